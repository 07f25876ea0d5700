# Gathering the daemon's statistics from its parts into one Stats value
# (stats.py), for the stats request, `shadowd stats` and the service manager.
#
# The open-fd count is made in a worker thread (FdCount): with the index's
# descriptor range, thousands of fds are always open, and listing
# /proc/self/fd took milliseconds of the loop. A stats answer carries the
# last finished count and its age; a stats request starts the next count
# when the last one began at least `stats_refresh` seconds ago, and waits
# for it (in its connection's task, at most FRESH_PATIENCE seconds), so
# that a daemon asked once in a while does not answer with an old count.
#
# Must never: count fds on the loop, or run two counts at once; make the
# loop pay for a costly part (resident memory, the ranking of entries) more
# than once per `stats_refresh` seconds (for the top files of unprivileged
# viewers: one pass over the cache, then each viewer's own entries once),
# or let stats requests start fd counts more often, whoever asks and however
# often; change anything it reads; show a user a path label another user
# sent.
from __future__ import annotations

import math
import os
import resource
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs
import trio

from . import __version__
from .access import Gate
from .cache import Cache, CacheLimits, Entry, top_of
from .copier import Copier
from .index import Index
from .inflight import FdBudget
from .opens import HostOpens
from .pins import Pins
from .private import PrivateFiles
from .refusals import Refusals
from .stats import Latencies, Stats, TopEntry

if TYPE_CHECKING:
    from .fdstore import FdStore

#: How long a stats request waits for the fd count it started; a count that
#: takes longer is answered with the last one (and the next request's).
FRESH_PATIENCE = 0.5
#: Viewers whose top files are kept per refresh.
_MAX_VIEWERS = 256


def count_open_fds() -> int:
    """The descriptors this process has open; -1 when /proc cannot tell.

    Blocking, and not for the daemon's loop (see :class:`FdCount`): where the
    kernel gives no count, it lists /proc/self/fd (milliseconds with
    thousands of fds).
    """
    try:
        # Linux 6.2 and later give the count as the size of the directory
        # (from the fd table's bitmap: about 3 us with 5,000 fds, against
        # about 2 ms to list them); earlier ones give 0, and so does a
        # process with no fd open, whose listing then says 0 as well.
        size = os.stat("/proc/self/fd").st_size
        if size > 0:
            return size
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return -1


@attrs.define(eq=False)
class FdCount:
    """The daemon's open-fd count, made in a worker thread; the loop only reads it.

    ``value`` is the last finished count: -1 ("unknown", as in the stats)
    until the first count finishes, and when /proc cannot be read.
    ``started`` is when (``time.monotonic()``) that count began: it
    includes every descriptor opened, and none closed, before then. A
    serving daemon makes its first count before it accepts a connection
    (server.py), so no client's stats answer carries -1 for want of one.
    At most one count runs at a time; a later one starts only through
    :meth:`start` or :meth:`since`.
    """

    #: Counts in a worker thread; one seam for tests that block it.
    count: Callable[[], int] = count_open_fds
    value: int = -1
    started: float = -math.inf
    #: Set when the count in flight finishes; None while none is.
    _done: trio.Event | None = None

    @property
    def running(self) -> bool:
        """Whether a count is in flight."""
        return self._done is not None

    def start(self, nursery: trio.Nursery) -> None:
        """Start a count in a worker thread (a task of *nursery*), unless one runs."""
        if self._done is None:
            self._done = trio.Event()
            nursery.start_soon(self._run)

    async def finished(self) -> None:
        """Until the count in flight, if any, has finished."""
        if self._done is not None:
            await self._done.wait()

    async def since(self, when: float) -> int:
        """The value of a count that began at *when* (monotonic) or later.

        Waits for the count in flight, if any; unless the last finished count
        began late enough, makes one more (in a worker thread) and waits for it.
        """
        while self.started < when:
            if self._done is not None:
                await self._done.wait()
            else:
                self._done = trio.Event()
                await self._run()
        return self.value

    async def _run(self) -> None:
        started = time.monotonic()
        try:
            value = await trio.to_thread.run_sync(self.count)
            self.value, self.started = value, started
        finally:
            done, self._done = self._done, None
            assert done is not None
            done.set()


