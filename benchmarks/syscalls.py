"""Count the daemon's syscalls per hit with `strace -c -f`.

Starts a daemon, warms one file into its cache, attaches strace to the
daemon and makes N hits, once from one client (request, reply, request...)
and once from 8 client processes at the same time; prints each syscall's
count per hit. Needs strace. Run: `.venv/bin/python benchmarks/syscalls.py`.
"""

from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

from shadowd_client import Client

from shadowd.bench import _wait_for_socket

HITS = 5000


def _client(socket_path: str, path: str, n: int) -> None:
    with Client(socket_path, timeout=30) as c:
        for _ in range(n):
            os.close(c.open(path))


def count(socket_path: str, pid: int, path: str, procs: int) -> dict[str, float]:
    out = os.path.join(os.path.dirname(socket_path), f"strace-{procs}.txt")
    strace = subprocess.Popen(["strace", "-c", "-f", "-p", str(pid), "-o", out])
    time.sleep(1.0)  # let strace attach to every thread
    ctx = multiprocessing.get_context("fork")
    workers = [
        ctx.Process(target=_client, args=(socket_path, path, HITS // procs)) for _ in range(procs)
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


def main() -> None:
    if shutil.which("strace") is None:
        sys.exit("strace is not installed")
    workdir = tempfile.mkdtemp(prefix="shadowd-syscalls-")
    socket_path = os.path.join(workdir, "s.sock")
    path = os.path.join(workdir, "file")
    with open(path, "wb") as f:
        f.write(os.urandom(65536))
    daemon = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "shadowd",
            "serve",
            "--socket",
            socket_path,
            "--racy-window",
            "0",
            "--log-level",
            "warning",
        ]
    )
    try:
        _wait_for_socket(socket_path, daemon, "the daemon")
        _client(socket_path, path, 10)  # the miss, then warm hits
        results = {procs: count(socket_path, daemon.pid, path, procs) for procs in (1, 8)}
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait()
        shutil.rmtree(workdir, ignore_errors=True)
    names = sorted(
        {n for r in results.values() for n, v in r.items() if v >= 0.01},
        key=lambda n: -results[1].get(n, 0),
    )
    print(f"daemon syscalls per hit ({HITS} hits each)")
    print(f"{'syscall':<14} {'1 client':>9} {'8 clients':>10}")
    for name in names:
        print(f"{name:<14} {results[1].get(name, 0):>9.2f} {results[8].get(name, 0):>10.2f}")
    total1 = sum(v for v in results[1].values())
    total8 = sum(v for v in results[8].values())
    print(f"{'total':<14} {total1:>9.2f} {total8:>10.2f}")


if __name__ == "__main__":
    main()
