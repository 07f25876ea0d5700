# cache.py: LRU order, budgets, versions, admission. Synchronous: the cache
# is plain code. Real sealed memfds are used where a test is about release.
from __future__ import annotations

import random

import pytest

from shadowd.cache import (
    PAGE_SIZE,
    Admission,
    Cache,
    CacheLimits,
    DropReason,
    Entry,
    HostKey,
    PrivateKey,
)
from shadowd.memfd import sealed_from_bytes

NOW = 10_000_000_000_000


class Blob:
    """A stand-in for a sealed file: a size and a reference count."""

    def __init__(self, size: int) -> None:
        self.size = size
        self.refs = 1

    def retain(self) -> Blob:
        self.refs += 1
        return self

    def release(self) -> None:
        assert self.refs > 0
        self.refs -= 1

    def share(self) -> int:
        raise NotImplementedError


def cache(**limits: int) -> Cache:
    return Cache(CacheLimits(**limits), clock=lambda: NOW)


OLD = NOW - 10_000_000_000  # ctime well outside the racy window


def put(c: Cache, ino: int, size: int, version: int = 1) -> tuple[Admission, Blob]:
    blob = Blob(size)
    admission, _ = c.insert(HostKey(1, ino), (size, version, version), blob, ctime_ns=OLD)
    return admission, blob


def test_hit_miss_and_version() -> None:
    c = cache()
    assert c.lookup(HostKey(1, 1), (3, 1, 1)) is None
    put(c, 1, 3)
    entry = c.lookup(HostKey(1, 1), (3, 1, 1))
    assert entry is not None and entry.hits == 1
    # Same identity, another version: a miss, and the old entry is gone.
    assert c.lookup(HostKey(1, 1), (3, 1, 2)) is None
    assert HostKey(1, 1) not in c
    assert (c.hits, c.misses, c.invalidations) == (1, 2, 1)


def test_same_inode_other_device_is_another_file() -> None:
    c = cache()
    c.insert(HostKey(1, 5), (1, 1, 1), Blob(1), ctime_ns=OLD)
    assert c.lookup(HostKey(2, 5), (1, 1, 1)) is None
    assert c.lookup(HostKey(1, 5), (1, 1, 1)) is not None


def test_eviction_follows_lru_order() -> None:
    c = cache(max_entries=3)
    blobs = [put(c, i, 10)[1] for i in range(3)]
    assert c.lookup(HostKey(1, 0), (10, 1, 1)) is not None  # 0 is now most recent
    put(c, 3, 10)
    assert c.lru_keys() == [HostKey(1, 2), HostKey(1, 0), HostKey(1, 3)]
    assert c.evictions == 1
    assert blobs[1].refs == 1  # the cache let go of the evicted file


def test_byte_budget_never_exceeded_random_workload() -> None:
    rng = random.Random(7)
    c = cache(max_entries=50, max_bytes=10_000, max_file_size=4_000)
    for _ in range(5000):
        ino = rng.randrange(200)
        size = rng.randrange(0, 5_000)
        if rng.random() < 0.5:
            c.lookup(HostKey(1, ino), (size, 1, 1))
        else:
            admission, _ = put(c, ino, size)
            assert admission is (Admission.TOO_LARGE if size > 4_000 else Admission.CACHED)
        assert c.bytes <= 10_000
        assert len(c) <= 50
        assert c.bytes == sum(c.peek(k).size for k in c.lru_keys())  # type: ignore[union-attr]


def test_admission_rules() -> None:
    c = Cache(
        CacheLimits(max_bytes=100, max_file_size=50, racy_window_ns=1_000_000_000),
        clock=lambda: NOW,
    )
    assert c.admission(51, OLD) is Admission.TOO_LARGE
    assert c.admission(50, NOW - 999_999_999) is Admission.RACY
    assert c.admission(50, NOW + 5) is Admission.RACY  # ctime in the future
    assert c.admission(50, NOW - 1_000_000_000) is Admission.CACHED
    assert c.admission(50, None) is Admission.CACHED  # private keys carry no ctime rule
    blob = Blob(10)
    admission, entry = c.insert(HostKey(1, 1), (10, 1, 1), blob, ctime_ns=NOW)
    assert admission is Admission.RACY and entry is None and blob.refs == 1
    assert Cache(CacheLimits(max_entries=0), clock=lambda: NOW).admission(1, OLD) is (
        Admission.OVER_BUDGET
    )


