# The command line of `shadowd`: every flag of serve, stats and bench, the
# types that check their values, and their help.
#
# Must never: answer a bad value with a traceback or the usage block (one
# line naming the flag, and exit 2); import what only running a command
# needs (`--help` builds the parser and nothing more).
from __future__ import annotations

import argparse
import math
import re
from collections.abc import Callable
from typing import NoReturn

from . import __version__
from .cache import CacheLimits
from .errors import ConfigError
from .paths import checked_socket_path
from .peer_limits import PeerLimits
from .protocol import MAX_BATCH_LIMIT, MIN_MAX_REQUEST, WireLimits

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


def _process_counts(text: str) -> tuple[int, ...]:
    """An argparse type: process counts of 1 or more, separated by commas (none empty:
    '1,,2' is a typo, not 1,2)."""
    counts = []
    for raw in text.split(","):
        item = raw.strip()
        if not item:
            raise argparse.ArgumentTypeError(
                f"process counts separated by commas, none of them empty, not {text!r}"
            )
        try:
            count = int(item)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{item!r} is not a number (in {text!r})") from None
        if count < 1:
            raise argparse.ArgumentTypeError(f"each count must be at least 1, not {item!r}")
        counts.append(count)
    return tuple(counts)


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line naming the flag, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see {self.prog} --help)\n")


#: The longest --racy-window taken: a day. The hello tells clients the window
#: in nanoseconds, a 64-bit integer on the wire: a window of 1e30 s failed
#: every hello (the daemon could not pack it). A real window is a few seconds
#: (the coarsest file timestamps, FAT's, are 2 s apart); a day is far past any.
MAX_RACY_WINDOW_SECONDS = 86400


def _racy_window(text: str) -> float:
    value = _seconds(text)
    if value > MAX_RACY_WINDOW_SECONDS:
        raise argparse.ArgumentTypeError(
            f"must be at most {MAX_RACY_WINDOW_SECONDS} seconds (a day), not {text}"
        )
    return value


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
    # float() takes "nan" and "inf": a --watch of nan refreshed without pause,
    # a --racy-window of inf ended serve in a traceback.
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"not a finite number of seconds: {text!r}")
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
        type=_racy_window,
        default=defaults.racy_window_ns / 1e9,
        help="files whose ctime is younger than this many seconds are served but not cached; "
        "at most 86400 (default %(default)s)",
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
        help="most bytes of copies under way for one uid and of memfds made for it, found by "
        "no other uid, that left the cache while still held (at full size, 64K at least each); "
        "past it its misses are refused with busy; all uids together, and memfds other uids "
        "found: --max-bytes, then a fair share (default 256M)",
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
        help="how much to log; upper or lower case (default %(default)s)",
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
        type=_process_counts,
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
    stats.add_argument(
        "--paths",
        action="store_true",
        help="with --prometheus or --textfile, also the files that gain most, by the path "
        "labels clients sent (shadowd_top_file_*): left out unless asked, since the "
        "output is read by others (a textfile is world-readable and served over HTTP) "
        "and each label any client chose would be a new time series",
    )
    return parser
