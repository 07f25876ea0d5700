# `shadowd stats`: the daemon's statistics fetched once or every --watch
# seconds, shown as a table (in place on a terminal), JSON or Prometheus, or
# written to a --textfile for a node exporter's textfile collector.
#
# Must never: print a traceback for a daemon that is not running or a reply
# this version cannot read (one line naming the socket, and a non-zero exit;
# --watch says so and keeps asking); put such a line into the --json or
# --prometheus stream a program reads (it goes to stderr); leave a
# half-written --textfile for a collector to read; chmod or write a file by
# its name in the --textfile directory, whose owner may swap the name for a
# symlink (attack 51); leave a terminal in the alternate screen.
from __future__ import annotations

import argparse
import os
import sys
from typing import TYPE_CHECKING

from .errors import ConfigError, DaemonError

if TYPE_CHECKING:
    from shadowd_client import Client

    from .stats import Stats


def run_stats(args: argparse.Namespace) -> int:
    """`shadowd stats`: once, or every --watch seconds; to stdout or --textfile."""
    from shadowd_client import Client, ShadowdError

    if args.textfile is not None:
        args.prometheus = True
    try:
        # No --socket: the client's own rule (shadowd.paths.find_socket).
        client = Client(args.socket, timeout=10.0)
    except ShadowdError as exc:
        print(f"shadowd: {_said(exc)}", file=sys.stderr)
        return 2
    with client:
        if args.watch is not None:
            return _watch(client, args)
        try:
            stats = _fetch(client)
        except _StatsUnavailable as exc:
            print(f"shadowd: {exc}", file=sys.stderr)
            if args.textfile is not None:
                _write_textfile(args.textfile, _down_text())
            return 1
        if args.textfile is not None:
            _write_textfile(args.textfile, _render(stats, args, client.socket_path))
        else:
            sys.stdout.write(_render(stats, args, client.socket_path))
            sys.stdout.flush()
        return 0


def _down_text() -> str:
    import time

    from .prometheus import format_prometheus_down

    return format_prometheus_down(now=round(time.time(), 3))


def _write_textfile(path: str, text: str) -> None:
    """Replace *path* with *text* in one step: a reader sees the old file or the new one.

    The temporary file sits beside it, named so that a textfile collector
    (which reads only *.prom) never picks it up.
    """
    import tempfile

    directory = os.path.dirname(path) or "."
    try:
        fd, tmp = tempfile.mkstemp(
            prefix=f".{os.path.basename(path)}.", suffix=".tmp", dir=directory
        )
    except OSError as exc:
        raise ConfigError(f"cannot write --textfile {path}: {exc.strerror or exc}") from None
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            umask = os.umask(0)
            os.umask(umask)
            # mkstemp makes it 0600; the collector usually runs as another user.
            # Through the descriptor: the directory's owner may have swapped the
            # name for a symlink by now, which a chmod by name follows (attack 51).
            os.fchmod(f.fileno(), 0o644 & ~umask)
            f.write(text)
        os.rename(tmp, path)
    except OSError as exc:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise ConfigError(f"cannot write --textfile {path}: {exc.strerror or exc}") from None
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise


def _said(exc: Exception) -> str:
    """*exc*'s message, which may carry the daemon's words, fit for a terminal."""
    from .report import printable

    return printable(str(exc))


class _StatsUnavailable(DaemonError):
    """No stats to show: no daemon, or a reply this version cannot read."""


def _fetch(client: Client) -> Stats:
    from shadowd_client import ShadowdError

    from .stats import Stats

    try:
        raw = client.stats()
    except ShadowdError as exc:
        raise _StatsUnavailable(_said(exc)) from None  # the message names the socket
    try:
        return Stats.from_wire(raw)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise _StatsUnavailable(
            f"the daemon at {client.socket_path} sent stats this version cannot read: {exc}"
        ) from None


