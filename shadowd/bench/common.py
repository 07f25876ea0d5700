# What every measurement of `shadowd bench` shares: sizes and percentiles, the
# status-quo copy it compares against, the daemon it starts, and forked
# client processes that start together and are always reaped.
#
# Must never: leave a process or a descriptor behind, whatever fails.
from __future__ import annotations

import contextlib
import multiprocessing
import os
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection as Pipe
from typing import Any, TextIO

import attrs

from .. import memfd
from ..fds import FdHolder

KiB = 1024
MiB = 1024 * KiB


def human_size(n: int) -> str:
    if n >= MiB and n % MiB == 0:
        return f"{n // MiB} MiB"
    if n >= MiB:
        return f"{n / MiB:.1f} MiB"
    if n >= KiB and n % KiB == 0:
        return f"{n // KiB} KiB"
    return f"{n} B"


@attrs.frozen
class Summary:
    """Percentiles of one series of latencies, in microseconds."""

    p50: float
    p99: float
    n: int

    @classmethod
    def of(cls, seconds: list[float]) -> Summary:
        ordered = sorted(seconds)
        p99 = ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]
        return cls(p50=statistics.median(ordered) * 1e6, p99=p99 * 1e6, n=len(ordered))


def status_quo(path: str) -> int:
    """What a supervisor does today on each open: a fresh sealed memfd copy."""
    with FdHolder(os.open(path, os.O_RDONLY | os.O_CLOEXEC)) as src:
        st = os.fstat(src.fd)
        executable = bool(st.st_mode & 0o111)
        fd = memfd.create(executable=executable)
        try:
            memfd.copy_into(fd, src.fd, st.st_size)
            memfd.seal(fd, executable=executable)
        except BaseException:
            os.close(fd)
            raise
        return fd


def host_dsos() -> list[tuple[str, str]]:
    """The dynamic loader and libc this process runs on, from its own mappings."""
    found: dict[str, str] = {}
    with open("/proc/self/maps") as maps:
        for line in maps:
            parts = line.split(maxsplit=5)
            if len(parts) < 6:
                continue
            path = parts[5].strip()
            base = os.path.basename(path)
            if base.startswith("ld-linux") or base.startswith("ld-musl"):
                found.setdefault("ld.so", path)
            elif base.startswith("libc.so") or base.startswith("libc-"):
                found.setdefault("libc", path)
    return [(name, path) for name, path in sorted(found.items()) if os.path.isfile(path)]


def time_open(fn: Callable[[], int]) -> float:
    """Seconds *fn* took to return an fd (which is closed, untimed)."""
    t0 = time.perf_counter()
    fd = fn()
    elapsed = time.perf_counter() - t0
    os.close(fd)
    return elapsed


def wait_for_socket(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"{what} exited with status {proc.returncode}")
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            probe.connect(path)
            return
        except OSError:
            time.sleep(0.02)
        finally:
            probe.close()
    raise RuntimeError(f"{what} did not start listening on {path}")


def daemon_command(socket_path: str) -> list[str]:
    """A private daemon for measurements: it caches new files at once, logs only warnings."""
    return [
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


def reachable(path: str) -> None:
    """Check that a daemon answers at *path* (--socket); else RuntimeError, the client's words."""
    from shadowd_client import Client, ShadowdError

    try:
        with Client(path, timeout=5) as client:
            client.connect()
    except ShadowdError as exc:
        raise RuntimeError(str(exc)) from None


def peer_pid(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return int.from_bytes(raw[:4], sys.byteorder)
    finally:
        s.close()


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


@attrs.define
class Progress:
    """One line of progress on *stream* (overwritten on a terminal); nothing without one."""

    stream: TextIO | None = None

    def say(self, text: str) -> None:
        if self.stream is not None:
            end = "\r" if self.stream.isatty() else "\n"
            self.stream.write(f"shadowd bench: {text}".ljust(72) + end)
            self.stream.flush()


class Forks:
    """Forked client processes that start together and are always reaped."""

    def __init__(self) -> None:
        self._ctx = multiprocessing.get_context("fork")

    @contextlib.contextmanager
    def processes(
        self, target: Callable[..., None], n: int, *args: Any, start_timeout: float = 60
    ) -> Iterator[list[Pipe]]:
        """*n* forked processes running target(*args, pipe); yields our ends of the pipes.

        Each must first send one message when it is ready; that is awaited
        here. On the way out every process is joined, or killed.
        """
        pipes = []
        procs = []
        try:
            for _ in range(n):
                ours, theirs = self._ctx.Pipe()
                proc = self._ctx.Process(target=target, args=(*args, theirs), daemon=True)
                proc.start()
                pipes.append(ours)
                procs.append(proc)
            for p in pipes:
                if not p.poll(start_timeout):
                    raise RuntimeError("a benchmark process did not start")
                p.recv()
            yield pipes
        finally:
            for proc in procs:
                proc.join(timeout=10)
                if proc.is_alive():
                    proc.kill()
                    proc.join()

    def run(self, target: Callable[..., None], n: int, *args: Any) -> list[Any]:
        """Start *n* processes together ("go"); the result each sends back."""
        with self.processes(target, n, *args, start_timeout=30) as pipes:
            for p in pipes:
                p.send("go")
            results = []
            for p in pipes:
                if not p.poll(60):
                    raise RuntimeError("a worker process did not finish")
                results.append(p.recv())
            return results
