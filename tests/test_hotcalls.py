# The hit path's system calls: the C extension and the Python versions must
# behave the same (results, flags, fds, exceptions), and neither may lose or
# keep a descriptor. Each test runs against both, on real sockets and memfds.
from __future__ import annotations

import errno
import os
import resource
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from shadowd import hotcalls
from shadowd.bench import c_compiler
from shadowd.cache import Entry, HostKey
from shadowd.fds import close_all
from shadowd.memfd import sealed_from_bytes
from shadowd.protocol import ConnectionState, Open, ProtocolError, ServerConnection
from shadowd.server import count_open_fds

from .conftest import REPO_PATH

PY = SimpleNamespace(
    statx_nosync=hotcalls.py_statx_nosync,
    recv=hotcalls.py_recv,
    send=hotcalls.py_send,
    reopen=hotcalls.py_reopen,
    send_reopened=hotcalls.py_send_reopened,
    accept_peer=hotcalls.py_accept_peer,
)
PY.answer_hit = hotcalls.py_answer_hit
IMPLS = {"python": PY}
if hotcalls._c is not None:
    IMPLS["c"] = hotcalls._c  # type: ignore[assignment]


@pytest.fixture(params=sorted(IMPLS))
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    return IMPLS[request.param]


@pytest.fixture
def pair() -> Iterator[tuple[socket.socket, socket.socket]]:
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    b.setblocking(False)
    with a, b:
        yield a, b


@pytest.fixture
def proc_dir() -> Iterator[int]:
    fd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    yield fd
    os.close(fd)


def _c_toolchain() -> bool:
    include = sysconfig.get_paths()["include"]
    return c_compiler() is not None and os.path.exists(os.path.join(include, "Python.h"))


@pytest.mark.skipif(not _c_toolchain(), reason="no C compiler or Python headers here")
def test_the_extension_is_built_where_it_can_be() -> None:
    # The build is optional so that an install never fails for want of a
    # compiler; this catches a build that broke silently where one exists.
    if os.environ.get(hotcalls.DISABLE_ENV, "") not in ("", "0"):
        pytest.skip(f"{hotcalls.DISABLE_ENV} is set")
    assert hotcalls.IN_C, "shadowd/_hotcalls.c did not build; run pip install -e . and read why"


def test_the_environment_switch_selects_python() -> None:
    code = "from shadowd import hotcalls; print(hotcalls.IN_C, hotcalls.recv.__module__)"
    env = dict(os.environ, PYTHONPATH=REPO_PATH, SHADOWD_NO_C="1")
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True
    )
    assert out.stdout.split() == ["False", "shadowd.hotcalls"]


def test_statx_matches_fstat(impl: SimpleNamespace, tmp_path: Path) -> None:
    path = tmp_path / "f"
    path.write_bytes(b"x" * 1234)
    fd = os.open(path, os.O_RDONLY)
    try:
        got = impl.statx_nosync(fd)
        st = os.fstat(fd)
        assert got[:6] == (
            st.st_dev,
            st.st_ino,
            st.st_mode,
            st.st_size,
            st.st_mtime_ns,
            st.st_ctime_ns,
        )
        assert got == PY.statx_nosync(fd)  # the mount ID too
    finally:
        os.close(fd)


def test_statx_of_a_bad_fd_raises(impl: SimpleNamespace) -> None:
    with pytest.raises(OSError) as info:
        impl.statx_nosync(-1)
    assert info.value.errno == errno.EBADF


def test_recv_gives_bytes_flags_and_fds(
    impl: SimpleNamespace, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        hotcalls.py_send(a, b"hello", [fd, fd])
    finally:
        os.close(fd)
    buf = bytearray(64)
    n, flags, fds = impl.recv(b, buf, socket.CMSG_SPACE(8 * 4))
    try:
        assert bytes(buf[:n]) == b"hello"
        assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)
        assert len(fds) == 2
        for got in fds:
            assert os.get_inheritable(got) is False  # MSG_CMSG_CLOEXEC
            assert os.path.samestat(os.fstat(got), os.stat("/dev/null"))
    finally:
        for got in fds:
            os.close(got)


