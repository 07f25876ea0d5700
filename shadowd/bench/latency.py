# Latency of one open, per file size: the status-quo copy against a cache hit
# through the socket and through the index (no round trip), and against the
# transport floor (a server that only reopens and sends); and a hit's latency
# with many idle connections open.
#
# Must never: let the order of samples favour one series (every series is
# sampled once per round, in a new random order each round).
from __future__ import annotations

import functools
import os
import random
import socket
import time
from collections.abc import Callable
from typing import Any

import attrs

from .cclient import CLatency
from .common import MiB, Progress, Summary, human_size, status_quo, time_open

KiB = 1024
DEFAULT_SIZES = (1 * KiB, 4 * KiB, 16 * KiB, 64 * KiB, 256 * KiB, 1 * MiB, 2 * MiB, 16 * MiB)


@attrs.frozen
class SizeResult:
    name: str
    size: int
    copy: Summary
    hit: Summary
    #: A hit through the index (no round trip), when the daemon gave one.
    index: Summary | None = None
    #: The same file timed in C (client/c): copy, socket hit, index hit.
    c: CLatency | None = None

    @property
    def speedup(self) -> float:
        """How many times faster a hit is than the status-quo copy (p50)."""
        return self.copy.p50 / self.hit.p50

    @property
    def index_speedup(self) -> float | None:
        """How many times faster an index hit is than the status-quo copy (p50)."""
        return None if self.index is None else self.copy.p50 / self.index.p50


@attrs.frozen
class Crowd:
    """Hit latency alone and with many other connections held open."""

    connections: int
    alone: Summary
    crowded: Summary


class NotInIndex(RuntimeError):
    """The file was not in the index at that moment (evicted, or its slot changing)."""


def index_open(view: Any, path: str) -> int:
    """What a client does for a hit through the index: open, then the view's open_fd
    (the source's fstat and the hit, in one call where the C extension is in use)."""
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        fd = view.open_fd(src)
    finally:
        os.close(src)
    if fd is None:
        raise NotInIndex(f"{path} is not in the index")
    return int(fd)


def measure_latency(
    client: Any,
    floor: Any,
    targets: list[tuple[str, str, int]],
    rounds: int,
    progress: Progress,
    *,
    index: Any = None,
) -> tuple[list[SizeResult], Summary, Summary]:
    """Copy, hit (and index hit) per target, and the floor against a hit of the smallest file."""
    copies: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    hits: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    indexed: dict[str, list[float]] = {name: [] for name, _, _ in targets}
    floor_samples: list[float] = []
    floor_hits: list[float] = []
    index_missed = 0
    small = targets[0][1]
    for _, path, _ in targets:  # warm: the first open of each is the miss
        os.close(client.open(path))
    os.close(floor.open(small))
    if index is not None:
        for _, path, _ in targets:  # in the index once the daemon watches them
            deadline = time.monotonic() + 10
            while True:
                try:
                    os.close(index_open(index, path))
                    break
                except NotInIndex:
                    if time.monotonic() > deadline:
                        raise
                    os.close(client.open(path))
                    time.sleep(0.01)
    rng = random.Random(0)
    for r in range(rounds):
        if r % 10 == 0:
            progress.say(f"latency, round {r + 1} of {rounds}")
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
            if size >= 8 * MiB and r >= max(20, rounds // 5):
                continue
            jobs.append((copies[name], functools.partial(status_quo, path)))
            jobs.append((hits[name], functools.partial(client.open, path)))
            if index is not None:
                jobs.append((indexed[name], functools.partial(index_open, index, path)))
        rng.shuffle(jobs)
        for samples, job in jobs:
            try:
                samples.append(time_open(job))
            except NotInIndex:
                # The daemon may drop a slot for a moment (a change it saw,
                # an eviction): a sample lost, not the run; many are a fault.
                index_missed += 1
                if index_missed > max(10, rounds * len(targets) // 10):
                    raise
    if index_missed:
        progress.say(f"latency: {index_missed} index opens found no slot (not timed)")
    results = [
        SizeResult(
            name=name,
            size=size,
            copy=Summary.of(copies[name]),
            hit=Summary.of(hits[name]),
            index=Summary.of(indexed[name]) if index is not None else None,
        )
        for name, _, size in targets
    ]
    return results, Summary.of(floor_samples), Summary.of(floor_hits)


def measure_crowd(
    client: Any, socket_path: str, path: str, connections: int, progress: Progress
) -> Crowd:
    """Hit latency with *connections* other clients connected (and idle)."""
    from ..protocol import Hello, encode_request

    def sample(n: int) -> list[float]:
        return [time_open(functools.partial(client.open, path)) for _ in range(n)]

    progress.say(f"latency with {connections} other connections open")
    alone = sample(100)
    held: list[socket.socket] = []
    try:
        hello, _ = encode_request(Hello(id=0, client="shadowd-bench-idle"))
        for _ in range(connections):
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
    return Crowd(connections, Summary.of(alone), Summary.of(crowded))


def crossover(sizes: list[SizeResult], *, index: bool = False, c: bool = False) -> str:
    """The smallest measured size from which a hit (or an index hit; *c*: an index hit
    in C against a copy in C) beats the copy (p50)."""
    plain = sorted((s for s in sizes if s.name == human_size(s.size)), key=lambda s: s.size)
    if c:
        winning = [s for s in plain if s.c is not None and s.c.index_speedup > 1.0]
    elif index:
        winning = [s for s in plain if (s.index_speedup or 0.0) > 1.0]
    else:
        winning = [s for s in plain if s.speedup > 1.0]
    if not winning:
        return "hits did not beat the copy at any measured size"
    first = winning[0]
    below = [s for s in plain if s.size < first.size]
    if not below:
        return f"hits win at every measured size (from {human_size(first.size)})"
    return f"hits win from between {human_size(below[-1].size)} and {human_size(first.size)}"
