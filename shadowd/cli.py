# The `shadowd` command: serve, stats (once, --watch, --textfile), bench.
#
# Must never: print a traceback for a condition a user can cause (a daemon
# that is not running, a socket in use, a bad flag, a closed pipe, Ctrl-C):
# one line naming the flag or the socket, and a non-zero exit; leave a
# half-written --textfile for a collector to read.
from __future__ import annotations

import argparse
import logging
import os
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NoReturn, TextIO, cast

from . import __version__
from .access import AccessPolicy, PeerLimits
from .cache import CacheLimits
from .errors import ConfigError, DaemonError
from .paths import checked_socket_path, resolve_socket_path
from .protocol import MAX_BATCH_LIMIT, MIN_MAX_REQUEST, WireLimits

if TYPE_CHECKING:
    from shadowd_client import Client

    from .stats import Stats

logger = logging.getLogger(__name__)

_SIZE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([kmgt]?)(?:i?b)?\s*$", re.IGNORECASE)
_UNITS = {"": 1, "k": 1 << 10, "m": 1 << 20, "g": 1 << 30, "t": 1 << 40}


def parse_size(text: str) -> int:
    """'4096', '64K', '256M', '1.5G' (binary units) -> bytes."""
    m = _SIZE.match(text)
    if not m:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (use e.g. 4096, 64K, 256M, 1G)")
    return int(float(m.group(1)) * _UNITS[m.group(2).lower()])


def positive_size(text: str) -> int:
    """A size of at least one byte (see parse_size)."""
    size = parse_size(text)
    if size < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1 byte, not {text!r}")
    return size


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (use e.g. 0600)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return mode


