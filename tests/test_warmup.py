# The daemon's warm-up (shadowd/warmup.py): it starts the worker threads and
# runs the first-request paths before the daemon says it is ready, leaves
# nothing behind that stats, the cache or the fd table would show, and is cut
# short by a SIGTERM, after which the daemon never says READY=1.
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import trio
from shadowd_client import Client

from shadowd.warmup import DELAY_VARIABLE
from tests.conftest import Daemon, make_file, repo_env, settle
from tests.manager import ServiceManager, running

#: $SHADOWD_TEST_WARMUP_DELAY for a daemon held in its warm-up: far longer
#: than a test may run, so that the daemon is still in it when it is stopped.
HELD = "3600"

# Warm up twice in a fresh process, reporting what each left behind: its fds
# (by target), its threads and their nice values, and that nothing raised.
_WARM_UP_TWICE = """
import json, os, sys, threading, trio
from shadowd.copier import WORKER_NICE
from shadowd.protocol import WireLimits
from shadowd.warmup import warm_up

def fds():
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass
    return out

def nices():
    me = threading.get_native_id()
    return sorted(
        os.getpriority(os.PRIO_PROCESS, int(t)) for t in os.listdir("/proc/self/task")
        if int(t) != me
    )

async def main():
    before = fds()
    limiter = trio.CapacityLimiter(3)
    args = dict(workers=3, limiter=limiter, wire=WireLimits(), hello_limits={"max_request": 65536})
    await warm_up(**args)
    first = fds()
    threads = nices()
    await warm_up(**args)
    second = fds()
    print(json.dumps({"before": before, "first": first, "second": second,
                      "nices": threads, "after_again": nices(), "worker_nice": WORKER_NICE}))

trio.run(main)
"""


