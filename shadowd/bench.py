# `shadowd bench`: what the cache saves on this host, measured side by side.
#
# Every comparison is made in one run, interleaved sample by sample (status
# quo, cache hit, transport floor, then again), because these machines are
# noisy: only ratios measured together mean anything.
#
# Must never: report a figure it did not measure in this run, or leave a
# daemon, floor server, worker process or temporary file behind.
from __future__ import annotations

import contextlib
import functools
import json
import multiprocessing
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection as Pipe
from typing import Any, TextIO

import attrs

from . import hotcalls, memfd
from .fds import FdHolder

KiB = 1024
MiB = 1024 * KiB
DEFAULT_SIZES = (4 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB, 16 * MiB)
THROUGHPUT_SIZE = 2 * MiB
#: Files per request in the batch-open throughput run (an exec's DSOs).
BATCH = 8


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


@attrs.frozen
class SizeResult:
    name: str
    size: int
    copy: Summary
    hit: Summary

    @property
    def speedup(self) -> float:
        """How many times faster a hit is than the status-quo copy (p50)."""
        return self.copy.p50 / self.hit.p50


@attrs.frozen
class Throughput:
    procs: int
    hits_per_s: float
    copies_per_s: float
    #: Hits per second when each request is a batch open of BATCH files.
    batch_hits_per_s: float = 0.0
    #: Opens per second the transport floor answers, with the same client.
    floor_per_s: float = 0.0
    #: The same with the C client (client/c) in each process: hits, and
    #: status-quo copies made in C; None when it could not be built here.
    c_hits_per_s: float | None = None
    c_copies_per_s: float | None = None

    @property
    def ratio(self) -> float:
        return self.hits_per_s / self.copies_per_s if self.copies_per_s else float("inf")

    @property
    def c_ratio(self) -> float | None:
        if self.c_hits_per_s is None or not self.c_copies_per_s:
            return None
        return self.c_hits_per_s / self.c_copies_per_s


@attrs.frozen
class Memory:
    procs: int
    size: int
    shadowd_bytes: int
    private_bytes: int


@attrs.frozen
class Crowd:
    """Hit latency alone and with many other connections held open."""

    connections: int
    alone: Summary
    crowded: Summary


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

    @property
    def floor_ratio(self) -> float:
        return self.floor_hit.p50 / self.floor.p50

    def to_json(self) -> dict[str, Any]:
        out = attrs.asdict(self)
        out["floor_ratio"] = self.floor_ratio
        for s, raw in zip(self.sizes, out["sizes"], strict=True):
            raw["speedup"] = s.speedup
        for t, raw in zip(self.throughput, out["throughput"], strict=True):
            raw["ratio"] = t.ratio
            raw["c_ratio"] = t.c_ratio
        return out


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


def _time(fn: Callable[[], int]) -> float:
    t0 = time.perf_counter()
    fd = fn()
    elapsed = time.perf_counter() - t0
    os.close(fd)
    return elapsed


def _wait_for_socket(path: str, proc: subprocess.Popen[bytes], what: str) -> None:
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


def _peer_pid(path: str) -> int:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    try:
        s.connect(path)
        raw = s.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
        return int.from_bytes(raw[:4], sys.byteorder)
    finally:
        s.close()


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _shmem_bytes() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Shmem line in /proc/meminfo")


def _worker(mode: str, socket_path: str, path: str, seconds: float, pipe: Pipe) -> None:
    """One client process of the throughput test: as many opens as it can."""
    from shadowd_client import Client

    client = Client(socket_path, timeout=30) if mode != "copy" else None
    if client is not None:
        os.close(client.open(path))
    batch = [path] * BATCH
    pipe.send("ready")
    pipe.recv()  # start together
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if client is None:
            os.close(status_quo(path))
            count += 1
        elif mode == "batch":
            for fd in client.open_many(batch):
                os.close(fd)
            count += BATCH
        else:
            os.close(client.open(path))
            count += 1
    pipe.send(count)
    if client is not None:
        client.close()


def _holder(mode: str, socket_path: str, path: str, pipe: Pipe) -> None:
    """One process of the memory test: hold an fd of *path*, map and read it."""
    import mmap

    from shadowd_client import Client

    if mode == "hit":
        with Client(socket_path, timeout=30) as client:
            fd = client.open(path)
    else:
        fd = status_quo(path)
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        for off in range(0, size, 4096):
            m[off]  # fault every page in, as a loader would
        pipe.send("holding")
        pipe.recv()
    os.close(fd)


