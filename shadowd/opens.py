# Opens of host files: what the daemon answers for a descriptor a client
# passed. A hit comes from the cache at once; a miss becomes a flight, copied
# in a worker thread (copier.py); an fd of a file system the loop does not
# trust is inspected, copied and closed in workers; a copy that its uid's
# quota cannot start yet waits for a slot. No sockets here: descriptors in,
# Served values and refusals out (dispatch.py sends them).
#
# Must never: await between a cache lookup and the use of what it returned;
# touch an fd of an untrusted file system on the loop (close included); let a
# uid's copies wait behind another uid's quota; lose a received fd on any
# path.
from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence

import attrs
import trio

from .access import Peer, UidShare
from .cache import Admission, Cache, CacheLimits, DropReason, Entry, HostKey, Shareable
from .copier import Copied, Copier, Flight
from .errors import RequestError, refusing_os_errors, request_error_from_os
from .fds import FdHolder, close_all, close_holders
from .index import Index
from .inflight import FdBudget
from .leases import Writers
from .memfd import SealedFile, memfd_seals
from .pins import Pins
from .protocol import ErrorCode, MissedItem, OpenedItem, Refusal, Version
from .refusals import INTERNAL_MESSAGE, Refusals
from .source import MountTrust, SourceStat, check_readable, check_regular, stat_nosync
from .stats import Latencies
from .watches import Watches

logger = logging.getLogger(__name__)


class _Throttled:
    """A copy must wait: its uid's quota of worker jobs is in use."""


THROTTLED = _Throttled()


@attrs.frozen
class Miss:
    """A miss answered without waiting (protocol version 2, ``wait`` False).

    ``filling``: a copy of that version into the cache is under way.
    ``untrusted``: the fd is of a file system the loop may not touch (a
    worker must close it).
    """

    filling: bool
    untrusted: bool = False


FILLING = Miss(True)
NOT_FILLING = Miss(False)
UNTRUSTED = Miss(False, untrusted=True)

#: Misses that did not wait, per uid, queued for a copy slot of its quota.
FILL_QUEUE = 64

#: A cache hit: the file to reopen for the client, its size, its version.
Hit = tuple[Shareable, int, Version]


@attrs.frozen
class Served:
    """A descriptor ready to send, and what to say about it."""

    fd: FdHolder
    size: int
    hit: bool
    #: Whose bytes the fd holds, and whether that version is cached now.
    version: Version | None = None
    cached: bool = False


@attrs.frozen
class Waiting:
    """A local source fd whose copy waits for a slot of its uid's quota."""

    holder: FdHolder


# What an open that cannot be answered at once waits for: a flight, an fd of
# an untrusted filesystem (a worker inspects it), or a slot of the quota.
Pending = Flight | FdHolder | Waiting


def share_error(exc: OSError) -> RequestError:
    return request_error_from_os(exc, "cannot open a served descriptor")


def served_fd(file: Shareable) -> int:
    """A fresh read-only open of a cached file; RequestError when the daemon cannot make one."""
    try:
        return file.share()
    except OSError as exc:
        raise share_error(exc) from exc


def check_size(size: int, limit: int) -> None:
    """Refuse a file above the daemon's --max-file-size of *limit* bytes."""
    if size > limit:
        raise RequestError(
            ErrorCode.FILE_TOO_LARGE,
            f"file is {size} bytes, above the daemon's --max-file-size of {limit}; copy it locally",
        )


def batch_items(
    results: list[Served | Miss | Refusal | None], *, versions: bool = False
) -> tuple[OpenedItem | MissedItem | Refusal, ...]:
    """The items of a batch reply, in order (every slot is filled before sending).

    *versions*: say each served item's version and whether it is cached
    (protocol version 2).
    """
    items: list[OpenedItem | MissedItem | Refusal] = []
    for r in results:
        if isinstance(r, Served):
            if versions:
                items.append(
                    OpenedItem(
                        fd=r.fd.fd, size=r.size, hit=r.hit, version=r.version, cached=r.cached
                    )
                )
            else:
                items.append(OpenedItem(fd=r.fd.fd, size=r.size, hit=r.hit))
        elif isinstance(r, Miss):
            items.append(MissedItem(filling=r.filling))
        elif isinstance(r, Refusal):
            items.append(r)
        else:  # pragma: no cover - every slot is filled before sending
            items.append(Refusal(code=ErrorCode.INTERNAL, message="no result"))
    return tuple(items)


