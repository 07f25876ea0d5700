# The C client (client/c) as a benchmark and test instrument: finding a
# compiler, building `shadowd-open`, running many of them at once, and its
# latency per file (a copy, a socket hit and an index hit, timed in C).
#
# Must never: leave a C client process running, or report a count or a
# latency it did not read from the process.
from __future__ import annotations

import json
import os
import shutil
import subprocess

import attrs

from .common import Summary

#: The C client's sources, next to the Python client's in the source tree.
C_CLIENT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "client", "c"
)


def c_compiler() -> str | None:
    """$CC, else cc or gcc from $PATH; None when there is none."""
    return os.environ.get("CC") or shutil.which("cc") or shutil.which("gcc")


def build_c_client(workdir: str, *flags: str) -> tuple[str | None, str]:
    """Compile client/c's shadowd-open into *workdir*: (its path, "") or (None, why not).

    *flags* go to the compiler (the tests shorten the client's timeout).
    """
    sources = [os.path.join(C_CLIENT_DIR, name) for name in ("shadowd-open.c", "shadowd.c")]
    if not all(os.path.exists(src) for src in sources):
        return None, f"no C client sources at {C_CLIENT_DIR} (not a source checkout)"
    cc = c_compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or $CC)"
    binary = os.path.join(workdir, "shadowd-open")
    done = subprocess.run(
        [cc, "-O2", *flags, "-o", binary, *sources, "-pthread"],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None, f"the C client did not compile: {done.stderr.strip()[:200]}"
    return binary, ""


def run_c_clients(binary: str, n: int, args: list[str], seconds: float) -> int:
    """*n* shadowd-open processes looping for *seconds*, started together; total opens."""
    command = [binary, "-g", "-l", str(seconds), *args]
    procs = [
        subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        for _ in range(n)
    ]
    try:
        for proc in procs:
            assert proc.stdout is not None
            if proc.stdout.readline().strip() != "ready":
                raise RuntimeError("a C client process did not start")
        for proc in procs:
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        total = 0
        for proc in procs:
            out, _ = proc.communicate(timeout=seconds + 60)
            if proc.returncode != 0:
                raise RuntimeError(f"a C client process failed (status {proc.returncode})")
            total += int(out)
        return total
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()


@attrs.frozen
class CLatency:
    """One file's single opens timed in C by `shadowd-open --latency`, interleaved.

    Each from the open of the source to the close of the source and of the
    fd got: a local copy (shadowd_copy_fd), a hit through the socket
    (shadowd_request_fd), a hit through the index (fstat, shadowd_index_open),
    and the system calls an index hit cannot do without, made bare on a
    sealed copy the process holds (*syscalls*: this host's floor under it).
    """

    copy: Summary
    hit: Summary
    index: Summary
    syscalls: Summary

    @property
    def index_speedup(self) -> float:
        """How many times faster an index hit is than the copy in C (p50)."""
        return self.copy.p50 / self.index.p50

    @property
    def index_over_syscalls(self) -> float:
        """An index hit's p50 over that of its bare system calls: the client's own share."""
        return self.index.p50 / self.syscalls.p50


def measure_c_latency(
    binary: str, socket_path: str, paths: list[str], rounds: int
) -> dict[str, CLatency]:
    """`shadowd-open --latency` on *paths* (cached by the daemon, as this uid): per path."""
    done = subprocess.run(
        [binary, "-s", socket_path, "--latency", "--rounds", str(rounds), *paths],
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"shadowd-open --latency failed: {done.stderr.strip()[:300]}")
    out: dict[str, CLatency] = {}
    for line in done.stdout.splitlines():
        row = json.loads(line)
        n = int(row["rounds"])
        out[row["path"]] = CLatency(
            *(
                Summary(p50=row[k][0], p99=row[k][1], n=n)
                for k in ("copy", "socket", "index", "syscalls")
            )
        )
    if sorted(out) != sorted(paths):
        raise RuntimeError("shadowd-open --latency did not report every file")
    return out
