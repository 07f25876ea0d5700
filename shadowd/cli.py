# The `shadowd` command: serve, stats.
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

from . import __version__
from .access import AccessPolicy, PeerLimits
from .cache import CacheLimits
from .errors import ConfigError
from .paths import resolve_socket_path
from .protocol import MAX_BATCH_LIMIT, WireLimits

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


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a whole number: {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1: {text!r}")
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
    serve.add_argument("--socket", help=socket_help)
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
            "--max-inflight",
            32,
            "most slow requests (misses) in flight on one connection before the daemon stops "
            "reading from it",
        ),
    ):
        serve.add_argument(
            flag, type=_positive_int, default=default, help=f"{text} (default %(default)s)"
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
        "--log-level",
        default="info",
        choices=["debug", "info", "warning", "error"],
        help="(default %(default)s)",
    )

    stats = sub.add_parser("stats", help="show the daemon's statistics")
    stats.add_argument("--socket", help=socket_help)
    stats.add_argument("--json", action="store_true", help="one JSON object, for scripts")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            return _serve(args)
        if args.command == "stats":
            return _stats(args)
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
            socket_path=resolve_socket_path(args.socket),
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
            ),
        )
    except ValueError as exc:
        raise ConfigError(str(exc)) from None
    trio.run(run, config)
    return 0


def _stats(args: argparse.Namespace) -> int:
    from shadowd_client import Client, ShadowdError

    from .report import format_json, format_table
    from .stats import Stats

    path = resolve_socket_path(args.socket)
    try:
        with Client(path, timeout=10.0) as client:
            raw = client.stats()
    except ShadowdError as exc:
        # The message names the socket path.
        print(f"shadowd: {exc}", file=sys.stderr)
        return 1
    try:
        stats = Stats.from_wire(raw)
    except (ValueError, TypeError, KeyError, IndexError) as exc:
        print(
            f"shadowd: the daemon at {path} sent stats this version cannot read: {exc}",
            file=sys.stderr,
        )
        return 1
    print(format_json(stats) if args.json else format_table(stats, path))
    return 0
