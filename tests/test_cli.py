# The `shadowd` command as users run it: real subprocesses, real sockets.
from __future__ import annotations

import json
import os
import re
import signal
import socket
import stat
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from shadowd.cli_flags import parse_size

from . import promtext
from .conftest import _DROP_AND_SERVE as DROP_AND_SERVE
from .conftest import (
    REPO,
    Daemon,
    make_file,
    repo_env,
    requires_root,
    settle,
    test_uid,
)
from .mounts import detach, mount


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


async def test_socket_created_owner_only_by_default(one_daemon: Daemon) -> None:
    daemon = one_daemon
    st = os.stat(daemon.socket_path)
    assert stat.S_ISSOCK(st.st_mode)
    assert stat.S_IMODE(st.st_mode) == 0o600


async def test_socket_mode_flag(start_daemon: Any) -> None:
    d = await start_daemon("--socket-mode", "0660")
    assert stat.S_IMODE(os.stat(d.socket_path).st_mode) == 0o660


async def test_second_daemon_on_live_socket_refused(one_daemon: Daemon, tmp_path: Path) -> None:
    daemon = one_daemon
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


@requires_root
async def test_a_user_refused_the_sockets_directory_is_told_so_not_about_the_lock(
    shared_dir: Path,
) -> None:
    """`shadowd serve --socket` as a user who may not write to the directory (root's,
    0755, as /run/shadowd is): one line naming the directory and what to do, not the
    lock file (the first thing the daemon made there); and as one who may not create
    the missing directory either."""
    run_dir = shared_dir / "run"
    run_dir.mkdir(mode=0o755)
    user = test_uid(60)

    def serve_as(path: Path) -> subprocess.CompletedProcess[str]:
        drop = [sys.executable, "-c", DROP_AND_SERVE, str(user), str(user), ""]
        return subprocess.run(
            [*drop, "serve", "--socket", str(path)],
            capture_output=True,
            text=True,
            timeout=30,
            env=repo_env(),
            check=False,
        )

    with trio.fail_after(60):
        there = await trio.to_thread.run_sync(serve_as, run_dir / "x.sock")
        below = await trio.to_thread.run_sync(serve_as, run_dir / "sub" / "x.sock")
    for proc, named in (there, run_dir), (below, run_dir / "sub"):
        assert proc.returncode == 2, proc.stderr
        lines = proc.stderr.strip().splitlines()
        assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert str(named) in lines[0] and ".lock" not in lines[0], lines
        assert f"uid {user} may not write to {run_dir} (owner uid 0, mode 0755)" in lines[0]
        assert "--socket" in lines[0] and "XDG_RUNTIME_DIR" in lines[0]
    assert os.listdir(run_dir) == []


@requires_root
async def test_a_socket_directory_on_a_read_only_file_system_is_named_as_such(
    shared_dir: Path,
) -> None:
    """A directory on a read-only mount refuses root too: the one line says so, and
    tells no one to run as another user."""
    ro = shared_dir / "ro"
    ro.mkdir()
    try:
        mount("tmpfs", ro, "tmpfs", os.ST_RDONLY, "size=1m,mode=755")  # MS_RDONLY
    except OSError as exc:
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        with trio.fail_after(30):
            proc = await run("serve", "--socket", str(ro / "x.sock"))
    finally:
        detach(ro)
    line = one_line_error(proc, 2, str(ro), "Read-only file system")
    assert "may not write" not in line and ".lock" not in line, line


