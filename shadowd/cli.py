# The `shadowd` command: its flags parsed (cli_flags.py), then serve (here),
# stats (cli_stats.py: once, --watch, --textfile) or bench (cli_bench.py).
#
# Must never: print a traceback for a condition a user can cause (a daemon
# that is not running, a socket in use, a bad flag, a closed pipe, Ctrl-C):
# one line naming the flag or the socket, and a non-zero exit.
from __future__ import annotations

import argparse
import logging
import os
import signal
import sys
from collections.abc import Sequence

from .cache import CacheLimits
from .cli_flags import build_parser
from .errors import ConfigError
from .paths import resolve_socket_path
from .peer_limits import PeerLimits
from .protocol import WireLimits

logger = logging.getLogger(__name__)


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "serve":
            _check_serve_flags(args, parser)
            return _serve(args)
        if args.command == "stats":
            if args.textfile is not None and args.json:
                # In the words of stats' own flag errors (the top parser's
                # error() would name `shadowd` and its help).
                parser.exit(
                    2,
                    "shadowd stats: argument --textfile: writes the Prometheus format, "
                    "not --json (see shadowd stats --help)\n",
                )
            if args.paths and not (args.prometheus or args.textfile is not None):
                parser.exit(
                    2,
                    "shadowd stats: argument --paths: only with --prometheus or --textfile "
                    "(the table and --json always name the top files; see shadowd stats "
                    "--help)\n",
                )
            from .cli_stats import run_stats

            return run_stats(args)
        if args.command == "bench":
            from .cli_bench import run_bench

            return run_bench(args)
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

    from .access import AccessPolicy
    from .daemon import STOP_SIGNALS, configure_logging, run
    from .server import ServerConfig
    from .systemd import fd_store_limit

    # Held until run() handles them, and after it returns: a stop signal
    # then is a clean stop (run's receiver) or nothing, never a kill. The mask
    # is this thread's alone: copy workers started while run() listened have
    # the signals open, and a second SIGTERM landing on one of them takes the
    # action of whatever handler is in place. So the handler run()'s receiver
    # puts back does nothing, and once run() returns the signals are ignored:
    # the interpreter's exit resets Python handlers to the default (a kill)
    # while those threads still live, but leaves SIG_IGN alone. Blocked before
    # that handler goes in: one that came between the two would run it, and be
    # lost (the daemon served on); before the block it is the default's, a kill.
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    for signum in STOP_SIGNALS:
        signal.signal(signum, _late_stop_signal)
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
    for signum in STOP_SIGNALS:
        signal.signal(signum, signal.SIG_IGN)
    return 0


def _late_stop_signal(signum: int, frame: object) -> None:
    """A stop signal outside run()'s receiver: the daemon is stopping already."""


def _serve_socket(flag: str | None) -> str:
    """The socket path to create; "" when the service manager passes the socket."""
    from .systemd import activated

    if flag is None and activated():
        return ""  # the passed socket, wherever it is
    return resolve_socket_path(flag)
