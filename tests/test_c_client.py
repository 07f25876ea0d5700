# The C client (client/c) against the real daemon: exact bytes, misses then
# hits, refusals with the daemon's code, no daemon, and a stand-in daemon
# that sends an unsealed fd (which it must refuse). Built with the host's C
# compiler; skipped where there is none.
from __future__ import annotations

import os
import shutil
import socket
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import msgpack
import pytest
import trio

from shadowd.bench import build_c_client, run_c_clients
from shadowd.fds import scm_rights

from .conftest import Daemon, make_file, settle

pytestmark = pytest.mark.skipif(
    not (os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")),
    reason="no C compiler here",
)


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
    assert [t[0] for t in top] == [str(f)]  # TopEntry: label, hits, size


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
            hello = msgpack.unpackb(conn.recv(4096))
            requests.append(msgpack.packb(hello))
            reply = {"id": hello["id"], "ok": True, "version": 1, "server": "fake", "limits": {}}
            conn.send(msgpack.packb(reply))
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