async def test_missing_directories_of_the_socket_are_created_and_said(shared_dir: Path) -> None:
    """`serve --socket A/B/C/x.sock` creates A/B/C (0755) as it always did, and says so
    in one line of its log naming each, outermost first; a directory that was there is
    not named (before, nothing was said)."""
    (shared_dir / "a").mkdir()
    path = shared_dir / "a" / "b" / "c" / "x.sock"
    log = shared_dir / "serve.log"

    def serve() -> str:
        with open(log, "wb") as out:
            proc = subprocess.Popen(
                [sys.executable, "-m", "shadowd", "serve", "--socket", str(path)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=repo_env(),
            )
            try:
                deadline = time.monotonic() + 20
                while not path.exists():
                    assert proc.poll() is None, log.read_text()
                    assert time.monotonic() < deadline, log.read_text()
                    time.sleep(0.01)
            finally:
                proc.send_signal(signal.SIGTERM)
                assert proc.wait(20) == 0
        return log.read_text()

    with trio.fail_after(60):
        text = await trio.to_thread.run_sync(serve)
    said = [ln for ln in text.splitlines() if "created the socket's directory" in ln]
    b, c = shared_dir / "a" / "b", shared_dir / "a" / "b" / "c"
    assert len(said) == 1 and said[0].endswith(f"directory {b}, {c} (mode 0755)"), text
    assert stat.S_IMODE(os.stat(c).st_mode) == 0o755


@pytest.mark.parametrize(
    ("mode", "allow", "warned"),
    [
        ("0666", [], "every uid is served"),
        ("0777", ["--allow-uid", "0"], "only the uids of --allow-uid"),
        ("0660", [], None),
    ],
)
async def test_a_socket_mode_open_to_every_user_is_warned_of_once(
    start_daemon: Any, mode: str, allow: list[str], warned: str | None
) -> None:
    """--socket-mode with "other" write lets anyone on the host connect: one warning at
    start, saying who is served then (before, none)."""
    d: Daemon = await start_daemon("--socket-mode", mode, *allow)
    said = [ln for ln in d.log().splitlines() if "lets every user on this host" in ln]
    if warned is None:
        assert said == []
    else:
        assert len(said) == 1 and "WARNING" in said[0] and warned in said[0], said
        assert f"--socket-mode {mode}" in said[0] and str(d.socket_path) in said[0]


async def test_stats_prometheus_from_a_live_daemon_parses(daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / 'odd "name"\\', b"y" * 5000)
    settle(f)
    with trio.fail_after(30):
        await open_times(daemon, f, 3)
        proc = await run("stats", "--socket", str(daemon.socket_path), "--prometheus", "--paths")
    assert proc.returncode == 0, proc.stderr
    families = promtext.parse(proc.stdout)
    assert families["shadowd_hits_total"].value(kind="host") == 2
    assert families["shadowd_misses_total"].value(kind="host") == 1
    assert families["shadowd_cache_bytes"].value() == 5000
    assert families["shadowd_top_file_hits"].value(path=str(f)) == 2
    assert families["shadowd_open_fds"].value() > 0
    assert families["shadowd_fdstore_max_entries"].value() == 0  # not under a manager


COLUMNS, ROWS = 80, 24


def _pty(columns: int = COLUMNS, rows: int = ROWS) -> tuple[int, int]:
    """A pseudo-terminal of *columns* x *rows*: (master, slave)."""
    import fcntl
    import pty
    import struct
    import termios

    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, columns, 0, 0))
    return master, slave


def _read_until(reader: int, done: Any, deadline: float) -> bytes:
    """Read *reader* until done(output) or the deadline or its end."""
    import select
    import time

    out = b""
    while not done(out) and time.monotonic() < deadline:
        if select.select([reader], [], [], 0.5)[0]:
            try:
                chunk = os.read(reader, 65536)
            except OSError:  # the pty closed
                break
            if not chunk:
                break
            out += chunk
    return out


def _watch(socket_path: Path, *, tty: bool) -> tuple[int, str]:
    """Run `stats --watch 0.2` until it drew three times; interrupt it like Ctrl-C."""
    import signal
    import time

    env = repo_env()
    argv = [sys.executable, "-m", "shadowd", "stats", "--socket", str(socket_path)]
    argv += ["--watch", "0.2"]
    if tty:
        reader, writer = _pty()
    else:
        reader, writer = os.pipe()
    proc = subprocess.Popen(argv, stdout=writer, stderr=subprocess.STDOUT, env=env)
    os.close(writer)
    try:
        out = _read_until(reader, lambda o: o.count(b"  misses ") >= 3, time.monotonic() + 30)
        proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=30)
        out += _read_until(reader, lambda o: False, time.monotonic() + 1)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(reader)
    return code, out.decode(errors="replace")


