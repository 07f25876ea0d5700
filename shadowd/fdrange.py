# The descriptor range of indexed memfds: a block of descriptor numbers the
# daemon keeps occupied at every instant, each by a cached memfd or by a
# stand-in (dups of one sealed, empty memfd). No other descriptor can then
# ever take one of those numbers: not a client's fd received with a request
# (a FIFO, a device), not a connection. An index client that finds a slot's
# number inside the range (published in the index header) opens
# /proc/PID/fd/N read-only at once: whatever N holds by then is a memfd, and
# opening a memfd runs no driver and has no side effects; the client still
# checks it is the slot's memfd. Outside the range it must take the O_PATH
# step first (client/shadowd_client/index.py, docs/security.md).
#
# Must never: leave a number of the range free, even for an instant (a memfd
# goes in with dup3 over the stand-in, the stand-in goes back with dup3 over
# the memfd: each atomic); hand out a number twice; close a number outside
# the range. Used on the trio thread only (the cache's owner).
from __future__ import annotations

import errno
import fcntl
import logging
import os
import resource

import attrs

from .fds import LONG_LIVED_BASE, FdHolder, close_all
from .memfd import REQUIRED_SEALS

log = logging.getLogger(__name__)

#: At most this share of the fd limit goes to the range: the rest is for fds
#: in flight (half, server.py), connections and memfds outside the range.
LIMIT_SHARE = 4


@attrs.define(eq=False)
class FdRange:
    """Descriptor numbers base .. base+size-1, every one always a memfd.

    Make one with :meth:`reserve`. :meth:`take` puts a memfd at a free
    number, :meth:`give_back` puts the stand-in back there.
    """

    base: int
    size: int
    _standin: FdHolder
    _free: list[int]
    _closed: bool = False

    @classmethod
    def reserve(cls, wanted: int) -> FdRange | None:
        """A range of *wanted* numbers (fewer under a low fd limit), or None.

        None when not even one number can be had, or when the numbers above
        the highest open fd could not all be taken (another thread opened
        one meanwhile: the range would have a hole).
        """
        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        size = min(wanted, soft // LIMIT_SHARE)
        try:
            highest = max(int(name) for name in os.listdir("/proc/self/fd"))
        except (OSError, ValueError):
            return None
        base = max(LONG_LIVED_BASE, highest + 1)
        size = min(size, soft - base - soft // LIMIT_SHARE)
        if size < 1:
            return None
        try:
            standin = _standin()
        except OSError as exc:  # ENFILE, ENOMEM, a memfd_noexec policy
            log.warning("no descriptor range for the index (%s): index hits take O_PATH", exc)
            return None
        taken: list[int] = []
        try:
            for n in range(base, base + size):
                got = fcntl.fcntl(standin.fd, fcntl.F_DUPFD_CLOEXEC, n)
                taken.append(got)
                if got != n:
                    raise OSError(errno.EBUSY, f"descriptor {n} was taken meanwhile")
        except OSError as exc:
            log.warning("no descriptor range for the index (%s): index hits take O_PATH", exc)
            for fd in taken:
                os.close(fd)
            standin.close()
            return None
        # Handed out from the bottom up, so a small cache stays low.
        return cls(base, size, standin, list(range(base + size - 1, base - 1, -1)))

    def __contains__(self, fd: object) -> bool:
        return isinstance(fd, int) and self.base <= fd < self.base + self.size

    @property
    def used(self) -> int:
        return self.size - len(self._free)

    def take(self, fd: int) -> int:
        """A free number of the range now holding *fd*'s file (close *fd* yourself),
        or -1 when the range is full or closed."""
        if self._closed or not self._free:
            return -1
        n = self._free.pop()
        try:
            os.dup2(fd, n, inheritable=False)  # dup3: the stand-in goes, atomically
        except OSError:
            self._free.append(n)
            return -1
        return n

    def give_back(self, n: int) -> None:
        """Put the stand-in back at *n* (a number :meth:`take` gave), which drops
        the memfd that was there. After :meth:`close`, *n* is simply closed."""
        if n not in self:
            raise ValueError(f"descriptor {n} is not in the range")
        if self._closed:
            os.close(n)
            return
        try:
            os.dup2(self._standin.fd, n, inheritable=False)
        except OSError as exc:
            # (The soft fd limit lowered below n from outside.) n keeps its
            # memfd, never freed: its memory stays, the range stays whole.
            log.error("descriptor %d of the index's range kept its memfd: %s", n, exc)
            return
        self._free.append(n)

    def close(self) -> None:
        """Close the stand-ins and the stand-in (memfds still taken stay, their
        holders give them back, which closes them)."""
        if self._closed:
            return
        self._closed = True
        close_all(self._free)
        self._free.clear()
        self._standin.close()


def _standin() -> FdHolder:
    """The sealed, empty memfd whose dups fill the free numbers."""
    fd = os.memfd_create("shadowd-free", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    except OSError:
        os.close(fd)
        raise
    return FdHolder(fd)
