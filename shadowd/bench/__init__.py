# `shadowd bench`: what the cache saves on this host, measured side by side.
#
# Every comparison is made in one run, interleaved sample by sample (status
# quo, cache hit, transport floor, then again), because these machines are
# noisy: only ratios measured together mean anything. One module per kind of
# measurement: latency.py (per file size, the floor, a crowd of
# connections), throughput.py (many processes, Python and C clients),
# memory.py (many holders of one file); common.py has what they share and
# cclient.py builds and runs the C client (and times its single opens per
# file: a copy, a socket hit and an index hit, in C). This module runs them
# and reports.
#
# Must never: report a figure it did not measure in this run, or leave a
# daemon, floor server, worker process or temporary file behind.
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any, TextIO

import attrs

from .. import hotcalls
from ..cache import CacheLimits
from .cclient import (
    C_CLIENT_DIR,
    CLatency,
    build_c_client,
    c_compiler,
    measure_c_latency,
    run_c_clients,
)
from .common import (
    Forks,
    MiB,
    Progress,
    Summary,
    daemon_command,
    host_dsos,
    human_size,
    peer_pid,
    reachable,
    status_quo,
    wait_for_socket,
)
from .latency import DEFAULT_SIZES, Crowd, SizeResult, crossover, measure_crowd, measure_latency
from .memory import Memory, measure_memory, memory_file
from .throughput import BATCH, THROUGHPUT_SIZE, Throughput, measure_throughput

__all__ = [
    "BATCH",
    "C_CLIENT_DIR",
    "DEFAULT_SIZES",
    "THROUGHPUT_SIZE",
    "Bench",
    "BenchResult",
    "CLatency",
    "Crowd",
    "Memory",
    "SizeResult",
    "Summary",
    "Throughput",
    "build_c_client",
    "c_compiler",
    "daemon_command",
    "format_json",
    "format_result",
    "host_dsos",
    "human_size",
    "run_c_clients",
    "status_quo",
    "wait_for_socket",
]


@attrs.frozen
class BenchResult:
    sizes: tuple[SizeResult, ...]
    floor: Summary
    floor_hit: Summary
    crossover: str
    throughput: tuple[Throughput, ...]
    cpu_us_per_hit: float | None
    memory: Memory | None
    crowd: Crowd | None
    seconds: float
    #: The daemon's CPU time per hit in the busiest run with C clients.
    c_cpu_us_per_hit: float | None = None
    #: Why there are no C client figures ("" when there are).
    c_client_missing: str = ""
    #: Where the daemon's hit path ran: hotcalls.DESCRIPTION of this install.
    hit_path: str = ""
    #: Where the Python client's index hits ran: "C" (shadowd/_hotcalls.c),
    #: "Python", or "" without an index.
    index_path: str = ""
    #: From which size an index hit beats the copy ("" without an index).
    index_crossover: str = ""
    #: The same for the C client's index hit against a copy made in C.
    c_index_crossover: str = ""
    #: The daemon's racy window (its hello): it caches no file younger.
    racy_window_s: float = 0.0
    #: Seconds the bench waited for its files to age past it; None: it would
    #: have been longer than MAX_AGE_WAIT, so its files were served uncached.
    aged_s: float | None = 0.0

    @property
    def floor_ratio(self) -> float:
        return self.floor_hit.p50 / self.floor.p50

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["floor_ratio"] = self.floor_ratio
        for s, raw in zip(self.sizes, out["sizes"], strict=True):
            raw["speedup"] = s.speedup
            raw["index_speedup"] = s.index_speedup
            if s.c is not None:
                raw["c"]["index_speedup"] = s.c.index_speedup
                raw["c"]["index_over_syscalls"] = s.c.index_over_syscalls
        for t, raw in zip(self.throughput, out["throughput"], strict=True):
            raw["ratio"] = t.ratio
            raw["c_ratio"] = t.c_ratio
        return out


#: The longest the bench waits for its files to age past the daemon's racy window.
MAX_AGE_WAIT = 10.0