ESCAPE = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.mark.parametrize("tty", [False, True])
async def test_stats_watch_refreshes_until_interrupted(one_daemon: Daemon, tty: bool) -> None:
    daemon = one_daemon
    with trio.fail_after(60):
        code, out = await trio.to_thread.run_sync(lambda: _watch(daemon.socket_path, tty=tty))
    assert code == 0, out
    assert "Traceback" not in out
    assert out.count("  misses ") >= 3
    assert "opens/s" in out  # rates from the second refresh on
    # On a terminal the table is redrawn in place, on the alternate screen
    # (left on exit); in a pipe it is appended, without escapes.
    assert (out.count("\x1b[H") >= 3) == tty
    assert ("\x1b[?1049h" in out and out.rstrip("\r\n").endswith("\x1b[?1049l")) == tty
    assert "\x1b[2J" not in out  # clearing the screen would pile frames up in scrollback
    if tty:
        frames = [ESCAPE.sub("", f) for f in out.split("\x1b[H")[1:]]
        for frame in frames:
            lines = frame.replace("\r\n", "\n").split("\n")
            assert len(lines) <= ROWS, frame
            assert max(len(line) for line in lines) < COLUMNS, frame
            assert "hit rate" in frame
        assert "opens/s" in frames[-1].split("\n")[1]  # the rates come second, always in view


def test_a_frame_fits_any_terminal() -> None:
    from shadowd.cli_stats import fit_frame

    lines = [f"line {i} " + "x" * 100 for i in range(30)]
    fitted = fit_frame(lines, 40, 10)
    assert len(fitted) == 10 and all(len(ln) <= 39 for ln in fitted)
    assert fitted[0].endswith("…") and fitted[-1] == "  (21 more lines in a larger terminal)"
    assert fit_frame(["short"], 40, 10) == ["short"]


async def test_stats_watch_into_a_closed_pipe_is_quiet(one_daemon: Daemon) -> None:
    daemon = one_daemon
    script = (
        f"{sys.executable} -m shadowd stats --socket {daemon.socket_path} --watch 0.2 | head -3;"
        ' echo "status ${PIPESTATUS[0]}" >&2'
    )
    with trio.fail_after(60):
        proc = await trio.to_thread.run_sync(
            lambda: subprocess.run(
                ["bash", "-c", script],
                capture_output=True,
                text=True,
                env=repo_env(),
                timeout=30,
                check=False,
            )
        )
    assert len(proc.stdout.splitlines()) == 3
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr
    assert proc.stderr.strip() == "status 141"  # non-zero, like any writer into a closed pipe


