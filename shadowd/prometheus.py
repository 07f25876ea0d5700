# The statistics in the Prometheus text exposition format (version 0.0.4),
# for `shadowd stats --prometheus` and `--textfile`: base units, counters
# named _total, the counters by error code and by bound present from the
# start (so that rate() works), and `shadowd_up 0` when no daemon answered.
#
# Must never: do I/O or change the numbers it renders (each sample is the
# figure in the Stats value); write a label value unescaped (a path label is
# any string a client chose); write a path label unless asked (its output is
# read by others than the viewer the daemon answered, attack 50).
from __future__ import annotations

import math
from collections.abc import Iterable, Mapping

from .protocol import ErrorCode
from .stats import BYTE_LIMITS, Histogram, Stats

Sample = tuple[Mapping[str, str], float]


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def _label_value(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


class _Exposition:
    """Metric families in the Prometheus text format (version 0.0.4)."""

    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help: str, samples: Iterable[Sample]) -> None:
        assert kind in ("counter", "gauge")
        assert name.startswith("shadowd_") and (kind != "counter" or name.endswith("_total"))
        self._head(name, kind, help)
        for labels, value in samples:
            self._sample(name, labels, value)

    def histogram(
        self, name: str, help: str, series: Iterable[tuple[Mapping[str, str], Histogram]]
    ) -> None:
        """One histogram family: per series, cumulative _bucket{le}, then _sum and _count."""
        assert name.startswith("shadowd_") and name.endswith("_seconds")
        self._head(name, "histogram", help)
        for labels, hist in series:
            for le, total in hist.cumulative():
                self._sample(f"{name}_bucket", {**labels, "le": _number(float(le))}, total)
            self._sample(f"{name}_sum", labels, hist.sum)
            self._sample(f"{name}_count", labels, hist.count)

    def _head(self, name: str, kind: str, help: str) -> None:
        help = help.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines.append(f"# HELP {name} {help}")
        self.lines.append(f"# TYPE {name} {kind}")

    def _sample(self, name: str, labels: Mapping[str, str], value: float) -> None:
        if labels:
            inner = ",".join(f'{k}="{_label_value(v)}"' for k, v in labels.items())
            self.lines.append(f"{name}{{{inner}}} {_number(value)}")
        else:
            self.lines.append(f"{name} {_number(value)}")


def _by_path(values: Iterable[tuple[str, int]]) -> list[Sample]:
    """One sample per path: two entries can carry one label (a file replaced by rename)."""
    sums: dict[str, int] = {}
    for label, value in values:
        sums[label] = sums.get(label, 0) + value
    return [({"path": label}, value) for label, value in sums.items()]