def test_recv_reports_truncation_and_returns_the_fds_that_came(
    impl: SimpleNamespace, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        hotcalls.py_send(a, b"x" * 100, [fd] * 4)
    finally:
        os.close(fd)
    baseline = count_open_fds()
    buf = bytearray(10)
    n, flags, fds = impl.recv(b, buf, socket.CMSG_LEN(4))
    assert n == 10
    assert flags & socket.MSG_TRUNC
    assert flags & socket.MSG_CTRUNC
    assert len(fds) == 1  # the kernel closed the ones without room
    assert count_open_fds() == baseline + 1
    os.close(fds[0])


def test_recv_of_an_empty_socket_and_of_an_ended_one(
    impl: SimpleNamespace, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    with pytest.raises(BlockingIOError):
        impl.recv(b, bytearray(16), 64)
    a.close()
    n, flags, fds = impl.recv(b, bytearray(16), 64)
    assert (n, fds) == (0, [])
    assert not flags & (socket.MSG_TRUNC | socket.MSG_CTRUNC)


def test_send_keeps_the_callers_fds_and_reports_a_full_socket(
    impl: SimpleNamespace, pair: tuple[socket.socket, socket.socket]
) -> None:
    a, b = pair
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        assert impl.send(a, b"abc", [fd]) == 3
        os.fstat(fd)  # still ours
        n, _, fds = hotcalls.py_recv(b, bytearray(8), 64)
        assert n == 3 and len(fds) == 1
        os.close(fds[0])
        with pytest.raises(BlockingIOError):
            while True:
                impl.send(a, b"y" * 4096, [])
        b.close()
        with pytest.raises(OSError) as info:
            impl.send(a, b"z", [fd])
        assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
    finally:
        os.close(fd)


def test_reopen_is_a_new_read_only_description(impl: SimpleNamespace, proc_dir: int) -> None:
    sealed = sealed_from_bytes(b"0123456789")
    try:
        one = impl.reopen(proc_dir, sealed.fd)
        two = impl.reopen(proc_dir, sealed.fd)
        try:
            assert os.read(one, 4) == b"0123"
            assert os.read(two, 4) == b"0123"  # its own offset
            with pytest.raises(OSError):
                os.write(one, b"x")
            assert os.get_inheritable(one) is False
        finally:
            os.close(one)
            os.close(two)
        with pytest.raises(OSError) as info:
            impl.reopen(proc_dir, -1)
        assert info.value.errno == errno.EBADF
    finally:
        sealed.holder.close()


def test_accept_peer_gives_a_high_nonblocking_socket_and_its_peer(
    impl: SimpleNamespace, tmp_path: Path
) -> None:
    path = str(tmp_path / "l.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK) as listener:
        listener.bind(path)
        listener.listen(4)
        before = count_open_fds()
        assert impl.accept_peer(listener.fileno(), 300) is None  # none waits: no exception
        assert count_open_fds() == before
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(path)
            fd, pid, uid, gid = impl.accept_peer(listener.fileno(), 300)
            try:
                assert fd >= 300
                assert (pid, uid, gid) == (os.getpid(), os.geteuid(), os.getegid())
                assert not os.get_blocking(fd)
                assert not os.get_inheritable(fd)
                # The client and the accepted socket: the low number it came on is closed.
                assert count_open_fds() == before + 2
                client.send(b"x")
                assert os.read(fd, 10) == b"x"  # the connection itself
            finally:
                os.close(fd)
        # No number free at or above the base: the socket stays where accept4 put it.
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as client:
            client.connect(path)
            soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
            fd, *_ = impl.accept_peer(listener.fileno(), soft)
            os.close(fd)
            assert fd < soft
        assert count_open_fds() == before


def test_accept_peer_of_a_socket_that_does_not_listen_raises(
    impl: SimpleNamespace, pair: tuple[socket.socket, socket.socket]
) -> None:
    before = count_open_fds()
    with pytest.raises(OSError) as info:
        impl.accept_peer(pair[0].fileno(), 300)
    assert info.value.errno in (errno.EINVAL, errno.EOPNOTSUPP)
    assert count_open_fds() == before


def _received(sock: socket.socket) -> tuple[bytes, list[int]]:
    buf = bytearray(64)
    n, _, fds = hotcalls.py_recv(sock, buf, 64)
    return bytes(buf[:n]), fds


def test_send_reopened_sends_a_fresh_fd_and_keeps_none(
    impl: SimpleNamespace, pair: tuple[socket.socket, socket.socket], proc_dir: int
) -> None:
    a, b = pair
    sealed = sealed_from_bytes(b"abcdef")
    try:
        os.lseek(sealed.fd, 3, os.SEEK_SET)
        baseline = count_open_fds()
        assert impl.send_reopened(a, b"reply", proc_dir, sealed.fd) == 0
        assert count_open_fds() == baseline  # the new fd went with the message only
        data, fds = _received(b)
        assert data == b"reply" and len(fds) == 1
        try:
            assert os.read(fds[0], 6) == b"abcdef"  # not the cache's offset
        finally:
            os.close(fds[0])
    finally:
        sealed.holder.close()


def test_send_reopened_failures(
    impl: SimpleNamespace, pair: tuple[socket.socket, socket.socket], proc_dir: int
) -> None:
    a, b = pair
    sealed = sealed_from_bytes(b"abcdef")
    try:
        baseline = count_open_fds()
        # A reopen that fails sends nothing and says why.
        assert impl.send_reopened(a, b"reply", proc_dir, -1) == errno.EBADF
        with pytest.raises(BlockingIOError):
            _received(b)

        def send() -> int:
            return int(impl.send_reopened(a, b"y" * 4096, proc_dir, sealed.fd))

        with pytest.raises(BlockingIOError):
            while True:
                send()
        assert count_open_fds() == baseline
        b.close()
        with pytest.raises(OSError) as info:
            send()
        assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
        assert count_open_fds() == baseline - 1  # only b is gone: no fd kept
    finally:
        sealed.holder.close()


# -- answer_hit: a whole hit in one call ----------------------------------


class _HitRig:
    """A cached file, its entry under its HostKey, and a socketpair to ask on."""

    def __init__(self, tmp_path: Path, data: bytes = b"cached bytes " * 50) -> None:
        self.path = tmp_path / "lib.so"
        self.path.write_bytes(data)
        self.data = data
        self.file = sealed_from_bytes(data)
        st = os.stat(self.path)
        self.key = HostKey(st.st_dev, st.st_ino)
        self.entry = Entry(
            key=self.key,
            version=(st.st_size, st.st_mtime_ns, st.st_ctime_ns),
            file=self.file,
            label=None,
            private=False,
            wd=1,  # watched, as every host entry the server keeps is
        )
        self.entries: dict[object, Entry] = {self.key: self.entry}
        self.trusted = True
        self.ours, self.theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.ours.setblocking(False)
        self.theirs.setblocking(False)
        self.buf = bytearray(65536)
        #: The fds an answered hit leaves for its caller to close.
        self.closing: list[int] = []

    def is_local(self, dev: int, mnt: int) -> bool:
        return self.trusted

    def ask(
        self,
        impl: SimpleNamespace,
        request: bytes,
        fds: list[int],
        max_file_size: int = 1 << 30,
        v2: bool = False,
    ) -> object:
        hotcalls.py_send(self.theirs, request, fds)
        return impl.answer_hit(
            self.ours,
            self.buf,
            socket.CMSG_SPACE(64 * 4),
            self.entries,
            self.is_local,
            max_file_size,
            self.closing,
            v2,
        )

    def close_used(self) -> int:
        """Close what an answered hit left to close; how many fds that was."""
        used = len(self.closing)
        close_all(self.closing)
        self.closing.clear()
        return used

    def reply(self) -> tuple[bytes, list[int]]:
        return _received(self.theirs)

    def close(self) -> None:
        self.ours.close()
        self.theirs.close()
        self.file.holder.close()


@pytest.fixture
def rig(tmp_path: Path) -> Iterator[_HitRig]:
    r = _HitRig(tmp_path)
    yield r
    r.close()


def _ready_connection() -> ServerConnection:
    proto = ServerConnection()
    proto.receive(msgpack.packb({"op": "hello", "id": 0, "version": 1}))
    assert proto.state is ConnectionState.READY
    return proto


needs_c = pytest.mark.skipif("c" not in IMPLS, reason="the C extension is not built")


@needs_c
@pytest.mark.parametrize("id", [0, 127, 128, 255, 256, 65535, 65536, 2**32 - 1, 2**32, 2**64 - 1])
@pytest.mark.parametrize("label", ["absent", None, "/usr/lib/libc.so.6", "/é/ü"])
def test_answer_hit_sends_protocol_bytes_and_a_fresh_fd(
    rig: _HitRig, id: int, label: str | None
) -> None:
    msg: dict[str, object] = {"op": "open", "id": id}
    if label != "absent":
        msg["path"] = label
    src = os.open(rig.path, os.O_RDONLY | os.O_CLOEXEC)
    baseline = count_open_fds()
    cache_offset = os.lseek(rig.file.fd, 0, os.SEEK_CUR)
    try:
        got = rig.ask(IMPLS["c"], msgpack.packb(msg), [src])
        assert got is rig.entry
        # The passed fd as received and the one sent, left for the round's end.
        assert rig.close_used() == 2
        assert count_open_fds() == baseline
        data, fds = rig.reply()
        assert data == _ready_connection().send_opened(id, len(rig.data), True)
        assert len(fds) == 1
        try:
            assert os.read(fds[0], len(rig.data) + 1) == rig.data
            assert os.fstat(fds[0]).st_ino == os.fstat(rig.file.fd).st_ino
            # Its own description: read from 0, the cache's offset untouched.
            assert os.lseek(rig.file.fd, 0, os.SEEK_CUR) == cache_offset
        finally:
            os.close(fds[0])
    finally:
        os.close(src)


@needs_c
@pytest.mark.parametrize(
    "mtime_ns", [0, 5, -1, -32, -33, -128, -129, -32768, -32769, -(2**31), -(2**31) - 1, -(2**62)]
)
@pytest.mark.parametrize("wait", ["absent", True, False])
def test_answer_hit_says_the_version_to_a_version_2_connection(
    rig: _HitRig, mtime_ns: int, wait: object
) -> None:
    """A version 2 reply, byte for byte protocol.py's, with any mtime (signed) and ``wait``."""
    os.utime(rig.path, ns=(0, mtime_ns))
    st = os.stat(rig.path)
    version = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
    rig.entry.version = version
    msg: dict[str, object] = {"op": "open", "id": 300, "path": str(rig.path)}
    if wait != "absent":
        msg["wait"] = wait
    src = os.open(rig.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert rig.ask(IMPLS["c"], msgpack.packb(msg), [src], v2=True) is rig.entry
        rig.close_used()
        data, fds = rig.reply()
        close_all(fds)
        proto = ServerConnection()
        proto.receive(msgpack.packb({"op": "hello", "id": 0, "version": 2}))
        assert data == proto.send_opened(300, len(rig.data), True, version)
        assert msgpack.unpackb(data)["version"] == list(version)
        # And to a version 1 connection, the reply of version 1 (wait is a key it ignores).
        assert rig.ask(IMPLS["c"], msgpack.packb(msg), [src]) is rig.entry
        rig.close_used()
        data, fds = rig.reply()
        close_all(fds)
        assert data == _ready_connection().send_opened(300, len(rig.data), True)
    finally:
        os.close(src)


def _declined(rig: _HitRig, got: object, request: bytes, nfds: int) -> None:
    """*got* is recv()'s tuple for *request*: nothing was sent, the fds came back."""
    assert type(got) is tuple
    assert rig.closing == []
    n, _flags, fds = got
    try:
        assert bytes(rig.buf[:n]) == request[: len(rig.buf)]
        assert len(fds) == nfds
    finally:
        for fd in fds:
            os.close(fd)
    with pytest.raises(BlockingIOError):
        rig.reply()


def test_answer_hit_declines_what_it_does_not_answer(
    impl: SimpleNamespace, rig: _HitRig, tmp_path: Path
) -> None:
    canonical = msgpack.packb({"op": "open", "id": 7, "path": str(rig.path)})
    src = os.open(rig.path, os.O_RDONLY | os.O_CLOEXEC)
    other = tmp_path / "other"
    other.write_bytes(b"not cached")
    baseline = count_open_fds()
    try:
        if impl is PY:  # the Python version leaves every hit to the server
            _declined(rig, rig.ask(impl, canonical, [src]), canonical, 1)
        # Not cached; another version; an untrusted file system; too large.
        with open(other, "rb") as f:
            _declined(rig, rig.ask(impl, canonical, [f.fileno()]), canonical, 1)
        rig.entry.version = (len(rig.data), 1, 2)
        _declined(rig, rig.ask(impl, canonical, [src]), canonical, 1)
        rig.entry.version = (len(rig.data), *os.stat(rig.path)[8:10])  # whole seconds: not it
        _declined(rig, rig.ask(impl, canonical, [src]), canonical, 1)
        st = os.stat(rig.path)
        rig.entry.version = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        rig.trusted = False
        _declined(rig, rig.ask(impl, canonical, [src]), canonical, 1)
        rig.trusted = True
        _declined(rig, rig.ask(impl, canonical, [src], max_file_size=10), canonical, 1)
        # Not watched (an entry restored at start): Python vouches for it first.
        rig.entry.wd = -1
        _declined(rig, rig.ask(impl, canonical, [src]), canonical, 1)
        rig.entry.wd = 1
        # Its memfd changed by a holder (mode, ACL, times): Python replaces it.
        stamp = rig.file.stamp
        held = os.open(f"/proc/self/fd/{rig.file.fd}", os.O_RDONLY | os.O_CLOEXEC)
        try:
            os.utime(held, ns=(1, 1))
            _declined(rig, rig.ask(impl, canonical, [src]), canonical, 1)
            os.fchmod(held, 0o400)  # the exec bits are sealed; these are not
            _declined(rig, rig.ask(impl, canonical, [src]), canonical, 1)
        finally:
            os.close(held)
        assert rig.file.stamp == stamp and not rig.file.intact()
        rig.file.stamp = (os.fstat(rig.file.fd).st_mode, os.fstat(rig.file.fd).st_ctime_ns)
        # Not readable, not regular, not one fd, not this op.
        opath = os.open(rig.path, os.O_PATH | os.O_CLOEXEC)
        wronly = os.open(rig.path, os.O_WRONLY | os.O_CLOEXEC)
        try:
            _declined(rig, rig.ask(impl, canonical, [opath]), canonical, 1)
            _declined(rig, rig.ask(impl, canonical, [wronly]), canonical, 1)
        finally:
            os.close(opath)
            os.close(wronly)
        directory = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _declined(rig, rig.ask(impl, canonical, [directory]), canonical, 1)
        finally:
            os.close(directory)
        _declined(rig, rig.ask(impl, canonical, [src, src]), canonical, 2)
        _declined(rig, rig.ask(impl, canonical, []), canonical, 0)
        batch = msgpack.packb({"op": "open_batch", "id": 7})
        _declined(rig, rig.ask(impl, batch, [src]), batch, 1)
        # A reply that does not fit: declined, to be sent in turn.
        while True:
            try:
                hotcalls.py_send(rig.ours, b"x" * 4096, [])
            except BlockingIOError:
                break
        got = rig.ask(impl, canonical, [src])
        assert type(got) is tuple
        for fd in got[2]:
            os.close(fd)
        assert count_open_fds() == baseline
    finally:
        os.close(src)


class _Interrupt(BaseException):
    pass


@needs_c
def test_answer_hit_leaves_an_error_of_the_trust_check_to_the_python_path(rig: _HitRig) -> None:
    def broken(dev: int, mnt: int) -> bool:
        raise RuntimeError("a bug in the trust check")

    rig.is_local = broken  # type: ignore[method-assign]
    request = msgpack.packb({"op": "open", "id": 1})
    src = os.open(rig.path, os.O_RDONLY | os.O_CLOEXEC)
    baseline = count_open_fds()
    try:
        # Declined, fd and all: the Python path meets the same error and
        # answers the request with an internal error.
        _declined(rig, rig.ask(IMPLS["c"], request, [src]), request, 1)
        assert count_open_fds() == baseline
    finally:
        os.close(src)


@needs_c
def test_answer_hit_passes_on_an_interrupt_and_keeps_no_fd(rig: _HitRig) -> None:
    def interrupted(dev: int, mnt: int) -> bool:
        raise _Interrupt()

    rig.is_local = interrupted  # type: ignore[method-assign]
    src = os.open(rig.path, os.O_RDONLY | os.O_CLOEXEC)
    baseline = count_open_fds()
    try:
        with pytest.raises(_Interrupt):
            rig.ask(IMPLS["c"], msgpack.packb({"op": "open", "id": 1}), [src])
        assert count_open_fds() == baseline
        assert rig.closing == []
    finally:
        os.close(src)


def test_timestamps_past_2262_are_exact_and_never_answered_from_c(
    impl: SimpleNamespace, rig: _HitRig
) -> None:
    # 64-bit nanoseconds end in 2262; files may carry later times.
    far = 10**19 + 5
    os.utime(rig.path, ns=(far, far))
    fd = os.open(rig.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = os.fstat(fd)
        assert st.st_mtime_ns == far
        assert impl.statx_nosync(fd)[4] == far
        rig.entry.version = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        request = msgpack.packb({"op": "open", "id": 3})
        _declined(rig, rig.ask(impl, request, [fd]), request, 1)
    finally:
        os.close(fd)


_values = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=False),
    st.text(max_size=8),
    st.binary(max_size=8),
    st.sampled_from(["open", "open_batch", "stats", "/lib/x.so"]),
    st.text(min_size=1020, max_size=1030),
)
_maps = st.dictionaries(
    st.sampled_from(["op", "id", "path", "x", b"op", "Op"]), _values, max_size=4
).map(lambda m: {**m, "op": "open"} if "op" in m and m["op"] is None else m)


@needs_c
@settings(
    max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    msg=st.one_of(_maps, st.fixed_dictionaries({"op": st.just("open"), "id": _values})),
    mutate=st.one_of(st.none(), st.tuples(st.integers(0, 40), st.integers(0, 255))),
    trailing=st.binary(max_size=2),
)
def test_answer_hit_answers_only_what_protocol_py_reads_as_that_open(
    rig: _HitRig, msg: dict[object, object], mutate: tuple[int, int] | None, trailing: bytes
) -> None:
    request = bytearray(msgpack.packb(msg))
    if mutate is not None and mutate[0] < len(request):
        request[mutate[0]] = mutate[1]
    request += trailing
    src = os.open(rig.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            event = _ready_connection().receive(bytes(request), [src])
        except ProtocolError:
            event = None
        got = rig.ask(IMPLS["c"], bytes(request), [src])
        if got is rig.entry:
            # It answered: protocol.py reads the same datagram as that open.
            assert rig.close_used() == 2
            assert isinstance(event, Open) and event.fd == src
            data, fds = rig.reply()
            close_all(fds)
            assert data == _ready_connection().send_opened(event.id, len(rig.data), True)
        else:
            _declined(rig, got, bytes(request), 1)
            # The plain request, in whatever msgpack form, is always answered.
            assert not (
                isinstance(event, Open)
                and set(msg) <= {"op", "id", "path"}
                and not trailing
                and mutate is None
                and (event.label is None or len(event.label.encode()) <= 1024)
            )
    finally:
        os.close(src)


@needs_c
@pytest.mark.parametrize(
    "label",
    [
        b"/lib/\xe2\x82\xac",  # valid: a 3-byte character
        b"/lib/\xf0\x9f\x98\x80",  # valid: a 4-byte character
        b"/lib/\xff",
        b"/lib/\xc0\x80",  # overlong NUL
        b"/lib/\xe0\x80\x80",  # overlong, 3 bytes
        b"/lib/\xed\xa0\x80",  # a surrogate
        b"/lib/\xf4\x90\x80\x80",  # past U+10FFFF
        b"/lib/\xe2\x82",  # cut short
        b"/lib/\x80",  # a lone continuation byte
    ],
)
def test_answer_hit_reads_labels_as_strictly_as_protocol_py(rig: _HitRig, label: bytes) -> None:
    # A label that is not UTF-8 makes the request malformed to protocol.py;
    # the C path must not answer it as a hit.
    request = b"\x83\xa2op\xa4open\xa2id\x05\xa4path" + bytes([0xA0 | len(label)]) + label
    src = os.open(rig.path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        try:
            _ready_connection().receive(request, [src])
            valid = True
        except ProtocolError:
            valid = False
        got = rig.ask(IMPLS["c"], request, [src])
        if valid:
            assert got is rig.entry
            assert rig.close_used() == 2
            close_all(rig.reply()[1])
        else:
            _declined(rig, got, request, 1)
    finally:
        os.close(src)
