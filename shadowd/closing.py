# Closing the descriptors clients sent that the daemon will not use (refused
# requests, misses that did not wait, sources done with), without ever
# blocking the loop: fds of file systems the loop trusts (and memfds) are
# closed at once; the rest (a file of a hung FUSE mount, a socket that
# lingers) in a worker thread, on the sender's quota, each counted in its
# uid's fd budget until it is closed.
#
# Must never: close on the loop an fd whose close may wait on a client's file
# system; let the fds waiting for a worker go uncounted in their uid's
# budget; lose an fd it was given on any path.
from __future__ import annotations

from collections.abc import Sequence

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
        if memfd_seals(fd) is not None:
            return True
        try:
            st = stat_nosync(fd)
        except RequestError:
            return False
        return st is not None and self.mounts.is_local(st.dev, st.mnt)
