# Files replaced while a client reads them, at the pace of the client's index
# hits: the rewriter of the 10,000-index-hit tests (tests/test_index.py,
# tests/test_c_client.py). The reader asks for each change with a byte on one
# FIFO and, before it asks for the next, waits for the rewriter's byte on the
# other (that change is in place); the rewriter replaces one file per byte.
# So every run asks for the same changes and misses at the same points of its
# count of hits, on an idle host as on a loaded one: the reader's count decides
# when files change, not the clock, and no side can outrun the other (how many
# opens a refill takes is still the host's).
#
# Must never: change a file in place or give two versions one mtime (each
# version is a new inode, whole, with an mtime of its own, so no two versions
# share a key: what lets these tests run a daemon without a racy window);
# change a file the reader did not ask for.
from __future__ import annotations

import os
import random
import threading
import time
from pathlib import Path

import attrs

#: The reader's index hits per change it asks for: 1,000 changes in a run of
#: 10,000 hits, of which one in ten to one in four replaces a file the cache
#: holds (an invalidation). Each of those, and each eviction below, costs a
#: refill, which a loaded host makes slowly; fewer of both run faster there (at
#: 20 and 40: 28-31 s against 64-89 s before the pacing, two busy loops beside a
#: load of 8), but they are what the test stresses: a fd number the daemon
#: reuses while a reader opens it. With the index's memfd check and its second
#: read of the seq both taken out of the Python path, runs at 10 and 20 served
#: 2 wrong fds in two runs of three, and at 20 and 40 none in one.
HITS_PER_CHANGE = 10
#: The files a reader opens (as many as the cache of these tests holds, so that
#: most of their opens are hits), but for one open of one of the others after
#: every HITS_PER_COLD index hits: a miss whose fill evicts one of the first,
#: refilled at its next open. Counted in hits, not opens, as the changes are:
#: a reader of all ten files alike missed 7 times in 10 and spent its time on
#: round trips, and one that opened the others one open in 20 opened them the
#: more often the longer the daemon took to fill the cache, which then took it
#: longer still.
HOT = 3
HITS_PER_COLD = 20


def version_bytes(size: int, mtime_ns: int) -> bytes:
    """What a file of this version holds: its size and mtime_ns, 16 little-endian bytes,
    over and over (tests/c_driver.c's holds_version checks the same), so that bytes of
    another version, or torn between two, show."""
    block = size.to_bytes(8, "little") + mtime_ns.to_bytes(8, "little", signed=True)
    return (block * (size // 16 + 1))[:size]


def replace(path: Path, size: int, mtime_ns: int) -> None:
    """A new inode at *path*, whole, with its version's bytes."""
    tmp = path.with_suffix(".tmp")
    tmp.write_bytes(version_bytes(size, mtime_ns))
    os.utime(tmp, ns=(mtime_ns, mtime_ns))
    os.rename(tmp, path)


def library(directory: Path, n: int = 10) -> list[Path]:
    """*n* files of about 20 kB in *directory*, each of its own size and mtime."""
    names = [directory / f"lib{i}.so" for i in range(n)]
    for i, name in enumerate(names):
        replace(name, 20_000 + i, 1_000_000_000 * (i + 1))
    return names


def pick(rng: random.Random, names: list[Path], hits: int, colds: int) -> int:
    """The index of the file a reader opens next, after *hits* index hits and *colds*
    opens of the other files (tests/c_driver.c's churn picks alike)."""
    if hits >= HITS_PER_COLD * (colds + 1):
        return HOT + rng.randrange(len(names) - HOT)
    return rng.randrange(HOT)


def fifos(directory: Path) -> tuple[Path, Path]:
    """The two FIFOs a reader and a :class:`Rewriter` talk through: asks, dones."""
    asks, dones = directory / "asks.fifo", directory / "dones.fifo"
    os.mkfifo(asks)
    os.mkfifo(dones)
    return asks, dones


@attrs.define
class Rewriter:
    """A thread that replaces one of *names* (a new inode, a size and mtime of its own)
    for each byte the reader writes to the FIFO *asks*, and writes a byte to the FIFO
    *dones* once the new version is in place. It opens *asks* first, as the reader must
    (a FIFO's open waits for its other end), and ends when the reader closes it."""

    names: list[Path]
    asks: Path
    dones: Path
    changes: int = 0
    _thread: threading.Thread | None = None

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def join(self, timeout: float = 10) -> None:
        """Wait for the reader to be done with it (a reader that never came leaves it
        waiting in a FIFO's open: a daemon thread, left behind)."""
        if self._thread is not None:
            self._thread.join(timeout)

    def _run(self) -> None:
        rng = random.Random(1)
        asks = os.open(self.asks, os.O_RDONLY | os.O_CLOEXEC)
        try:
            dones = os.open(self.dones, os.O_WRONLY | os.O_CLOEXEC)
            try:
                while os.read(asks, 1):
                    name = rng.choice(self.names)
                    replace(name, 20_000 + rng.randrange(64), time.time_ns())
                    self.changes += 1
                    os.write(dones, b".")
            finally:
                os.close(dones)
        finally:
            os.close(asks)


@attrs.define
class Pacer:
    """The reader's end of a :class:`Rewriter`, for a reader in Python (tests/c_driver.c's
    churn is the C one): :meth:`step` once per :data:`HITS_PER_CHANGE` index hits."""

    asks: int
    dones: int
    asked: int = 0

    @classmethod
    def open(cls, asks: Path, dones: Path) -> Pacer:
        """The FIFOs' other ends, in the rewriter's order (each open waits for it)."""
        a = os.open(asks, os.O_WRONLY | os.O_CLOEXEC)
        try:
            return cls(a, os.open(dones, os.O_RDONLY | os.O_CLOEXEC))
        except BaseException:
            os.close(a)
            raise

    def step(self) -> None:
        """Ask for one change, once the one asked before is in place: one at a time,
        however fast either side runs."""
        self._done()
        os.write(self.asks, b".")
        self.asked += 1

    def close(self) -> None:
        """Wait for the last change asked for, then let the rewriter end."""
        try:
            self._done()
        finally:
            os.close(self.asks)
            os.close(self.dones)

    def _done(self) -> None:
        if self.asked and not os.read(self.dones, 1):
            raise RuntimeError("the rewriter stopped")