def age_files(paths: list[str], window_s: float) -> float | None:
    """Wait until every file of *paths* is older (by its ctime) than the daemon's racy
    window *window_s*, which caches no younger file: seconds waited, or None (not
    waited) when that would take longer than MAX_AGE_WAIT."""
    if window_s <= 0:
        return 0.0
    newest = max(os.stat(p).st_ctime for p in paths)
    wait = max(0.0, newest + window_s + 0.05 - time.time())
    if wait > MAX_AGE_WAIT:
        return None
    time.sleep(wait)
    return wait


class Bench:
    """One benchmark run; see ``shadowd bench --help``."""

    def __init__(
        self,
        *,
        socket_path: str | None = None,
        rounds: int = 150,
        procs: tuple[int, ...] = (1, 4, 8),
        seconds: float = 2.0,
        memory_procs: int = 50,
        connections: int = 300,
        sizes: tuple[int, ...] = DEFAULT_SIZES,
        progress: TextIO | None = None,
    ) -> None:
        self.socket_path = socket_path
        self.rounds = rounds
        self.procs = procs
        self.seconds = seconds
        self.memory_procs = memory_procs
        self.connections = connections
        self.sizes = sizes
        self.progress = Progress(progress)
        self._forks = Forks()

    @contextlib.contextmanager
    def _servers(self, workdir: str) -> Iterator[tuple[str, str, int]]:
        """The daemon (ours unless --socket) and the floor; yields their sockets and pid."""
        procs: list[subprocess.Popen[bytes]] = []
        try:
            socket_path = self.socket_path
            if socket_path is None:
                socket_path = os.path.join(workdir, "shadowd.sock")
                daemon = subprocess.Popen(daemon_command(socket_path))
                procs.append(daemon)
                wait_for_socket(socket_path, daemon, "the daemon")
            floor_path = os.path.join(workdir, "floor.sock")
            floor = subprocess.Popen([sys.executable, "-m", "shadowd.floor", floor_path])
            procs.append(floor)
            wait_for_socket(floor_path, floor, "the floor server")
            yield socket_path, floor_path, peer_pid(socket_path)
        finally:
            for proc in procs:
                if proc.poll() is None:
                    proc.send_signal(signal.SIGTERM)
            for proc in procs:
                try:
                    proc.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()

    def run(self) -> BenchResult:
        from shadowd_client import Client

        started = time.monotonic()
        progress = self.progress
        if self.socket_path is not None:
            reachable(self.socket_path)  # one line, before any file is written
        workdir = tempfile.mkdtemp(prefix="shadowd-bench-")
        try:
            targets: list[tuple[str, str, int]] = []
            for size in self.sizes:
                path = os.path.join(workdir, f"file-{size}")
                with open(path, "wb") as f:
                    f.write(os.urandom(size))
                targets.append((human_size(size), path, size))
            written = [path for _, path, _ in targets]
            # Every file of the run written now: they age together (age_files).
            big = os.path.join(workdir, "file-2MiB")
            with open(big, "wb") as f:
                f.write(os.urandom(THROUGHPUT_SIZE))
            held = memory_file(workdir) if self.memory_procs else ""
            written += [big, held] if held else [big]
            for name, path in host_dsos():
                targets.append((f"{name} ({os.path.basename(path)})", path, os.path.getsize(path)))
            with (
                self._servers(workdir) as (socket_path, floor_path, daemon_pid),
                Client(socket_path, timeout=30) as client,
                Client(floor_path, timeout=30) as floor,
            ):
                client.connect()
                racy_ns = client.limits.get("racy_window_ns", CacheLimits().racy_window_ns)
                if racy_ns:
                    progress.say(f"files aging past the racy window ({racy_ns / 1e9:g} s)")
                aged = age_files(written, racy_ns / 1e9)
                c_client, c_missing = build_c_client(workdir)
                index = client.index()
                index_path = "" if index is None else "C" if index.in_c else "Python"
                try:
                    sizes, floor_s, floor_hit = measure_latency(
                        client, floor, targets, self.rounds, progress, index=index
                    )
                finally:
                    if index is not None:
                        index.close()
                if c_client is not None and index is not None:
                    # The same files in C, in the same run (its own three series
                    # interleaved): what a supervisor in C pays.
                    progress.say("latency in C: copy, socket hit, index hit")
                    in_c = measure_c_latency(
                        c_client, socket_path, [path for _, path, _ in targets], self.rounds
                    )
                    sizes = [
                        attrs.evolve(s, c=in_c[path])
                        for s, (_, path, _) in zip(sizes, targets, strict=True)
                    ]
                crowd = (
                    measure_crowd(client, socket_path, targets[0][1], self.connections, progress)
                    if self.connections
                    else None
                )
                throughput, cpu, c_cpu = measure_throughput(
                    self._forks,
                    progress,
                    socket_path=socket_path,
                    floor_path=floor_path,
                    path=big,
                    daemon_pid=daemon_pid,
                    c_client=c_client,
                    procs=self.procs,
                    seconds=self.seconds,
                )
                memory = (
                    measure_memory(self._forks, progress, socket_path, held, self.memory_procs)
                    if self.memory_procs
                    else None
                )
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        progress.say("done")
        return BenchResult(
            sizes=tuple(sizes),
            floor=floor_s,
            floor_hit=floor_hit,
            crossover=crossover(sizes),
            index_crossover=crossover(sizes, index=True) if sizes and sizes[0].index else "",
            c_index_crossover=crossover(sizes, c=True) if sizes and sizes[0].c else "",
            throughput=tuple(throughput),
            cpu_us_per_hit=cpu,
            memory=memory,
            crowd=crowd,
            seconds=time.monotonic() - started,
            c_cpu_us_per_hit=c_cpu,
            c_client_missing=c_missing,
            hit_path=hotcalls.DESCRIPTION,
            index_path=index_path,
            racy_window_s=racy_ns / 1e9,
            aged_s=aged,
        )