def one_line_error(proc: subprocess.CompletedProcess[str], code: int, *needles: str) -> str:
    """Assert *proc* failed with *code* and one stderr line holding each needle; return it."""
    assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert proc.stdout == ""
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert "Traceback" not in proc.stderr
    for needle in needles:
        assert needle in lines[0], lines[0]
    return lines[0]


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        (["serve", "--socket", ""], ["--socket", "empty"]),
        (["stats", "--socket", ""], ["--socket", "empty"]),
        (["bench", "--socket", ""], ["--socket", "empty"]),
        (["--socket", "", "stats"], ["--socket", "empty"]),
        (["serve", "--max-bytes", "0"], ["--max-bytes", "at least 1", "cache nothing"]),
        (["serve", "--max-entries", "0"], ["--max-entries", "at least 1", "cache nothing"]),
        (["serve", "--max-entries", "-5"], ["--max-entries", "at least 1"]),
        (["serve", "--max-request", "100"], ["--max-request", "at least 512"]),
        (["serve", "--max-batch", "100000"], ["--max-batch", "at most"]),
        (["serve", "--max-clients", "-1"], ["--max-clients", "at least 1"]),
        (["serve", "--racy-window", "-1"], ["--racy-window", "negative"]),
        (["serve", "--max-file-size", "0"], ["--max-file-size", "at least 1"]),
        (
            ["serve", "--max-file-size", "2G", "--max-bytes", "1G"],
            ["--max-file-size 2.0 GiB", "--max-bytes 1.0 GiB"],
        ),
        (["serve", "--log-level", "loud"], ["--log-level", "invalid choice"]),
        (  # checked before the socket is made (/proc: never made there anyway)
            ["serve", "--socket", "/proc/x.sock", "--socket-group", "no-such-group-x"],
            ["--socket-group", "no such group", "no-such-group-x"],
        ),
        (["bench", "--seconds", "-1"], ["--seconds"]),
        (["bench", "--procs", "1,,2"], ["--procs", "'1,,2'", "empty"]),
        (["bench", "--procs", "1,2,"], ["--procs", "'1,2,'", "empty"]),
        (["bench", "--procs", "1,x"], ["--procs", "'x'", "not a number"]),
        (["bench", "--procs", "4,0"], ["--procs", "at least 1", "'0'"]),
        (["bench", "--memory-procs", "-2"], ["--memory-procs", "at least 0"]),
        (["stats", "--json", "--textfile", "x.prom"], ["--textfile", "--json"]),
        (["stats", "--json", "--paths"], ["--paths", "--prometheus"]),
        ([], ["COMMAND"]),
    ],
)
def test_bad_flags_are_one_line_naming_the_flag(args: list[str], needles: list[str]) -> None:
    one_line_error(shadowd(*args), 2, *needles)


def test_textfile_with_json_is_refused_in_stats_words() -> None:
    # It said "shadowd: ... (see shadowd --help)", where every other stats
    # flag error names `shadowd stats` and its help.
    line = one_line_error(shadowd("stats", "--json", "--textfile", "x.prom"), 2)
    assert line == (
        "shadowd stats: argument --textfile: writes the Prometheus format, not --json "
        "(see shadowd stats --help)"
    )


@pytest.mark.parametrize(
    ("args", "needles"),
    [
        # float() takes these: nan refreshed without pause (--watch), inf ended
        # serve in an OverflowError traceback (--racy-window), nan in one line
        # that named no flag.
        (["stats", "--watch", "nan"], ["--watch", "finite"]),
        (["stats", "--watch", "inf"], ["--watch", "finite"]),
        (["serve", "--racy-window", "nan"], ["--racy-window", "finite"]),
        (["serve", "--racy-window", "inf"], ["--racy-window", "finite"]),
        (["serve", "--racy-window", "1e400"], ["--racy-window", "finite"]),
        (["bench", "--seconds", "inf"], ["--seconds", "finite"]),
        # A window the hello cannot carry (1e30 s failed every hello).
        (["serve", "--racy-window", "1e30"], ["--racy-window", "at most 86400"]),
    ],
)
def test_seconds_that_are_no_finite_number_are_refused(
    args: list[str], needles: list[str], tmp_path: Path
) -> None:
    # A socket of this test's own: a flag taken by mistake serves there, not on the default.
    if args[0] == "serve":
        args = [*args, "--socket", str(tmp_path / "s.sock")]
    one_line_error(shadowd(*args), 2, *needles)


async def test_log_level_in_upper_case_and_budgets_people_can_read(start_daemon: Any) -> None:
    d = await start_daemon("--log-level", "DEBUG", "--max-bytes", "1G")
    with trio.fail_after(30):
        await run("stats", "--socket", str(d.socket_path))
    log = d.log()
    assert "DEBUG shadowd.server: client connected" in log
    assert "at most 10000 files and 1.0 GiB, files up to 256.0 MiB" in log
    assert "1073741824" not in log


async def test_max_file_size_follows_a_smaller_budget(start_daemon: Any) -> None:
    d = await start_daemon("--max-bytes", "100M")
    with trio.fail_after(30):
        proc = await run("stats", "--socket", str(d.socket_path), "--json")
    assert json.loads(proc.stdout)["max_file_size"] == 100 << 20


