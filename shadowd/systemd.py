# The daemon's side of the service manager, without libsystemd: descriptors
# passed at start (LISTEN_FDS: the listening socket, and the fd store handed
# back), and messages sent over NOTIFY_SOCKET (READY, STATUS, STOPPING, the
# fd store).
#
# Must never: take descriptors meant for another process (LISTEN_PID decides);
# leave the variables behind for a child to misread; keep a passed descriptor
# inheritable; block the event loop on the manager's socket (every send is
# non-blocking, and what cannot go now waits in a bounded queue); say
# READY=1 after STOPPING=1 (the manager would take a service that said it is
# stopping for one that started after all).
from __future__ import annotations

import enum
import fcntl
import logging
import os
import socket
import stat
from collections import deque
from collections.abc import MutableMapping, Sequence

import attrs
import trio

from .cache import Shareable
from .errors import ConfigError
from .fds import scm_rights

logger = logging.getLogger(__name__)

#: The first descriptor a service manager passes; the rest follow in order.
SD_LISTEN_FDS_START = 3
#: What systemd calls a passed descriptor that was given no name.
UNNAMED = "unknown"
LISTEN_VARIABLES = ("LISTEN_FDS", "LISTEN_PID", "LISTEN_FDNAMES", "LISTEN_PIDFDID")
NOTIFY_VARIABLE = "NOTIFY_SOCKET"
# More passed descriptors than this is a broken environment, not a big cache.
_MAX_LISTEN_FDS = 1 << 20


@attrs.frozen
class PassedFd:
    """A descriptor the service manager passed, with its name (LISTEN_FDNAMES)."""

    fd: int
    name: str

    @property
    def is_socket(self) -> bool:
        return stat.S_ISSOCK(os.fstat(self.fd).st_mode)


def listen_fds(
    environ: MutableMapping[str, str] | None = None,
    *,
    pid: int | None = None,
    start: int = SD_LISTEN_FDS_START,
) -> list[PassedFd]:
    """The descriptors passed to this process, made close-on-exec; the variables are unset.

    Nothing is taken when LISTEN_PID names another process (the variables
    were inherited from a parent). Raises ConfigError when the variables
    promise descriptors that are not open.
    """
    env = os.environ if environ is None else environ
    try:
        return _take(env, os.getpid() if pid is None else pid, start)
    finally:
        for name in LISTEN_VARIABLES:
            env.pop(name, None)


def _take(env: MutableMapping[str, str], pid: int, start: int) -> list[PassedFd]:
    listen_pid = env.get("LISTEN_PID")
    count_text = env.get("LISTEN_FDS")
    if listen_pid is None or count_text is None:
        return []
    if not listen_pid.isdigit() or not count_text.isdigit():
        raise ConfigError(
            f"socket activation: LISTEN_PID={listen_pid!r} LISTEN_FDS={count_text!r} "
            "are not whole numbers"
        )
    if int(listen_pid) != pid:
        logger.debug("LISTEN_FDS is meant for pid %s, not for us; ignored", listen_pid)
        return []
    count = int(count_text)
    if count > _MAX_LISTEN_FDS:
        raise ConfigError(f"socket activation: LISTEN_FDS={count} is not believable")
    names = _names(env.get("LISTEN_FDNAMES"), count)
    passed = []
    for i in range(count):
        fd = start + i
        try:
            flags = fcntl.fcntl(fd, fcntl.F_GETFD)
            fcntl.fcntl(fd, fcntl.F_SETFD, flags | fcntl.FD_CLOEXEC)
        except OSError:
            raise ConfigError(
                f"socket activation: LISTEN_FDS={count} but descriptor {fd} is not open"
            ) from None
        passed.append(PassedFd(fd=fd, name=names[i]))
    return passed


def _names(text: str | None, count: int) -> list[str]:
    if text is None:
        return [UNNAMED] * count
    names = text.split(":") if count else []
    if len(names) != count:
        logger.warning(
            "LISTEN_FDNAMES has %d names for %d descriptors; ignoring the names",
            len(names),
            count,
        )
        return [UNNAMED] * count
    return [name or UNNAMED for name in names]


