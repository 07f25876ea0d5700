# The cache: an LRU of sealed memfds, keyed by file identity and checked
# against the file's version on every lookup.
#
# Plain synchronous code, owned by the event-loop thread: no await, no locks,
# no I/O except releasing memfds it drops. Every operation is O(1) (a dict in
# LRU order) except `top`, which reports and is O(n log k). Observers hear of
# every entry added and dropped (the fd store, the log), synchronously and
# never on a hit.
#
# Must never: return an entry whose version differs from the one asked for;
# hold more than max_entries entries or max_bytes bytes; cache a file larger
# than max_file_size, or one whose ctime is inside the racily-clean window.
from __future__ import annotations

import enum
import heapq
import mmap
import time
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable, Mapping
from typing import NamedTuple, Protocol

import attrs

from .stats import MAX_COUNT, TopEntry

GiB = 1 << 30
MiB = 1 << 20


class Shareable(Protocol):
    """What the cache needs of a cached file: its size and a reference count."""

    @property
    def size(self) -> int: ...

    def retain(self) -> Shareable: ...

    def release(self) -> None: ...

    def share(self) -> int: ...

    # What the hit path reopens in one call (hotcalls.send_reopened):
    # the daemon's own fd of the file, and its handle on /proc/self/fd.
    @property
    def fd(self) -> int: ...

    @property
    def dir_fd(self) -> int: ...

    # What the hit path checks before every hand-out (memfd.SealedFile.intact):
    # (mode, ctime_ns) as sealed.
    @property
    def stamp(self) -> tuple[int, int]: ...

    def intact(self, *, times: bool = True) -> bool: ...


@attrs.frozen
class CacheLimits:
    max_entries: int = 10_000
    max_bytes: int = 1 * GiB
    max_file_size: int = 256 * MiB
    #: A file whose ctime is younger than this may still change without any
    #: visible change of stat (same size, same coarse timestamps): serve it,
    #: don't cache it.
    racy_window_ns: int = 1_000_000_000

    def __attrs_post_init__(self) -> None:
        if self.max_entries < 0 or self.max_bytes < 0 or self.max_file_size < 0:
            raise ValueError("cache limits must not be negative")
        if self.racy_window_ns < 0:
            raise ValueError("the racy window must not be negative")


class HostKey(NamedTuple):
    """Identity of a host file: inode numbers repeat across filesystems.

    NamedTuples, not attrs classes: keys are built and hashed on every
    request, and a tuple does both several times faster.
    """

    dev: int
    ino: int


class PrivateKey(NamedTuple):
    """Identity of a private file: scoped by the publisher's uid and namespace."""

    uid: int
    namespace: str
    ino: int


Version = tuple[int, int, int | None]


class DropReason(enum.Enum):
    """Why an entry left the cache; observers act on some and not others."""

    EVICTED = "evicted"  # made room under the budgets
    INVALIDATED = "invalidated"  # its file changed, or an entry of a newer version replaced it
    REMOVED = "removed"  # asked for by name
    CLEARED = "cleared"  # the daemon is stopping: the entry is not wrong, only let go


class Admission(enum.Enum):
    CACHED = "cached"
    TOO_LARGE = "too-large"  # above max_file_size
    OVER_BUDGET = "over-budget"  # cannot fit in max_bytes or max_entries at all
    RACY = "racy"  # ctime inside the racily-clean window


@attrs.define(eq=False)
class Entry:
    key: Hashable
    version: Version
    file: Shareable
    label: str | None
    private: bool
    hits: int = 0
    #: The uid whose request named the file *label*; None when unknown (an
    #: entry restored at start): only privileged viewers see such labels.
    label_uid: int | None = None
    #: The inotify watch on a host file's inode (watches.py); -1 for none:
    #: a private entry, or one restored at start and not yet verified.
    wd: int = -1
    #: The unique ID of the mount the file was copied through; 0 unknown.
    mnt: int = 0

    @property
    def size(self) -> int:
        return self.file.size


class CacheObserver(Protocol):
    """Told of each entry added to and dropped from a :class:`Cache`.

    Called synchronously on the loop, inside the cache operation: it must not
    block, await or change the cache.
    """

    def inserted(self, entry: Entry) -> None: ...

    def dropped(self, entry: Entry, reason: DropReason) -> None: ...


PAGE_SIZE = mmap.PAGESIZE


