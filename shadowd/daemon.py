# The daemon process around the server: logging, the fd limit, the listening
# socket (created, or passed by the service manager), the service manager's
# notifications and fd store, signals, and a clean exit.
#
# The order the service manager sees: READY=1 once the warm-up is over and
# the server accepts, STATUS= every STATUS_INTERVAL, STOPPING=1 at the first
# SIGTERM or SIGINT (or at exit). A signal during the warm-up cuts it short
# (server.py), and the daemon exits without ever saying READY=1.
#
# Must never: exit without removing the socket it created; remove one it did
# not create; turn SIGTERM into anything but a drain and exit status 0; tell
# the service manager READY=1 before it serves, or once it said STOPPING=1.
from __future__ import annotations

import logging
import os
import resource
import signal
import sys
from collections.abc import AsyncIterator, Mapping

import trio

from . import __version__, hotcalls, systemd
from .cache import DropReason, Entry
from .errors import ConfigError
from .fds import close_all
from .fdstore import FdStore
from .listener import Listener
from .paths import resolve_socket_path
from .report import human_bytes
from .server import Server, ServerConfig
from .systemd import PassedFd
from .warmup import test_knob_seconds

logger = logging.getLogger(__name__)


#: syslog priorities of logging's levels: journald reads a "<N>" line prefix.
_SYSLOG_PRIORITY = {
    logging.DEBUG: 7,
    logging.INFO: 6,
    logging.WARNING: 4,
    logging.ERROR: 3,
    logging.CRITICAL: 2,
}


class JournalFormatter(logging.Formatter):
    """No timestamp (the journal adds its own); the level as a syslog prefix."""

    def __init__(self) -> None:
        super().__init__("%(levelname)s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        priority = _SYSLOG_PRIORITY.get(record.levelno, 6 if record.levelno < 30 else 3)
        return f"<{priority}>{super().format(record)}"


def stream_is_journal(stream: object, environ: Mapping[str, str] | None = None) -> bool:
    """True when *stream* is the journal's stream: JOURNAL_STREAM names its device and inode.

    The variable alone is not enough: a child inherits it even when its
    stderr goes somewhere else.
    """
    value = (os.environ if environ is None else environ).get("JOURNAL_STREAM", "")
    dev, _, ino = value.partition(":")
    if not (dev.isdigit() and ino.isdigit()):
        return False
    try:
        st = os.fstat(stream.fileno())  # type: ignore[attr-defined]
    except (AttributeError, OSError, ValueError):
        return False
    return (st.st_dev, st.st_ino) == (int(dev), int(ino))


def configure_logging(level: str | int = "info", *, stream: object = None) -> None:
    """Plain lines on stderr; no timestamps when stderr is the journal (it adds its own)."""
    if isinstance(level, str):
        level = level.upper()
    stream = stream or sys.stderr
    handler = logging.StreamHandler(stream)  # type: ignore[arg-type]
    if stream_is_journal(stream):
        handler.setFormatter(JournalFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
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


class CacheLog:
    """Logs what enters and leaves the cache, at debug level."""

    def inserted(self, entry: Entry) -> None:
        if logger.isEnabledFor(logging.DEBUG):
            logger.debug("cached %s (%d bytes)", _entry_name(entry), entry.size)

    def dropped(self, entry: Entry, reason: DropReason) -> None:
        if reason is not DropReason.CLEARED and logger.isEnabledFor(logging.DEBUG):
            logger.debug("%s %s (%d bytes)", reason.value, _entry_name(entry), entry.size)


def _entry_name(entry: Entry) -> str:
    return repr(entry.label) if entry.label is not None else f"{entry.key}"


def status_line(server: Server) -> str:
    """One line for the service manager's STATUS=.

    From the counters alone: the full stats rank the top files, which is too
    much work for the loop every few seconds.
    """
    cache = server.cache
    hits, misses = cache.hits, cache.misses
    rate = f"{100.0 * hits / (hits + misses):.1f}%" if hits + misses else "-"
    return (
        f"{len(cache)} files, {human_bytes(cache.bytes)} cached; "
        f"{hits} hits, {misses} misses (hit rate {rate}); {server.clients} clients"
    )


def budgets(config: ServerConfig) -> str:
    """The cache's bounds for the start line, as people write them."""
    limits = config.cache
    return (
        f"at most {limits.max_entries} files and {human_bytes(limits.max_bytes)}, "
        f"files up to {human_bytes(limits.max_file_size)}"
    )


#: Seconds between STATUS= updates to the service manager.
STATUS_INTERVAL = 10.0

#: The signals that stop the daemon. Blocked from the start (cli.py) until
#: the daemon's own receiver is there, and again once it is gone: one that
#: comes while the daemon sets up (the fd store's restore can take a while)
#: or while it cleans up would otherwise kill it before it removes its
#: socket, with no drain and a non-zero exit.
STOP_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT})

#: For tests only: seconds to pause once the socket exists, before the stop
#: signals are handled (where the fd store is restored), so that a test can
#: send one in that window. The pause ends early at a stop signal, which is
#: then held again for the receiver, as one that came during a long restore.
START_DELAY_VARIABLE = "SHADOWD_TEST_START_DELAY"


def _test_start_delay() -> None:
    delay = test_knob_seconds(START_DELAY_VARIABLE, "pausing before the stop signals are handled")
    if delay > 0:
        got = signal.sigtimedwait(STOP_SIGNALS, delay)
        if got is not None:
            os.kill(os.getpid(), got.si_signo)  # pending again: blocked until the receiver