async def test_stats_on_what_is_no_shadowd_socket(shared_dir: Path) -> None:
    plain = shared_dir / "plain"
    plain.write_text("not a socket")
    stream_path = shared_dir / "stream.sock"
    stream = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stream.bind(str(stream_path))
    stream.listen()
    # A SOCK_SEQPACKET socket of some other program, answering in its own words.
    other_path = shared_dir / "other.sock"
    other = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    other.bind(str(other_path))
    other.listen()

    def answer_in_other_words() -> None:
        conn, _ = other.accept()
        with conn:
            conn.recv(4096)
            conn.send(b"\x01\x02 HELLO, not msgpack of shadowd")
            conn.recv(4096)  # until the client has gone

    try:
        with trio.fail_after(30):
            on_file = await run("stats", "--socket", str(plain))
            on_stream = await run("stats", "--socket", str(stream_path))
            async with trio.open_nursery() as nursery:
                nursery.start_soon(trio.to_thread.run_sync, answer_in_other_words)
                on_other = await run("stats", "--socket", str(other_path))
    finally:
        stream.close()
        other.close()
    line = one_line_error(on_file, 1, str(plain), "not a socket")
    assert "refused" not in line.lower()
    one_line_error(on_stream, 1, str(stream_path), "not a shadowd socket")
    one_line_error(on_other, 1, str(other_path), "not a shadowd socket")


async def test_socket_before_the_command(one_daemon: Daemon) -> None:
    daemon = one_daemon
    with trio.fail_after(30):
        proc = await run("--socket", str(daemon.socket_path), "stats", "--json")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["entries"] == 0
    assert json.loads(proc.stdout)["hit_rate"] is None  # no lookups: no rate, not 0


@pytest.mark.parametrize("name", ["hit_path", "syscalls", "cache_scale"])
def test_benchmarks_have_help(name: str) -> None:
    proc = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / f"{name}.py"), "--help"],
        capture_output=True,
        text=True,
        env=repo_env(),
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("usage:") and proc.stderr == ""


# -- --textfile ---------------------------------------------------------------


async def test_textfile_is_replaced_whole_and_says_when_the_daemon_is_down(
    start_daemon: Any, tmp_path: Path
) -> None:
    d = await start_daemon()
    target = tmp_path / "shadowd.prom"
    target.write_text("old\n")
    before = target.stat().st_ino
    with trio.fail_after(60):
        proc = await run("stats", "--socket", str(d.socket_path), "--textfile", str(target))
        assert proc.returncode == 0 and proc.stdout == "" and proc.stderr == ""
        families = promtext.parse(target.read_text())
        assert families["shadowd_up"].value() == 1
        assert families["shadowd_cache_entries"].value() == 0
        # A new file took the old one's name: a reader never sees half of either.
        assert target.stat().st_ino != before
        assert stat.S_IMODE(target.stat().st_mode) & 0o044 == 0o044  # the collector reads it
        await d.terminate()
        proc = await run("stats", "--socket", str(d.socket_path), "--textfile", str(target))
    one_line_error(proc, 1, str(d.socket_path))
    down = promtext.parse(target.read_text())
    assert down["shadowd_up"].value() == 0
    assert down["shadowd_scrape_timestamp_seconds"].value() > 1.7e9
    assert "shadowd_cache_entries" not in down  # no stale numbers left
    assert os.listdir(tmp_path) == ["shadowd.prom"]  # no temporaries


async def test_textfile_with_watch_follows_the_daemon(start_daemon: Any, tmp_path: Path) -> None:
    import time

    d = await start_daemon()
    target = tmp_path / "shadowd.prom"
    argv = [sys.executable, "-m", "shadowd", "stats", "--socket", str(d.socket_path)]
    argv += ["--watch", "0.2", "--textfile", str(target)]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=repo_env()
    )

    def up() -> float | None:
        try:
            return promtext.parse(target.read_text())["shadowd_up"].value()
        except (OSError, KeyError):
            return None

    try:
        with trio.fail_after(60):
            while up() != 1:
                await trio.sleep(0.05)
            stamp = promtext.parse(target.read_text())["shadowd_scrape_timestamp_seconds"]
            assert abs(stamp.value() - time.time()) < 30
            await d.terminate()
            while up() != 0:
                await trio.sleep(0.05)
    finally:
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=30)
    assert proc.returncode == 0
    assert out == ""
    assert len(err.strip().splitlines()) == 1 and str(d.socket_path) in err  # once, not per try


