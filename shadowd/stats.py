# The daemon's statistics as one frozen value, and its wire form.
#
# Must never: report memory it cannot vouch for as if it were exact. Bytes
# are the cache's own memfd content; memory still held by clients after an
# eviction is outside the daemon's view and the stats say so.
from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping
from typing import Any

import attrs

#: Where counters a client can move by any amount (the hits it reports having
#: served through the index) stop: the stats' wire form carries int64 at most.
MAX_COUNT = 2**63 - 1


@attrs.frozen
class TopEntry:
    """One of the files that gain most: the label its client sent, hits, size."""

    label: str
    hits: int
    size: int

    @property
    def bytes_saved(self) -> int:
        return min(self.hits * self.size, MAX_COUNT)

    def to_wire(self) -> dict[str, Any]:
        return {
            "path": self.label,
            "hits": self.hits,
            "size": self.size,
            "bytes_saved": self.bytes_saved,
        }

    @classmethod
    def from_wire(cls, data: Any) -> TopEntry:
        """From ``{"path", "hits", "size"}``, or the ``[path, hits, size]`` of older daemons."""
        if isinstance(data, Mapping):
            return cls(str(data["path"]), int(data["hits"]), int(data["size"]))
        label, hits, size = data
        return cls(str(label), int(hits), int(size))


#: Upper bounds (seconds) of the latency buckets: 1-2-5 steps from 5 us to
#: 10 s, so one set fits a hit (tens of us), a miss and a copy (up to seconds).
#: Fixed, so that histograms of any two daemons or snapshots can be merged.
LATENCY_BOUNDS: tuple[float, ...] = (
    5e-6, 1e-5, 2e-5, 5e-5, 1e-4, 2e-4, 5e-4, 1e-3, 2e-3, 5e-3,
    1e-2, 2e-2, 5e-2, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0,
)  # fmt: skip


@attrs.define
class Histogram:
    """Observations counted in fixed buckets, with their sum (a Prometheus histogram).

    ``counts[i]`` counts the observations above ``bounds[i-1]`` and at most
    ``bounds[i]``; the last, ``counts[len(bounds)]``, those above every bound.
    """

    bounds: tuple[float, ...] = LATENCY_BOUNDS
    counts: list[int] = attrs.field()
    sum: float = 0.0

    @counts.default
    def _zeros(self) -> list[int]:
        return [0] * (len(self.bounds) + 1)

    def __attrs_post_init__(self) -> None:
        if list(self.bounds) != sorted(set(self.bounds)) or not all(
            math.isfinite(b) for b in self.bounds
        ):
            raise ValueError("histogram bounds must be finite and strictly increasing")
        if len(self.counts) != len(self.bounds) + 1 or min(self.counts, default=0) < 0:
            raise ValueError(
                f"a histogram of {len(self.bounds)} bounds has "
                f"{len(self.bounds) + 1} counts, none negative"
            )

    def observe(self, seconds: float) -> None:
        """Count one observation of *seconds*."""
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds

    @property
    def count(self) -> int:
        return sum(self.counts)

    def cumulative(self) -> list[tuple[float, int]]:
        """``(le, observations at most le)`` per bucket, ending with ``(inf, count)``."""
        out, total = [], 0
        for le, n in zip((*self.bounds, math.inf), self.counts, strict=True):
            total += n
            out.append((le, total))
        return out

    def quantile(self, q: float) -> float | None:
        """The bound of the bucket holding the *q*-quantile (an upper estimate);
        inf when it lies above every bound; None without observations."""
        count = self.count
        if not count:
            return None
        rank = q * count
        for le, total in self.cumulative():
            if total >= rank and total > 0:
                return le
        return math.inf  # pragma: no cover - the last total is count

    def merge(self, other: Histogram) -> Histogram:
        """A new histogram holding the observations of both (same bounds only)."""
        if self.bounds != other.bounds:
            raise ValueError("cannot merge histograms with different buckets")
        return Histogram(
            self.bounds,
            [a + b for a, b in zip(self.counts, other.counts, strict=True)],
            self.sum + other.sum,
        )

    def copy(self) -> Histogram:
        return Histogram(self.bounds, list(self.counts), self.sum)

    def to_wire(self) -> dict[str, Any]:
        return {"bounds": list(self.bounds), "counts": list(self.counts), "sum": self.sum}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Histogram:
        return cls(
            tuple(float(b) for b in data["bounds"]),
            [int(n) for n in data["counts"]],
            float(data["sum"]),
        )


