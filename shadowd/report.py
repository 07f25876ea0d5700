# Rendering of statistics for people (a table) and for scripts (JSON).
#
# Must never: do I/O or change the numbers it renders; each figure printed is
# the one in the Stats value.
from __future__ import annotations

import json

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
    return f"{100.0 * part / whole:.1f}%" if whole else "-"


def format_table(stats: Stats, socket_path: str | None = None) -> str:
    """A readable summary: counters, limits, and the files that gain most."""
    where = f" on {socket_path}" if socket_path else ""
    rows: list[tuple[str, str]] = [
        ("hits", f"{stats.hits}"),
        ("misses", f"{stats.misses}"),
        ("hit rate", f"{100.0 * stats.hit_rate:.1f}%" if stats.lookups else "- (no lookups yet)"),
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
        ("served uncached", f"{stats.uncached}"),
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
        rows.append(("open fds", f"{stats.open_fds} of {stats.fd_limit}"))
    width = max(len(k) for k, _ in rows)
    lines = [f"{stats.server}{where}, up {human_duration(stats.uptime_seconds)}"]
    lines += [f"  {k.ljust(width)}  {v}" for k, v in rows]
    lines.append("  (cached bytes count the cache's own memfds; an evicted file stays in memory")
    lines.append("   while clients still hold descriptors of it)")
    if stats.top_by_bytes:
        lines.append("")
        lines.append("files that gain most (copies avoided):")
        lines += _top_table(stats.top_by_bytes)
    return "\n".join(lines)


def _refused(stats: Stats) -> str:
    if not stats.refused:
        return "0"
    detail = ", ".join(f"{code} {n}" for code, n in sorted(stats.refused_by_code.items()))
    return f"{stats.refused} ({detail})"


def _top_table(entries: tuple[TopEntry, ...]) -> list[str]:
    lines = [f"  {'hits':>8}  {'size':>10}  {'saved':>10}  path"]
    for t in entries:
        lines.append(
            f"  {t.hits:>8}  {human_bytes(t.size):>10}  {human_bytes(t.bytes_saved):>10}  {t.label}"
        )
    return lines


def format_json(stats: Stats) -> str:
    """One JSON object, keys as in the wire form plus hit_rate."""
    return json.dumps(stats.to_wire(), sort_keys=True)