@pytest.mark.parametrize("form", ["--json", "--prometheus"])
async def test_watch_for_programs_keeps_a_daemon_down_out_of_stdout(
    start_daemon: Any, form: str
) -> None:
    """`stats --watch --json | jq` must read JSON only: a daemon that stops is said on stderr
    (once, not per try), and so is its return; stdout goes on with the numbers."""
    d = await start_daemon(socket_name="w.sock")
    argv = [sys.executable, "-m", "shadowd", "stats", "--socket", str(d.socket_path)]
    argv += ["--watch", "0.1", form]
    proc = subprocess.Popen(
        argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=repo_env()
    )
    assert proc.stdout is not None and proc.stderr is not None

    def is_up(ln: str) -> bool:
        return ln.startswith("{") if form == "--json" else ln == "shadowd_up 1"

    async def line(stream: Any) -> str:
        # Abandoned at the deadline: the finally below ends the process, and the read.
        return await trio.to_thread.run_sync(stream.readline, abandon_on_cancel=True)

    try:
        with trio.fail_after(20):
            first = await line(proc.stdout)
            await d.terminate()
            gone = await line(proc.stderr)
            await trio.sleep(0.5)  # several more tries while it is down: said once (below)
            d2 = await start_daemon(socket_name="w.sock")
            back = await line(proc.stderr)
            assert d2.socket_path == d.socket_path
            # Read on to the numbers after the return: a JSON line, or an exposition's up.
            out = first
            while sum(is_up(ln) for ln in out.splitlines()) < 2:
                out += await line(proc.stdout)
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(timeout=30)
        # Not communicate(): it would skip what readline() already buffered.
        with proc:  # closes the pipes
            rest, err = proc.stdout.read(), proc.stderr.read()
    assert proc.returncode == 0
    assert str(d.socket_path) in gone and "retrying" in gone
    assert back.strip() == f"shadowd: {d.socket_path} answers again"
    assert err == ""
    lines = (out + rest).splitlines()
    if form == "--json":
        assert all(json.loads(ln)["server"] for ln in lines)  # every line is JSON
    else:  # each refresh a whole exposition: comments and samples only
        assert [ln for ln in lines if ln and not ln.startswith(("# ", "shadowd_"))] == []


# -- bench, interrupted ---------------------------------------------------------

IN_TERMINAL = """
import fcntl, os, sys, termios
os.setsid()
fcntl.ioctl(0, termios.TIOCSCTTY, 0)
os.execv(sys.executable, [sys.executable, "-m", "shadowd", *sys.argv[1:]])
"""


QUICK = ("--seconds", "5", "--memory-procs", "0", "--connections", "0")


def _bench_interrupted(tmp: Path) -> tuple[int, str, str]:
    """`shadowd bench` on a terminal of its own, Ctrl-C typed once it measures in parallel."""
    import time

    master, slave = _pty()
    proc = subprocess.Popen(
        [sys.executable, "-c", IN_TERMINAL, "bench", "--rounds", "2", "--procs", "2", *QUICK],
        stdin=slave,
        stdout=slave,
        stderr=slave,
        env=dict(repo_env(), TMPDIR=str(tmp)),
    )
    os.close(slave)
    try:
        before = _read_until(master, lambda o: b"throughput, 2 client" in o, time.monotonic() + 90)
        assert b"throughput, 2 client" in before, before
        time.sleep(1.0)  # the workers are at it
        os.write(master, b"\x03")
        after = _read_until(master, lambda o: False, time.monotonic() + 60)
        code = proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(master)
    return code, before.decode(errors="replace"), after.decode(errors="replace")