#: Metrics that are one Stats field each: (name, type, help, field). A field
#: below zero means "could not measure", and its metric is left out.
_SCALARS: tuple[tuple[str, str, str, str], ...] = (
    ("shadowd_uptime_seconds", "gauge", "Seconds since the daemon started.", "uptime_seconds"),
    (
        "shadowd_evictions_total",
        "counter",
        "Entries dropped to stay within the budgets.",
        "evictions",
    ),
    (
        "shadowd_invalidations_total",
        "counter",
        "Entries dropped because their file changed.",
        "invalidations",
    ),
    (
        "shadowd_served_uncached_total",
        "counter",
        "Copies served but not cached (too new, too large, over budget, a writer had the "
        "file open, it changed during the copy, its inode could not be watched).",
        "uncached",
    ),
    ("shadowd_copies_total", "counter", "Files copied into memfds.", "copies"),
    ("shadowd_copied_bytes_total", "counter", "Bytes copied into memfds.", "bytes_copied"),
    ("shadowd_clients", "gauge", "Clients connected now.", "clients"),
    ("shadowd_connections_total", "counter", "Client connections accepted.", "clients_total"),
    ("shadowd_cache_entries", "gauge", "Files in the cache.", "entries"),
    ("shadowd_cache_max_entries", "gauge", "Most files the cache keeps.", "max_entries"),
    ("shadowd_cache_bytes", "gauge", "Bytes of file content in the cache.", "bytes"),
    (
        "shadowd_cache_max_bytes",
        "gauge",
        "Most bytes of file content the cache keeps.",
        "max_bytes",
    ),
    (
        "shadowd_cache_memory_bytes",
        "gauge",
        "Memory the cached memfds hold, in whole pages (see shadowd_pinned_bytes for "
        "those that left the cache).",
        "memory_bytes",
    ),
    (
        "shadowd_pinned_bytes",
        "gauge",
        "Bytes of memfds the daemon made that left the cache while clients still hold them.",
        "pinned_bytes",
    ),
    (
        "shadowd_memfds_replaced_total",
        "counter",
        "Cached memfds a holder changed (mode, ACL, times), dropped and replaced.",
        "tampered",
    ),
    (
        "shadowd_uncached_writers_total",
        "counter",
        "Copies not cached because a writer had the file open during them.",
        "uncached_writers",
    ),
    (
        "shadowd_watched_files",
        "gauge",
        "Cached host files whose inodes the daemon watches for changes stat cannot show.",
        "watched_files",
    ),
    (
        "shadowd_index_hits_total",
        "counter",
        "Hits clients served themselves through the index, as they reported them.",
        "index_hits",
    ),
    ("shadowd_index_entries", "gauge", "Files in the index of the cache.", "index_entries"),
    (
        "shadowd_index_slots",
        "gauge",
        "Slots of the index of the cache (0: none is published).",
        "index_slots",
    ),
    (
        "shadowd_index_fd_range",
        "gauge",
        "Descriptor numbers reserved for the index's memfds (counted in open fds).",
        "index_fd_range",
    ),
    (
        "shadowd_index_fd_range_used",
        "gauge",
        "Of those, the numbers that hold a cached memfd.",
        "index_fd_range_used",
    ),
    (
        "shadowd_fds_in_flight",
        "gauge",
        "Descriptors in replies clients have not read, and held for replies that wait.",
        "fds_in_flight",
    ),
    (
        "shadowd_max_file_size_bytes",
        "gauge",
        "Files larger than this are never cached.",
        "max_file_size",
    ),
    (
        "shadowd_resident_memory_bytes",
        "gauge",
        "Resident memory of the daemon process (without memfd pages it does not map).",
        "rss_bytes",
    ),
    (
        "shadowd_open_fds",
        "gauge",
        "Descriptors the daemon had open at its last count.",
        "open_fds",
    ),
    (
        "shadowd_open_fds_age_seconds",
        "gauge",
        "Seconds since the daemon's last fd count began.",
        "open_fds_age_seconds",
    ),
    ("shadowd_max_fds", "gauge", "The daemon's descriptor limit.", "fd_limit"),
    (
        "shadowd_fdstore_entries",
        "gauge",
        "Entries kept in the service manager's fd store for warm restarts.",
        "fdstore_entries",
    ),
    (
        "shadowd_fdstore_max_entries",
        "gauge",
        "Most entries the fd store keeps; 0 when warm restarts are off.",
        "fdstore_max",
    ),
    (
        "shadowd_fdstore_restored_entries",
        "gauge",
        "Entries taken back from the fd store when the daemon started.",
        "restored_entries",
    ),
    (
        "shadowd_private_publishes_total",
        "counter",
        "Private files published by clients.",
        "private_publishes",
    ),
    (
        "shadowd_private_sealed_in_place_total",
        "counter",
        "Published memfds sealed as they were (no copy).",
        "private_sealed_in_place",
    ),
    (
        "shadowd_private_copied_total",
        "counter",
        "Published files copied because they could not be sealed in place.",
        "private_copied",
    ),
    (
        "shadowd_private_races_lost_total",
        "counter",
        "Publishes answered with another publisher's copy of the same version.",
        "private_races_lost",
    ),
    (
        "shadowd_peers_refused_total",
        "counter",
        "Peers turned away at accept by --allow-uid and --allow-gid (connection limits count "
        "in shadowd_limit_reached_total).",
        "peers_refused",
    ),
    (
        "shadowd_fds_refused_total",
        "counter",
        "Received descriptors closed unused because their request was refused.",
        "fds_refused",
    ),
)