def format_result(r: BenchResult) -> str:
    indexed = bool(r.sizes) and r.sizes[0].index is not None
    lines = [
        "status quo (open + memfd_create + sendfile + seals) against a shadowd cache hit",
        "(Client.open through the socket)"
        + (
            f" and an index hit (IndexView.open_fd, in {r.index_path or '?'}, no round trip)"
            if indexed
            else ""
        )
        + "; microseconds, measured interleaved in one run",
        "",
        f"{'file':<28} {'copy p50':>9} {'copy p99':>9} {'hit p50':>9} {'hit p99':>9}"
        f" {'copy/hit':>9}" + (f" {'index p50':>9} {'copy/idx':>9}" if indexed else ""),
    ]
    for s in r.sizes:
        line = (
            f"{s.name:<28} {s.copy.p50:>9.1f} {s.copy.p99:>9.1f} {s.hit.p50:>9.1f}"
            f" {s.hit.p99:>9.1f} {s.speedup:>8.2f}x"
        )
        if s.index is not None:
            line += f" {s.index.p50:>9.1f} {s.index_speedup or 0:>8.2f}x"
        lines.append(line)
    if r.sizes and r.sizes[0].c is not None:
        lines += [
            "",
            "the same files with the C client (client/c), timed in C from the open of the",
            "source to the close of both fds: a copy in C (shadowd_copy_fd), a hit through",
            "the socket (shadowd_request_fd), an index hit (fstat, shadowd_index_open),",
            "and the system calls an index hit cannot do without, made bare (the floor",
            "this host sets under it); interleaved, after the Python series; microseconds",
            "",
            f"{'file':<28} {'copy p50':>9} {'hit p50':>9} {'index p50':>9} {'index p99':>9}"
            f" {'copy/idx':>9} {'hit/idx':>9} {'sys p50':>9} {'idx/sys':>9}",
        ]
        for s in r.sizes:
            assert s.c is not None
            lines.append(
                f"{s.name:<28} {s.c.copy.p50:>9.1f} {s.c.hit.p50:>9.1f} {s.c.index.p50:>9.1f}"
                f" {s.c.index.p99:>9.1f} {s.c.index_speedup:>8.2f}x"
                f" {s.c.hit.p50 / s.c.index.p50:>8.2f}x {s.c.syscalls.p50:>9.1f}"
                f" {s.c.index_over_syscalls:>8.2f}x"
            )
    lines += [
        "",
        f"crossover: {r.crossover}",
        *([f"index crossover: {r.index_crossover}"] if r.index_crossover else []),
        *([f"index crossover in C: {r.c_index_crossover}"] if r.c_index_crossover else []),
        f"transport floor (same client, a server that only reopens and sends):"
        f" p50 {r.floor.p50:.1f} us, p99 {r.floor.p99:.1f} us",
        f"shadowd hit of the smallest file, alongside: p50 {r.floor_hit.p50:.1f} us"
        f" = {r.floor_ratio:.2f}x the floor",
        "",
        f"throughput, {human_size(THROUGHPUT_SIZE)} file, whole seconds of back-to-back opens:",
        f"{'client processes':>16} {'hits/s':>10} {'copies/s':>10} {'hits/copies':>12}"
        f" {f'batched {BATCH}/s':>12} {'floor/s':>10}",
    ]
    for t in r.throughput:
        lines.append(
            f"{t.procs:>16} {t.hits_per_s:>10.0f} {t.copies_per_s:>10.0f} {t.ratio:>11.2f}x"
            f" {t.batch_hits_per_s:>12.0f} {t.floor_per_s:>10.0f}"
        )
    if r.cpu_us_per_hit is not None:
        lines.append(f"daemon CPU time per hit (busiest run): {r.cpu_us_per_hit:.1f} us")
    if r.c_client_missing:
        lines.append(f"C client: not measured ({r.c_client_missing})")
    else:
        lines += [
            "",
            "the same processes running the C client (client/c) instead, copies made in C:",
            f"{'client processes':>16} {'hits/s':>10} {'copies/s':>10} {'hits/copies':>12}",
        ]
        for t in r.throughput:
            lines.append(
                f"{t.procs:>16} {t.c_hits_per_s or 0:>10.0f} {t.c_copies_per_s or 0:>10.0f}"
                f" {t.c_ratio or 0:>11.2f}x"
            )
        if r.c_cpu_us_per_hit is not None:
            lines.append(f"daemon CPU time per hit (busiest run): {r.c_cpu_us_per_hit:.1f} us")
    lines.append(f"daemon hit path system calls in: {r.hit_path}")
    if r.memory is not None:
        m = r.memory
        lines += [
            "",
            f"memory: {m.procs} processes each mapping a {human_size(m.size)} file"
            " (the shmem they map, Pss):",
            f"  through shadowd   {m.shadowd_bytes / MiB:8.1f} MiB",
            f"  private copies    {m.private_bytes / MiB:8.1f} MiB",
        ]
    if r.crowd is not None:
        c = r.crowd
        lines += [
            "",
            f"hit latency with {c.connections} other connections open:"
            f" p50 {c.crowded.p50:.1f} us, p99 {c.crowded.p99:.1f} us"
            f" (alone: p50 {c.alone.p50:.1f} us, p99 {c.alone.p99:.1f} us)",
        ]
    if r.racy_window_s > 0:
        lines += ["", racy_line(r)]
    lines.append(f"\n(run took {r.seconds:.0f} s)")
    return "\n".join(lines)


def racy_line(r: BenchResult) -> str:
    """What the daemon's racy window did to the run (it caches no younger file)."""
    window = f"the daemon's racy window {r.racy_window_s:g} s"
    if r.aged_s is not None:
        return (
            f"{window}: the bench waited {r.aged_s:.1f} s after writing its files, so that"
            " the daemon cached them (its hits are hits)"
        )
    return (
        f"{window} is longer than the bench waits ({MAX_AGE_WAIT:g} s): the daemon served"
        " the bench's files uncached (a copy for each open), so the hit columns are no hits;"
        " measure against a daemon with a shorter --racy-window, or without --socket"
    )


def format_json(r: BenchResult) -> str:
    return json.dumps(r.to_json(), sort_keys=True)