def _whole_at_least(
    minimum: int, why: str = "", maximum: int | None = None
) -> Callable[[str], int]:
    """An argparse type: a whole number from *minimum* (to *maximum*); *why* explains the bound."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}{why}, not {text}")
        if maximum is not None and value > maximum:
            raise argparse.ArgumentTypeError(f"must be at most {maximum}, not {text}")
        return value

    return parse


_positive_int = _whole_at_least(1)
_whole = _whole_at_least(0)


def _size_at_least(minimum: int, why: str = "") -> Callable[[str], int]:
    """An argparse type: a size (see parse_size) of at least *minimum* bytes."""

    def parse(text: str) -> int:
        value = parse_size(text)
        if value < minimum:
            unit = "byte" if minimum == 1 else "bytes"
            raise argparse.ArgumentTypeError(f"must be at least {minimum} {unit}{why}, not {text}")
        return value

    return parse


def _socket_arg(text: str) -> str:
    """An argparse type: a usable socket path (never empty: that is no default)."""
    if not text:
        raise argparse.ArgumentTypeError("must not be empty (leave the flag out for the default)")
    try:
        return checked_socket_path(text)
    except ConfigError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _positive_seconds(text: str) -> float:
    value = _seconds(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be more than 0, not {text}")
    return value


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


def _interval(text: str) -> float:
    value = _seconds(text)
    if value < 0.1:
        raise argparse.ArgumentTypeError(f"refresh at most ten times a second: {text!r}")
    return value


def _id_or_name(text: str, lookup: Callable[[str], int], what: str) -> int:
    if text.isdigit():
        return int(text)
    try:
        return lookup(text)
    except KeyError:
        raise argparse.ArgumentTypeError(f"no such {what}: {text!r}") from None


def _uid(text: str) -> int:
    """A uid, or the name of a user."""
    import pwd

    return _id_or_name(text, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _gid(text: str) -> int:
    """A gid, or the name of a group."""
    import grp

    return _id_or_name(text, lambda name: grp.getgrnam(name).gr_gid, "group")


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of seconds: {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must not be negative: {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="shadowd",
        description="A per-host cache of sealed memfds for sandbox supervisors.",
    )
    parser.add_argument("--version", action="version", version=f"shadowd {__version__}")
    # Also before the command (`shadowd --socket X stats`); the command's own wins.
    parser.add_argument(
        "--socket", type=_socket_arg, default=None, help="socket path, as each command's --socket"
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    client_socket_help = (
        "socket path (default: $SHADOWD_SOCKET when set; else the first socket of "
        "$XDG_RUNTIME_DIR/shadowd/shadowd.sock, or /run/user/UID/shadowd/shadowd.sock without "
        "it, and /run/shadowd/shadowd.sock; root looks only at the last)"
    )
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--socket",
        type=_socket_arg,
        default=argparse.SUPPRESS,
        help="socket path to create (default: $SHADOWD_SOCKET; root: /run/shadowd/shadowd.sock; "
        "others: $XDG_RUNTIME_DIR/shadowd/shadowd.sock, else /run/user/UID/shadowd/shadowd.sock; "
        "a socket passed by the service manager wins)",
    )
    defaults = CacheLimits()
    serve.add_argument(
        "--max-entries",
        type=_whole_at_least(1, " (0 would cache nothing)"),
        default=defaults.max_entries,
        help="most files kept (default %(default)s)",
    )
    serve.add_argument(
        "--max-bytes",
        type=_size_at_least(1, " (0 would cache nothing)"),
        default=defaults.max_bytes,
        help="most bytes of memfd content kept, e.g. 512M (default 1G)",
    )
    serve.add_argument(
        "--max-file-size",
        type=_size_at_least(1),
        default=None,
        help="larger files are refused with file-too-large and never cached; at most "
        "--max-bytes (default 256M, or --max-bytes when that is smaller)",
    )
    serve.add_argument(
        "--racy-window",
        type=_seconds,
        default=defaults.racy_window_ns / 1e9,
        help="files whose ctime is younger than this many seconds are served but not cached "
        "(default %(default)s)",
    )
    serve.add_argument(
        "--socket-mode",
        type=parse_mode,
        default=0o600,
        help="octal mode of the socket (default 0600: only the daemon's user may connect)",
    )
    serve.add_argument(
        "--socket-group",
        help="group owning the socket (name or gid); with --socket-mode 0660, its members "
        "may connect",
    )
    serve.add_argument(
        "--allow-uid",
        type=_uid,
        action="append",
        default=[],
        metavar="UID",
        help="admit only peers of this uid or user name (repeatable; checked with "
        "SO_PEERCRED at accept; others get not-permitted). The daemon's own uid is always "
        "admitted. Without --allow-uid and --allow-gid, everyone who can connect is admitted",
    )
    serve.add_argument(
        "--allow-gid",
        type=_gid,
        action="append",
        default=[],
        metavar="GID",
        help="admit peers whose primary or supplementary group is this gid or group name "
        "(repeatable)",
    )
    peer_defaults = PeerLimits()
    for flag, default, text in (
        (
            "--max-clients",
            peer_defaults.max_clients,
            "most connections at once; more are refused with busy",
        ),
        (
            "--max-clients-per-uid",
            peer_defaults.max_clients_per_uid,
            "most connections of one uid at once; more are refused with busy",
        ),
        (
            "--max-copies-per-uid",
            peer_defaults.max_copies_per_uid,
            "most worker jobs (copies, inspections) for one uid's files at once; a file on "
            "a hung mount ties up only its uid's share",
        ),
        (
            "--max-fds-per-uid",
            peer_defaults.max_fds_per_uid,
            "most descriptors one uid may have in replies it has not read yet and in replies "
            "waiting to be sent; past it its requests are refused with busy (the daemon "
            "allows half its fd limit in all)",
        ),
        (
            "--max-inflight",
            32,
            "most requests waiting on one connection (misses, and replies waiting for room "
            "in its socket) before the daemon stops reading from it",
        ),
    ):
        serve.add_argument(
            flag, type=_positive_int, default=default, help=f"{text} (default %(default)s)"
        )
    serve.add_argument(
        "--max-pinned-bytes-per-uid",
        type=positive_size,
        default=peer_defaults.max_pinned_bytes_per_uid,
        help="most bytes of copies under way for one uid and of memfds made for it that left "
        "the cache while still held (at full size); past it its misses are refused with busy "
        "(default 256M)",
    )
    serve.add_argument(
        "--max-request",
        type=_size_at_least(MIN_MAX_REQUEST),
        default=WireLimits().max_request,
        help="largest request datagram in bytes, at least 512; a larger one is refused with "
        "request-too-large and its connection closed (default 64K)",
    )
    serve.add_argument(
        "--copy-workers",
        type=_positive_int,
        default=4,
        help="threads copying missed files (default %(default)s)",
    )
    serve.add_argument(
        "--max-batch",
        type=_whole_at_least(1, maximum=MAX_BATCH_LIMIT),
        default=WireLimits().max_batch,
        help=f"most files in one batch open, up to {MAX_BATCH_LIMIT}, and so most fds one "
        "request may carry; the kernel closes the fds beyond it (default %(default)s)",
    )
    serve.add_argument(
        "--fd-store-max",
        type=_whole,
        default=None,
        metavar="N",
        help="cached files to keep in the service manager's fd store for warm restarts: "
        "set it to the unit's FileDescriptorStoreMax= (default: $FDSTORE, which systemd 254 "
        "and later set, else 0: none)",
    )
    serve.add_argument(
        "--log-level",
        type=str.lower,
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="in any case (default %(default)s)",
    )

    bench = sub.add_parser(
        "bench",
        help="measure on this host what the cache saves (about 45 seconds)",
        description="Measure, side by side in one run, the status-quo copy into a fresh memfd "
        "against a cache hit, per file size and for this host's ld.so and libc; the "
        "transport floor; hits per second with several client processes; the daemon's CPU "
        "time per hit; and the memory that N processes holding one file take.",
    )
    bench.add_argument(
        "--socket",
        type=_socket_arg,
        default=argparse.SUPPRESS,
        help="measure a running daemon (default: start a private one for the run)",
    )
    bench.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    bench.add_argument(
        "--rounds", type=_positive_int, default=150, help="latency samples per size (default 150)"
    )
    bench.add_argument(
        "--seconds",
        type=_positive_seconds,
        default=2.0,
        help="length of each throughput run (default %(default)s)",
    )
    bench.add_argument(
        "--procs",
        default="1,4,8",
        help="client process counts for throughput, comma separated (default %(default)s)",
    )
    bench.add_argument(
        "--memory-procs",
        type=_whole,
        default=50,
        help="processes holding one 16 MiB file in the memory test; 0 skips it (default 50)",
    )

    bench.add_argument(
        "--connections",
        type=_whole,
        default=300,
        help="other connections held open while hit latency is measured again; 0 skips it "
        "(default %(default)s)",
    )

    stats = sub.add_parser("stats", help="show the daemon's statistics")
    stats.add_argument(
        "--socket", type=_socket_arg, default=argparse.SUPPRESS, help=client_socket_help
    )
    form = stats.add_mutually_exclusive_group()
    form.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    form.add_argument(
        "--prometheus",
        action="store_true",
        help="the Prometheus text exposition format, for monitoring",
    )
    stats.add_argument(
        "--watch",
        type=_interval,
        metavar="SECONDS",
        help="refresh every SECONDS until interrupted (the table in place, on a terminal)",
    )
    stats.add_argument(
        "--textfile",
        metavar="PATH",
        help="write the Prometheus format to PATH (for the node exporter's textfile "
        "collector) instead of stdout, atomically (a temporary file renamed over it); "
        "when no daemon answers, PATH says shadowd_up 0. Implies --prometheus",
    )
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            _check_serve_flags(args, parser)
            return _serve(args)
        if args.command == "stats":
            if args.textfile is not None and args.json:
                parser.error("argument --textfile: writes the Prometheus format, not --json")
            return _stats(args)
        if args.command == "bench":
            return _bench(args)
    except ConfigError as exc:
        print(f"shadowd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # The reader went away (`shadowd stats --watch 1 | head -3`): nothing
        # more to say, and nowhere to say it. Quiet, like any filter.
        _silence_stdout()
        return 141  # 128 + SIGPIPE, what a shell reports for a writer killed by it
    parser.error(f"unknown command {args.command!r}")


def _silence_stdout() -> None:
    """Point stdout at /dev/null, so that the interpreter's last flush cannot fail again."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):
        pass


