# Filling the cache from host files: a copy started for a miss (a flight,
# copier.py, on a slot of its uid's quota and within its uid's bound of
# pinned bytes), the per-uid queue of misses that did not wait and found
# every copy slot of their uid taken, and what becomes of a finished copy:
# cached, or served uncached when it cannot be trusted to stay true (its
# inode changed during the copy, a writer had it open, no watch on it).
#
# The queue has two lanes. A lone open's miss is a file a program is opening
# now (its client copies it meanwhile, and the program's next process will
# look for it in the index); a batch's are files a client copied itself and
# only tells of (a cold supervisor's, at the end of a run), or a preload's.
# A freed slot goes to the first lane, then to opens that wait for a slot,
# and only then to the second (copier.Quota.acquire_last). Every told file is
# queued, even with a slot free, and the second lane's files are copied
# several to one worker job on one slot (TOLD_GROUP_FILES, TOLD_GROUP_BYTES):
# one hand-off to a worker and back for them all. Told work holds at most all
# but one of the uid's slots (told_slots), so the program's own misses find one
# it does not hold; a group keeps its files' descriptors counted in the fd
# budget, as they were while queued, until its job ends.
#
# Must never: start a copy, or a group of told files' copies, without a slot
# of its uid's quota (the slot comes first, so a flight that exists is always
# copying, or in a group whose job is, and no uid waits behind another's
# quota); queue more than FILL_QUEUE fills per uid, or one version
# twice, or hold their fds uncounted in the uid's fd budget (queued or in a
# group); let a told file take a slot that an asked one or a waiting open
# wants, or told work hold more slots than told_slots; put two versions of one
# inode in one group; keep a copy that grew past the bytes its uid reserved
# unless its bound holds them (Pins.grow); cache a copy of an inode that had
# an event since its flight began; start a queued fill once the daemon is
# stopping (stop(): the queue is let go of, attack 35).
from __future__ import annotations

import logging
import os
from collections.abc import Callable

import attrs
import trio

from .access import UidShare
from .cache import Admission, Cache, HostKey
from .closing import Closer
from .copier import Copied, Copier, Flight, GroupItem, Quota
from .errors import RequestError
from .fds import FdHolder
from .guard import EntryGuard
from .inflight import FdBudget
from .leases import Writers
from .pins import Pins
from .protocol import Version
from .source import SourceStat
from .stats import Latencies

# Logged as before these lines moved here from opens.py: the name operators know.
logger = logging.getLogger("shadowd.opens")

#: Misses that did not wait, per uid, queued for a copy slot of its quota. Each
#: holds a descriptor counted in the uid's fd budget (--max-fds-per-uid, 4096 by
#: default), which bounds them too. 512: a cold supervisor tells of a program's
#: files in batches of 64 (the clients' SHADOWD_HINTS and TELL_FILES) faster than
#: two copy slots drain them; with 64, half of pip's 478 files told in one cold
#: run were dropped (client/c/README.md, "A cold daemon").
FILL_QUEUE = 512

#: Told files copied by one worker job, one after another on one slot of their
#: uid's quota (Filler._fly_told): at most this many, and this many bytes of them
#: (or one file, when it alone is larger). A request that joins the flight of one
#: of them waits for the copies before it in the group; the bytes bound keeps that
#: below what one told file of a few MiB costs it anyway. The sizes are those told
#: of; the job holds its copies to the bytes bound whatever the files grew to since.
#: Each of its files holds a descriptor counted in the uid's fd budget until the job
#: ends (its source; once copied, its memfd until the results are applied).
TOLD_GROUP_FILES = 16
TOLD_GROUP_BYTES = 1 << 20


@attrs.define(eq=False)
class Fill:
    """A queued fill: a dup of the fd a client sent, and what its request said."""

    source: FdHolder
    st: SourceStat
    label: str | None
    remote: bool
    #: An item of a batch (a file told of), not a lone open's miss.
    told: bool


def told_slots(quota: Quota) -> int:
    """How many slots of a uid's quota told files' jobs may hold at once: all but one
    (one, when there is only one), so that a miss of the uid's program finds a slot
    that told work does not hold."""
    return max(1, quota.limit - 1)


