# The daemon process around the server: logging, the fd limit, the listening
# socket, signals, and a clean exit.
#
# Must never: exit without removing the socket it created; remove one it did
# not create; turn SIGTERM into anything but a drain and exit status 0.
from __future__ import annotations

import logging
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator

import trio

from . import __version__
from .listener import Listener
from .server import Server, ServerConfig

logger = logging.getLogger(__name__)


def configure_logging(level: str | int = "info", *, stream: object = None) -> None:
    """Plain lines on stderr; no timestamps when stderr is the journal (it adds its own)."""
    if isinstance(level, str):
        level = level.upper()
    journal = bool(os.environ.get("JOURNAL_STREAM"))
    fmt = (
        "%(levelname)s %(name)s: %(message)s"
        if journal
        else ("%(asctime)s %(levelname)s %(name)s: %(message)s")
    )
    handler = logging.StreamHandler(stream or sys.stderr)  # type: ignore[arg-type]
    handler.setFormatter(logging.Formatter(fmt))
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level)


def raise_fd_limit() -> int:
    """Raise the soft RLIMIT_NOFILE to the hard limit; return the new soft limit.

    Each open request holds a few fds for microseconds, but hundreds of
    clients and thousands of cached memfds add up.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            logger.warning("cannot raise the fd limit from %d to %d: %s", soft, hard, exc)
    return soft


async def run(
    config: ServerConfig,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and clean up."""
    fd_limit = raise_fd_limit()
    listener = Listener.bind(config.socket_path, mode=config.socket_mode, group=config.socket_group)
    server = Server(config)
    try:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def serve(task_status: trio.TaskStatus[None]) -> None:
                    try:
                        await server.serve(listener.sock, task_status=task_status)
                    finally:
                        nursery.cancel_scope.cancel()

                nursery.start_soon(_watch_signals, signals, server)
                await nursery.start(serve)
                logger.info(
                    "shadowd %s serving on %s (mode %o, %d entries / %d bytes max, fd limit %d)",
                    __version__,
                    listener.path,
                    config.socket_mode,
                    config.cache.max_entries,
                    config.cache.max_bytes,
                    fd_limit,
                )
                task_status.started(server)
    finally:
        listener.close()
    logger.info("socket %s removed; exiting", listener.path)


async def _watch_signals(signals: AsyncIterator[int], server: Server) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not server.draining:
            logger.info("%s: finishing in-flight requests, then exiting", name)
            server.shutdown()
        else:
            logger.info("%s again: stopping now", name)
            server.stop_now()
