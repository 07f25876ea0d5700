"""Cache operations stay O(1): time per hit, miss and insert-with-eviction
at 1k, 10k and 100k entries. A plain timing benchmark (not a test): run it
with `.venv/bin/python benchmarks/cache_scale.py` and compare the rows.

Hits are timed twice: on a hot set of 100 entries (what a host's libc and
loader look like) and on keys drawn uniformly from the whole cache, where
the growth from row to row is the CPU's memory caches missing, not the
algorithm: no operation walks more than one dict slot and one list node.
"""

from __future__ import annotations

import argparse
import random
import time

from shadowd.cache import Cache, CacheLimits, HostKey

NOW = 10**19
OLD = NOW - 10**12


class Blob:
    """A stand-in for a sealed file: the cache only needs size and refs."""

    __slots__ = ("refs", "size")

    def __init__(self) -> None:
        self.size = 1
        self.refs = 1

    def retain(self) -> Blob:
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1

    def share(self) -> int:
        raise NotImplementedError


def _hits(cache: Cache, keys: list[HostKey]) -> float:
    t0 = time.perf_counter()
    for key in keys:
        cache.lookup(key, (1, 1, 1))
    return (time.perf_counter() - t0) / len(keys)


def per_op(n: int, ops: int = 200_000) -> tuple[float, float, float, float]:
    cache = Cache(CacheLimits(max_entries=n, max_bytes=1 << 60), clock=lambda: NOW)
    for i in range(n):
        cache.insert(HostKey(1, i), (1, 1, 1), Blob(), ctime_ns=OLD)
    rng = random.Random(1)
    hot = [HostKey(1, i) for i in rng.sample(range(n), 100)]
    hot_hit = _hits(cache, [rng.choice(hot) for _ in range(ops)])
    uniform_hit = _hits(cache, [HostKey(1, rng.randrange(n)) for _ in range(ops)])
    misses = [HostKey(2, i) for i in range(ops)]
    t0 = time.perf_counter()
    for key in misses:
        cache.lookup(key, (1, 1, 1))
    miss = (time.perf_counter() - t0) / ops
    fresh = [HostKey(3, i) for i in range(ops)]
    blobs = [Blob() for _ in range(ops)]
    t0 = time.perf_counter()
    for key, blob in zip(fresh, blobs, strict=True):
        cache.insert(key, (1, 1, 1), blob, ctime_ns=OLD)  # evicts the oldest each time
    insert = (time.perf_counter() - t0) / ops
    assert len(cache) == n
    return hot_hit, uniform_hit, miss, insert


def main(argv: list[str] | None = None) -> None:
    argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    ).parse_args(argv)
    print(f"{'entries':>8} {'hot hit':>8} {'any hit':>8} {'miss':>8} {'insert+evict':>13}  (ns)")
    for n in (1_000, 10_000, 100_000):
        # The best of five runs: noise on a shared machine only adds time.
        runs = [per_op(n) for _ in range(5)]
        hot, uniform, miss, insert = (min(col) for col in zip(*runs, strict=True))
        print(
            f"{n:>8} {hot * 1e9:>8.0f} {uniform * 1e9:>8.0f} {miss * 1e9:>8.0f}"
            f" {insert * 1e9:>13.0f}"
        )


if __name__ == "__main__":
    main()
