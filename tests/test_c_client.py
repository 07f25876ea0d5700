# The C client (client/c) against the real daemon: exact bytes, misses then
# hits, refusals with the daemon's code, no daemon, and a stand-in daemon
# that sends an unsealed fd (which it must refuse). Built with the host's C
# compiler; skipped where there is none.
from __future__ import annotations

import os
import socket
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from shadowd.bench import build_c_client, c_compiler, run_c_clients
from shadowd.fds import scm_rights

from .conftest import Daemon, deep_file, make_file, settle

pytestmark = pytest.mark.skipif(c_compiler() is None, reason="no C compiler here")


@pytest.fixture(scope="module")
def c_client(tmp_path_factory: pytest.TempPathFactory) -> str:
    binary, why = build_c_client(str(tmp_path_factory.mktemp("cclient")))
    assert binary is not None, why
    return binary


def run(binary: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([binary, *args], capture_output=True, timeout=timeout, check=False)


async def test_exact_bytes_a_miss_then_a_hit(c_client: str, daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "lib.so", os.urandom(300_001))
    settle(f)
    with trio.fail_after(30):
        first = await trio.to_thread.run_sync(
            lambda: run(c_client, "-v", "-s", str(daemon.socket_path), str(f))
        )
        second = await trio.to_thread.run_sync(
            lambda: run(c_client, "-v", "-s", str(daemon.socket_path), str(f))
        )
    assert first.returncode == 0, first.stderr
    assert first.stdout == f.read_bytes()
    assert first.stderr.decode() == "300001 miss\n"
    assert second.stdout == f.read_bytes()
    assert second.stderr.decode() == "300001 hit\n"
    # The label (the path) reached the daemon's stats, as the Python client's does.
    from shadowd_client import Client

    with Client(daemon.socket_path, timeout=10) as c:
        top = c.stats()["top_by_hits"]
    assert [t["path"] for t in top] == [str(f)]


async def test_refusals_and_no_daemon_are_clear(
    c_client: str, daemon: Daemon, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        refused = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(daemon.socket_path), "/dev/null")
        )
        missing = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(daemon.socket_path), str(tmp_path / "nope"))
        )
        nobody = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(tmp_path / "no.sock"), "/etc/hostname")
        )
        usage = await trio.to_thread.run_sync(lambda: run(c_client))
    assert refused.returncode == 1
    assert b"only regular files are served" in refused.stderr
    assert b"(not-regular)" in refused.stderr
    assert missing.returncode == 1 and b"No such file or directory" in missing.stderr
    assert nobody.returncode == 1
    assert b"connecting to shadowd at" in nobody.stderr and b"no.sock" in nobody.stderr
    assert usage.returncode == 2 and b"usage:" in usage.stderr


async def test_loops_for_the_benchmark_through_shadowd_and_by_copying(
    c_client: str, daemon: Daemon, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "big", os.urandom(1 << 20))
    settle(f)
    with trio.fail_after(30):
        hits = await trio.to_thread.run_sync(
            lambda: run_c_clients(c_client, 2, ["-s", str(daemon.socket_path), str(f)], 0.3)
        )
        copies = await trio.to_thread.run_sync(
            lambda: run_c_clients(c_client, 2, ["-c", str(f)], 0.3)
        )
    assert hits > 2 and copies > 2
    from shadowd_client import Client

    with Client(daemon.socket_path, timeout=10) as c:
        s = c.stats()
    # Both processes may miss at once (one copy is made); every open counted.
    assert s["misses"] in (1, 2) and s["hits"] + s["misses"] == hits