@attrs.define(eq=False)
class Reserved:
    """The bytes reserved in a uid's bound for one copy (Pins.reserve), grown when the
    copy found its file grown (Pins.grow)."""

    uid: int
    size: int


@attrs.define(eq=False)
class Filler:
    """Starts copies into the cache, queues the fills that wait for a slot, keeps the copies."""

    cache: Cache
    copier: Copier
    pins: Pins
    guard: EntryGuard
    closer: Closer
    #: Where copies are timed (the server's; in the stats).
    latency: Latencies
    #: The fd budget (inflight.py): queued fills hold an fd each, counted in it.
    budget: FdBudget | None = None
    #: The server's nursery while it serves: flights and the queues run in it.
    nursery: trio.Nursery | None = None
    #: Copies not cached because a writer had the file open during them.
    uncached_writers: int = 0
    #: Set by stop() (shutdown): nothing more is queued, and no queued fill starts.
    stopped: bool = False
    #: The cancel scope of each uid's pump (_pump) while it runs.
    _pumps: set[trio.CancelScope] = attrs.field(factory=set, init=False)

    def stop(self) -> None:
        """The daemon stops: let go of every queued fill now (their fds closed, their
        counts given back) and queue no more. A fill only warms the cache, which goes
        with the daemon; its copy would keep a stopping daemon copying files nobody
        waits for, up to 512 a uid (attack 35). Copies already started finish."""
        self.stopped = True
        for scope in self._pumps:
            scope.cancel()

    def fly(
        self,
        key: tuple[HostKey, Version],
        source: FdHolder,
        st: SourceStat,
        label: str | None,
        share: UidShare,
        *,
        remote: bool,
        told: bool = False,
    ) -> Flight:
        """Start copying *source* (ours now) as flight *key*, on a slot of the uid's
        quota the caller took (*told*: one of the slots told files may hold, counted in
        share.told_jobs until the copy ends). Raises RequestError (busy) past the uid's
        copy budget; then the slot is given back and *source* closed."""
        quota, uid = share.quota, share.uid
        try:
            self.pins.reserve(uid, st.size)  # refused (busy) past the uid's bound
        except BaseException:
            quota.release()
            self.closer.discard([source.detach()], share)
            raise
        assert self.nursery is not None
        reserved = Reserved(uid, st.size)
        flight = self.copier.start(
            self.nursery,
            key,
            source,
            st,
            self._on_copied(label, reserved),
            remote=remote,
            quota=quota,
            on_failed=self._unreserve(reserved),
            on_end=self._told_ended(share, 0) if told else None,
        )
        flight.uid = uid
        return flight

    def queue(
        self,
        fd: int,
        st: SourceStat,
        label: str | None,
        share: UidShare,
        *,
        remote: bool,
        told: bool = False,
    ) -> bool:
        """Copy this version once a slot of its uid's quota is free (a miss that did
        not wait, when the uid's copies are all under way). *told*: an item of a batch,
        started after every miss of a lone open (and after the opens that wait for a
        slot). False when the queue is full; a lone open's miss then takes the place
        of the last told file queued, if any."""
        if self.nursery is None or self.stopped:
            return False
        key = (HostKey(st.dev, st.ino), st.version)
        fills: dict[tuple[HostKey, Version], Fill] = share.fills
        queued = fills.get(key)
        if queued is not None:  # one fill per version, from the first fd sent for it
            if queued.told and not told:
                share.told.remove(key)  # at most FILL_QUEUE long
                queued.told = False
                share.asked.append(key)
                self._hurry(share)
            return True
        if len(fills) >= FILL_QUEUE:
            if told or not share.told:
                return False
            self._drop(share, fills.pop(share.told.pop()))  # the newest told file
        try:
            source = FdHolder(os.dup(fd))
        except OSError:
            return False
        if self.budget is not None:
            self.budget.use(share, 1)  # held until its copy takes it
        fills[key] = Fill(source, st, label, remote, told)
        (share.told if told else share.asked).append(key)
        if not share.filling:
            share.filling = True
            self.nursery.start_soon(self._pump, share)
        elif not told:
            self._hurry(share)
        return True

    def _hurry(self, share: UidShare) -> None:
        """A miss was queued in the asked lane: the pump, which may wait in the told
        files' turn for a slot or for one of their jobs to end, waits for a slot now."""
        share.quota.hurry()
        share.told_turn.set()

    def _drop(self, share: UidShare, fill: Fill) -> None:
        """Let go of a queued fill that will not be copied: its fd, and its count."""
        if self.budget is not None:
            self.budget.use(share, -1)
        self.closer.discard([fill.source.detach()], share)

    async def _pump(self, share: UidShare) -> None:
        """Start the queued copies of *share*'s uid one by one, as its quota allows."""
        fills: dict[tuple[HostKey, Version], Fill] = share.fills
        scope = trio.CancelScope()
        self._pumps.add(scope)
        try:
            with scope:
                await self._pump_in(share)
        finally:
            self._pumps.discard(scope)
            share.filling = False
            while fills:  # stopped or cancelled (shutdown): let go of what is left
                _, fill = fills.popitem()
                self._drop(share, fill)
            share.asked.clear()
            share.told.clear()

    def _stopping(self) -> bool:
        """Whether stop() ran (read afresh after an await: it may have come meanwhile)."""
        return self.stopped

    async def _pump_in(self, share: UidShare) -> None:
        """The pump's work: each queued fill in turn, once a slot of the quota is free."""
        fills: dict[tuple[HostKey, Version], Fill] = share.fills
        quota = share.quota
        if self.stopped:
            return  # started before stop(), which could not cancel it yet
        while fills:
            if share.asked:
                await quota.acquire()
            elif share.told_jobs >= told_slots(quota):
                # Told files' jobs hold every slot they may: wait for one of them
                # to end, or for a miss the program asks for (Filler._hurry).
                share.told_turn = trio.Event()
                await share.told_turn.wait()
                continue
            else:
                await quota.acquire_last()  # moved up by quota.hurry() for an asked one
            if self._stopping():  # stop() came as the slot became ours: no copy starts
                quota.release()
                return
            # Chosen once the slot is ours: a miss asked for meanwhile goes first.
            if not share.asked and share.told and not fills[share.told[0]].remote:
                self._fly_told(share)
                continue
            lane = share.asked or share.told
            if not lane:  # pragma: no cover - only this task takes fills out
                quota.release()
                continue
            told = lane is share.told  # (a remote told file, copied alone)
            fill = fills.pop(lane.popleft())
            if self.budget is not None:
                self.budget.use(share, -1)
            if not self._wanted(fill, share):
                quota.release()  # filled meanwhile, or no longer worth it
                continue
            st = fill.st
            if told:
                share.told_jobs += 1
            try:
                self.fly(
                    (HostKey(st.dev, st.ino), st.version),
                    fill.source,
                    st,
                    fill.label,
                    share,
                    remote=fill.remote,
                    told=told,
                )
            except RequestError:  # over its copy budget: dropped (it was only a fill)
                if told:
                    share.told_jobs -= 1

    def _wanted(self, fill: Fill, share: UidShare) -> bool:
        """Whether a fill taken off the queue is still to be copied; if not, its fd is
        let go of."""
        st = fill.st
        key = HostKey(st.dev, st.ino)
        entry = self.cache.peek(key)
        if (
            (entry is not None and entry.version == st.version)
            or self.copier.flight((key, st.version)) is not None
            or self.cache.admission(st.size, st.ctime_ns) is not Admission.CACHED
        ):
            self.closer.discard([fill.source.detach()], share)
            return False
        return True

    def _fly_told(self, share: UidShare) -> None:
        """Start the told files first in the queue, up to TOLD_GROUP_FILES of them and
        TOLD_GROUP_BYTES (or one file larger than that), as one worker job on the slot
        of the uid's quota the pump took: one hand-off to a worker and back for them
        all, where each file's own flight cost the loop a task, a thread's round trip
        and a turn of the pump."""
        fills: dict[tuple[HostKey, Version], Fill] = share.fills
        uid = share.uid
        items: list[GroupItem] = []
        inodes: set[HostKey] = set()
        total = 0
        while share.told and len(items) < TOLD_GROUP_FILES:
            fill = fills[share.told[0]]
            st = fill.st
            inode = HostKey(st.dev, st.ino)
            if fill.remote or (items and total + st.size > TOLD_GROUP_BYTES):
                break  # (a remote one, never told in fact, is copied alone)
            if inode in inodes:
                # Another version of a file the group copies: that copy, finding the
                # file changed, copies what it is now, maybe this version. It waits
                # for the next group, which finds it cached if so.
                break
            share.told.popleft()
            del fills[(inode, st.version)]
            if not self._wanted(fill, share):
                self._uncount(share, 1)
                continue
            try:
                self.pins.reserve(uid, st.size)  # refused (busy) past the uid's bound
            except RequestError:
                self._uncount(share, 1)
                self.closer.discard([fill.source.detach()], share)
                continue  # dropped (it was only a fill)
            reserved = Reserved(uid, st.size)
            items.append(
                GroupItem(
                    key=(inode, st.version),
                    src=fill.source,
                    stat=st,
                    on_copied=self._on_copied(fill.label, reserved),
                    on_failed=self._unreserve(reserved),
                )
            )
            inodes.add(inode)
            total += st.size
        if not items:
            share.quota.release()  # none still wanted
            return
        assert self.nursery is not None
        # Their sizes were told; a file grown since must not hold up the rest (nor a
        # request of any uid that joins a later flight) for more bytes than that.
        max_bytes = TOLD_GROUP_BYTES if len(items) > 1 else None
        share.told_jobs += 1
        # Each file's descriptor stays counted in the fd budget, as it was while
        # queued (its source, then its copy's memfd), until the job ends.
        ended = self._told_ended(share, len(items))
        for flight in self.copier.start_group(
            self.nursery, items, share.quota, max_bytes, on_end=ended
        ):
            flight.uid = uid

    def _uncount(self, share: UidShare, n: int) -> None:
        if self.budget is not None:
            self.budget.use(share, -n)

    def _told_ended(self, share: UidShare, fds: int) -> Callable[[], None]:
        """What a told job calls once it has ended and given its slot back: the slot
        no longer counts as told work (the pump may start more), and the *fds* it held
        are out of the fd budget."""

        def ended() -> None:
            share.told_jobs -= 1
            share.told_turn.set()
            self._uncount(share, fds)

        return ended

    def _unreserve(self, reserved: Reserved) -> Callable[[], None]:
        return lambda: self.pins.unreserve(reserved.uid, reserved.size)

    def _on_copied(self, label: str | None, reserved: Reserved) -> Callable[[Flight, Copied], None]:
        uid = reserved.uid

        def apply(flight: Flight, copied: Copied) -> None:
            st, wd, watches = copied.stat, copied.wd, self.guard.watches
            if st.size != reserved.size:
                # A retry copied the file at the size it has now, which the uid must
                # be able to hold as if it had asked with it: else refused (busy),
                # before anything is kept (the copier lets go of the copy).
                self.pins.grow(uid, reserved.size, st.size)
                reserved.size = max(reserved.size, st.size)

            def track(*, cached: bool) -> None:
                # Charged to uid out of the cache, to nobody's when another uid joined.
                self.guard.track(
                    copied.sealed,
                    uid,
                    cached=cached,
                    reserved=reserved.size,
                    wd=copied.memfd_wd,
                    shared=flight.shared,
                )

            self.latency.copy_.observe(copied.seconds)
            watches.drain()  # an event of this inode since the flight began?
            why = ""
            if wd < 0:
                why = "no watch on its inode"
            elif copied.writers is Writers.PRESENT:
                why = "a writer had it open"
                self.uncached_writers += 1
            elif watches.changed_since(wd, flight.start):
                why = "it changed during the copy"
            if why:
                if wd >= 0:
                    watches.forget(wd)
                flight.cached = False
                track(cached=False)
                logger.debug("served uncached (%s): %s", why, label or "?")
                return
            watches.hold(wd)  # before the insert, which may drop an entry of the same inode
            admission, entry = self.cache.insert(
                HostKey(st.dev, st.ino),
                st.version,
                copied.sealed,
                label=label,
                ctime_ns=st.ctime_ns,
                label_uid=uid,
                wd=wd,
                mnt=st.mnt,
            )
            flight.cached = admission is Admission.CACHED
            ours = entry is not None and entry.file is copied.sealed
            if not ours:
                watches.release(wd)  # not ours that was kept
            track(cached=ours)
            if not flight.cached:
                logger.debug("served uncached (%s): %s", admission.value, label or "?")

        return apply
