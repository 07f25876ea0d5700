# The hit path's system calls: the C extension and the Python versions must
# behave the same (results, flags, fds, exceptions), and neither may lose or
# keep a descriptor. Each test runs against both, on real sockets and memfds.
from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
import sys
import sysconfig
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

import pytest

from shadowd import hotcalls
from shadowd.memfd import sealed_from_bytes

from .conftest import REPO_PATH

PY = SimpleNamespace(
    statx_nosync=hotcalls.py_statx_nosync,
    recv=hotcalls.py_recv,
    send=hotcalls.py_send,
    reopen=hotcalls.py_reopen,
    send_reopened=hotcalls.py_send_reopened,
)
IMPLS = {"python": PY}
if hotcalls._c is not None:
    IMPLS["c"] = hotcalls._c  # type: ignore[assignment]


@pytest.fixture(params=sorted(IMPLS))
def impl(request: pytest.FixtureRequest) -> SimpleNamespace:
    return IMPLS[request.param]


def _open_fds() -> int:
    return len(os.listdir("/proc/self/fd"))


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
    return bool(shutil.which("cc") or shutil.which("gcc")) and os.path.exists(
        os.path.join(include, "Python.h")
    )


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
    baseline = _open_fds()
    buf = bytearray(10)
    n, flags, fds = impl.recv(b, buf, socket.CMSG_LEN(4))
    assert n == 10
    assert flags & socket.MSG_TRUNC
    assert flags & socket.MSG_CTRUNC
    assert len(fds) == 1  # the kernel closed the ones without room
    assert _open_fds() == baseline + 1
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
        baseline = _open_fds()
        assert impl.send_reopened(a, b"reply", proc_dir, sealed.fd) == 0
        assert _open_fds() == baseline  # the new fd went with the message only
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
        baseline = _open_fds()
        # A reopen that fails sends nothing and says why.
        assert impl.send_reopened(a, b"reply", proc_dir, -1) == errno.EBADF
        with pytest.raises(BlockingIOError):
            _received(b)

        def send() -> int:
            return int(impl.send_reopened(a, b"y" * 4096, proc_dir, sealed.fd))

        with pytest.raises(BlockingIOError):
            while True:
                send()
        assert _open_fds() == baseline
        b.close()
        with pytest.raises(OSError) as info:
            send()
        assert info.value.errno in (errno.EPIPE, errno.ECONNRESET)
        assert _open_fds() == baseline - 1  # only b is gone: no fd kept
    finally:
        sealed.holder.close()