def _check_serve_flags(args: argparse.Namespace, parser: argparse.ArgumentParser) -> None:
    """Flags that are wrong only together; one line naming them, exit 2."""
    from .report import human_bytes

    default = CacheLimits().max_file_size
    if args.max_file_size is None:
        args.max_file_size = min(default, args.max_bytes)
    elif args.max_file_size > args.max_bytes:
        parser.exit(
            2,
            f"shadowd serve: --max-file-size {human_bytes(args.max_file_size)} is above "
            f"--max-bytes {human_bytes(args.max_bytes)}: no file that large could ever be "
            "cached; lower --max-file-size or raise --max-bytes\n",
        )


def _serve(args: argparse.Namespace) -> int:
    import trio

    from .daemon import configure_logging, run
    from .server import ServerConfig
    from .systemd import fd_store_limit

    configure_logging(args.log_level)
    try:
        cache = CacheLimits(
            max_entries=args.max_entries,
            max_bytes=args.max_bytes,
            max_file_size=args.max_file_size,
            racy_window_ns=int(args.racy_window * 1e9),
        )
        config = ServerConfig(
            socket_path=_serve_socket(args.socket),
            socket_mode=args.socket_mode,
            socket_group=args.socket_group,
            cache=cache,
            wire=WireLimits(max_request=args.max_request, max_batch=args.max_batch),
            copy_workers=args.copy_workers,
            max_inflight=args.max_inflight,
            access=AccessPolicy(
                allow_uids=frozenset(args.allow_uid), allow_gids=frozenset(args.allow_gid)
            ),
            peers=PeerLimits(
                max_clients=args.max_clients,
                max_clients_per_uid=args.max_clients_per_uid,
                max_copies_per_uid=args.max_copies_per_uid,
                max_fds_per_uid=args.max_fds_per_uid,
                max_pinned_bytes_per_uid=args.max_pinned_bytes_per_uid,
            ),
            fd_store_max=fd_store_limit(args.fd_store_max),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    trio.run(run, config)
    return 0


def _serve_socket(flag: str | None) -> str:
    """The socket path to create; "" when the service manager passes the socket."""
    from .systemd import activated

    if flag is None and activated():
        return ""  # the passed socket, wherever it is
    return resolve_socket_path(flag)


def _stats(args: argparse.Namespace) -> int:
    from shadowd_client import Client, ShadowdError

    if args.textfile is not None:
        args.prometheus = True
    try:
        # No --socket: the client's own rule (shadowd.paths.find_socket).
        client = Client(args.socket, timeout=10.0)
    except ShadowdError as exc:
        print(f"shadowd: {exc}", file=sys.stderr)
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

    from .report import format_prometheus_down

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
            f.write(text)
        umask = os.umask(0)
        os.umask(umask)
        # mkstemp makes it 0600; the collector usually runs as another user.
        os.chmod(tmp, 0o644 & ~umask)
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


class _StatsUnavailable(DaemonError):
    """No stats to show: no daemon, or a reply this version cannot read."""


def _fetch(client: Client) -> Stats:
    from shadowd_client import ShadowdError

    from .stats import Stats

    try:
        raw = client.stats()
    except ShadowdError as exc:
        raise _StatsUnavailable(str(exc)) from None  # the message names the socket
    try:
        return Stats.from_wire(raw)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        raise _StatsUnavailable(
            f"the daemon at {client.socket_path} sent stats this version cannot read: {exc}"
        ) from None


def _render(stats: Stats, args: argparse.Namespace, path: str, rates: str = "") -> str:
    import time

    from .report import format_json, format_prometheus, format_table

    if args.json:
        return format_json(stats) + "\n"
    if args.prometheus:
        return format_prometheus(stats, now=round(time.time(), 3))
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
    in_place = textfile is None and sys.stdout.isatty() and not (args.json or args.prometheus)
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
                if textfile is not None:
                    _write_textfile(textfile, _render(stats, args, client.socket_path))
                    if down:
                        print(f"shadowd: {client.socket_path} answers again", file=sys.stderr)
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


def _bench(args: argparse.Namespace) -> int:
    try:
        procs = tuple(int(p) for p in args.procs.split(",") if p.strip())
    except ValueError:
        raise ConfigError(
            f"--procs takes numbers separated by commas, not {args.procs!r}"
        ) from None
    if not procs or min(procs) < 1:
        raise ConfigError("--procs needs at least one process count of 1 or more")
    progress_tty = sys.stderr.isatty()

    def body() -> int:
        from .bench import Bench, format_json, format_result

        bench = Bench(
            socket_path=args.socket,
            rounds=args.rounds,
            procs=procs,
            seconds=args.seconds,
            memory_procs=args.memory_procs,
            connections=args.connections,
            progress=cast(TextIO, _Progress(sys.stderr, progress_tty)),
        )
        try:
            result = bench.run()
        except RuntimeError as exc:
            print(f"shadowd bench: {exc}", file=sys.stderr)
            return 1
        print(format_json(result) if args.json else format_result(result))
        return 0

    return run_interruptible("shadowd bench", body, tty=progress_tty)


class _Progress:
    """The bench's progress stream, which says it is a terminal when ours is (see below)."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self._stream = stream
        self._tty = tty

    def write(self, text: str) -> int:
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._tty


#: Seconds an interrupted child gets to clean up before it is killed.
INTERRUPT_GRACE = 20.0


def run_interruptible(name: str, body: Callable[[], int], *, tty: bool = False) -> int:
    """Run *body* in a child process; Ctrl-C makes one line and exit status 130.

    The child (and every process it starts: daemons, workers, compilers) runs
    in a process group of its own, with its output relayed through pipes.
    On SIGINT or SIGTERM to us, the whole group gets SIGINT, so each part
    cleans up (the bench removes its daemon and its files) while what they
    print meanwhile, tracebacks of interrupted workers included, is
    dropped; then ``NAME: interrupted`` and 130. A second Ctrl-C, or a
    group still running after INTERRUPT_GRACE seconds, gets SIGKILL.
    """
    import selectors
    import signal
    import time

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its exit status is checked by the tests
        code = 1
        try:
            os.setpgid(0, 0)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (null, out_r, out_w, err_r, err_w):
                os.close(fd)
            code = body()
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            import traceback

            traceback.print_exc()  # a bug of ours: show it
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    try:
        os.setpgid(pid, pid)  # also here: no signal may reach the group before it exists
    except OSError:
        pass  # the child did it first, or already exited
    os.close(out_w)
    os.close(err_w)
    relay = {out_r: sys.stdout, err_r: sys.stderr}

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    interrupted = False
    piped_out = False  # our own reader went away (`shadowd bench | head`)
    deadline = float("inf")

    def stop(signum: int) -> None:
        nonlocal deadline
        deadline = min(deadline, time.monotonic() + INTERRUPT_GRACE)
        _signal_group(pid, signum)

    try:
        with selectors.DefaultSelector() as sel:
            for fd in relay:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                try:
                    ready = sel.select(timeout=max(0.0, min(deadline - time.monotonic(), 1.0)))
                    if time.monotonic() >= deadline:
                        _signal_group(pid, signal.SIGKILL)
                        break
                    for key, _ in ready:
                        fd = int(key.fd)
                        data = os.read(fd, 65536)
                        if not data:
                            sel.unregister(fd)
                        elif not (interrupted or piped_out):
                            _relay(relay[fd], data)
                except KeyboardInterrupt:
                    if interrupted:  # the second time: no more waiting
                        _signal_group(pid, signal.SIGKILL)
                        break
                    interrupted = True
                    stop(signal.SIGINT)
                except BrokenPipeError:
                    piped_out = True
                    stop(signal.SIGINT)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except KeyboardInterrupt:
                _signal_group(pid, signal.SIGKILL if interrupted else signal.SIGINT)
                interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(out_r)
        os.close(err_r)
    if piped_out:
        raise BrokenPipeError
    if interrupted:
        line = f"{name}: interrupted"
        # On a terminal: over the last progress line and the echoed ^C.
        print("\r" + line.ljust(72) if tty else line, file=sys.stderr)
        return 130
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _relay(stream: TextIO, data: bytes) -> None:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode(errors="replace"))
        stream.flush()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