@pytest.mark.slow
async def test_bench_interrupted_is_one_line_and_leaves_nothing(shared_dir: Path) -> None:
    with trio.fail_after(180):
        code, before, after = await trio.to_thread.run_sync(lambda: _bench_interrupted(shared_dir))
    assert code == 130, (before, after)
    lines = [ln.strip() for ln in after.replace("\r", "\n").split("\n") if ln.strip()]
    lines = [ln.removeprefix("^C") for ln in lines if ln != "^C"]  # the terminal's echo
    assert lines == ["shadowd bench: interrupted"], after
    assert "Traceback" not in before + after
    assert os.listdir(shared_dir) == []  # its files, daemon socket included, are gone


def test_stats_never_imports_the_daemons_io() -> None:
    """`shadowd stats` (and the parser every command builds) loads neither trio nor the
    daemon's modules: a third of its start-up time went to them (193 ms of imports,
    trio's 75) before the peer limits' defaults had a module of their own."""
    probe = (
        "import sys\n"
        "from shadowd.cli import main\n"
        "try:\n"
        "    main(['stats', '--socket', sys.argv[1]])\n"
        "except SystemExit:\n"
        "    pass\n"
        "loaded = sorted(m for m in sys.modules if m == 'trio' or m.startswith(("
        "'trio.', 'shadowd.access', 'shadowd.copier', 'shadowd.server', 'shadowd.poller')))\n"
        "print(loaded)\n"
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, "/nonexistent/shadowd.sock"],
        capture_output=True, text=True, timeout=30, env=repo_env(), check=False,
    )  # fmt: skip
    assert done.stdout.strip().splitlines()[-1] == "[]", (done.stdout, done.stderr)


# `shadowd serve` with a SIGTERM sent to itself at one moment of its start (*at*):
# just before the first block of the stop signals, or just after serve put its own
# handler in for SIGTERM. The moment is chosen here; the signal is the kernel's.
_STOP_AT = """
import os, signal, sys
at, fired = sys.argv[1], []
real_mask, real_signal = signal.pthread_sigmask, signal.signal
def fire():
    if not fired:
        fired.append(True)
        os.kill(os.getpid(), signal.SIGTERM)
def pthread_sigmask(how, mask):
    if at == "block" and how == signal.SIG_BLOCK and signal.SIGTERM in mask:
        fire()
    return real_mask(how, mask)
def handler(signum, action):
    old = real_signal(signum, action)
    if at == "handler" and signum == signal.SIGTERM:
        fire()
    return old
signal.pthread_sigmask, signal.signal = pthread_sigmask, handler
from shadowd.cli import main
sys.exit(main(sys.argv[2:]))
"""


@pytest.mark.parametrize("at", ["block", "handler"])
async def test_a_stop_signal_at_any_moment_of_the_start_stops_serve(
    shared_dir: Path, at: str
) -> None:
    """serve puts in a handler that does nothing for SIGTERM and SIGINT (a stop signal
    that lands on a copy worker's thread once run() is over must not kill it), and
    blocks them until run() handles them. It put the handler in first: a SIGTERM
    between the two ran that handler, and the daemon served on as if never told
    (before: still serving 10 s after the signal, whether it came just after the
    handler went in or just before the block). Blocked first, a signal before the
    block stops it as the default action does, and one after it is run()'s: a clean
    stop."""
    path = shared_dir / "s.sock"

    def serve() -> int | None:
        proc = subprocess.Popen(
            [sys.executable, "-c", _STOP_AT, at, "serve", "--socket", str(path)],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            env=repo_env(),
        )
        try:
            return proc.wait(10)
        except subprocess.TimeoutExpired:
            return None
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    with trio.fail_after(30):
        code = await trio.to_thread.run_sync(serve)
    assert code is not None, "still serving 10 s after SIGTERM"
    if at == "handler":
        assert code == 0  # run()'s clean stop
    assert not path.exists()
