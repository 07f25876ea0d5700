# The `shadowd` command as users run it: real subprocesses, real sockets.
from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import trio

from shadowd.cli import parse_size

from . import promtext
from .conftest import Daemon, make_file, repo_env, settle


def shadowd(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = repo_env()
    return subprocess.run(
        [sys.executable, "-m", "shadowd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )


async def run(*args: str) -> subprocess.CompletedProcess[str]:
    return await trio.to_thread.run_sync(lambda: shadowd(*args))


@pytest.mark.parametrize(
    ("text", "value"),
    [
        ("4096", 4096),
        ("64K", 65536),
        ("256M", 256 << 20),
        ("1G", 1 << 30),
        ("1.5g", 3 << 29),
        ("2MiB", 2 << 20),
        ("10kb", 10240),
    ],
)
def test_sizes(text: str, value: int) -> None:
    assert parse_size(text) == value


def test_bad_size_is_a_usage_error() -> None:
    proc = shadowd("serve", "--max-bytes", "lots")
    assert proc.returncode == 2
    assert "not a size" in proc.stderr


async def open_times(daemon: Daemon, path: Path, times: int) -> None:
    """Open *path* through *daemon* *times* times, on one connection."""
    from shadowd_client import Client

    def opens() -> None:
        with Client(daemon.socket_path, timeout=10) as c:
            for _ in range(times):
                os.close(c.open(path))

    await trio.to_thread.run_sync(opens)


async def test_stats_table_and_json(daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "f", b"x" * 1000)
    settle(f)
    with trio.fail_after(30):
        await open_times(daemon, f, 4)
        table = await run("stats", "--socket", str(daemon.socket_path))
        assert table.returncode == 0, table.stderr
        assert "hit rate" in table.stdout and "75.0%" in table.stdout
        assert str(daemon.socket_path) in table.stdout
        assert str(f) in table.stdout  # among the files that gain most
        js = await run("stats", "--socket", str(daemon.socket_path), "--json")
        assert js.returncode == 0
        data = json.loads(js.stdout)
        assert (data["hits"], data["misses"], data["entries"]) == (3, 1, 1)
        assert data["hit_rate"] == 0.75


@pytest.mark.parametrize("form", [[], ["--json"], ["--prometheus"]])
async def test_stats_without_daemon_is_one_clear_line(tmp_path: Path, form: list[str]) -> None:
    path = tmp_path / "none.sock"
    with trio.fail_after(30):
        proc = await run("stats", "--socket", str(path), *form)
    assert proc.returncode == 1
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0]
    assert "Traceback" not in proc.stderr


async def test_socket_created_owner_only_by_default(daemon: Daemon) -> None:
    st = os.stat(daemon.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


async def test_socket_mode_flag(start_daemon: Any) -> None:
    d = await start_daemon("--socket-mode", "0660")
    assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o660


async def test_second_daemon_on_live_socket_refused(daemon: Daemon, tmp_path: Path) -> None:
    from shadowd_client import Client

    f = make_file(tmp_path / "f", b"still served")
    with trio.fail_after(30):
        proc = await run("serve", "--socket", str(daemon.socket_path))
    assert proc.returncode != 0
    assert str(daemon.socket_path) in proc.stderr
    assert "already serving" in proc.stderr or "answering" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert "Traceback" not in proc.stderr
    # The first one keeps serving, on the same socket file.
    assert stat.S_ISSOCK(os.lstat(daemon.socket_path).st_mode)
    with Client(daemon.socket_path, timeout=10) as c:
        fd = c.open(f)
        assert os.pread(fd, 100, 0) == b"still served"
        os.close(fd)


async def test_live_socket_of_another_server_refused(shared_dir: Path) -> None:
    path = shared_dir / "other.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other.bind(str(path))
    other.listen()
    try:
        with trio.fail_after(30):
            proc = await run("serve", "--socket", str(path))
        assert proc.returncode != 0
        assert "answering" in proc.stderr and str(path) in proc.stderr
        assert path.exists()
    finally:
        other.close()


async def test_stale_socket_is_replaced(start_daemon: Any, shared_dir: Path) -> None:
    path = shared_dir / "stale.sock"
    dead = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    dead.bind(str(path))
    dead.close()  # the file stays, nobody listens
    assert path.exists()
    d = await start_daemon(socket_name="stale.sock")
    assert d.answers()


async def test_path_that_is_not_a_socket_is_never_replaced(shared_dir: Path) -> None:
    path = shared_dir / "precious"
    path.write_text("do not delete")
    with trio.fail_after(30):
        proc = await run("serve", "--socket", str(path))
    assert proc.returncode != 0 and "not a socket" in proc.stderr
    assert path.read_text() == "do not delete"


async def test_stats_prometheus_from_a_live_daemon_parses(daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / 'odd "name"\\', b"y" * 5000)
    settle(f)
    with trio.fail_after(30):
        await open_times(daemon, f, 3)
        proc = await run("stats", "--socket", str(daemon.socket_path), "--prometheus")
    assert proc.returncode == 0, proc.stderr
    families = promtext.parse(proc.stdout)
    assert families["shadowd_hits_total"].value(kind="host") == 2
    assert families["shadowd_misses_total"].value(kind="host") == 1
    assert families["shadowd_cache_bytes"].value() == 5000
    assert families["shadowd_top_file_hits"].value(path=str(f)) == 2
    assert families["shadowd_open_fds"].value() > 0
    assert families["shadowd_fdstore_max_entries"].value() == 0  # not under a manager


def _watch(socket_path: Path, *, tty: bool) -> tuple[int, str]:
    """Run `stats --watch 0.2` until it drew three times; interrupt it like Ctrl-C."""
    import pty
    import select
    import signal
    import time

    env = repo_env()
    argv = [sys.executable, "-m", "shadowd", "stats", "--socket", str(socket_path)]
    argv += ["--watch", "0.2"]
    if tty:
        reader, writer = pty.openpty()
    else:
        reader, writer = os.pipe()
    proc = subprocess.Popen(argv, stdout=writer, stderr=subprocess.STDOUT, env=env)
    os.close(writer)
    out = b""
    deadline = time.monotonic() + 30
    try:
        while out.count(b"  misses ") < 3 and time.monotonic() < deadline:
            if select.select([reader], [], [], 1.0)[0]:
                try:
                    chunk = os.read(reader, 65536)
                except OSError:  # the pty closed
                    break
                if not chunk:
                    break
                out += chunk
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(reader)
    return code, out.decode(errors="replace")


@pytest.mark.parametrize("tty", [False, True])
async def test_stats_watch_refreshes_until_interrupted(daemon: Daemon, tty: bool) -> None:
    with trio.fail_after(60):
        code, out = await trio.to_thread.run_sync(lambda: _watch(daemon.socket_path, tty=tty))
    assert code == 0, out
    assert "Traceback" not in out
    assert out.count("  misses ") >= 3
    assert "opens/s" in out  # rates from the second refresh on
    # On a terminal the table is redrawn in place; in a pipe it is appended.
    assert (out.count("\x1b[H\x1b[2J") >= 3) == tty