def adopt_listening_socket(passed: PassedFd) -> socket.socket:
    """The passed descriptor as a listening SOCK_SEQPACKET Unix socket, or ConfigError."""
    try:
        sock = socket.socket(fileno=passed.fd)
    except OSError as exc:
        raise ConfigError(
            f"socket activation: descriptor {passed.fd} ({passed.name}) is not a socket: "
            f"{exc.strerror}"
        ) from None
    try:
        domain = sock.getsockopt(socket.SOL_SOCKET, socket.SO_DOMAIN)
        kind = sock.getsockopt(socket.SOL_SOCKET, socket.SO_TYPE)
        listening = sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN)
    except OSError as exc:
        sock.detach()
        raise ConfigError(
            f"socket activation: cannot inspect descriptor {passed.fd}: {exc.strerror}"
        ) from None
    problem = None
    if domain != socket.AF_UNIX:
        problem = "is not a Unix socket"
    elif kind != socket.SOCK_SEQPACKET:
        problem = f"is a {_type_name(kind)} socket; shadowd needs SOCK_SEQPACKET"
    elif not listening:
        problem = "is not listening"
    if problem is not None:
        sock.detach()  # the caller still owns the descriptor
        raise ConfigError(
            f"socket activation: descriptor {passed.fd} ({passed.name}) {problem} "
            "(use ListenSequentialPacket= in the .socket unit, or --seqpacket)"
        )
    return sock


def _type_name(kind: int) -> str:
    for name in ("SOCK_STREAM", "SOCK_DGRAM", "SOCK_SEQPACKET", "SOCK_RAW"):
        if getattr(socket, name) == kind:
            return name
    return f"type-{kind}"


def socket_name(sock: socket.socket) -> str:
    """The address a Unix socket is bound to, as people write it (abstract: '@name')."""
    try:
        raw: str | bytes = sock.getsockname()
    except OSError:
        return "?"
    name = raw.decode("utf-8", "replace") if isinstance(raw, bytes) else raw
    if not name:
        return "(unnamed)"
    if name.startswith("\0"):
        return "@" + name[1:]
    return name


def notify_address(value: str) -> str | bytes | None:
    """The socket address NOTIFY_SOCKET names: a path, or '@name' for the abstract namespace."""
    if value.startswith("/"):
        return value
    if value.startswith("@") and len(value) > 1:
        return b"\0" + value[1:].encode()
    return None


class _Outcome(enum.Enum):
    SENT = "sent"
    FULL = "full"  # the manager's queue is full: try again later
    FAILED = "failed"  # the manager is gone: the notifier is broken


@attrs.frozen
class _Message:
    data: bytes
    fds: tuple[int, ...]
    keep: Shareable | None  # holds the fds open while the message waits
    #: The fds are keep's own descriptor, whose number is read again when the
    #: message goes: the index renumbers a cached memfd into its descriptor
    #: range (fdrange.py) and closes the old number, which may be another
    #: file's by then.
    kept: bool = False

    def descriptors(self) -> tuple[int, ...]:
        return (self.keep.fd,) if self.kept and self.keep is not None else self.fds


