# Operations end to end: the daemon under systemd-socket-activate, under a
# stand-in service manager that keeps its fd store across restarts, and seen
# from a client that lives through the restart. Real subprocesses, sockets,
# memfds and SCM_RIGHTS throughout.
from __future__ import annotations

import fcntl
import os
import shutil
import signal
import socket
import struct
import subprocess
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from shadowd_client import Client

from shadowd.cache import HostKey
from shadowd.daemon import START_DELAY_VARIABLE
from shadowd.fdstore import StoredName
from shadowd.memfd import REQUIRED_SEALS
from shadowd.source import stat_nosync

from .conftest import REPO_PATH, make_file, read_fd, settle
from .indexed import cached_view
from .manager import SERVE, ServiceManager, running
from .test_cli import run as run_shadowd


async def call(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


@pytest.fixture
async def manager(shared_dir: Path) -> AsyncIterator[ServiceManager]:
    async with running(shared_dir) as m:
        yield m


def stored_name(path: Path, *, labelled: bool = True) -> str:
    """The FDNAME the daemon gives *path*'s current version (labelled as the client does)."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        st = stat_nosync(fd)
    finally:
        os.close(fd)
    assert st is not None
    return StoredName(
        key=HostKey(st.dev, st.ino),
        version=st.version,
        label=str(path) if labelled else None,
        mnt=st.mnt,
    ).format()


def names_for(manager: ServiceManager, path: Path) -> list[str]:
    return [n for n in manager.store if n.startswith(stored_name(path, labelled=False))]


# -- warm restarts ------------------------------------------------------------


async def test_restart_keeps_the_cache_warm_and_the_client_working(
    manager: ServiceManager, tmp_path: Path
) -> None:
    lib = make_file(tmp_path / "libc.so.6", os.urandom(300_000), 0o755)
    conf = make_file(tmp_path / "ld.so.conf", b"include /etc/ld.so.conf.d/*.conf\n")
    settle(lib, conf)
    client = Client(manager.socket_path, timeout=10)
    try:
        with trio.fail_after(60):
            await manager.start_ready("--racy-window", "0.05")
            before = await call(client.open, lib)
            os.close(await call(client.open, conf))
            await manager.wait_until(lambda: len(manager.store) == 2)
            assert list(manager.store) == [stored_name(lib), stored_name(conf)]

            index = len(manager.messages)
            assert await manager.stop() == 0
            await manager.wait_for("STOPPING", after=index)
            assert len(manager.store) == 2  # stopping removes nothing from the store
            # The descriptor handed out before the restart outlives its daemon.
            assert read_fd(before) == lib.read_bytes()
            assert fcntl.fcntl(before, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS

            await manager.start_ready("--racy-window", "0.05")
            # The same Client object: its connection broke, it reconnects once.
            after = await call(client.open, lib)
            assert read_fd(after) == lib.read_bytes()
            assert os.fstat(after).st_mode & 0o111  # still executable
            stats = await call(client.stats)
            assert (stats["hits"], stats["misses"], stats["copies"]) == (1, 0, 0)
            assert stats["restored_entries"] == 2 and stats["fdstore_entries"] == 2
            assert stats["entries"] == 2
            # The label came back with the entry: it counts among the top files.
            assert [t["path"] for t in stats["top_by_hits"]] == [str(lib)]
            os.close(before)
            os.close(after)
            assert await manager.stop() == 0
    finally:
        client.close()
    assert "warm restart: 2 of 2 stored descriptors back in the cache" in manager.log()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
@pytest.mark.parametrize("passed", [False, True], ids=["own-socket", "socket-activated"])
async def test_a_stop_signal_while_the_daemon_starts_is_a_clean_stop(
    manager: ServiceManager,
    monkeypatch: pytest.MonkeyPatch,
    shared_dir: Path,
    sig: signal.Signals,
    passed: bool,
) -> None:
    """A stop signal that comes before the daemon handles signals itself (its
    socket made, its fd store being restored) is held until it does: STOPPING=1,
    never READY=1, the socket it created removed, exit 0. Before, SIGTERM killed
    it there (leaving its socket file) and SIGINT ended it with a traceback."""
    monkeypatch.setenv(START_DELAY_VARIABLE, "3600")
    own = shared_dir / "own.sock"
    args = () if passed else ("--socket", str(own))
    index = manager.start(*args, with_socket=passed)
    await manager.wait_for_log(f"{START_DELAY_VARIABLE}=3600")
    if not passed:
        assert own.is_socket()
    assert await manager.stop(sig) == 0, manager.log()
    got = await manager.said_since(index)
    assert got == [{"STOPPING": "1", "STATUS": "stopping: finishing in-flight requests"}]
    if passed:
        assert manager.socket_path.is_socket()  # the manager's, kept for the next start
    else:
        assert not own.exists()
    log = manager.log()
    assert "never served" in log and "Traceback" not in log, log


async def test_a_service_without_a_socket_unit_binds_its_own_and_restores(
    manager: ServiceManager, shared_dir: Path, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "f", os.urandom(1000))
    settle(f)
    own = shared_dir / "own.sock"
    with trio.fail_after(60):
        await manager.start_ready("--racy-window", "0.05", "--socket", str(own), with_socket=False)
        assert own.exists()  # not passed: created by the daemon
        with Client(own, timeout=10) as c:
            os.close(await call(c.open, f))
        await manager.wait_until(lambda: len(manager.store) == 1)
        assert await manager.stop() == 0
        assert not own.exists()  # created by the daemon: removed by it

        await manager.start_ready("--racy-window", "0.05", "--socket", str(own), with_socket=False)
        with Client(own, timeout=10) as c:
            fd = await call(c.open, f)
            assert read_fd(fd) == f.read_bytes()
            os.close(fd)
            stats = await call(c.stats)
        assert (stats["hits"], stats["misses"], stats["restored_entries"]) == (1, 0, 1)
        assert await manager.stop() == 0


async def test_a_file_changed_during_the_restart_is_served_fresh(
    manager: ServiceManager, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "config", b"old bytes, same size")
    settle(f)
    old_name = None
    with trio.fail_after(60):
        await manager.start_ready("--racy-window", "0.05")
        with Client(manager.socket_path, timeout=10) as c:
            os.close(await call(c.open, f))
        await manager.wait_until(lambda: len(manager.store) == 1)
        old_name = next(iter(manager.store))
        assert await manager.stop() == 0

        # Same size, old mtime put back: only ctime tells.
        st = f.stat()
        f.write_bytes(b"NEW BYTES, SAME SIZE")
        os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))
        settle(f)

        index = await manager.start_ready("--racy-window", "0.05")
        with Client(manager.socket_path, timeout=10) as c:
            fd = await call(c.open, f)
            assert read_fd(fd) == b"NEW BYTES, SAME SIZE"
            os.close(fd)
            stats = await call(c.stats)
        assert (stats["hits"], stats["misses"], stats["invalidations"]) == (0, 1, 1)
        # The stale descriptor left the store; the new version went in.
        await manager.wait_for("FDSTOREREMOVE", after=index)
        await manager.wait_until(lambda: list(manager.store) == [stored_name(f)])
        assert old_name not in manager.store
        assert await manager.stop() == 0


async def test_eviction_removes_from_the_store(manager: ServiceManager, tmp_path: Path) -> None:
    a = make_file(tmp_path / "a", b"a" * 100)
    b = make_file(tmp_path / "b", b"b" * 100)
    settle(a, b)
    with trio.fail_after(60):
        await manager.start_ready("--racy-window", "0.05", "--max-entries", "1")
        with Client(manager.socket_path, timeout=10) as c:
            os.close(await call(c.open, a))
            await manager.wait_until(lambda: len(names_for(manager, a)) == 1)
            os.close(await call(c.open, b))
        await manager.wait_until(lambda: not names_for(manager, a) and len(manager.store) == 1)
        assert names_for(manager, b)
        assert await manager.stop() == 0


async def test_descriptors_that_are_not_ours_are_refused_and_closed(
    manager: ServiceManager, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "f", b"x" * 64)
    settle(f)
    good_name = stored_name(f, labelled=False)
    unsealed = os.memfd_create("shadowd", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(unsealed, b"y" * 64)  # right size, right name, not sealed
    plain = os.open(f, os.O_RDONLY | os.O_CLOEXEC)  # a regular file, not a memfd
    junk = os.memfd_create("junk", os.MFD_CLOEXEC)
    extra = [(good_name, unsealed), (good_name.replace("/v1/", "/v1/9"), plain), ("junk", junk)]
    try:
        with trio.fail_after(60):
            index = await manager.start_ready("--racy-window", "0.05", extra=extra)
            assert manager.proc is not None
            targets = [
                os.readlink(f"/proc/{manager.proc.pid}/fd/{n}")
                for n in os.listdir(f"/proc/{manager.proc.pid}/fd")
            ]
            assert not any("memfd:junk" in t or t == str(f) for t in targets), targets
            removed = {m.get("FDNAME") for m in manager.messages[index:] if "FDSTOREREMOVE" in m}
            assert {good_name, "junk"} <= removed
            with Client(manager.socket_path, timeout=10) as c:
                fd = await call(c.open, f)
                assert read_fd(fd) == b"x" * 64  # never the unsealed impostor's bytes
                os.close(fd)
                stats = await call(c.stats)
            assert (stats["hits"], stats["misses"], stats["restored_entries"]) == (0, 1, 0)
            assert await manager.stop() == 0
    finally:
        for fd in (unsealed, plain, junk):
            os.close(fd)
    assert "rejected: not sealed" in manager.log()


async def test_without_fdstore_from_the_manager_nothing_is_stored(
    shared_dir: Path, tmp_path: Path
) -> None:
    # An older systemd sets no $FDSTORE; without --fd-store-max nothing is stored.
    m = ServiceManager(shared_dir, fdstore_max=None)
    f = make_file(tmp_path / "f", b"z" * 10)
    settle(f)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.pump)
            with trio.fail_after(60):
                await m.start_ready("--racy-window", "0.05")
                with Client(m.socket_path, timeout=10) as c:
                    os.close(await call(c.open, f))
                    assert (await call(c.stats))["fdstore_max"] == 0
                assert await m.stop() == 0
                assert not m.store
                await m.start_ready("--racy-window", "0.05", "--fd-store-max", "5")
                with Client(m.socket_path, timeout=10) as c:
                    os.close(await call(c.open, f))
                await m.wait_until(lambda: len(m.store) == 1)
                assert await m.stop() == 0
            nursery.cancel_scope.cancel()
    finally:
        m.close()


async def test_clients_of_a_daemon_on_a_passed_socket_see_the_daemon_itself(
    manager: ServiceManager, tmp_path: Path
) -> None:
    """SO_PEERCRED gives the credentials of whoever last called listen() on a socket.
    The manager made this one; the daemon listens on it again, so a client sees the
    daemon (its pid and uid), and takes its index's descriptor range at its word."""
    f = make_file(tmp_path / "f", os.urandom(5000))
    settle(f)

    def look() -> tuple[tuple[int, int], bool, int, bool]:
        with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as raw:
            raw.connect(str(manager.socket_path))
            pid, uid, _ = struct.unpack(
                "3i", raw.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            )
        with cached_view(manager.socket_path, f) as view:
            fd = view.open(f.stat())
            served = fd is not None and read_fd(fd) == f.read_bytes()
            if fd is not None:
                os.close(fd)
            return (pid, uid), view.direct, len(view.range), served

    with trio.fail_after(60):
        await manager.start_ready("--racy-window", "0.05")
        peer, direct, opened_at_once, served = await call(look)
        assert await manager.stop() == 0
    assert manager.proc is not None
    assert peer == (manager.proc.pid, os.geteuid()) != (os.getpid(), os.geteuid())
    assert direct and opened_at_once > 0 and served


async def test_a_passed_stream_socket_is_a_clear_error(shared_dir: Path) -> None:
    m = ServiceManager(shared_dir)
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(shared_dir / "stream.sock"))
    stream.listen()
    m.listener.close()
    m.listener = stream
    try:
        with trio.fail_after(60):
            m.start()
            assert m.proc is not None
            code = await trio.to_thread.run_sync(m.proc.wait)
        assert code == 2
        lines = m.log().strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in m.log()
        assert "SOCK_STREAM" in lines[0] and "SOCK_SEQPACKET" in lines[0]
    finally:
        m.close()


