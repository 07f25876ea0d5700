# File-descriptor ownership: a holder that owns exactly one fd, and helpers that
# close many fds at once.
#
# Must never: close an fd it does not own, or close the same fd number twice.
# A holder sets its fd to -1 when closed, so a use after close fails with EBADF
# instead of touching whatever file later reuses the number.
from __future__ import annotations

import array
import errno
import fcntl
import os
import socket
import struct
from collections.abc import Iterable, Sequence
from types import TracebackType

import attrs


@attrs.define(eq=False)
class FdHolder:
    """Owns one file descriptor until :meth:`close` or :meth:`detach`."""

    fd: int

    @property
    def closed(self) -> bool:
        return self.fd < 0

    def close(self) -> None:
        """Close the fd. Idempotent: a second call does nothing.

        An error a file system reports from its flush at close (EIO, or
        ENOTCONN from an aborted FUSE mount) is ignored: the fd is released
        either way, and nothing we close was written to. EBADF is a bug.
        """
        fd, self.fd = self.fd, -1
        if fd >= 0:
            try:
                os.close(fd)
            except OSError as exc:
                if exc.errno == errno.EBADF:
                    raise

    def detach(self) -> int:
        """Give up ownership and return the fd; the caller must close it."""
        fd, self.fd = self.fd, -1
        return fd

    def __enter__(self) -> FdHolder:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


#: Long-lived descriptors (connections, cached memfds, the poller's epoll
#: set) are renumbered to at least this, so that the low numbers stay free
#: for the two each hit uses (the client's fd and the served one): the kernel
#: then hands a round's out side by side, and one close_range closes them.
LONG_LIVED_BASE = 256


def move_high(fd: int) -> int:
    """*fd* renumbered to LONG_LIVED_BASE or above, the old number closed.

    Returns *fd* unchanged when no such number is free (a low fd limit).
    """
    try:
        high = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LONG_LIVED_BASE)
    except OSError:
        return fd
    os.close(fd)
    return high


def close_all(fds: Iterable[int]) -> None:
    """Close every fd in *fds*, with as few syscalls as is safe.

    Runs of consecutive numbers go through one ``close_range``; that is safe
    because every number in such a run belongs to us, whatever other threads
    are doing. Errors are ignored: the numbers are released either way.
    """
    ordered = sorted({fd for fd in fds if fd >= 0})
    i = 0
    n = len(ordered)
    while i < n:
        j = i
        while j + 1 < n and ordered[j + 1] == ordered[j] + 1:
            j += 1
        try:
            if j == i:
                os.close(ordered[i])
            else:
                os.closerange(ordered[i], ordered[j] + 1)
        except OSError:
            pass
        i = j + 1


def close_holders(holders: Sequence[FdHolder]) -> None:
    """Close every still-owned holder, with as few syscalls as is safe."""
    close_all([h.detach() for h in holders if h.fd >= 0])


def fds_from_ancdata(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The fds of every SCM_RIGHTS message in *ancdata*, from recvmsg."""
    if len(ancdata) == 1:
        level, kind, data = ancdata[0]
        if len(data) == 4 and level == _SOL_SOCKET and kind == _SCM_RIGHTS:
            return [_INT.unpack(data)[0]]  # one fd: the common case
    fds: list[int] = []
    for level, kind, data in ancdata:
        if level == socket.SOL_SOCKET and kind == socket.SCM_RIGHTS:
            arr = array.array("i")
            arr.frombytes(data[: len(data) - len(data) % arr.itemsize])
            fds.extend(arr)
    return fds


def scm_rights(fds: Sequence[int]) -> list[tuple[int, int, bytes]]:
    """Ancillary data for sendmsg that passes *fds* (none: no ancillary data)."""
    if not fds:
        return []
    if len(fds) == 1:
        return [(_SOL_SOCKET, _SCM_RIGHTS, _INT.pack(fds[0]))]
    return [(_SOL_SOCKET, _SCM_RIGHTS, array.array("i", fds).tobytes())]


_SOL_SOCKET = socket.SOL_SOCKET
_SCM_RIGHTS = socket.SCM_RIGHTS
_INT = struct.Struct("i")