@attrs.define(eq=False)
class Notifier:
    """Messages to the service manager over $NOTIFY_SOCKET; nothing here blocks.

    A message that cannot go at once (the manager's queue is full) waits in
    a bounded queue that :meth:`run` drains, in order: the fd store depends on
    a removal never overtaking the store it undoes.
    """

    sock: socket.socket
    address: str | bytes
    max_queue: int = 4096
    _queue: deque[_Message] = attrs.field(factory=deque)
    _wakeup: trio.Event = attrs.field(factory=trio.Event)
    broken: bool = False
    sent: int = 0
    dropped: int = 0
    said_stopping: bool = False

    @classmethod
    def from_environment(
        cls, environ: MutableMapping[str, str] | None = None, *, max_queue: int = 4096
    ) -> Notifier | None:
        """A notifier for $NOTIFY_SOCKET (then unset), or None when there is none."""
        env = os.environ if environ is None else environ
        value = env.pop(NOTIFY_VARIABLE, None)
        if not value:
            return None
        address = notify_address(value)
        if address is None:
            logger.warning("NOTIFY_SOCKET=%r is not a path or an @abstract name; ignored", value)
            return None
        sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        return cls(sock=sock, address=address, max_queue=max_queue)

    @property
    def queued(self) -> int:
        return len(self._queue)

    def send(self, message: str, fds: Sequence[int] = (), keep: Shareable | None = None) -> bool:
        """Send *message* (``KEY=value`` lines) with *fds*, now or soon.

        *keep* is what owns *fds*: retained while the message waits; when *fds*
        is keep's own descriptor, it goes at the number keep has by then.
        Returns False when the message was dropped (queue full, manager gone).
        """
        if self.broken:
            return False
        msg = _Message(data=message.encode(), fds=tuple(fds), keep=None)
        if not self._queue:
            outcome = self._send_now(msg)
            if outcome is not _Outcome.FULL:
                return outcome is _Outcome.SENT
        if len(self._queue) >= self.max_queue:
            self.dropped += 1
            if self.dropped == 1:
                logger.warning(
                    "the service manager is not reading %s; dropping messages to it",
                    self.describe(),
                )
            return False
        if keep is not None:
            keep.retain()
        kept = keep is not None and msg.fds == (keep.fd,)
        self._queue.append(attrs.evolve(msg, keep=keep, kept=kept))
        self._wakeup.set()
        return True

    def ready(self, status: str | None = None) -> bool:
        """Tell the manager the service is ready, unless it was told it is stopping.

        Returns False when READY=1 did not go (STOPPING=1 went first, the
        queue is full, the manager is gone).
        """
        if self.said_stopping:
            return False
        return self.send("READY=1" + (f"\nSTATUS={status}" if status else ""))

    def stopping(self, status: str | None = None) -> None:
        """Tell the manager the service is stopping (once, however often called)."""
        if not self.said_stopping:
            self.said_stopping = True
            self.send("STOPPING=1" + (f"\nSTATUS={status}" if status else ""))

    def describe(self) -> str:
        address = self.address
        if isinstance(address, bytes):
            return "@" + address[1:].decode("utf-8", "replace")
        return address

    def _send_now(self, msg: _Message) -> _Outcome:
        """Send one message without waiting; an error other than a full queue breaks us."""
        try:
            self.sock.sendmsg(
                [msg.data], scm_rights(msg.descriptors()), socket.MSG_NOSIGNAL, self.address
            )
        except (BlockingIOError, InterruptedError):
            return _Outcome.FULL
        except OSError as exc:
            self._break(exc)
            return _Outcome.FAILED
        self.sent += 1
        return _Outcome.SENT

    def _break(self, exc: OSError) -> None:
        logger.warning(
            "cannot notify the service manager at %s (%s); not telling it anything more",
            self.describe(),
            exc.strerror or exc,
        )
        self.broken = True
        self._release_queue()

    def flush(self) -> None:
        """Send what can be sent now, in order."""
        while self._queue and not self.broken:
            msg = self._queue[0]
            if self._send_now(msg) is not _Outcome.SENT:
                return
            self._queue.popleft()
            if msg.keep is not None:
                msg.keep.release()

    async def run(self) -> None:
        """Drain the queue whenever it has something, backing off while the manager is full."""
        while True:
            await self._wakeup.wait()
            self._wakeup = trio.Event()
            delay = 0.005
            while self._queue and not self.broken:
                self.flush()
                if self._queue:
                    await trio.sleep(delay)
                    delay = min(delay * 2, 1.0)

    def _release_queue(self) -> None:
        while self._queue:
            msg = self._queue.popleft()
            self.dropped += 1
            if msg.keep is not None:
                msg.keep.release()

    def close(self) -> None:
        """Drop what is still queued and close the socket."""
        self._release_queue()
        self.sock.close()


def activated(environ: MutableMapping[str, str] | None = None, *, pid: int | None = None) -> bool:
    """Whether the service manager passed descriptors to this process (nothing is taken)."""
    env = os.environ if environ is None else environ
    return env.get("LISTEN_PID") == str(os.getpid() if pid is None else pid) and bool(
        env.get("LISTEN_FDS", "0").strip("0")
    )


def fd_store_limit(flag: int | None, environ: MutableMapping[str, str] | None = None) -> int:
    """How many descriptors to keep in the fd store.

    systemd 254 and later say how many it accepts in $FDSTORE; older ones
    do not, and the operator says it with --fd-store-max (the unit's
    FileDescriptorStoreMax=). When both are given the smaller wins.
    """
    env = os.environ if environ is None else environ
    text = env.get("FDSTORE", "")
    offered = int(text) if text.isdigit() else None
    if flag is None:
        return offered or 0
    return flag if offered is None else min(flag, offered)