#: What the latency histograms time, by kind: a hit answered from the
#: cache (the request read to its reply sent), a miss (the same, for a
#: request the cache could not answer at once) and a copy of a file into a
#: memfd (in a worker thread).
LATENCY_KINDS = ("hit", "miss", "copy")


@attrs.define
class Latencies:
    """One latency histogram per kind of :data:`LATENCY_KINDS`.

    The daemon keeps one and calls :meth:`observe` per request (and per
    copy); ``Stats.latency`` holds a :meth:`copy` of it.
    """

    hit: Histogram = attrs.field(factory=Histogram)
    miss: Histogram = attrs.field(factory=Histogram)
    copy_: Histogram = attrs.field(factory=Histogram, alias="copy")

    def by_kind(self) -> dict[str, Histogram]:
        return {"hit": self.hit, "miss": self.miss, "copy": self.copy_}

    def observe(self, kind: str, seconds: float) -> None:
        """Count one *kind* ("hit", "miss" or "copy") that took *seconds*."""
        self.by_kind()[kind].observe(seconds)

    def merge(self, other: Latencies) -> Latencies:
        return Latencies(*(a.merge(b) for a, b in zip(self._all(), other._all(), strict=True)))

    def copy(self) -> Latencies:
        return Latencies(*(h.copy() for h in self._all()))

    def _all(self) -> Iterable[Histogram]:
        return (self.hit, self.miss, self.copy_)

    def to_wire(self) -> dict[str, Any]:
        return {kind: h.to_wire() for kind, h in self.by_kind().items()}

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Latencies:
        """Kinds this version does not know are ignored; missing ones are empty."""
        return cls(
            *(Histogram.from_wire(data[k]) if k in data else Histogram() for k in LATENCY_KINDS)
        )


# Fields that are maps of name to count.
_COUNTER_MAPS = frozenset({"refused_by_code", "limits", "limit_hits"})

#: The limits (in ``Stats.limits``) measured in bytes; the others are counts.
BYTE_LIMITS = frozenset({"max_request", "max_pinned_bytes_per_uid"})