#: The C client's sources, next to the Python client's in the source tree.
C_CLIENT_DIR = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "client", "c"
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
        [cc, "-O2", *flags, "-o", binary, *sources], capture_output=True, text=True, check=False
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
        self.progress = progress
        self._ctx = multiprocessing.get_context("fork")

    def _say(self, text: str) -> None:
        if self.progress is not None:
            end = "\r" if self.progress.isatty() else "\n"
            self.progress.write(f"shadowd bench: {text}".ljust(72) + end)
            self.progress.flush()

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
                _wait_for_socket(socket_path, daemon, "the daemon")
            floor_path = os.path.join(workdir, "floor.sock")
            floor = subprocess.Popen([sys.executable, "-m", "shadowd.floor", floor_path])
            procs.append(floor)
            _wait_for_socket(floor_path, floor, "the floor server")
            yield socket_path, floor_path, _peer_pid(socket_path)
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
        workdir = tempfile.mkdtemp(prefix="shadowd-bench-")
        try:
            targets: list[tuple[str, str, int]] = []
            for size in self.sizes:
                path = os.path.join(workdir, f"file-{size}")
                with open(path, "wb") as f:
                    f.write(os.urandom(size))
                targets.append((human_size(size), path, size))
            for name, path in host_dsos():
                targets.append((f"{name} ({os.path.basename(path)})", path, os.path.getsize(path)))
            with (
                self._servers(workdir) as (socket_path, floor_path, daemon_pid),
                Client(socket_path, timeout=30) as client,
                Client(floor_path, timeout=30) as floor,
            ):
                sizes, floor_s, floor_hit = self._latency(client, floor, targets)
                crowd = (
                    self._crowd(client, socket_path, targets[0][1]) if self.connections else None
                )
                big = os.path.join(workdir, "file-2MiB")
                with open(big, "wb") as f:
                    f.write(os.urandom(THROUGHPUT_SIZE))
                c_client, c_missing = build_c_client(workdir)
                throughput, cpu, c_cpu = self._throughput(
                    socket_path, floor_path, big, daemon_pid, c_client
                )
                memory = self._memory(socket_path, workdir) if self.memory_procs else None
        finally:
            shutil.rmtree(workdir, ignore_errors=True)
        self._say("done")
        return BenchResult(
            sizes=tuple(sizes),
            floor=floor_s,
            floor_hit=floor_hit,
            crossover=_crossover(sizes),
            throughput=tuple(throughput),
            cpu_us_per_hit=cpu,
            memory=memory,
            crowd=crowd,
            seconds=time.monotonic() - started,
            c_cpu_us_per_hit=c_cpu,
            c_client_missing=c_missing,
            hit_path=hotcalls.DESCRIPTION,
        )

    def _latency(
        self, client: Any, floor: Any, targets: list[tuple[str, str, int]]
    ) -> tuple[list[SizeResult], Summary, Summary]:
        copies: dict[str, list[float]] = {name: [] for name, _, _ in targets}
        hits: dict[str, list[float]] = {name: [] for name, _, _ in targets}
        floor_samples: list[float] = []
        floor_hits: list[float] = []
        small = targets[0][1]
        for _, path, _ in targets:  # warm: the first open of each is the miss
            os.close(client.open(path))
        os.close(floor.open(small))
        rng = random.Random(0)
        for r in range(self.rounds):
            if r % 10 == 0:
                self._say(f"latency, round {r + 1} of {self.rounds}")
            # Every measurement once per round, in a new random order each
            # round: what runs just before (a 16 MiB copy leaves the caches
            # cold) must not favour one series over another.
            # The floor is asked as often as the daemon, so that neither
            # server process is left idle (and cold) longer than the other.
            jobs: list[tuple[list[float], Callable[[], int]]] = []
            for name, path, size in targets:
                jobs.append((floor_samples, functools.partial(floor.open, small)))
                jobs.append((floor_hits, functools.partial(client.open, small)))
                # The biggest copies take milliseconds: fewer rounds of them.
                if size >= 8 * MiB and r >= max(20, self.rounds // 5):
                    continue
                jobs.append((copies[name], functools.partial(status_quo, path)))
                jobs.append((hits[name], functools.partial(client.open, path)))
            rng.shuffle(jobs)
            for samples, job in jobs:
                samples.append(_time(job))
        results = [
            SizeResult(
                name=name, size=size, copy=Summary.of(copies[name]), hit=Summary.of(hits[name])
            )
            for name, _, size in targets
        ]
        return results, Summary.of(floor_samples), Summary.of(floor_hits)

    def _crowd(self, client: Any, socket_path: str, path: str) -> Crowd:
        """Hit latency with self.connections other clients connected (and idle)."""
        from shadowd.protocol import Hello, encode_request

        def sample(n: int) -> list[float]:
            return [_time(functools.partial(client.open, path)) for _ in range(n)]

        self._say(f"latency with {self.connections} other connections open")
        alone = sample(100)
        held: list[socket.socket] = []
        try:
            hello, _ = encode_request(Hello(id=0, client="shadowd-bench-idle"))
            for _ in range(self.connections):
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                held.append(s)
                s.settimeout(30)
                s.connect(socket_path)
                s.send(hello)
                s.recv(65536)
            crowded = sample(200)
        finally:
            for s in held:
                s.close()
        alone += sample(100)  # before and after, against drift
        return Crowd(self.connections, Summary.of(alone), Summary.of(crowded))

    @contextlib.contextmanager
    def _processes(
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

    def _run_workers(self, target: Callable[..., None], n: int, *args: Any) -> list[Any]:
        with self._processes(target, n, *args, start_timeout=30) as pipes:
            for p in pipes:
                p.send("go")
            results = []
            for p in pipes:
                if not p.poll(60):
                    raise RuntimeError("a worker process did not finish")
                results.append(p.recv())
            return results

    def _throughput(
        self,
        socket_path: str,
        floor_path: str,
        path: str,
        daemon_pid: int,
        c_client: str | None,
    ) -> tuple[list[Throughput], float | None, float | None]:
        out = []
        cpu_per_hit: float | None = None
        c_cpu_per_hit: float | None = None
        for n in self.procs:
            self._say(f"throughput, {n} client process{'es' if n > 1 else ''}")
            cpu0 = _cpu_seconds(daemon_pid)
            hits = sum(self._run_workers(_worker, n, "hit", socket_path, path, self.seconds))
            cpu1 = _cpu_seconds(daemon_pid)
            copies = sum(self._run_workers(_worker, n, "copy", socket_path, path, self.seconds))
            batched = sum(self._run_workers(_worker, n, "batch", socket_path, path, self.seconds))
            floor = sum(self._run_workers(_worker, n, "hit", floor_path, path, self.seconds))
            c_hits = c_copies = None
            if c_client is not None:
                cpu2 = _cpu_seconds(daemon_pid)
                c_hits = run_c_clients(c_client, n, ["-s", socket_path, path], self.seconds)
                cpu3 = _cpu_seconds(daemon_pid)
                c_copies = run_c_clients(c_client, n, ["-c", path], self.seconds)
                if n == max(self.procs) and c_hits:
                    c_cpu_per_hit = (cpu3 - cpu2) / c_hits * 1e6
            out.append(
                Throughput(
                    n,
                    hits / self.seconds,
                    copies / self.seconds,
                    batch_hits_per_s=batched / self.seconds,
                    floor_per_s=floor / self.seconds,
                    c_hits_per_s=None if c_hits is None else c_hits / self.seconds,
                    c_copies_per_s=None if c_copies is None else c_copies / self.seconds,
                )
            )
            if n == max(self.procs) and hits:
                cpu_per_hit = (cpu1 - cpu0) / hits * 1e6
        return out, cpu_per_hit, c_cpu_per_hit

    def _memory(self, socket_path: str, workdir: str) -> Memory:
        size = 16 * MiB
        path = os.path.join(workdir, "held-16MiB")
        with open(path, "wb") as f:
            f.write(os.urandom(size))

        def held(mode: str) -> int:
            self._say(f"memory, {self.memory_procs} processes holding 16 MiB ({mode})")
            before = _shmem_bytes()
            with self._processes(_holder, self.memory_procs, mode, socket_path, path) as pipes:
                during = _shmem_bytes()  # every holder has faulted its pages in
                for pipe in pipes:
                    pipe.send("release")
            return max(0, during - before)

        return Memory(
            procs=self.memory_procs,
            size=size,
            shadowd_bytes=held("hit"),
            private_bytes=held("copy"),
        )


def _crossover(sizes: list[SizeResult]) -> str:
    """The smallest measured size from which a hit beats the copy (p50)."""
    plain = sorted((s for s in sizes if s.name == human_size(s.size)), key=lambda s: s.size)
    winning = [s for s in plain if s.speedup > 1.0]
    if not winning:
        return "hits did not beat the copy at any measured size"
    first = winning[0]
    below = [s for s in plain if s.size < first.size]
    if not below:
        return f"hits win at every measured size (from {human_size(first.size)})"
    return f"hits win from between {human_size(below[-1].size)} and {human_size(first.size)}"


def format_result(r: BenchResult) -> str:
    lines = [
        "status quo (open + memfd_create + sendfile + seals) against a shadowd cache hit",
        "(Client.open through the socket); microseconds, measured interleaved in one run",
        "",
        f"{'file':<28} {'copy p50':>9} {'copy p99':>9} {'hit p50':>9} {'hit p99':>9}"
        f" {'copy/hit':>9}",
    ]
    for s in r.sizes:
        lines.append(
            f"{s.name:<28} {s.copy.p50:>9.1f} {s.copy.p99:>9.1f} {s.hit.p50:>9.1f}"
            f" {s.hit.p99:>9.1f} {s.speedup:>8.2f}x"
        )
    lines += [
        "",
        f"crossover: {r.crossover}",
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
            f"memory: {m.procs} processes each mapping a {human_size(m.size)} file (Shmem growth):",
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
    lines.append(f"\n(run took {r.seconds:.0f} s)")
    return "\n".join(lines)


def format_json(r: BenchResult) -> str:
    return json.dumps(r.to_json(), sort_keys=True)