def _greet(conn: socket.socket, server: str) -> dict[str, Any]:
    """Read a client's hello on a stand-in daemon's *conn* and answer it; the hello."""
    hello: dict[str, Any] = msgpack.unpackb(conn.recv(4096))
    reply = {"id": hello["id"], "ok": True, "version": 1, "server": server, "limits": {}}
    conn.send(msgpack.packb(reply))
    return hello


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A daemon that answers hello, then every open with an unsealed memfd."""
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    requests: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            requests.append(msgpack.packb(_greet(conn, "fake")))
            data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4))
            requests.append(data)
            for _, _, fds in anc:
                os.close(int.from_bytes(fds[:4], "little"))
            unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
            os.write(unsealed, b"evil")
            msg = msgpack.unpackb(data)
            conn.sendmsg(
                [msgpack.packb({"id": msg["id"], "ok": True, "size": 4, "hit": True})],
                scm_rights([unsealed]),
            )
            os.close(unsealed)
            conn.recv(1)  # until the client goes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, requests
    thread.join(timeout=10)
    listener.close()


def test_an_unsealed_fd_is_refused(c_client: str, stand_in: tuple[Path, list[bytes]]) -> None:
    path, requests = stand_in
    done = run(c_client, "-s", str(path), "/etc/hostname")
    assert done.returncode == 1
    assert b"not sealed; refused it" in done.stderr
    assert done.stdout == b""
    hello, open_ = (msgpack.unpackb(r) for r in requests)
    # What the C client writes is what the protocol documents.
    assert hello == {"op": "hello", "id": 0, "version": 1, "client": "shadowd.c/1"}
    assert open_ == {"op": "open", "id": 1, "path": "/etc/hostname"}


@pytest.fixture(scope="module")
def quick_c_client(tmp_path_factory: pytest.TempPathFactory) -> str:
    """The C client built to give up after 1 s instead of 30."""
    binary, why = build_c_client(
        str(tmp_path_factory.mktemp("cclient1")), "-DSHADOWD_TIMEOUT_SECONDS=1"
    )
    assert binary is not None, why
    return binary


async def test_a_daemon_restart_between_opens_is_survived(
    c_client: str, start_daemon: Any, tmp_path: Path
) -> None:
    first = await start_daemon("--racy-window", "0.05", socket_name="r.sock")
    f1 = make_file(tmp_path / "one", b"first file")
    f2 = make_file(tmp_path / "two", b"second file")
    settle(f1, f2)
    proc = subprocess.Popen(
        [c_client, "-g", "-s", str(first.socket_path), str(f1), str(f2)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with trio.fail_after(30):
            assert await trio.to_thread.run_sync(proc.stdout.readline) == b"ready\n"
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            assert await trio.to_thread.run_sync(proc.stdout.readline) == b"first fileready\n"
            first.kill()
            await start_daemon("--racy-window", "0.05", socket_name="r.sock")
            out, err = await trio.to_thread.run_sync(proc.communicate, b"go\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out == b"second file"


@pytest.fixture
def slow_stand_in(tmp_path: Path) -> Iterator[Path]:
    """A daemon whose first connection answers its open 1.5 s late; the next is prompt."""
    path = tmp_path / "slow.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    listener.settimeout(10)

    def answer(conn: socket.socket, delay: float) -> None:
        conn.settimeout(10)
        _greet(conn, "slow")
        data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4))
        src = int.from_bytes(anc[0][2][:4], "little")
        time.sleep(delay)
        served = os.open(f"/proc/self/fd/{src}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(src)
        sealed = memfd_copy(served)
        os.close(served)
        msg = msgpack.unpackb(data)
        size = os.fstat(sealed).st_size
        try:
            conn.sendmsg(
                [msgpack.packb({"id": msg["id"], "ok": True, "size": size, "hit": False})],
                scm_rights([sealed]),
            )
        except OSError:
            pass  # the client gave up on this connection
        os.close(sealed)

    def handle(conn: socket.socket, delay: float) -> None:
        with conn:
            answer(conn, delay)
            conn.recv(1)  # until the client goes

    handlers: list[threading.Thread] = []

    def serve() -> None:
        for delay in (1.5, 0.0):  # in the order the client connects
            conn, _ = listener.accept()
            handlers.append(threading.Thread(target=handle, args=(conn, delay), daemon=True))
            handlers[-1].start()

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    yield path
    acceptor.join(timeout=10)
    for thread in handlers:
        thread.join(timeout=10)
    listener.close()


def memfd_copy(fd: int) -> int:
    from shadowd.memfd import sealed_copy
    from shadowd.source import SourceStat

    sealed = sealed_copy(fd, SourceStat.from_stat_result(os.fstat(fd)))
    try:
        return sealed.share()  # its own offset, at 0
    finally:
        sealed.release()


def test_a_late_reply_does_not_answer_the_next_open(
    quick_c_client: str, slow_stand_in: Path, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "f", b"prompt bytes")
    done = run(quick_c_client, "-s", str(slow_stand_in), str(f), str(f), timeout=30)
    # The first open times out and its connection goes; the second, on a
    # new connection, gets its own reply, not the first one's late one.
    assert done.returncode == 1
    assert done.stderr.count(b"timed out") == 1, done.stderr
    assert b"answered another request" not in done.stderr
    assert done.stdout == b"prompt bytes", done.stderr


def test_a_daemon_that_does_not_accept_does_not_hold_connect(
    quick_c_client: str, tmp_path: Path
) -> None:
    path = tmp_path / "full.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(0)
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    try:
        for s in held:  # fill the backlog
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                pass
        started = time.monotonic()
        done = run(quick_c_client, "-s", str(path), "/etc/hostname", timeout=20)
        assert time.monotonic() - started < 10
        assert done.returncode == 1
        assert b"connecting to shadowd at" in done.stderr or b"timed out" in done.stderr
    finally:
        for s in held:
            s.close()
        listener.close()


async def test_a_long_path_goes_without_its_label_under_a_small_max_request(
    c_client: str, start_daemon: Any, tmp_path: Path
) -> None:
    d = await start_daemon("--racy-window", "0.05", "--max-request", "512")
    f = deep_file(tmp_path, 600, b"deep bytes")
    with trio.fail_after(30):
        done = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(d.socket_path), str(f))
        )
    # With the label the request would pass 512 bytes, be refused and the
    # connection closed; without it the file is served.
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"deep bytes"