def _run_fresh(code: str, timeout: float) -> dict[str, Any]:
    """*code* run in a fresh Python process: the JSON object it printed."""
    done = subprocess.run(
        [sys.executable, "-c", code],
        env=repo_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out: dict[str, Any] = json.loads(done.stdout)
    return out


def test_warm_up_starts_niced_workers_and_leaves_no_fd() -> None:
    out = _run_fresh(_WARM_UP_TWICE, timeout=60)
    before, first, second = out["before"], out["first"], out["second"]
    # The only fd the first warm-up may add is the one the memfd module keeps
    # for the process's life (its /proc/self/fd, opened by the first reopen).
    added = {fd: target for fd, target in first.items() if fd not in before}
    assert all(target == f"/proc/{_pid_of(target)}/fd" for target in added.values()), added
    assert len(added) <= 1
    assert not any("warmup" in target for target in first.values())
    # A second warm-up adds nothing: nothing is leaked per run.
    assert second == first
    # Its threads: three workers, each at the copies' priority, still there
    # for the next warm-up (and the daemon's first copies) to use.
    assert out["nices"] == [out["worker_nice"]] * 3
    assert out["after_again"] == out["nices"]


def _pid_of(target: str) -> str:
    parts = target.split("/")
    return parts[2] if len(parts) > 2 else ""


def _stats(d: Daemon) -> dict[str, Any]:
    with Client(d.socket_path, timeout=10) as c:
        return c.stats()


async def test_a_warmed_daemon_shows_nothing_and_holds_no_warm_up_fd(
    start_daemon: Any, tmp_path: Path
) -> None:
    d: Daemon = await start_daemon("--racy-window", "0.05", "--copy-workers", "3")
    with trio.fail_after(30):
        s = await trio.to_thread.run_sync(_stats, d)
        # The fixture's readiness probe (a hello, then a close) counts until
        # the daemon's next round sees it gone: only then is ours alone.
        while s["clients"] > 1:
            await trio.sleep(0.02)
            s = await trio.to_thread.run_sync(_stats, d)
        targets = d.fd_targets()
        tasks = len(os.listdir(f"/proc/{d.pid}/task"))
    counters = (
        "hits", "misses", "entries", "bytes", "copies", "bytes_copied", "evictions",
        "invalidations", "uncached", "refused", "watched_files", "index_entries",
        "index_hits", "pinned_bytes", "memory_bytes",
    )  # fmt: skip
    assert {k: s[k] for k in counters} == dict.fromkeys(counters, 0)
    assert all(sum(h["counts"]) == 0 for h in s["latency"].values())
    assert s["clients"] == 1  # the stats request itself
    assert not any("warmup" in t for t in targets), targets
    assert tasks >= 4  # the loop and the three warm workers
    # And it serves as any daemon does: a miss, then a hit.
    f = make_file(tmp_path / "f.bin", os.urandom(50_000))
    settle(f)

    def twice() -> list[bytes]:
        out = []
        with Client(d.socket_path, timeout=10) as c:
            for _ in range(2):
                fd = c.open(f)
                try:
                    out.append(os.pread(fd, 60_000, 0))
                finally:
                    os.close(fd)
        return out

    with trio.fail_after(30):
        assert await trio.to_thread.run_sync(twice) == [f.read_bytes()] * 2
        s = await trio.to_thread.run_sync(_stats, d)
    assert (s["misses"], s["hits"]) == (1, 1)


async def test_ready_comes_after_the_warm_up(start_daemon: Any, shared_dir: Path) -> None:
    """READY=1 is sent once the workers run: a service manager's "started" is warm."""
    path = str(shared_dir / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as notify:
        notify.bind(path)
        notify.setblocking(False)
        env = dict(os.environ, NOTIFY_SOCKET=path)
        d: Daemon = await start_daemon("--copy-workers", "2", env=env)
        with trio.fail_after(30):
            while True:
                await trio.lowlevel.wait_readable(notify)
                if b"READY=1" in notify.recv(4096).split(b"\n"):
                    break
        tasks = len(os.listdir(f"/proc/{d.pid}/task"))
    assert tasks >= 3  # the loop and two workers, already there at READY=1


# A warm-up whose sealed copy cannot be made: no fd may be opened (the fd
# limit is the highest fd in use + 1, the numbers below it all taken), so
# memfd_create fails in the first worker. The other workers wait at the
# barrier for that one; THREAD_WAIT is made far longer than the subprocess
# may run, so a warm-up that leaves them waiting hangs here instead of
# costing a daemon THREAD_WAIT before READY=1.
_WARM_UP_WITHOUT_FDS = """
import json, os, resource, trio
import shadowd.warmup
from shadowd.protocol import WireLimits
from shadowd.warmup import warm_up

shadowd.warmup.THREAD_WAIT = 600.0

def fds():
    return sorted(int(name) for name in os.listdir("/proc/self/fd"))

async def main():
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    before = fds()
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(before) + 1, hard))
    holes = []  # the free numbers below the limit, taken
    try:
        while True:
            try:
                holes.append(os.dup(0))
            except OSError:
                break
        await warm_up(workers=3, limiter=trio.CapacityLimiter(3), wire=WireLimits(),
                      hello_limits={"max_request": 65536})
    finally:
        for fd in holes:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    print(json.dumps({"before": before, "after": fds()}))

trio.run(main)
"""


def test_a_warm_up_that_cannot_copy_does_not_hold_up_the_start() -> None:
    out = _run_fresh(_WARM_UP_WITHOUT_FDS, timeout=30)
    assert out["after"] == out["before"]  # and nothing was left open


@pytest.fixture
async def manager(shared_dir: Path) -> AsyncIterator[ServiceManager]:
    async with running(shared_dir) as m:
        yield m


@pytest.mark.parametrize("passed", [False, True], ids=["own-socket", "socket-activated"])
async def test_sigterm_during_the_warm_up_stops_without_ever_saying_ready(
    manager: ServiceManager, monkeypatch: pytest.MonkeyPatch, shared_dir: Path, passed: bool
) -> None:
    """Held in its warm-up, the daemon gets SIGTERM: the manager hears STOPPING=1 and
    never READY=1, and the daemon exits 0 having removed the socket it created (and
    kept the one the manager passed). That the warm-up is cut short rather than
    ended by the shutdown's grace is tests/test_daemon.py's to show: the grace
    can be set there."""
    monkeypatch.setenv(DELAY_VARIABLE, HELD)
    own = shared_dir / "own.sock"
    # Passed: the manager's socket; else one the daemon creates (no socket unit).
    args = () if passed else ("--socket", str(own))
    index = manager.start(*args, with_socket=passed)
    # The knob's warning comes from inside the warm-up, so after the daemon
    # handles SIGTERM itself; the last worker is held from then on.
    await manager.wait_for_log(f"{DELAY_VARIABLE}={HELD}")
    if not passed:
        assert own.is_socket()  # created before the warm-up, not served on yet
    assert await manager.stop(signal.SIGTERM) == 0
    got = await manager.said_since(index)
    assert got == [{"STOPPING": "1", "STATUS": "stopping: finishing in-flight requests"}]
    assert not any("READY" in m for m in got)
    if passed:
        assert manager.socket_path.is_socket()  # the manager's, kept for the next start
        assert manager.store == {}
    else:
        assert not own.exists()
    log = manager.log()
    assert "serving on" not in log and "Traceback" not in log