async def run(
    config: ServerConfig,
    *,
    task_status: trio.TaskStatus[Server] = trio.TASK_STATUS_IGNORED,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain and clean up.

    SIGTERM and SIGINT are held (blocked) until the daemon handles them
    itself, and from when it no longer does; the caller's signal mask is
    restored on return.
    """
    mask = signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    try:
        await _run(config, task_status)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, mask)


async def _run(config: ServerConfig, task_status: trio.TaskStatus[Server]) -> None:
    fd_limit = raise_fd_limit()
    server = Server(config)
    server.cache.add_observer(CacheLog())
    passed = systemd.listen_fds()
    try:
        notifier = systemd.Notifier.from_environment()
    except BaseException:
        close_all(p.fd for p in passed)
        raise
    try:
        listener, stored = _listener(config, passed)
    except BaseException:
        if notifier is not None:
            notifier.close()
        raise
    try:
        # Without a manager to keep them, stored descriptors passed at start
        # are still taken back; nothing new is stored.
        _test_start_delay()
        store = FdStore(notifier, max_entries=config.fd_store_max if notifier else 0)
        store.restore(server.cache, stored)
        server.fd_store = store
        with trio.open_signal_receiver(*STOP_SIGNALS) as signals:
            # Ours from here: one that came while we set up is delivered now.
            signal.pthread_sigmask(signal.SIG_UNBLOCK, STOP_SIGNALS)
            try:
                async with trio.open_nursery() as nursery:

                    async def serve(task_status: trio.TaskStatus[None]) -> None:
                        try:
                            await server.serve(listener.sock, task_status=task_status)
                        finally:
                            nursery.cancel_scope.cancel()

                    nursery.start_soon(_watch_signals, signals, server, notifier, listener)
                    # Returns once the server accepts, or once it stopped in its
                    # warm-up. No checkpoint between here and READY=1: a signal
                    # is handled (STOPPING=1, then shutdown) before the draining
                    # check below or after READY=1, never between the two.
                    await nursery.start(serve)
                    if notifier is not None:
                        nursery.start_soon(notifier.run)
                    if server.draining:
                        # STOPPING=1 went already: READY=1 now would tell the
                        # manager that a service it is stopping started after all.
                        logger.info("stopped during the warm-up; never served on %s", listener.path)
                    else:
                        logger.info(
                            "shadowd %s serving on %s%s (%s; fd limit %d%s; "
                            "hit path system calls in %s)",
                            __version__,
                            listener.path,
                            "" if listener.created else ", passed by the service manager",
                            budgets(config),
                            fd_limit,
                            f", fd store {config.fd_store_max}" if notifier is not None else "",
                            hotcalls.DESCRIPTION,
                        )
                        if notifier is not None:
                            notifier.ready(status_line(server))
                            nursery.start_soon(_report_status, server, notifier)
                    task_status.started(server)
            finally:
                # Past the receiver, one would kill us before the socket is removed.
                signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)
    finally:
        listener.close()
        if notifier is not None:
            notifier.stopping()
            notifier.flush()
            notifier.close()
    if listener.created:
        logger.info("socket %s removed; exiting", listener.path)
    else:
        logger.info("exiting; the service manager keeps socket %s", listener.path)


def _listener(config: ServerConfig, passed: list[PassedFd]) -> tuple[Listener, list[PassedFd]]:
    """The listening socket (passed or created) and the other passed descriptors.

    Every descriptor in *passed* ends up closed, in the listener, or in the
    list returned.
    """
    try:
        sockets = [p for p in passed if p.is_socket]
        others = [p for p in passed if p not in sockets]
        if len(sockets) > 1:
            raise ConfigError(
                f"socket activation passed {len(sockets)} sockets "
                f"({', '.join(p.name for p in sockets)}); shadowd listens on one"
            )
        if sockets:
            sock = systemd.adopt_listening_socket(sockets[0])
            listener = Listener.adopt(sock, systemd.socket_name(sock))
            if config.socket_path and config.socket_path != listener.path:
                logger.warning(
                    "serving on %s, the socket passed by the service manager, not on %s",
                    listener.path,
                    config.socket_path,
                )
            return listener, others
        # Only stored descriptors were passed (a service without a socket
        # unit): the socket is ours to create, where it goes by default.
        path = config.socket_path or resolve_socket_path(None)
        listener = Listener.bind(path, mode=config.socket_mode, group=config.socket_group)
        _warn_if_open_to_others(config, path)
        return listener, others
    except BaseException:
        close_all(p.fd for p in passed)
        raise


def _warn_if_open_to_others(config: ServerConfig, path: str) -> None:
    """One warning at start when --socket-mode lets any user of the host connect."""
    mode = config.socket_mode
    if not mode & 0o002:
        return
    if config.access.open_to_all:
        served = "every uid is served: name who may be with --allow-uid or --allow-gid"
    else:
        served = "only the uids of --allow-uid and --allow-gid (and the daemon's own) are served"
    logger.warning(
        "--socket-mode %04o lets every user on this host connect to %s (others may write "
        "to it); %s",
        mode,
        path,
        served,
    )


async def _report_status(server: Server, notifier: systemd.Notifier) -> None:
    while not server.draining:
        await trio.sleep(STATUS_INTERVAL)
        if not server.draining:
            notifier.send(f"STATUS={status_line(server)}")


async def _watch_signals(
    signals: AsyncIterator[int],
    server: Server,
    notifier: systemd.Notifier | None,
    listener: Listener,
) -> None:
    async for signum in signals:
        name = signal.Signals(signum).name
        if not server.draining:
            logger.info("%s: finishing in-flight requests, then exiting", name)
            if notifier is not None:
                notifier.stopping("stopping: finishing in-flight requests")
            # New clients fail at once (and copy locally) instead of waiting
            # in a backlog nobody accepts from while the drain lasts.
            listener.withdraw()
            server.shutdown()
        else:
            logger.info("%s again: stopping now", name)
            server.stop_now()