@attrs.frozen
class Stats:
    """A snapshot of the daemon's counters; ``from_wire``/``to_wire`` for the wire."""

    server: str
    uptime_seconds: float
    hits: int
    misses: int
    entries: int
    bytes: int
    evictions: int
    invalidations: int
    uncached: int
    refused: int
    copies: int
    bytes_copied: int
    clients: int
    clients_total: int
    max_entries: int
    max_bytes: int
    max_file_size: int
    private_hits: int = 0
    private_misses: int = 0
    private_entries: int = 0
    private_bytes: int = 0
    #: The daemon's open descriptors at its last count (made in a worker
    #: thread, at most once per stats refresh); -1: not known (yet).
    open_fds: int = -1
    #: Seconds since the count in ``open_fds`` began (it holds every fd
    #: opened, and none closed, before then); -1 when there is no count.
    open_fds_age_seconds: float = -1.0
    fd_limit: int = -1
    top_by_hits: tuple[TopEntry, ...] = ()
    top_by_bytes: tuple[TopEntry, ...] = ()
    refused_by_code: Mapping[str, int] = attrs.field(factory=dict)
    #: Memory the cached memfds hold, in whole pages (``bytes`` is their content).
    memory_bytes: int = 0
    #: The daemon process's resident memory; memfd pages are not in it.
    rss_bytes: int = -1
    #: Entries kept in the service manager's fd store for warm restarts.
    fdstore_entries: int = 0
    #: How many the store may keep; 0 when the daemon keeps none there.
    fdstore_max: int = 0
    #: Entries taken back from the fd store when this daemon started.
    restored_entries: int = 0
    private_publishes: int = 0
    private_sealed_in_place: int = 0
    private_copied: int = 0
    private_races_lost: int = 0
    #: Peers turned away at accept by --allow-uid/--allow-gid.
    peers_refused: int = 0
    #: Received fds closed unused because their request was refused.
    fds_refused: int = 0
    #: The configured bounds on peers, by flag name (max_clients, ...).
    limits: Mapping[str, int] = attrs.field(factory=dict)
    #: How often a peer ran into each bound.
    limit_hits: Mapping[str, int] = attrs.field(factory=dict)
    #: How long hits, misses and copies took (empty from a daemon that does
    #: not time them).
    latency: Latencies = attrs.field(factory=Latencies)
    #: Bytes of memfds the daemon made that left the cache while clients
    #: still hold them (they stay in memory until the last holder lets go).
    pinned_bytes: int = 0
    #: Cached memfds a holder changed (mode, ACL, times), dropped and replaced.
    tampered: int = 0
    #: Copies not cached because a writer had the file open during them.
    uncached_writers: int = 0
    #: Cached host files whose inodes the daemon watches (inotify).
    watched_files: int = 0
    #: Descriptors in replies clients have not read and held for replies
    #: that wait, of every uid (at most half the fd limit).
    fds_in_flight: int = 0
    #: Hits clients served themselves through the index, as they reported them.
    index_hits: int = 0
    #: Files in the index, and its slots (0: the daemon publishes none).
    index_entries: int = 0
    index_slots: int = 0
    #: Descriptor numbers reserved for indexed memfds (fdrange.py): each holds
    #: one, or a stand-in; they count in open fds from the start. And how
    #: many hold a cached memfd (those entries take no other descriptor).
    index_fd_range: int = 0
    index_fd_range_used: int = 0

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float | None:
        """Hits over lookups; None before the first lookup (there is no rate yet)."""
        return self.hits / self.lookups if self.lookups else None

    def to_wire(self) -> dict[str, Any]:
        """The map a stats reply carries (and ``shadowd stats --json`` prints), plus hit_rate."""
        out: dict[str, Any] = {}
        for field in attrs.fields(Stats):
            value = getattr(self, field.name)
            if field.name.startswith("top_"):
                value = [t.to_wire() for t in value]
            elif field.name in _COUNTER_MAPS:
                value = dict(value)
            elif field.name == "latency":
                value = value.to_wire()
            out[field.name] = value
        out["hit_rate"] = self.hit_rate
        return out

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> Stats:
        """Rebuild from a stats reply; unknown keys are ignored, missing ones are errors."""
        kwargs: dict[str, Any] = {}
        for field in attrs.fields(Stats):
            if field.name not in data:
                if field.default is attrs.NOTHING:
                    raise ValueError(f"stats reply lacks {field.name!r}")
                continue
            value = data[field.name]
            if field.name.startswith("top_"):
                value = tuple(TopEntry.from_wire(t) for t in value)
            elif field.name in _COUNTER_MAPS:
                value = {str(k): int(v) for k, v in dict(value).items()}
            elif field.name == "latency":
                value = Latencies.from_wire(value)
            elif not _is_a(value, field.type):
                # Whoever answers on the socket says what it likes: a string where a
                # number goes broke the table's arithmetic (attack 52).
                raise ValueError(f"stats field {field.name!r} is not {field.type}")
            kwargs[field.name] = value
        return cls(**kwargs)


def _is_a(value: object, kind: object) -> bool:
    """Whether *value* is what a scalar field of :class:`Stats` declares (*kind*, the
    annotation's text): a str, an int (no bool), a float (or an int)."""
    if kind == "str":
        return isinstance(value, str)
    if kind == "int":
        return isinstance(value, int) and not isinstance(value, bool)
    if kind == "float":
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return True
