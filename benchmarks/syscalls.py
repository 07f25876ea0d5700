"""Count the daemon's syscalls per hit with `strace -c -f`.

Starts a daemon, warms files into its cache, attaches strace to the daemon
and makes N hits three ways: one client (request, reply, request...), 8
client processes at once, and one client asking for 8 files per batch open;
prints each syscall's count per hit. Needs strace.
Run: `.venv/bin/python benchmarks/syscalls.py`.

A hit itself is six syscalls (recvmsg, ioctl FIONREAD on the inotify fd,
statx, fcntl, openat, sendmsg); the rest is per round of the poller, shared
by every connection answered in it (one close_range for the round's fds, an
epoll_wait for the ready list) and per wake-up of the poller task (trio's
epoll_ctl and epoll_wait). A lone strictly request-reply client pays all of
that on every hit; several clients share it.
"""

from __future__ import annotations

import argparse
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from shadowd_client import Client

from shadowd.bench import daemon_command, wait_for_socket

HITS = 5000


BATCH = 8


def _client(socket_path: str, path: str, n: int) -> None:
    with Client(socket_path, timeout=30) as c:
        for _ in range(n):
            os.close(c.open(path))


def _batch_client(socket_path: str, path: str, n: int) -> None:
    paths = [f"{path}.{i}" for i in range(BATCH)]
    with Client(socket_path, timeout=30) as c:
        for _ in range(n // BATCH):
            for fd in c.open_many(paths):
                os.close(fd)


def count(
    socket_path: str, pid: int, path: str, procs: int, batch: bool = False
) -> dict[str, float]:
    out = os.path.join(os.path.dirname(socket_path), f"strace-{procs}-{batch}.txt")
    # -q: strace's "Process N attached/detached" lines (13 per run) went to
    # the terminal around the table.
    strace = subprocess.Popen(["strace", "-q", "-c", "-f", "-p", str(pid), "-o", out])
    time.sleep(1.0)  # let strace attach to every thread
    ctx = multiprocessing.get_context("fork")
    target = _batch_client if batch else _client
    workers = [
        ctx.Process(target=target, args=(socket_path, path, HITS // procs)) for _ in range(procs)
    ]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    strace.send_signal(signal.SIGINT)
    strace.wait()
    per_hit: dict[str, float] = {}
    with open(out) as f:
        for line in f:
            parts = line.split()
            if len(parts) >= 5 and parts[0][0].isdigit() and not line.startswith("100"):
                calls, name = int(parts[3]), parts[-1]
                per_hit[name] = calls / HITS
    return per_hit


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    if shutil.which("strace") is None:
        sys.exit("strace is not installed")
    workdir = tempfile.mkdtemp(prefix="shadowd-syscalls-")
    socket_path = os.path.join(workdir, "s.sock")
    path = os.path.join(workdir, "file")
    for name in [path, *(f"{path}.{i}" for i in range(BATCH))]:
        with open(name, "wb") as f:
            f.write(os.urandom(65536))
    daemon = subprocess.Popen(daemon_command(socket_path))
    try:
        wait_for_socket(socket_path, daemon, "the daemon")
        _client(socket_path, path, 10)  # the miss, then warm hits
        _batch_client(socket_path, path, BATCH)
        results = {
            "1 client": count(socket_path, daemon.pid, path, 1),
            "8 clients": count(socket_path, daemon.pid, path, 8),
            f"batches of {BATCH}": count(socket_path, daemon.pid, path, 1, batch=True),
        }
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    first = results["1 client"]
    names = sorted(
        {n for r in results.values() for n, v in r.items() if v >= 0.01},
        key=lambda n: -first.get(n, 0),
    )
    print(f"daemon syscalls per hit ({HITS} hits each)")
    print(f"{'syscall':<14}" + "".join(f"{k:>15}" for k in results))
    for name in names:
        print(f"{name:<14}" + "".join(f"{r.get(name, 0):>15.2f}" for r in results.values()))
    print(f"{'total':<14}" + "".join(f"{sum(r.values()):>15.2f}" for r in results.values()))


if __name__ == "__main__":
    main()