def resident_bytes() -> int:
    """The daemon's resident memory (memfd pages it has not mapped are not in it)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return -1


@attrs.define(eq=False)
class _CostlyStats:
    """The parts of stats that take a scan (of entries) to compute on the loop."""

    at: float
    rss_bytes: int
    top_by_hits: tuple[TopEntry, ...]
    top_by_bytes: tuple[TopEntry, ...]
    #: The top files of each unprivileged viewer asked for so far.
    by_uid: dict[int, tuple[tuple[TopEntry, ...], tuple[TopEntry, ...]]] = attrs.field(factory=dict)
    #: The labelled entries by the uid that labelled them (Cache.labelled_by_uid),
    #: made at the first unprivileged viewer: one pass over the cache a refresh,
    #: however many uids ask (attack 44).
    labelled: dict[int, list[Entry]] | None = None


@attrs.define(eq=False)
class StatsCollector:
    """Builds :class:`Stats` from the server's parts; see the module comment."""

    cache: Cache
    limits: CacheLimits
    copier: Copier
    gate: Gate
    refusals: Refusals
    opens: HostOpens
    private: PrivateFiles
    pins: Pins
    budget: FdBudget
    latency: Latencies
    #: The index while published, and the hits reported through it.
    index: Callable[[], Index | None]
    index_hits: Callable[[], int]
    #: What the configuration allows (`limits` in the stats).
    configured: dict[str, int]
    top_files: int = 10
    refresh: float = 1.0
    #: The warm-restart store, when the daemon runs with one.
    fd_store: FdStore | None = None
    clients_total: int = 0
    #: The daemon's own uid: it sees every label, as root does.
    owner_uid: int = attrs.field(factory=os.geteuid)
    started: float = attrs.field(factory=time.monotonic)
    #: The open-fd count, made in worker threads.
    fds: FdCount = attrs.field(factory=FdCount)
    #: The server's nursery while it serves: fd counts run in it. Without
    #: one (a server not serving) the stats keep the last count.
    nursery: trio.Nursery | None = None
    _costly_stats: _CostlyStats | None = None

    async def fresh(self, patience: float = FRESH_PATIENCE) -> None:
        """Before a stats answer, in the asking connection's task: when the last fd
        count began ``refresh`` seconds ago or more and none runs, start one and wait
        for it, at most *patience* seconds (the loop goes on meanwhile)."""
        fds = self.fds
        if self.nursery is None or fds.running or time.monotonic() - fds.started < self.refresh:
            return
        fds.start(self.nursery)
        with trio.move_on_after(patience):
            await fds.finished()

    def stats(self, viewer: int | None = None) -> Stats:
        """The stats as uid *viewer* may see them (None: everything, for the daemon itself).

        The top files name host files by the paths clients sent: a viewer
        other than root and the daemon's own uid sees only those its own uid
        named. ``open_fds`` is the last finished count (-1 before the first
        one finishes, see :class:`FdCount`), and ``open_fds_age_seconds``
        how long ago it began (-1 with no count); when that is at least
        ``refresh``, this call starts the next count in a worker thread and
        still answers with the last one.
        """
        cache = self.cache
        limits = self.limits
        store = self.fd_store
        now = time.monotonic()
        fds = self.fds
        if self.nursery is not None and now - fds.started >= self.refresh:
            fds.start(self.nursery)
        costly = self._costly(now)
        index = self.index()
        top_by_hits, top_by_bytes = costly.top_by_hits, costly.top_by_bytes
        if viewer is not None and viewer not in (0, self.owner_uid):
            top_by_hits, top_by_bytes = self._top_for(viewer, costly)
        private = self.private.counters
        return Stats(
            server=f"shadowd/{__version__}",
            uptime_seconds=round(now - self.started, 3),
            hits=cache.hits,
            misses=cache.misses,
            entries=len(cache),
            bytes=cache.bytes,
            memory_bytes=cache.memory_bytes,
            rss_bytes=costly.rss_bytes,
            evictions=cache.evictions,
            invalidations=cache.invalidations,
            uncached=self.opens.uncached + self.private.uncached,
            refused=self.refusals.refused,
            copies=self.copier.copies,
            bytes_copied=self.copier.bytes_copied,
            clients=self.gate.clients,
            clients_total=self.clients_total,
            max_entries=limits.max_entries,
            max_bytes=limits.max_bytes,
            max_file_size=limits.max_file_size,
            private_hits=cache.private.hits,
            private_misses=cache.private.misses,
            private_entries=cache.private.entries,
            private_bytes=cache.private.bytes,
            open_fds=fds.value,
            open_fds_age_seconds=now - fds.started if fds.value >= 0 else -1.0,
            fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            top_by_hits=top_by_hits,
            top_by_bytes=top_by_bytes,
            refused_by_code=dict(self.refusals.refused_by_code),
            fdstore_entries=store.entries if store is not None else 0,
            fdstore_max=store.max_entries if store is not None else 0,
            restored_entries=store.restored if store is not None else 0,
            private_publishes=private.publishes,
            private_sealed_in_place=private.sealed_in_place,
            private_copied=private.copied,
            private_races_lost=private.races_lost,
            peers_refused=self.gate.refused_peers,
            fds_refused=self.refusals.fds_refused,
            limits=self.configured,
            limit_hits=dict(self.gate.hits),
            latency=self.latency.copy(),
            pinned_bytes=self.pins.pinned,
            tampered=self.opens.guard.tampered + private.tampered,
            uncached_writers=self.opens.filler.uncached_writers,
            watched_files=self.opens.guard.watches.watched,
            fds_in_flight=self.budget.used,
            index_hits=self.index_hits(),
            index_entries=index.entries if index is not None else 0,
            index_slots=index.slots if index is not None else 0,
            index_fd_range=index.fd_range.size if index is not None and index.fd_range else 0,
            index_fd_range_used=index.fd_range.used if index is not None and index.fd_range else 0,
        )

    def _top_for(
        self, uid: int, costly: _CostlyStats
    ) -> tuple[tuple[TopEntry, ...], tuple[TopEntry, ...]]:
        """The top files *uid* named, reused like the rest of the costly parts."""
        found = costly.by_uid.get(uid)
        if found is None:
            if len(costly.by_uid) >= _MAX_VIEWERS:
                costly.by_uid.clear()  # a flood of uids must not grow it without bound
            n = self.top_files
            if costly.labelled is None:
                costly.labelled = self.cache.labelled_by_uid()
            own = costly.labelled.get(uid, ())
            found = costly.by_uid[uid] = (
                tuple(top_of(own, n, by="hits")),
                tuple(top_of(own, n, by="bytes")),
            )
        return found

    def _costly(self, now: float) -> _CostlyStats:
        """The costly parts of stats on the loop: computed at most once per ``refresh`` seconds."""
        costly = self._costly_stats
        if costly is None or now - costly.at >= self.refresh:
            n = self.top_files
            costly = self._costly_stats = _CostlyStats(
                at=now,
                rss_bytes=resident_bytes(),
                top_by_hits=tuple(self.cache.top(n, by="hits")),
                top_by_bytes=tuple(self.cache.top(n, by="bytes")),
            )
        return costly
