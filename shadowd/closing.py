# Closing the descriptors clients sent that the daemon will not use (refused
# requests, misses that did not wait, sources done with), without ever
# blocking the loop: fds of file systems the loop trusts (and memfds) are
# closed at once; the rest (a file of a hung FUSE mount, a socket that
# lingers) in a worker thread, on the sender's quota, each counted in its
# uid's fd budget until it is closed. So is the last descriptor of a large
# file with no link left (attack 19): its close frees the file, which takes
# the kernel milliseconds a GiB (and on a file system mounted with discard,
# waits for the disk: 25-250 ms for a 10 GiB file on the project's VM), and
# a client may close its own descriptors before the daemon reads them.
#
# Must never: close on the loop an fd whose close may wait on a client's file
# system, or free a large file; let the fds waiting for a worker go uncounted
# in their uid's budget; lose an fd it was given on any path.
from __future__ import annotations

import os
from collections.abc import Callable, Sequence

import attrs
import trio

from .access import UidShare
from .copier import Copier
from .errors import RequestError
from .fds import FdHolder, close_all
from .inflight import FdBudget
from .memfd import memfd_seals
from .source import MountTrust, stat_nosync


@attrs.define(eq=False)
class Closer:
    """Closes fds a client sent: on the loop when that is quick, else in a worker."""

    mounts: MountTrust
    copier: Copier
    #: The fd budget (inflight.py): fds waiting to be closed count in it.
    budget: FdBudget | None = None
    #: The server's nursery while it serves: closes in workers run in it.
    nursery: trio.Nursery | None = None

    def discard(self, fds: Sequence[int], share: UidShare) -> None:
        """Close fds a client sent that we will not use, never blocking the loop.

        Only fds of filesystems the loop may touch (and memfds) are closed
        here; the rest (a file of a hung FUSE mount, a socket that lingers)
        are closed in a worker thread, on the sender's quota.
        """
        later: list[int] = []
        now: list[int] = []
        for fd in fds:
            (now if self._closes_quickly(fd) else later).append(fd)
        close_all(now)
        for fd in later:
            if self.nursery is None:
                FdHolder(fd).close()  # not serving any more: nobody is left to wait
            else:
                self.close_later(FdHolder(fd), share)

    def discard_local(self, fd: int, share: UidShare, close: Callable[[int], None]) -> None:
        """Close *fd*, of a file system the loop trusts (as its stat said), with
        *close* (the poller's close_later), or in a worker when its close may free a
        large file (attack 19): one fstat, not discard's three system calls."""
        if self.nursery is not None and _frees_much(fd):
            self.close_later(FdHolder(fd), share)
        else:
            close(fd)

    def close_later(self, src: FdHolder, share: UidShare) -> None:
        """Close *src* in a worker, counted in its uid's fd budget until it is closed:
        a uid whose file system hangs cannot pile up fds in the daemon's table."""
        assert self.nursery is not None
        budget = self.budget
        if budget is None or src.closed:
            self.copier.close_later(self.nursery, src, share.quota)
            return
        budget.use(share, 1)
        self.copier.close_later(
            self.nursery, src, share.quota, on_closed=lambda: budget.use(share, -1)
        )

    def _closes_quickly(self, fd: int) -> bool:
        if memfd_seals(fd) is None:
            try:
                st = stat_nosync(fd)
            except RequestError:
                return False
            if st is None or not self.mounts.is_local(st.dev, st.mnt):
                return False
        # A memfd, or a file of a file system that never hangs: fstat is safe.
        return not _frees_much(fd)


#: Bytes (of size or of blocks) from which the last close of a file with no
#: link left is made in a worker: freeing 16 MiB takes the kernel well under
#: a millisecond, freeing 256 MiB 5-12 ms on the project's VM.
FREES_MUCH = 16 << 20


def _frees_much(fd: int) -> bool:
    """Whether closing *fd* may free a large file: it has no link left, and a size
    or blocks (fallocate may reserve blocks past the size) of FREES_MUCH or more.
    Whether another descriptor of it is still open is not known: as if none were."""
    try:
        st = os.fstat(fd)
    except OSError:
        return False  # not ours to judge: closed as before
    return st.st_nlink == 0 and max(st.st_size, st.st_blocks * 512) >= FREES_MUCH