def page_rounded(size: int) -> int:
    """The memory a memfd of *size* bytes holds: whole pages (at least)."""
    return -(-size // PAGE_SIZE) * PAGE_SIZE


@attrs.define
class KindCounters:
    hits: int = 0
    misses: int = 0
    entries: int = 0
    bytes: int = 0


class Cache:
    """LRU of shareable files; see the module comment for its rules."""

    def __init__(
        self, limits: CacheLimits | None = None, *, clock: Callable[[], int] = time.time_ns
    ) -> None:
        self.limits = limits or CacheLimits()
        self._clock = clock
        # Order is LRU order: the first entry is evicted first. OrderedDict,
        # not dict: popping a plain dict's first item again and again makes
        # iteration skip ever more deleted slots.
        self._entries: OrderedDict[Hashable, Entry] = OrderedDict()
        self.bytes = 0
        #: Memory the entries hold, counted in whole pages.
        self.memory_bytes = 0
        self.evictions = 0
        self.invalidations = 0
        self.host = KindCounters()
        self.private = KindCounters()
        self.observers: tuple[CacheObserver, ...] = ()
        #: Lets go of the cache's reference to a dropped entry's file: the server's
        #: frees a large memfd's pages off the loop (closing.Closer.release_file).
        self.release_file: Callable[[Shareable], None] = _release_file

    def add_observer(self, observer: CacheObserver) -> None:
        """Tell *observer* of every entry added and dropped from now on."""
        self.observers = (*self.observers, observer)

    def remove_observer(self, observer: CacheObserver) -> None:
        self.observers = tuple(o for o in self.observers if o is not observer)

    def __len__(self) -> int:
        return len(self._entries)

    def __contains__(self, key: Hashable) -> bool:
        return key in self._entries

    @property
    def hits(self) -> int:
        return self.host.hits + self.private.hits

    @property
    def misses(self) -> int:
        return self.host.misses + self.private.misses

    def _counters(self, private: bool) -> KindCounters:
        return self.private if private else self.host

    def lookup(self, key: Hashable, version: Version, *, private: bool = False) -> Entry | None:
        """The entry for *key* at *version*, made most recently used; None on a miss.

        An entry of another version is dropped and counted as an invalidation.
        """
        entry = self._entries.get(key)
        counters = self.private if private else self.host
        if entry is not None:
            if entry.version == version:
                self._entries.move_to_end(key)
                entry.hits += 1
                counters.hits += 1
                return entry
            self._drop(key, entry, DropReason.INVALIDATED)
            self.invalidations += 1
        counters.misses += 1
        return None

    @property
    def index(self) -> Mapping[Hashable, Entry]:
        """Every entry by key, read-only: for hotcalls.answer_hit, which finds
        host entries under plain (dev, ino) tuples (HostKey hashes as one)."""
        return self._entries

    def count_host_hit(self, entry: Entry, n: int = 1) -> None:
        """What lookup() does on a hit, for *n* host-file hits answered without it."""
        self._entries.move_to_end(entry.key)
        entry.hits += n
        self.host.hits += n

    def touch(self, entry: Entry, n: int) -> None:
        """*n* hits served outside the cache's lookups (the index): most recently used
        now, and counted for the top files (not in ``hits``: the stats count them apart).
        A client says what *n* is: the count saturates at MAX_COUNT."""
        self._entries.move_to_end(entry.key)
        entry.hits = min(entry.hits + n, MAX_COUNT)

    def uncount_miss(self, *, private: bool = False) -> None:
        """Take back the miss of a lookup that will be made again (and counted then)."""
        self._counters(private).misses -= 1

    def peek(self, key: Hashable) -> Entry | None:
        """The entry for *key*, if any, without counting or reordering."""
        return self._entries.get(key)

    def admission(self, size: int, ctime_ns: int | None) -> Admission:
        """Whether a file of *size* and *ctime_ns* may be cached now."""
        limits = self.limits
        if size > limits.max_file_size:
            return Admission.TOO_LARGE
        if size > limits.max_bytes or limits.max_entries == 0:
            return Admission.OVER_BUDGET
        if ctime_ns is not None:
            age = self._clock() - ctime_ns
            if age < limits.racy_window_ns:
                return Admission.RACY
        return Admission.CACHED

    def insert(
        self,
        key: Hashable,
        version: Version,
        file: Shareable,
        *,
        label: str | None = None,
        private: bool = False,
        ctime_ns: int | None = None,
        label_uid: int | None = None,
        wd: int = -1,
        mnt: int = 0,
    ) -> tuple[Admission, Entry | None]:
        """Cache *file* as *key* at *version*, evicting LRU entries to make room.

        On success the cache takes its own reference to *file*. When an entry
        of the same version is already there (a concurrent publisher won), that
        entry is kept and returned and *file* is left alone.
        """
        admission = self.admission(file.size, ctime_ns)
        if admission is not Admission.CACHED:
            return admission, None
        existing = self._entries.get(key)
        if existing is not None:
            if existing.version == version:
                return Admission.CACHED, existing
            self._drop(key, existing, DropReason.INVALIDATED)
            self.invalidations += 1
        limits = self.limits
        while self._entries and (
            len(self._entries) >= limits.max_entries or self.bytes + file.size > limits.max_bytes
        ):
            self.evict_oldest()
        entry = Entry(
            key=key,
            version=version,
            file=file.retain(),
            label=label,
            private=private,
            label_uid=label_uid,
            wd=wd,
            mnt=mnt,
        )
        self._entries[key] = entry
        self.bytes += entry.size
        self.memory_bytes += page_rounded(entry.size)
        counters = self._counters(private)
        counters.entries += 1
        counters.bytes += entry.size
        for observer in self.observers:
            observer.inserted(entry)
        return Admission.CACHED, entry

    def evict_oldest(self) -> Entry:
        key, entry = next(iter(self._entries.items()))
        self._drop(key, entry, DropReason.EVICTED)
        self.evictions += 1
        return entry

    def unserved(self, entry: Entry) -> None:
        """A hit that serves nobody (a told file: its client copied it itself): the
        entry stays most recently used, and the open counts as the miss it was for
        the client, not as a hit or in the entry's savings."""
        counters = self._counters(entry.private)
        counters.hits -= 1
        counters.misses += 1
        entry.hits -= 1

    def reject(self, entry: Entry) -> None:
        """A hit that turned out unusable (its memfd was changed, its source cannot be
        vouched for): counted as the miss it is now, and the entry dropped."""
        counters = self._counters(entry.private)
        counters.hits -= 1
        counters.misses += 1
        entry.hits -= 1
        self.invalidate(entry.key)

    def invalidate(self, key: Hashable) -> bool:
        """Drop *key*'s entry because its file changed in a way its version may not show."""
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._drop(key, entry, DropReason.INVALIDATED)
        self.invalidations += 1
        return True

    def remove(self, key: Hashable) -> bool:
        entry = self._entries.get(key)
        if entry is None:
            return False
        self._drop(key, entry, DropReason.REMOVED)
        return True

    def _drop(self, key: Hashable, entry: Entry, reason: DropReason) -> None:
        del self._entries[key]
        self.bytes -= entry.size
        self.memory_bytes -= page_rounded(entry.size)
        counters = self._counters(entry.private)
        counters.entries -= 1
        counters.bytes -= entry.size
        try:
            # Before the release: an observer may still need the file's fd.
            for observer in self.observers:
                observer.dropped(entry, reason)
        finally:
            self.release_file(entry.file)

    def clear(self) -> None:
        """Drop every entry (and the cache's reference to its file)."""
        while self._entries:
            key, entry = next(iter(self._entries.items()))
            self._drop(key, entry, DropReason.CLEARED)

    def lru_keys(self) -> list[Hashable]:
        """Keys from least to most recently used (for tests and debugging)."""
        return list(self._entries)

    def top(self, n: int, *, by: str = "hits", uid: int | None = None) -> list[TopEntry]:
        """The *n* labelled entries that saved most, by hits or by bytes not copied.

        With *uid*, only the entries whose label that uid gave: a path says
        something about its owner, and other users need not learn it.
        """
        labelled = (
            e
            for e in self._entries.values()
            if e.label is not None and e.hits > 0 and (uid is None or e.label_uid == uid)
        )
        return top_of(labelled, n, by=by)

    def labelled_by_uid(self) -> dict[int, list[Entry]]:
        """The labelled entries with hits, by the uid whose label they carry, in one
        pass: each viewer's top files are then ranked from its own entries alone,
        never from a pass over the whole cache each (attack 44)."""
        out: dict[int, list[Entry]] = {}
        for e in self._entries.values():
            if e.label is not None and e.hits > 0 and e.label_uid is not None:
                own = out.get(e.label_uid)
                if own is None:
                    out[e.label_uid] = [e]
                else:
                    own.append(e)
        return out


def top_of(entries: Iterable[Entry], n: int, *, by: str = "hits") -> list[TopEntry]:
    """The *n* of *entries* (labelled ones) that saved most, by hits or by bytes not copied."""
    rank = _RANKINGS.get(by)
    if rank is None:
        raise ValueError(f"unknown ranking {by!r}")
    return [
        TopEntry(label=e.label or "", hits=e.hits, size=e.size)
        for e in heapq.nlargest(n, entries, key=rank)
    ]


def _release_file(file: Shareable) -> None:
    file.release()


def _by_hits(entry: Entry) -> int:
    return entry.hits


def _by_bytes_saved(entry: Entry) -> int:
    return entry.hits * entry.size


_RANKINGS: dict[str, Callable[[Entry], int]] = {"hits": _by_hits, "bytes": _by_bytes_saved}
