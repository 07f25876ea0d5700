# The daemon's statistics as one frozen value, and its wire form.
#
# Must never: report memory it cannot vouch for as if it were exact. Bytes
# are the cache's own memfd content; memory still held by clients after an
# eviction is outside the daemon's view and the stats say so.
from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import attrs


@attrs.frozen
class TopEntry:
    label: str
    hits: int
    size: int

    @property
    def bytes_saved(self) -> int:
        return self.hits * self.size


# Fields that are maps of name to count.
_COUNTER_MAPS = frozenset({"refused_by_code", "limits", "limit_hits"})


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
    open_fds: int = -1
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

    @property
    def lookups(self) -> int:
        return self.hits + self.misses

    @property
    def hit_rate(self) -> float:
        """Hits over lookups, 0.0 before the first lookup."""
        return self.hits / self.lookups if self.lookups else 0.0

    def to_wire(self) -> dict[str, Any]:
        out: dict[str, Any] = {}
        for field in attrs.fields(Stats):
            value = getattr(self, field.name)
            if field.name.startswith("top_"):
                value = [[t.label, t.hits, t.size] for t in value]
            elif field.name in _COUNTER_MAPS:
                value = dict(value)
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
                value = tuple(TopEntry(str(t[0]), int(t[1]), int(t[2])) for t in value)
            elif field.name in _COUNTER_MAPS:
                value = {str(k): int(v) for k, v in dict(value).items()}
            kwargs[field.name] = value
        return cls(**kwargs)