@attrs.define(eq=False)
class HostOpens:
    """Answers opens of host files from the cache, or by copying them in workers."""

    cache: Cache
    copier: Copier
    mounts: MountTrust
    refusals: Refusals
    limits: CacheLimits
    pins: Pins
    #: The server's nursery while it serves: flights and closes run in it.
    nursery: trio.Nursery | None = None
    #: Descriptors served of copies that were not cached (racy, over budget,
    #: a writer at work, no watch).
    uncached: int = 0
    #: Copies not cached because a writer had the file open during them.
    uncached_writers: int = 0
    #: Cached memfds found changed by a holder (mode, ACL, times) and replaced.
    tampered: int = 0
    watches: Watches = attrs.field(init=False)
    #: Which entry each inotify watch belongs to.
    _by_wd: dict[int, HostKey] = attrs.field(factory=dict, init=False)
    #: Where copies are timed (the server's; in the stats).
    latency: Latencies = attrs.field(factory=Latencies)
    #: The fd budget (inflight.py): fds waiting to be closed count in it.
    budget: FdBudget | None = None
    #: The index of the cache, while the daemon publishes one.
    index: Index | None = None

    def __attrs_post_init__(self) -> None:
        self.watches = Watches(
            on_event=self._changed, on_overflow=self._lost_events, on_freed=self.pins.freed
        )
        self.cache.add_observer(self)

    def track(
        self, sealed: SealedFile, uid: int | None, *, cached: bool, reserved: int = 0
    ) -> None:
        """Watch a memfd we made until it is freed (pins.py); takes over *uid*'s reservation."""
        try:
            wd = self.watches.add_memfd(sealed.fd)
        except OSError:
            # Nothing would tell when it is freed: it is not charged.
            if uid is not None:
                self.pins.unreserve(uid, reserved)
            return
        sealed.pin_wd = wd
        self.pins.track(wd, sealed.size, uid, cached=cached, reserved=reserved)

    def track_unwatched_entries(self) -> None:
        """Track the memfds the cache holds that no one tracks yet (restored at start)."""
        for entry in list(self.cache.index.values()):
            file = entry.file
            if isinstance(file, SealedFile) and file.pin_wd < 0:
                self.track(file, None, cached=True)

    # -- the watches' side ------------------------------------------------

    def _changed(self, wd: int) -> None:
        """An event on a cached file's inode: the entry goes (watches.py says why)."""
        key = self._by_wd.get(wd)
        if key is not None:
            self.cache.invalidate(key)

    def _lost_events(self) -> None:
        for key in list(self._by_wd.values()):
            self.cache.invalidate(key)

    def inserted(self, entry: Entry) -> None:
        if entry.wd >= 0 and not entry.private:
            self._by_wd[entry.wd] = entry.key  # type: ignore[assignment]

    def dropped(self, entry: Entry, reason: DropReason) -> None:
        if entry.wd >= 0 and self._by_wd.get(entry.wd) == entry.key:
            del self._by_wd[entry.wd]
            self.watches.release(entry.wd)
        file = entry.file
        if isinstance(file, SealedFile) and file.pin_wd >= 0:
            self.pins.left_cache(file.pin_wd)

    def _usable(self, entry: Entry, fd: int, st: SourceStat, *, remote: bool) -> bool:
        """Whether a hit may be served: its memfd untouched, its source vouched for.

        An entry restored at start has no watch yet: it is kept only for a
        request through the very mount it was copied from (unique mount IDs
        are never reused, so that is its file system), which lends the fd to
        watch it from now on.
        """
        if not entry.file.intact():
            self.tampered += 1
            logger.warning("a cached memfd was changed by one of its holders; replacing it")
            return False
        if entry.wd >= 0:
            return True
        if remote or not st.mnt or st.mnt != entry.mnt:
            return False
        try:
            wd = self.watches.add(fd)
        except OSError:
            return False
        self.watches.hold(wd)
        entry.wd = wd
        self._by_wd[wd] = entry.key  # type: ignore[assignment]
        if self.index is not None:
            self.index.put(entry)  # watched now: it may be published
        return True

    # -- at once, on the loop -------------------------------------------

    def serve_now(
        self, fd: int, label: str | None, share: UidShare, *, wait: bool = True
    ) -> Hit | Flight | Miss | _Throttled | None:
        """Answer from the cache, or join the copy of this version, without waiting.

        Returns (cached file, size, version) on a hit (the caller reopens it
        for the client), the Flight to wait for on a miss, THROTTLED when a
        new copy must wait for the uid's quota, or None for an fd of an
        untrusted filesystem, which a worker must inspect. With *wait* False
        a miss is a Miss instead: a copy is started in the background when
        it would be cached, and nothing waits. Raises RequestError for an fd
        that is refused. *fd* stays the caller's in every case.
        """
        st = stat_nosync(fd)
        if st is None or not self.mounts.is_local(st.dev, st.mnt):
            return None if wait else UNTRUSTED
        check_readable(fd)
        if not st.is_regular:
            check_regular(st)  # raises, naming what it is
        if st.size > self.limits.max_file_size:
            self.check_size(st.size)  # raises
        return self.lookup_or_fly(fd, st, label, share, remote=False, wait=wait)

    def lookup_or_fly(
        self,
        fd: int,
        st: SourceStat,
        label: str | None,
        share: UidShare,
        *,
        remote: bool,
        wait: bool = True,
    ) -> Hit | Flight | Miss | _Throttled:
        """A hit, or the flight that will copy this version (joined as a waiter).

        Synchronous on purpose: between the miss and joining the flight
        nothing else runs, so two requests for one version make one copy. A
        new flight copies from a dup of *fd*, so *fd* stays the caller's. It
        takes a slot of the uid's quota first (THROTTLED when there is none):
        a flight that exists is always copying, never queued behind a quota,
        so no other uid can be made to wait on a hostile uid's share. With
        *wait* False nothing is joined and nothing waits: a Miss says whether
        a copy into the cache is under way.
        """
        key = HostKey(st.dev, st.ino)
        version = st.version
        entry = self.cache.lookup(key, version)
        if entry is not None:
            if self._usable(entry, fd, st, remote=remote):
                return entry.file, entry.size, version
            self.cache.reject(entry)
        assert self.nursery is not None
        flight_key = (key, version)
        flight = self.copier.flight(flight_key)
        if flight is not None and not wait:
            return FILLING
        if flight is None:
            if not wait and self.cache.admission(st.size, st.ctime_ns) is not Admission.CACHED:
                return NOT_FILLING  # it would not be cached: copying it helps nobody
            quota = share.quota
            if not quota.try_acquire():
                if not wait:
                    # Copied when one of the uid's copies ends (bounded).
                    return (
                        FILLING
                        if self._queue_fill(fd, st, label, share, remote=remote)
                        else NOT_FILLING
                    )
                self.cache.uncount_miss()  # the retry counts it
                return THROTTLED
            try:
                with refusing_os_errors("cannot keep the passed fd"):
                    source = FdHolder(os.dup(fd))
            except BaseException:
                quota.release()
                raise
            try:
                flight = self._fly(flight_key, source, st, label, share, remote=remote)
            except RequestError:
                if not wait:
                    return NOT_FILLING  # its uid's copy budget is used up
                raise
            if not wait:
                return FILLING
        flight.join()
        return flight

    def _fly(
        self,
        key: tuple[HostKey, Version],
        source: FdHolder,
        st: SourceStat,
        label: str | None,
        share: UidShare,
        *,
        remote: bool,
    ) -> Flight:
        """Start copying *source* (ours now) as flight *key*, on a slot of the uid's
        quota the caller took. Raises RequestError (busy) past the uid's copy budget;
        then the slot is given back and *source* closed."""
        quota, uid, size = share.quota, share.uid, st.size
        try:
            self.pins.reserve(uid, size)  # refused (busy) past the uid's bound
        except BaseException:
            quota.release()
            self.discard([source.detach()], share)
            raise
        assert self.nursery is not None
        return self.copier.start(
            self.nursery,
            key,
            source,
            st,
            self._on_copied(label, uid, size),
            remote=remote,
            quota=quota,
            on_failed=lambda: self.pins.unreserve(uid, size),
        )

    def _queue_fill(
        self, fd: int, st: SourceStat, label: str | None, share: UidShare, *, remote: bool
    ) -> bool:
        """Copy this version once a copy of its uid ends (a miss that did not wait,
        when the uid's copies are all under way). False when the queue is full."""
        if len(share.fills) >= FILL_QUEUE or self.nursery is None:
            return False
        try:
            source = FdHolder(os.dup(fd))
        except OSError:
            return False
        if self.budget is not None:
            self.budget.use(share, 1)  # held until its copy takes it
        share.fills.append((source, st, label, remote))
        if not share.filling:
            share.filling = True
            self.nursery.start_soon(self._pump_fills, share)
        return True

    async def _pump_fills(self, share: UidShare) -> None:
        """Start the queued copies of *share*'s uid one by one, as its quota allows."""
        try:
            while share.fills:
                await share.quota.acquire()
                source, st, label, remote = share.fills.popleft()
                if self.budget is not None:
                    self.budget.use(share, -1)
                key = HostKey(st.dev, st.ino)
                flight_key = (key, st.version)
                entry = self.cache.peek(key)
                if (
                    (entry is not None and entry.version == st.version)
                    or self.copier.flight(flight_key) is not None
                    or self.cache.admission(st.size, st.ctime_ns) is not Admission.CACHED
                ):
                    share.quota.release()  # filled meanwhile, or no longer worth it
                    self.discard([source.detach()], share)
                    continue
                try:
                    self._fly(flight_key, source, st, label, share, remote=remote)
                except RequestError:
                    pass  # over its copy budget: dropped (it was only a fill)
        finally:
            share.filling = False
            while share.fills:  # cancelled (shutdown): let go of what is left
                source, *_ = share.fills.popleft()
                if self.budget is not None:
                    self.budget.use(share, -1)
                self.discard([source.detach()], share)

    def check_size(self, size: int) -> None:
        check_size(size, self.limits.max_file_size)

    def pending(self, fd: int, outcome: Flight | Miss | _Throttled | None) -> Pending:
        """What a request whose serve_now gave *outcome* waits for; takes over *fd*."""
        if isinstance(outcome, Flight):
            # The flight copies from its own dup. A file system's error at
            # close (an aborted FUSE connection) is no error of the request.
            FdHolder(fd).close()
            return outcome
        if outcome is None:
            return FdHolder(fd)  # a worker inspects and closes it
        return Waiting(FdHolder(fd))

    def batch_now(
        self,
        holders: list[FdHolder],
        labels: Sequence[str | None],
        share: UidShare,
        peer: Peer,
        id: int,
        *,
        wait: bool = True,
    ) -> tuple[list[Served | Miss | Refusal | None], list[tuple[int, Pending]]]:
        """Serve every item of a batch that can be now; the rest wait.

        Returns the results (None where an item waits) and the items that
        wait. An item that must wait detaches the holder it needs; the caller
        closes the rest. With *wait* False no item waits: a miss is a Miss.
        """
        results: list[Served | Miss | Refusal | None] = [None] * len(holders)
        later: list[tuple[int, Pending]] = []
        try:
            for i, src in enumerate(holders):
                try:
                    outcome = self.serve_now(src.fd, labels[i], share, wait=wait)
                except RequestError as exc:
                    self.refusals.count(peer, exc.code, exc.message)
                    results[i] = Refusal(code=exc.code, message=exc.message)
                    continue
                except Exception as exc:  # a bug of ours: this item fails, not the batch
                    self.refusals.internal(peer, id, exc)
                    self.refusals.count(peer, ErrorCode.INTERNAL, INTERNAL_MESSAGE)
                    results[i] = Refusal(code=ErrorCode.INTERNAL, message=INTERNAL_MESSAGE)
                    continue
                if type(outcome) is tuple:
                    try:
                        served = FdHolder(served_fd(outcome[0]))
                    except RequestError as exc:
                        self.refusals.count(peer, exc.code, exc.message)
                        results[i] = Refusal(code=exc.code, message=exc.message)
                        continue
                    results[i] = Served(
                        fd=served, size=outcome[1], hit=True, version=outcome[2], cached=True
                    )
                elif isinstance(outcome, Miss):
                    results[i] = outcome
                    if outcome.untrusted:
                        self.discard([src.detach()], share)  # in a worker
                elif outcome is None:
                    later.append((i, FdHolder(src.detach())))  # a worker closes it
                elif isinstance(outcome, Flight):
                    later.append((i, outcome))
                else:
                    later.append((i, Waiting(FdHolder(src.detach()))))
        except BaseException:
            # A bug of ours part way: give back what the items before it took.
            close_holders([r.fd for r in results if isinstance(r, Served)])
            self.abandon(later, share)
            raise
        return results, later

    def abandon(self, later: list[tuple[int, Pending]], share: UidShare) -> None:
        """Give back what waiting items hold (they will never be served)."""
        for _, pending in later:
            if isinstance(pending, Flight):
                pending.leave()
            else:
                holder = pending if isinstance(pending, FdHolder) else pending.holder
                self.discard([holder.detach()], share)

    def _on_copied(
        self, label: str | None, uid: int, reserved: int
    ) -> Callable[[Flight, Copied], None]:
        def apply(flight: Flight, copied: Copied) -> None:
            st, wd, watches = copied.stat, copied.wd, self.watches
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
                self.track(copied.sealed, uid, cached=False, reserved=reserved)
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
            self.track(copied.sealed, uid, cached=ours, reserved=reserved)
            if not flight.cached:
                logger.debug("served uncached (%s): %s", admission.value, label or "?")

        return apply

    # -- what waits ------------------------------------------------------

    async def finish(self, pending: Pending, label: str | None, share: UidShare) -> Served:
        """Wait for a flight or a slot of the quota, or inspect an untrusted fd, then serve."""
        if isinstance(pending, Flight):
            return await self._await_flight(pending)
        if isinstance(pending, Waiting):
            return await self._serve_waiting(pending.holder, label, share)
        return await self._serve_untrusted(pending, label, share)

    async def finish_batch(
        self,
        results: list[Served | Miss | Refusal | None],
        later: list[tuple[int, Pending]],
        labels: Sequence[str | None],
        share: UidShare,
        peer: Peer,
    ) -> None:
        """Fill in the items of a batch that had to wait, each as it comes."""

        async def one(i: int, pending: Pending) -> None:
            try:
                results[i] = await self.finish(pending, labels[i], share)
            except RequestError as exc:
                self.refusals.count(peer, exc.code, exc.message)
                results[i] = Refusal(code=exc.code, message=exc.message)

        async with trio.open_nursery() as nursery:
            for i, pending in later:
                nursery.start_soon(one, i, pending)

    async def _await_flight(self, flight: Flight) -> Served:
        fd, sealed = await flight.wait()
        if not flight.cached:
            self.uncached += 1
        st = flight.stat
        return Served(
            fd=FdHolder(fd),
            size=sealed.size,
            hit=False,
            version=None if st is None else st.version,
            cached=flight.cached,
        )

    async def _serve_untrusted(self, taken: FdHolder, label: str | None, share: UidShare) -> Served:
        """Serve an fd of an untrusted filesystem: stat, copy and close it off the loop.

        Every worker job for it runs on the uid's quota: a file of a hung
        mount ties up only its own uid's share of the workers.
        """
        assert self.nursery is not None
        # This call owns the fd from here on; the caller's holder is empty, so
        # its cleanup cannot race the worker thread that closes the fd.
        src = FdHolder(taken.detach())
        logger.debug("fd of a filesystem the loop does not trust: a worker inspects it")
        try:
            st = await self.copier.inspect(src, share.quota)
        except trio.Cancelled:
            raise  # the inspecting job closes the fd
        except BaseException:
            self._close_later(src, share)
            raise
        try:
            self.check_size(st.size)
            outcome = await self._when_allowed(
                share, lambda: self.lookup_or_fly(src.fd, st, label, share, remote=True)
            )
        finally:
            self._close_later(src, share)  # in a worker, never here
        assert outcome is not None
        return await self._served(outcome)

    async def _serve_waiting(self, holder: FdHolder, label: str | None, share: UidShare) -> Served:
        """Serve a local fd once its uid may start another copy."""
        try:
            outcome = await self._when_allowed(
                share, lambda: self.serve_now(holder.fd, label, share)
            )
            if outcome is None:  # the mount table changed its mind meanwhile
                return await self._serve_untrusted(holder, label, share)
            return await self._served(outcome)
        finally:
            holder.close()  # a local fd (an untrusted one was detached above)

    async def _when_allowed(
        self, share: UidShare, attempt: Callable[[], Hit | Flight | Miss | _Throttled | None]
    ) -> Hit | Flight | None:
        """*attempt* until it is not THROTTLED, waiting for the uid's jobs to end."""
        counted = False
        while True:
            outcome = attempt()
            assert not isinstance(outcome, Miss)  # only asked for with wait
            if not isinstance(outcome, _Throttled):
                return outcome
            if not counted:
                counted = True
                share.quota.count_wait()
            await share.quota.wait_freed()

    async def _served(self, outcome: Hit | Flight) -> Served:
        if isinstance(outcome, Flight):
            return await self._await_flight(outcome)
        return Served(
            fd=FdHolder(served_fd(outcome[0])),
            size=outcome[1],
            hit=True,
            version=outcome[2],
            cached=True,
        )

    # -- descriptors we will not use -------------------------------------

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
                self._close_later(FdHolder(fd), share)

    def _close_later(self, src: FdHolder, share: UidShare) -> None:
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