def test_existing_same_version_wins() -> None:
    c = cache()
    first, second = Blob(4), Blob(4)
    key = PrivateKey(1000, "ns", 1)
    _, e1 = c.insert(key, (4, 1, None), first, private=True)
    _, e2 = c.insert(key, (4, 1, None), second, private=True)
    assert e1 is e2 and e2 is not None and e2.file is first
    assert second.refs == 1  # untouched: the caller still owns it
    assert c.private.entries == 1 and c.host.entries == 0


def test_release_closes_real_memfd_when_last_holder_lets_go() -> None:
    c = cache(max_entries=1)
    sealed = sealed_from_bytes(b"abc")
    c.insert(HostKey(1, 1), (3, 1, 1), sealed, ctime_ns=OLD)
    sealed.release()  # our reference; the cache still holds one
    assert not sealed.closed
    put(c, 2, 1)  # evicts it
    assert sealed.closed


def test_clear_releases_everything() -> None:
    c = cache()
    blobs = [put(c, i, 1)[1] for i in range(5)]
    c.clear()
    assert len(c) == 0 and c.bytes == 0
    assert all(b.refs == 1 for b in blobs)


def test_top_files() -> None:
    c = cache()
    c.insert(HostKey(1, 1), (100, 1, 1), Blob(100), label="/big", ctime_ns=OLD)
    c.insert(HostKey(1, 2), (1, 1, 1), Blob(1), label="/small", ctime_ns=OLD)
    for _ in range(2):
        c.lookup(HostKey(1, 1), (100, 1, 1))
    for _ in range(5):
        c.lookup(HostKey(1, 2), (1, 1, 1))
    assert [t.label for t in c.top(2, by="hits")] == ["/small", "/big"]
    assert [t.label for t in c.top(2, by="bytes")] == ["/big", "/small"]
    with pytest.raises(ValueError, match="ranking"):
        c.top(1, by="nonsense")


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, object, int]] = []

    def inserted(self, entry: Entry) -> None:
        self.events.append(("inserted", entry.key, entry.file.refs))  # type: ignore[attr-defined]

    def dropped(self, entry: Entry, reason: DropReason) -> None:
        # Called before the cache lets go: the file is still held.
        self.events.append((reason.value, entry.key, entry.file.refs))  # type: ignore[attr-defined]


def test_observers_hear_every_insert_and_drop_with_its_reason() -> None:
    c = cache(max_entries=2)
    rec = Recorder()
    c.add_observer(rec)
    put(c, 1, 10)
    put(c, 2, 10)
    assert c.lookup(HostKey(1, 2), (10, 1, 1)) is not None  # a hit says nothing
    put(c, 3, 10)  # evicts 1
    assert c.lookup(HostKey(1, 2), (10, 2, 2)) is None  # changed: invalidated
    put(c, 3, 10, version=2)  # a newer version replaces the entry
    c.remove(HostKey(1, 3))
    put(c, 4, 10)
    c.clear()
    k = [HostKey(1, i) for i in range(5)]
    assert rec.events == [
        ("inserted", k[1], 2),
        ("inserted", k[2], 2),
        ("evicted", k[1], 2),
        ("inserted", k[3], 2),
        ("invalidated", k[2], 2),
        ("invalidated", k[3], 2),
        ("inserted", k[3], 2),
        ("removed", k[3], 2),
        ("inserted", k[4], 2),
        ("cleared", k[4], 2),
    ]


def test_memory_is_counted_in_whole_pages() -> None:
    c = cache()
    put(c, 1, 1)
    put(c, 2, PAGE_SIZE)
    put(c, 3, PAGE_SIZE + 1)
    assert c.bytes == 2 * PAGE_SIZE + 2
    assert c.memory_bytes == 4 * PAGE_SIZE
    c.remove(HostKey(1, 3))
    assert c.memory_bytes == 2 * PAGE_SIZE
    c.clear()
    assert c.memory_bytes == 0
