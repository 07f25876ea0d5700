# Rendering of statistics for people (a table), for scripts (JSON) and for
# monitoring (the Prometheus text exposition format).
#
# Must never: do I/O or change the numbers it renders; each figure printed is
# the one in the Stats value; print a client's path label raw (a label is any
# string a client chose, and a terminal would obey the escape sequences in it).
from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping

from .protocol import ErrorCode
from .stats import BYTE_LIMITS, Histogram, Stats, TopEntry


def human_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(n) < 1024 or unit == "TiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    raise AssertionError("unreachable")


def human_duration(seconds: float) -> str:
    s = int(seconds)
    days, s = divmod(s, 86400)
    hours, s = divmod(s, 3600)
    minutes, s = divmod(s, 60)
    if days:
        return f"{days}d{hours:02d}h{minutes:02d}m"
    if hours:
        return f"{hours}h{minutes:02d}m{s:02d}s"
    if minutes:
        return f"{minutes}m{s:02d}s"
    return f"{seconds:.1f}s"


def _pct(part: int, whole: int) -> str:
    """part/whole as a percentage; "-" when either is unknown (negative) or whole is 0."""
    return f"{100.0 * part / whole:.1f}%" if whole > 0 and part >= 0 else "-"


def format_table(stats: Stats, socket_path: str | None = None) -> str:
    """A readable summary: counters, limits, and the files that gain most."""
    where = f" on {socket_path}" if socket_path else ""
    rows: list[tuple[str, str]] = [
        ("hits", f"{stats.hits}"),
        ("misses", f"{stats.misses}"),
        ("hit rate", _hit_rate(stats)),
        (
            "entries",
            f"{stats.entries} of {stats.max_entries} ({_pct(stats.entries, stats.max_entries)})",
        ),
        (
            "cached bytes",
            f"{human_bytes(stats.bytes)} of {human_bytes(stats.max_bytes)}"
            f" ({_pct(stats.bytes, stats.max_bytes)})",
        ),
        ("max file size", human_bytes(stats.max_file_size)),
        ("evictions", f"{stats.evictions}"),
        ("invalidations", f"{stats.invalidations}"),
        ("served uncached", _uncached(stats)),
        ("copies made", f"{stats.copies} ({human_bytes(stats.bytes_copied)})"),
        ("refused", _refused(stats)),
        ("clients", f"{stats.clients} now, {stats.clients_total} since start"),
    ]
    if stats.private_hits or stats.private_misses or stats.private_entries:
        rows.append(
            (
                "private files",
                f"{stats.private_entries} entries, {human_bytes(stats.private_bytes)}, "
                f"{stats.private_hits} hits, {stats.private_misses} misses",
            )
        )
    latency = _latency(stats)
    if latency:
        rows.append(("latency", latency))
    rows.append(("memory", _memory(stats)))
    if stats.tampered:
        rows.append(("memfds replaced", f"{stats.tampered} (changed by one of their holders)"))
    if stats.fds_in_flight:
        rows.append(("fds in flight", f"{stats.fds_in_flight} (unread or waiting replies)"))
    if stats.index_slots:
        rows.append(
            (
                "index",
                f"{stats.index_entries} files in {stats.index_slots} slots, "
                f"{stats.index_hits} hits reported",
            )
        )
    if stats.private_publishes:
        rows.append(
            (
                "private publishes",
                f"{stats.private_publishes} ({stats.private_sealed_in_place} sealed in place, "
                f"{stats.private_copied} copied, {stats.private_races_lost} races lost)",
            )
        )
    if stats.peers_refused:
        rows.append(("peers refused", f"{stats.peers_refused}"))
    if stats.limit_hits:
        hits = ", ".join(
            f"{name} ({stats.limits.get(name, '?')}) {n}"
            for name, n in sorted(stats.limit_hits.items())
        )
        rows.append(("limits reached", hits))
    if stats.open_fds >= 0:
        limit = f"{stats.fd_limit}" if stats.fd_limit >= 0 else "an unknown limit"
        rows.append(
            ("open fds", f"{stats.open_fds} of {limit} ({_pct(stats.open_fds, stats.fd_limit)})")
        )
    rows.append(("fd store", _fd_store(stats)))
    width = max(len(k) for k, _ in rows)
    lines = [f"{stats.server}{where}, up {human_duration(stats.uptime_seconds)}"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines.append("  (memory: an evicted file stays in memory while clients still hold it;")
    lines.append("   the daemon counts those until the last holder lets go)")
    if stats.top_by_bytes:
        lines.append("")
        lines.append("files that gain most, by bytes not copied:")
        lines += _top_table(stats.top_by_bytes)
    if stats.top_by_hits:
        lines.append("")
        lines.append("files that gain most, by hits:")
        lines += _top_table(stats.top_by_hits)
    return "\n".join(lines)


def _uncached(stats: Stats) -> str:
    if stats.uncached_writers:
        return f"{stats.uncached} ({stats.uncached_writers} while a writer had the file open)"
    return f"{stats.uncached}"


def _hit_rate(stats: Stats) -> str:
    rate = stats.hit_rate
    return "- (no lookups yet)" if rate is None else f"{100.0 * rate:.1f}%"


def human_seconds(seconds: float) -> str:
    """A duration from microseconds to seconds, in the unit that reads best."""
    if math.isinf(seconds):
        return "above the largest bucket"
    if seconds < 1e-3:
        return f"{seconds * 1e6:.0f} us"
    if seconds < 1:
        return f"{seconds * 1e3:.0f} ms"
    return f"{seconds:.0f} s"


def _latency(stats: Stats) -> str:
    """Per kind: p50 and p99 (the upper bounds of their buckets), and the count."""
    parts = []
    for kind, hist in stats.latency.by_kind().items():
        p50, p99 = hist.quantile(0.5), hist.quantile(0.99)
        if p50 is None or p99 is None:
            continue
        parts.append(
            f"{kind} p50 <= {human_seconds(p50)}, p99 <= {human_seconds(p99)} ({hist.count})"
        )
    return "; ".join(parts)


def _memory(stats: Stats) -> str:
    text = f"{human_bytes(stats.memory_bytes)} in cached memfds (whole pages)"
    if stats.pinned_bytes:
        text += f"; {human_bytes(stats.pinned_bytes)} evicted but held by clients"
    if stats.rss_bytes >= 0:
        text += f"; daemon resident {human_bytes(stats.rss_bytes)}"
    return text


def _fd_store(stats: Stats) -> str:
    if not stats.fdstore_max and not stats.fdstore_entries:
        text = "off (the cache starts cold after a restart)"
    else:
        text = f"{stats.fdstore_entries} of {stats.fdstore_max} entries kept for warm restarts"
    if stats.restored_entries:
        text += f"; {stats.restored_entries} restored at start"
    return text


def format_rates(before: Stats, after: Stats, seconds: float) -> str:
    """What changed between two snapshots, per second (for --watch)."""
    if seconds <= 0 or after.uptime_seconds < before.uptime_seconds:
        return "  (rates after the next refresh)"
    hits = after.hits - before.hits
    misses = after.misses - before.misses
    lookups = hits + misses
    rate = f"{100.0 * hits / lookups:.1f}%" if lookups else "-"
    copied = after.bytes_copied - before.bytes_copied
    return (
        f"  last {seconds:.1f}s: {lookups / seconds:.1f} opens/s, hit rate {rate}, "
        f"{human_bytes(copied / seconds)}/s copied, "
        f"{(after.evictions - before.evictions) / seconds:.1f} evictions/s"
    )


def printable(label: str) -> str:
    """*label* with every non-printable character written as an escape."""
    if label.isprintable():
        return label
    return "".join(c if c.isprintable() else ascii(c)[1:-1] for c in label)


def _refused(stats: Stats) -> str:
    if not stats.refused:
        return "0"
    detail = ", ".join(f"{code} {n}" for code, n in sorted(stats.refused_by_code.items()))
    return f"{stats.refused} ({detail})"


def _top_table(entries: tuple[TopEntry, ...]) -> list[str]:
    lines = [f"  {'hits':>8}  {'size':>10}  {'saved':>10}  path"]
    for t in entries:
        lines.append(
            f"  {t.hits:>8}  {human_bytes(t.size):>10}  {human_bytes(t.bytes_saved):>10}"
            f"  {printable(t.label)}"
        )
    return lines


def format_json(stats: Stats) -> str:
    """One JSON object, keys as in the wire form plus hit_rate (null before any lookup)."""
    return json.dumps(stats.to_wire(), sort_keys=True, allow_nan=False)


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
        "Copies served but not cached (too new, too large, over budget).",
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
    ("shadowd_open_fds", "gauge", "Descriptors the daemon has open.", "open_fds"),
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


def format_prometheus(stats: Stats, now: float | None = None) -> str:
    """The stats in the Prometheus text exposition format: base units, _total counters.

    *now* (Unix time) adds ``shadowd_scrape_timestamp_seconds``, so that a
    consumer of a file written earlier can tell how old its numbers are.
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
