# The `shadowd` command: serve, stats (once or --watch).
#
# Must never: print a traceback for a condition a user can cause (a daemon
# that is not running, a socket in use, a bad flag): one line naming what is
# wrong, and a non-zero exit.
from __future__ import annotations

import argparse
import logging
import re
import sys
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING

from . import __version__
from .access import AccessPolicy, PeerLimits
from .cache import CacheLimits
from .errors import ConfigError, DaemonError
from .paths import resolve_socket_path
from .protocol import MAX_BATCH_LIMIT, WireLimits

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


def parse_mode(text: str) -> int:
    try:
        mode = int(text, 8)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an octal mode: {text!r} (use e.g. 0600)") from None
    if not 0 <= mode <= 0o777:
        raise argparse.ArgumentTypeError(f"mode out of range: {text!r}")
    return mode


def _whole_at_least(minimum: int) -> Callable[[str], int]:
    """An argparse type: a whole number no smaller than *minimum*."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
        if value < minimum:
            raise argparse.ArgumentTypeError(f"must be at least {minimum}: {text!r}")
        return value

    return parse


_positive_int = _whole_at_least(1)
_whole = _whole_at_least(0)


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
    parser = argparse.ArgumentParser(
        prog="shadowd",
        description="A per-host cache of sealed memfds for sandbox supervisors.",
    )
    parser.add_argument("--version", action="version", version=f"shadowd {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    socket_help = (
        "socket path (default: $SHADOWD_SOCKET, else $XDG_RUNTIME_DIR/shadowd/shadowd.sock, "
        "or /run/shadowd/shadowd.sock for root)"
    )
    serve = sub.add_parser("serve", help="run the daemon in the foreground")
    serve.add_argument(
        "--socket", help=socket_help[:-1] + "; a socket passed by the service manager wins)"
    )
    defaults = CacheLimits()
    serve.add_argument(
        "--max-entries",
        type=int,
        default=defaults.max_entries,
        help="most files kept (default %(default)s)",
    )
    serve.add_argument(
        "--max-bytes",
        type=parse_size,
        default=defaults.max_bytes,
        help="most bytes of memfd content kept, e.g. 512M (default 1G)",
    )
    serve.add_argument(
        "--max-file-size",
        type=parse_size,
        default=defaults.max_file_size,
        help="larger files are refused with file-too-large and never cached (default 256M)",
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
        type=parse_size,
        default=peer_defaults.max_pinned_bytes_per_uid,
        help="most bytes of copies under way for one uid and of memfds made for it that left "
        "the cache while still held (at full size); past it its misses are refused with busy "
        "(default 256M)",
    )
    serve.add_argument(
        "--max-request",
        type=parse_size,
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
        type=_positive_int,
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
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default %(default)s)",
    )

    bench = sub.add_parser(
        "bench",
        help="measure on this host what the cache saves (about half a minute)",
        description="Measure, side by side in one run, the status-quo copy into a fresh memfd "
        "against a cache hit, per file size and for this host's ld.so and libc; the "
        "transport floor; hits per second with several client processes; the daemon's CPU "
        "time per hit; and the memory that N processes holding one file take.",
    )
    bench.add_argument(
        "--socket", help="measure a running daemon (default: start a private one for the run)"
    )
    bench.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    bench.add_argument(
        "--rounds", type=_positive_int, default=150, help="latency samples per size (default 150)"
    )
    bench.add_argument(
        "--seconds",
        type=float,
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
        type=int,
        default=50,
        help="processes holding one 16 MiB file in the memory test; 0 skips it (default 50)",
    )

    bench.add_argument(
        "--connections",
        type=int,
        default=300,
        help="other connections held open while hit latency is measured again; 0 skips it "
        "(default %(default)s)",
    )

    stats = sub.add_parser("stats", help="show the daemon's statistics")
    stats.add_argument("--socket", help=socket_help)
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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "stats":
            return _stats(args)
        if args.command == "bench":
            return _bench(args)
    except ConfigError as exc:
        print(f"shadowd: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130
    parser.error(f"unknown command {args.command!r}")


def _serve(args: argparse.Namespace) -> int:
    import trio

    from .daemon import configure_logging, run
    from .server import ServerConfig
    from .systemd import fd_store_limit

    configure_logging(args.log_level)
    if args.max_batch > MAX_BATCH_LIMIT:
        raise ConfigError(f"--max-batch is at most {MAX_BATCH_LIMIT}")
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
    from shadowd_client import Client

    path = resolve_socket_path(args.socket)
    with Client(path, timeout=10.0) as client:
        if args.watch is not None:
            return _watch(client, args)
        try:
            stats = _fetch(client)
        except _StatsUnavailable as exc:
            print(f"shadowd: {exc}", file=sys.stderr)
            return 1
        print(_render(stats, args, path), end="")
        return 0


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
    from .report import format_json, format_prometheus, format_table

    if args.json:
        return format_json(stats) + "\n"
    if args.prometheus:
        return format_prometheus(stats)
    table = format_table(stats, path)
    return f"{table}\n{rates}\n" if rates else f"{table}\n"


# Cursor to the top left, then clear the screen: the table is redrawn in place.
_REDRAW = "\x1b[H\x1b[2J"


def _watch(client: Client, args: argparse.Namespace) -> int:
    """Show the stats every args.watch seconds until interrupted; a daemon restart is shown."""
    import time

    from .report import format_rates

    in_place = sys.stdout.isatty() and not (args.json or args.prometheus)
    before: tuple[Stats, float] | None = None
    try:
        while True:
            started = time.monotonic()
            try:
                stats = _fetch(client)
            except _StatsUnavailable as exc:
                text = f"shadowd: {exc} (retrying every {args.watch:g}s)\n"
                before = None
            else:
                rates = ""
                if not (args.json or args.prometheus):
                    rates = (
                        format_rates(before[0], stats, started - before[1])
                        if before is not None
                        else "  (rates after the next refresh)"
                    )
                text = _render(stats, args, client.socket_path, rates)
                before = (stats, started)
            if in_place:
                sys.stdout.write(_REDRAW + text)
            else:
                sys.stdout.write(text if args.json else text + "\n")
            sys.stdout.flush()
            time.sleep(max(0.0, args.watch - (time.monotonic() - started)))
    except KeyboardInterrupt:
        return 0


def _bench(args: argparse.Namespace) -> int:
    from .bench import Bench, format_json, format_result

    try:
        procs = tuple(int(p) for p in args.procs.split(",") if p.strip())
    except ValueError:
        raise ConfigError(
            f"--procs takes numbers separated by commas, not {args.procs!r}"
        ) from None
    if not procs or min(procs) < 1:
        raise ConfigError("--procs needs at least one process count of 1 or more")
    socket_path = resolve_socket_path(args.socket) if args.socket else None
    bench = Bench(
        socket_path=socket_path,
        rounds=args.rounds,
        procs=procs,
        seconds=args.seconds,
        memory_procs=args.memory_procs,
        connections=args.connections,
        progress=sys.stderr,
    )
    try:
        result = bench.run()
    except RuntimeError as exc:
        print(f"shadowd bench: {exc}", file=sys.stderr)
        return 1
    print(format_json(result) if args.json else format_result(result))
    return 0