_UP_HELP = (
    "1 when these metrics come from a daemon that answered, 0 when none did (then "
    "only this and the timestamp are written)."
)
_TIMESTAMP_HELP = "Unix time at which these metrics were read from the daemon."


def _freshness(out: _Exposition, up: int, now: float | None) -> None:
    out.family("shadowd_up", "gauge", _UP_HELP, [({}, up)])
    if now is not None:
        out.family("shadowd_scrape_timestamp_seconds", "gauge", _TIMESTAMP_HELP, [({}, now)])


def format_prometheus_down(now: float | None = None) -> str:
    """What to export when no daemon answered: ``shadowd_up 0`` (and the time)."""
    out = _Exposition()
    _freshness(out, 0, now)
    return "\n".join(out.lines) + "\n"


def format_prometheus(stats: Stats, now: float | None = None, *, paths: bool = False) -> str:
    """The stats in the Prometheus text exposition format: base units, _total counters.

    *now* (Unix time) adds ``shadowd_scrape_timestamp_seconds``, so that a
    consumer of a file written earlier can tell how old its numbers are.
    *paths* adds the top files by the path labels clients sent; without it no
    label value a client chose is written (docs/security.md, attack 50).
    """
    out = _Exposition()
    _freshness(out, 1, now)
    version = stats.server.partition("/")[2] or stats.server
    out.family("shadowd_info", "gauge", "The daemon's version.", [({"version": version}, 1)])
    for name, kind, help, field in _SCALARS:
        value = getattr(stats, field)
        if value >= 0:
            out.family(name, kind, help, [({}, value)])
    kinds = {
        "host": (stats.hits - stats.private_hits, stats.misses - stats.private_misses),
        "private": (stats.private_hits, stats.private_misses),
    }
    out.family(
        "shadowd_hits_total",
        "counter",
        "Opens answered from the cache.",
        [({"kind": k}, h) for k, (h, _) in kinds.items()],
    )
    out.family(
        "shadowd_misses_total",
        "counter",
        "Opens that had to copy the file (or join a copy in progress).",
        [({"kind": k}, m) for k, (_, m) in kinds.items()],
    )
    codes = dict.fromkeys((str(c) for c in ErrorCode), 0) | dict(stats.refused_by_code)
    out.family(
        "shadowd_refusals_total",
        "counter",
        "Requests refused, by error code.",
        [({"code": code}, n) for code, n in sorted(codes.items())],
    )
    limits = sorted(stats.limits.items())
    out.family(
        "shadowd_limit",
        "gauge",
        "The configured bounds on peers that are counts (clients, requests, fds), by name.",
        [({"limit": name}, n) for name, n in limits if name not in BYTE_LIMITS],
    )
    out.family(
        "shadowd_limit_bytes",
        "gauge",
        "The configured bounds on peers that are sizes, in bytes, by name.",
        [({"limit": name}, n) for name, n in limits if name in BYTE_LIMITS],
    )
    # Every bound from the start (0 until first reached), so that rate() works.
    reached = dict.fromkeys(stats.limits, 0) | dict(stats.limit_hits)
    out.family(
        "shadowd_limit_reached_total",
        "counter",
        "How often a peer ran into a bound, by name.",
        [({"limit": name}, n) for name, n in sorted(reached.items())],
    )
    out.histogram(
        "shadowd_latency_seconds",
        "How long the daemon took: kind=hit and kind=miss from reading an open request to "
        "sending its reply, kind=copy to copy a file into a memfd.",
        [({"kind": kind}, hist) for kind, hist in stats.latency.by_kind().items()],
    )
    if not paths:
        # Root's stats name every uid's files: a textfile is read by every user
        # and served over HTTP, and each new label would be a new series.
        return "\n".join(out.lines) + "\n"
    out.family(
        "shadowd_top_file_hits",
        "gauge",
        "Hits of the files with most hits, by the path label clients sent.",
        _by_path((t.label, t.hits) for t in stats.top_by_hits),
    )
    out.family(
        "shadowd_top_file_saved_bytes",
        "gauge",
        "Bytes not copied thanks to the cache, for the files that saved most.",
        _by_path((t.label, t.bytes_saved) for t in stats.top_by_bytes),
    )
    return "\n".join(out.lines) + "\n"
