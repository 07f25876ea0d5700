# The client library: its error family, reconnection across a daemon restart,
# the trio client's pipelining, the local fallback, and refusing bad fds.
from __future__ import annotations

import array
import fcntl
import os
import signal
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from shadowd_client import (
    AsyncClient,
    Client,
    DaemonUnavailable,
    NotRegularFile,
    Opener,
    ShadowdError,
    SourceError,
    UnsealedDescriptor,
    local_copy,
)

from shadowd.memfd import REQUIRED_SEALS

from .conftest import Daemon, make_file, read_fd, settle


async def call(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def test_errors_are_one_family(tmp_path: Path) -> None:
    with Client(tmp_path / "nobody-home.sock", timeout=2) as c:
        with pytest.raises(DaemonUnavailable) as info:
            c.stats()
        assert str(tmp_path / "nobody-home.sock") in str(info.value)
        with pytest.raises(SourceError) as info2:
            c.open(tmp_path / "missing")
        assert info2.value.errno == 2
        assert str(info2.value) == f"cannot open {tmp_path / 'missing'}: No such file or directory"
        with pytest.raises(SourceError) as info3:
            c.open("")
        assert str(info3.value) == "cannot open '': No such file or directory"  # not "open :"
    for exc in (DaemonUnavailable, SourceError, NotRegularFile, UnsealedDescriptor):
        assert issubclass(exc, ShadowdError)


def test_client_finds_a_socket_path_without_being_told(
    monkeypatch: pytest.MonkeyPatch, host_sockets: None
) -> None:
    from shadowd.paths import ROOT_SOCKET, is_socket

    monkeypatch.delenv("SHADOWD_SOCKET", raising=False)
    monkeypatch.delenv("XDG_RUNTIME_DIR", raising=False)
    uid = os.geteuid()
    user = f"/run/user/{uid}/shadowd/shadowd.sock"
    if uid == 0:
        assert Client().socket_path == ROOT_SOCKET
    else:
        assert Client().socket_path == (
            ROOT_SOCKET if is_socket(ROOT_SOCKET) and not is_socket(user) else user
        )
    monkeypatch.setenv("SHADOWD_SOCKET", "/somewhere/s.sock")
    assert Client().socket_path == "/somewhere/s.sock"
    monkeypatch.setenv("SHADOWD_SOCKET", "")  # empty: as if unset
    assert Client().socket_path in (user, ROOT_SOCKET)


async def test_client_survives_a_daemon_restart(start_daemon: Any, tmp_path: Path) -> None:
    first = await start_daemon("--racy-window", "0.05", socket_name="r.sock")
    f = make_file(tmp_path / "f", b"before and after")
    settle(f)
    client = Client(first.socket_path, timeout=10)
    try:
        with trio.fail_after(60):
            before = await call(client.open, f)
            assert await first.terminate() == 0
            await start_daemon("--racy-window", "0.05", socket_name="r.sock")
            after = await call(client.open, f)  # same Client object, new connection
            assert read_fd(before) == read_fd(after) == b"before and after"
            os.close(before)
            os.close(after)
    finally:
        client.close()


async def test_async_client_survives_a_daemon_restart(start_daemon: Any, tmp_path: Path) -> None:
    first = await start_daemon("--racy-window", "0.05", socket_name="ra.sock")
    f = make_file(tmp_path / "f", b"async")
    settle(f)
    with trio.fail_after(60):
        async with AsyncClient(first.socket_path, timeout=10) as client:
            os.close(await client.open(f))
            assert await first.terminate() == 0
            await start_daemon("--racy-window", "0.05", socket_name="ra.sock")
            fd = await client.open(f)
            assert read_fd(fd) == b"async"
            os.close(fd)


async def test_async_client_pipelines_many_tasks(daemon: Daemon, tmp_path: Path) -> None:
    files = [make_file(tmp_path / f"f{i}", os.urandom(1000 + i)) for i in range(20)]
    settle(*files)
    with trio.fail_after(60):
        async with AsyncClient(daemon.socket_path, timeout=30) as client:

            async def worker(i: int) -> None:
                for j in range(25):
                    f = files[(i + j) % len(files)]
                    fd = await client.open(f)
                    try:
                        assert read_fd(fd) == f.read_bytes()
                    finally:
                        os.close(fd)

            async with trio.open_nursery() as nursery:
                for i in range(20):
                    nursery.start_soon(worker, i)
            s = await client.stats()
            assert s["hits"] + s["misses"] == 500 and s["copies"] == 20
            batch = await client.open_many(files[:3])
            for fd, f in zip(batch, files, strict=False):
                assert read_fd(fd) == f.read_bytes()
                os.close(fd)


async def test_async_client_cancelled_request_leaks_nothing(daemon: Daemon, tmp_path: Path) -> None:
    big = make_file(tmp_path / "big", os.urandom(20 * 1024 * 1024))
    settle(big)
    with trio.fail_after(60):
        async with AsyncClient(daemon.socket_path, timeout=30) as client:
            await client.connect()
            before = len(os.listdir("/proc/self/fd"))
            # The daemon stopped: the request is sent well within the half second
            # (a timer of 1 ms could end before the send, under load), and its
            # reply cannot come before the cancel.
            os.kill(daemon.pid, signal.SIGSTOP)
            try:
                with trio.move_on_after(0.5):
                    await client.open(big)
            finally:
                os.kill(daemon.pid, signal.SIGCONT)
            small = make_file(tmp_path / "small", b"ok")
            conn = client._conn
            assert conn is not None and conn.abandoned
            # The cancelled request's reply (an fd, once the copy is done) is read
            # and closed while a later request waits for its own.
            while conn.abandoned:
                fd = await client.open(small)
                os.close(fd)
                await trio.sleep(0.01)
            assert len(os.listdir("/proc/self/fd")) == before


def test_local_copy_is_the_same_kind_of_fd(tmp_path: Path) -> None:
    f = make_file(tmp_path / "tool", b"#!/bin/sh\necho hi\n", mode=0o755)
    fd = local_copy(f)
    try:
        assert read_fd(fd) == f.read_bytes()
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert os.fstat(fd).st_mode & 0o111
        assert os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:")
    finally:
        os.close(fd)
    with pytest.raises(NotRegularFile):
        local_copy("/dev/null")


async def test_opener_falls_back_when_the_daemon_is_down(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon("--racy-window", "0.05", socket_name="o.sock")
    f = make_file(tmp_path / "f", b"either way")
    settle(f)
    # No process-local tier: every open asks the daemon (when it is up).
    opener = Opener(d.socket_path, retry_after=0.2, local_below=0, held_files=0, use_index=False)

    async def until_served(count: int) -> None:
        # A miss is copied here while the daemon fills its cache; then it hits.
        while opener.daemon_opens < count:
            fd = await call(opener.open, f)
            assert read_fd(fd) == b"either way"
            os.close(fd)
            await trio.sleep(0.02)

    try:
        with trio.fail_after(60):
            await until_served(1)
            assert await d.terminate() == 0
            local = opener.local_opens
            fd = await call(opener.open, f)  # no daemon: a local copy
            assert read_fd(fd) == b"either way"
            os.close(fd)
            assert opener.local_opens == local + 1
            await start_daemon("--racy-window", "0.05", socket_name="o.sock")
            await until_served(2)  # back to the daemon, once the breaker's window is over
            with pytest.raises(NotRegularFile):
                await call(opener.open, "/dev/zero")
    finally:
        opener.close()


async def test_opener_routes_by_size(daemon: Daemon, tmp_path: Path) -> None:
    small = make_file(tmp_path / "small", b"tiny")
    large = make_file(tmp_path / "large", os.urandom(8192))
    settle(small, large, window=1.0)  # older than the daemon's racy window

    def work() -> None:
        with Opener(daemon.socket_path, local_below=4096, held_files=0, use_index=False) as opener:
            for f in (small, large, small):
                fd = opener.open(f)
                assert read_fd(fd) == f.read_bytes()
                os.close(fd)
            # The large file's first open missed (copied here, the daemon filling).
            assert (opener.local_opens, opener.daemon_opens) == (3, 0)
            deadline = time.monotonic() + 10
            while opener.daemon_opens == 0 and time.monotonic() < deadline:
                os.close(opener.open(large))
            assert opener.daemon_opens == 1
        with Client(daemon.socket_path, timeout=10) as c:
            s = c.stats()
            assert s["misses"] >= 1 and s["entries"] == 1  # the small file never reached it

    with trio.fail_after(30):
        await call(work)


def _fake_daemon_socket(path: Path) -> socket.socket:
    """A listening SEQPACKET socket at *path*, for a stand-in daemon the test plays."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    return listener


async def test_client_refuses_an_unsealed_fd(shared_dir: Path, tmp_path: Path) -> None:
    """A fake daemon that answers with a plain, unsealed memfd."""
    path = shared_dir / "fake.sock"
    listener = _fake_daemon_socket(path)
    f = make_file(tmp_path / "f", b"data")

    def fake_daemon() -> None:
        conn, _ = listener.accept()
        with conn:
            for _ in range(2):
                data, anc, _flags, _ = conn.recvmsg(4096, 256)
                for _level, _kind, raw in anc:
                    for fd in array.array("i", raw):
                        os.close(fd)
                msg = msgpack.unpackb(data)
                if msg["op"] == "hello":
                    conn.send(
                        msgpack.packb(
                            {
                                "id": msg["id"],
                                "ok": True,
                                "version": 1,
                                "server": "fake",
                                "limits": {},
                            }
                        )
                    )
                else:
                    bad = os.memfd_create("unsealed")
                    os.write(bad, b"evil")
                    conn.sendmsg(
                        [msgpack.packb({"id": msg["id"], "ok": True, "size": 4, "hit": True})],
                        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [bad]))],
                    )
                    os.close(bad)

    def client_side() -> None:
        with Client(path, timeout=10) as c, pytest.raises(UnsealedDescriptor):
            c.open(f)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, fake_daemon)
                await call(client_side)
    finally:
        listener.close()
    # The fake closed its own copy; the client must have closed the one it got.
    links = []
    for name in os.listdir("/proc/self/fd"):
        try:
            links.append(os.readlink(f"/proc/self/fd/{name}"))
        except OSError:
            pass
    assert not [link for link in links if "unsealed" in link]


@pytest.mark.parametrize("version", [0, 3])
async def test_a_daemon_speaking_a_version_this_client_does_not_is_refused(
    shared_dir: Path, tmp_path: Path, version: int
) -> None:
    """A hello answered with protocol version 0, or 3 (a newer major version, to a
    client that said 2): both clients raise UnsupportedProtocolVersion, which names the
    socket and both versions; an Opener copies locally at once, as while the daemon is
    down, and says hello again only after its breaker's window."""
    from shadowd_client import ProtocolViolation, UnsupportedProtocolVersion

    path = shared_dir / "newer.sock"
    listener = _fake_daemon_socket(path)
    listener.settimeout(0.1)
    f = make_file(tmp_path / "lib.so", os.urandom(300_000))
    hellos: list[int] = []
    stop = False

    def fake_daemon() -> None:
        conns = []
        while not stop:
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            conn.settimeout(5)
            data = conn.recv(4096)
            msg = msgpack.unpackb(data)
            hellos.append(msg["version"])
            reply = {"id": msg["id"], "ok": True, "version": version, "server": "newer"}
            conn.send(msgpack.packb({**reply, "limits": {}}))
        for conn in conns:
            conn.close()

    def sync_side() -> None:
        with Client(path, timeout=5) as c, pytest.raises(UnsupportedProtocolVersion) as info:
            c.open(f)
        err = info.value
        assert isinstance(err, ProtocolViolation) and err.version == version
        assert str(path) in str(err) and f"protocol version {version};" in str(err)
        assert "this client speaks 1 to 2" in str(err), str(err)
        with Opener(path, timeout=5, retry_after=30) as opener:
            fds = [opener.open(f) for _ in range(3)]
            try:
                assert all(read_fd(fd) == f.read_bytes() for fd in fds)
                assert opener.local_opens == 3 and opener.daemon_opens == 0
            finally:
                for fd in fds:
                    os.close(fd)

    async def async_side() -> None:
        async with AsyncClient(path, timeout=5) as client:
            with pytest.raises(UnsupportedProtocolVersion) as info:
                await client.stats()
        assert info.value.version == version and str(path) in str(info.value)

    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(call, fake_daemon)
                try:
                    await call(sync_side)
                    await async_side()
                finally:
                    stop = True
    finally:
        listener.close()
    # Each client said 2 once: the Opener's one hello opened its breaker for 30 s.
    assert hellos == [2, 2, 2], hellos


async def test_client_times_out_on_a_silent_daemon(shared_dir: Path, tmp_path: Path) -> None:
    """A daemon that accepts and never answers: the timeout, not a hang."""
    from shadowd_client import DaemonTimeout

    path = shared_dir / "silent.sock"
    listener = _fake_daemon_socket(path)
    f = make_file(tmp_path / "f", b"x")

    def client_side() -> float:
        t0 = time.monotonic()
        with Client(path, timeout=0.3) as c, pytest.raises(DaemonTimeout):
            c.open(f)
        return time.monotonic() - t0

    try:
        with trio.fail_after(10):
            elapsed = await call(client_side)
        assert elapsed < 3
    finally:
        listener.close()


async def test_a_forked_child_talks_to_the_daemon_on_a_connection_of_its_own(
    daemon: Daemon, tmp_path: Path
) -> None:
    """Parent and child open files at the same time through one Client object made
    before the fork: each gets its own files' bytes (one shared connection would
    hand each process some of the other's replies)."""
    files = [make_file(tmp_path / f"f{i}", os.urandom(2000 + i)) for i in range(8)]
    settle(*files)
    want = {f: f.read_bytes() for f in files}
    client = Client(daemon.socket_path, timeout=10)

    def opens(offset: int) -> bytes:
        try:
            for k in range(300):
                f = files[(k + offset) % len(files)]
                fd = client.open(f)
                try:
                    if os.pread(fd, 1 << 16, 0) != want[f]:
                        return b"wrong bytes"
                finally:
                    os.close(fd)
        except Exception as exc:  # the child reports it through the pipe
            return repr(exc).encode()[:300]
        return b"ok"

    def body() -> tuple[bytes, bytes, int]:
        os.close(client.open(files[0]))  # connected before the fork
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            verdict = b"child died"
            try:
                verdict = opens(3)
            finally:
                os.write(w, verdict)
                os._exit(0)
        os.close(w)
        try:
            mine = opens(0)
            theirs = os.read(r, 400)
        finally:
            os.close(r)
            os.waitpid(pid, 0)
        return mine, theirs, client.connections

    try:
        with trio.fail_after(60):
            mine, theirs, connections = await trio.to_thread.run_sync(body)
    finally:
        client.close()
    assert (mine, theirs) == (b"ok", b"ok")
    assert connections == 1  # the parent kept its connection


async def test_a_refusal_of_open_path_names_the_path(daemon: Daemon, tmp_path: Path) -> None:
    """The daemon sees only a descriptor, so its refusal names none; Client.open,
    open_many and AsyncClient.open name the path they were asked for (they said only
    "only regular files are served; the passed fd is a character device")."""
    fifo = tmp_path / "a fifo"
    os.mkfifo(fifo)

    def sync() -> list[str]:
        messages = []
        with Client(daemon.socket_path, timeout=10) as c:
            for path in ("/dev/null", fifo):
                with pytest.raises(NotRegularFile) as caught:
                    c.open(path)
                messages.append(str(caught.value))
            got = c.open_many(["/dev/null", fifo], return_exceptions=True)
            messages += [str(e) for e in got]
        return messages

    with trio.fail_after(30):
        messages = await trio.to_thread.run_sync(sync)
        async with AsyncClient(daemon.socket_path) as ac:
            with pytest.raises(NotRegularFile) as caught:
                await ac.open("/dev/null")
    assert messages[0].startswith("/dev/null: only regular files are served"), messages
    assert messages[1].startswith(f"{fifo}: "), messages
    assert messages[2].startswith("/dev/null: ") and messages[3].startswith(f"{fifo}: ")
    assert str(caught.value).startswith("/dev/null: "), caught.value
    assert caught.value.code == "not-regular"