def _render(stats: Stats, args: argparse.Namespace, path: str, rates: str = "") -> str:
    import time

    from .prometheus import format_prometheus
    from .report import format_json, format_table

    if args.json:
        return format_json(stats) + "\n"
    if args.prometheus:
        return format_prometheus(stats, now=round(time.time(), 3), paths=args.paths)
    table = format_table(stats, path)
    return f"{table}\n{rates}\n" if rates else f"{table}\n"


# The terminal's alternate screen (left as it was on exit, like top and
# watch), the cursor to the top left, the rest of a line, the rest of the
# screen: each frame overwrites the last in place, none reaches scrollback.
_ENTER = "\x1b[?1049h"
_LEAVE = "\x1b[?1049l"
_HOME = "\x1b[H"
_CLEAR_LINE = "\x1b[K"
_CLEAR_BELOW = "\x1b[J"


def fit_frame(lines: list[str], columns: int, rows: int, ellipsis: str = "…") -> list[str]:
    """*lines* cut to a terminal of *columns* x *rows*: long lines abbreviated,
    the lines that do not fit (they come last: the top files) counted instead."""
    width = max(columns - 1, 8)  # the last column left free: no wrap, ever
    if len(lines) > rows:
        hidden = len(lines) - (rows - 1)
        lines = [*lines[: rows - 1], f"  ({hidden} more lines in a larger terminal)"]
    return [ln if len(ln) <= width else ln[: width - len(ellipsis)] + ellipsis for ln in lines]


def _frame(text: str, rates: str) -> str:
    """One screenful: the table with the rates second (they matter most), fit to the terminal."""
    import shutil

    lines = text.rstrip("\n").split("\n")
    if rates:
        lines.insert(1, rates)
    size = shutil.get_terminal_size()
    encoding = (getattr(sys.stdout, "encoding", None) or "").lower().replace("-", "")
    lines = fit_frame(lines, size.columns, size.lines, "…" if encoding == "utf8" else "~")
    return _HOME + (_CLEAR_LINE + "\n").join(lines) + _CLEAR_LINE + _CLEAR_BELOW


def _watch(client: Client, args: argparse.Namespace) -> int:
    """Show the stats every args.watch seconds until interrupted; a daemon restart is shown.

    With --textfile, the file is rewritten at each refresh, and says
    ``shadowd_up 0`` while no daemon answers.
    """
    import time

    from .report import format_rates

    textfile = args.textfile
    # JSON and Prometheus text are read by programs: a daemon that is down is
    # said on stderr (once, and again when it answers), never in their stream.
    machine = textfile is not None or args.json or args.prometheus
    in_place = not machine and sys.stdout.isatty()
    before: tuple[Stats, float] | None = None
    down = False
    try:
        if in_place:
            sys.stdout.write(_ENTER)
        while True:
            started = time.monotonic()
            rates = ""
            try:
                stats = _fetch(client)
            except _StatsUnavailable as exc:
                text = f"shadowd: {exc} (retrying every {args.watch:g}s)\n"
                before = None
                if textfile is not None:
                    _write_textfile(textfile, _down_text())
                if machine:
                    if not down:
                        print(text, end="", file=sys.stderr, flush=True)
                    text = ""
                down = True
            else:
                if not (args.json or args.prometheus):
                    rates = (
                        format_rates(before[0], stats, started - before[1])
                        if before is not None
                        else "  (rates after the next refresh)"
                    )
                before = (stats, started)
                if machine and down:
                    print(f"shadowd: {client.socket_path} answers again", file=sys.stderr)
                if textfile is not None:
                    _write_textfile(textfile, _render(stats, args, client.socket_path))
                    text = ""
                else:
                    text = _render(stats, args, client.socket_path, "" if in_place else rates)
                down = False
            if in_place:
                sys.stdout.write(_frame(text, rates))
            elif text:
                sys.stdout.write(text if args.json else text + "\n")
            sys.stdout.flush()
            time.sleep(max(0.0, args.watch - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0
    finally:
        if in_place:
            try:
                sys.stdout.write(_LEAVE)
                sys.stdout.flush()
            except OSError:
                pass