# -- systemd-socket-activate --------------------------------------------------


@pytest.mark.skipif(
    shutil.which("systemd-socket-activate") is None,
    reason="systemd-socket-activate is not installed (Debian: package systemd)",
)
async def test_under_systemd_socket_activate(shared_dir: Path, tmp_path: Path) -> None:
    path = shared_dir / "activated.sock"
    # An abstract NOTIFY_SOCKET ('@name'), as some managers use.
    abstract = f"shadowd-test-{uuid.uuid4().hex}"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
    notify.bind(b"\0" + abstract.encode())
    notify.settimeout(30)
    f = make_file(tmp_path / "f", os.urandom(5000))
    settle(f)
    log_path = shared_dir / "activated.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [
                shutil.which("systemd-socket-activate") or "",
                "--seqpacket",
                "-l",
                str(path),
                "-E",
                f"NOTIFY_SOCKET=@{abstract}",
                "-E",
                "PYTHONPATH=" + REPO_PATH,
                *SERVE,
                "--racy-window",
                "0.05",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
        )
    messages: list[str] = []

    async def receive_until(field: str) -> None:
        while field not in messages:
            data = await trio.to_thread.run_sync(notify.recv, 4096)
            messages.extend(data.decode().splitlines())

    try:
        with trio.fail_after(60):
            while not path.exists():
                await trio.sleep(0.02)
            # The first connection starts the daemon on the socket it was given.
            with Client(path, timeout=20) as c:
                fd = await call(c.open, f)
                assert read_fd(fd) == f.read_bytes()
                os.close(fd)
            await receive_until("READY=1")
            assert any(m.startswith("STATUS=") for m in messages)

            # A second daemon on the live socket is refused; the first keeps serving.
            second = await run_shadowd("serve", "--socket", str(path))
            assert second.returncode != 0
            assert str(path) in second.stderr and "answering" in second.stderr
            assert len(second.stderr.strip().splitlines()) == 1
            with Client(path, timeout=20) as c:
                fd = await call(c.open, f)
                assert read_fd(fd) == f.read_bytes()
                os.close(fd)
                assert (await call(c.stats))["hits"] == 1

            proc.send_signal(signal.SIGTERM)
            await receive_until("STOPPING=1")
            assert await trio.to_thread.run_sync(proc.wait) == 0
        # The daemon did not create the socket, so it did not remove it.
        assert path.exists()
        assert "passed by the service manager" in log_path.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        notify.close()
        print(f"--- daemon log ---\n{log_path.read_text(errors='replace')}")
