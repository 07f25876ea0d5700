# Rendering of statistics for people (a table, the rates of --watch) and for
# scripts (JSON); for monitoring, prometheus.py.
#
# Must never: do I/O or change the numbers it renders; each figure printed is
# the one in the Stats value; print a client's path label, or any string the
# daemon sent, raw (a label is any string a client chose, whatever answers on
# the socket sends what it likes, and a terminal obeys the escape sequences in
# them: attacks 12 and 52).
from __future__ import annotations

import json
import math

from .stats import Stats, TopEntry


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
                f"{stats.index_hits} hits reported, "
                f"{stats.index_fd_range_used} of {stats.index_fd_range} fds reserved"
                " for its memfds in use",
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
        fds = f"{stats.open_fds} of {limit} ({_pct(stats.open_fds, stats.fd_limit)})"
        # The count is made in the background: an old one says how old it is.
        if stats.open_fds_age_seconds >= 1:
            fds += f", counted {human_duration(stats.open_fds_age_seconds)} ago"
        rows.append(("open fds", fds))
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
    # Every string came from whoever answered on the socket (its server name, the
    # names of its limits and codes): no escape sequence reaches a terminal (attack 52).
    return "\n".join(printable(line) for line in lines)


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
            f"  {t.label}"  # (escaped with the table's every line: format_table)
        )
    return lines


def format_json(stats: Stats) -> str:
    """One JSON object, keys as in the wire form plus hit_rate (null before any lookup)."""
    return json.dumps(stats.to_wire(), sort_keys=True, allow_nan=False)
