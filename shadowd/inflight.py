# Descriptors the daemon sends or holds for a peer: those in replies its peer
# has not read yet (the kernel counts them against the daemon user's fd limit
# until they are read, and past it every send of every peer fails with
# ETOOMANYREFS), and those it holds in its own fd table for replies that wait.
# Each uid may have at most its share of them; a request that would take it
# past is refused with `busy`, so that no other uid ever meets the limit.
#
# What a peer has not read is known without a system call per reply: each
# connection remembers, in order, the size the kernel charges for each reply
# it sent (truesize, measured once per length on a private socket pair) and
# the fds in it; SIOCOUTQ says how many bytes are still unread, and so which
# replies. It is asked only when a uid nears its bound.
#
# Must never: count a descriptor as read before its peer read it; let a uid
# pass its bound, or the sum of all uids pass the daemon's; block.
from __future__ import annotations

import array
import collections
import fcntl
import socket
import termios
from typing import Protocol

import attrs

SIOCOUTQ = termios.TIOCOUTQ
_TRUESIZE: dict[int, int] = {}


def unread_bytes(sock: socket.socket) -> int:
    """Bytes this socket sent that its peer has not read yet (their truesize)."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), SIOCOUTQ, buf, True)
    return buf[0]


def truesize(length: int) -> int:
    """What the kernel charges for one datagram of *length* bytes until it is read.

    Measured on a socket pair the first time a length is seen (the kernel
    rounds to its allocation sizes; the fds a datagram carries do not count).
    """
    size = _TRUESIZE.get(length)
    if size is None:
        a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            a.send(b"\0" * length)
            size = max(1, unread_bytes(a))
        finally:
            a.close()
            b.close()
        _TRUESIZE[length] = size
    return size


@attrs.define
class Outbox:
    """What one connection sent that its peer may not have read yet, in order."""

    #: (truesize, fds) of each reply not known to be read.
    _sent: collections.deque[tuple[int, int]] = attrs.field(factory=collections.deque)
    _bytes: int = 0
    #: Descriptors in replies not known to be read.
    fds: int = 0

    def sent(self, length: int, nfds: int) -> None:
        size = truesize(length)
        self._sent.append((size, nfds))
        self._bytes += size
        self.fds += nfds

    def refresh(self, sock: socket.socket) -> int:
        """Ask the kernel what is still unread; forget the rest. Returns the fds read."""
        try:
            unread = unread_bytes(sock)
        except OSError:
            return 0
        sent = self._sent
        freed = 0
        # The peer reads in order: the oldest replies are the ones gone.
        while sent and self._bytes - sent[0][0] >= unread:
            size, nfds = sent.popleft()
            self._bytes -= size
            freed += nfds
        if not sent:
            self._bytes = 0
        self.fds -= freed
        return freed


class Holder(Protocol):
    """What the budget counts per uid (access.UidShare)."""

    fds: int


@attrs.define
class FdBudget:
    """Per uid and in all, the descriptors peers may have the daemon send or hold.

    ``total`` is what all uids together may use; a uid below its fair share
    of it may still go on when it is full (so the uid that filled it cannot
    starve the others), but never past ``hard``, which keeps a margin below
    the daemon's fd limit whatever the number of uids.
    """

    per_uid: int
    total: int
    hard: int = 0
    #: Descriptors in unread replies and held for waiting replies, of every uid.
    used: int = 0
    #: Uids with any in use (for a fair share when the total is tight).
    active: int = 0

    def __attrs_post_init__(self) -> None:
        if self.hard < self.total:
            self.hard = self.total + self.total // 2

    def allows(self, used_by_uid: int, want: int) -> bool:
        """Whether a uid that has *used_by_uid* may have *want* more."""
        if used_by_uid + want > self.per_uid:
            return False
        if self.used + want <= self.total:
            return True
        # The daemon's whole budget is tight: only a uid below its fair share
        # may have more, and never past the hard limit.
        return self.used + want <= self.hard and used_by_uid + want <= self.total // max(
            1, self.active
        )

    def use(self, holder: Holder, n: int) -> None:
        """*holder*'s uid has *n* more in use (n may be negative)."""
        before = holder.fds
        holder.fds = after = before + n
        self.used += n
        if before <= 0 < after:
            self.active += 1
        elif after <= 0 < before:
            self.active -= 1
