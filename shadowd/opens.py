# Opens of host files: what the daemon answers for a descriptor a client
# passed. A hit comes from the cache at once, once guard.py vouched for the
# entry; a miss becomes a flight, copied in a worker thread (filling.py,
# copier.py); an fd of a file system the loop does not trust is inspected,
# copied and closed in workers; a copy that its uid's quota cannot start yet
# waits for a slot. No sockets here: descriptors in, Served values and
# refusals out (dispatch.py sends them, batches.py gathers a batch's); the
# fds not used are closed by closing.py.
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

from .access import UidShare
from .cache import Admission, Cache, CacheLimits, HostKey, Shareable
from .closing import Closer
from .copier import Copier, Flight
from .errors import RequestError, refusing_os_errors, request_error_from_os
from .fds import FdHolder
from .filling import Filler
from .guard import EntryGuard
from .inflight import FdBudget
from .pins import Pins
from .protocol import Version
from .refusals import Refusals
from .source import (
    MountTrust,
    SourceStat,
    check_readable,
    check_regular,
    check_size,
    stat_nosync,
)
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
    worker must close it). ``hit``: not a miss, a version the cache holds, answered
    without an fd all the same (a batch that does not want them: ``serve`` False).
    """

    filling: bool
    untrusted: bool = False
    hit: bool = False


FILLING = Miss(True)
NOT_FILLING = Miss(False)
UNTRUSTED = Miss(False, untrusted=True)
HELD = Miss(False, hit=True)

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


@attrs.define(eq=False)
class HostOpens:
    """Answers opens of host files from the cache, or by copying them in workers."""

    cache: Cache
    copier: Copier
    mounts: MountTrust
    refusals: Refusals
    limits: CacheLimits
    pins: Pins
    #: Where copies are timed (the server's; in the stats).
    latency: Latencies = attrs.field(factory=Latencies)
    #: The fd budget (inflight.py): fds waiting to be closed count in it.
    budget: FdBudget | None = None
    #: Descriptors served of copies that were not cached (racy, over budget,
    #: a writer at work, no watch).
    uncached: int = 0
    #: What keeps cached host files honest (watches, the check of each hit).
    guard: EntryGuard = attrs.field(init=False)
    #: What closes the fds clients sent that are not used.
    closer: Closer = attrs.field(init=False)
    #: What starts copies into the cache and queues those that wait for a slot.
    filler: Filler = attrs.field(init=False)
    #: Closes fds a client sent that we will not use, never blocking the loop
    #: (Closer.discard).
    discard: Callable[[Sequence[int], UidShare], None] = attrs.field(init=False)
    _nursery: trio.Nursery | None = attrs.field(default=None, init=False)

    def __attrs_post_init__(self) -> None:
        self.guard = EntryGuard(cache=self.cache, pins=self.pins)
        self.closer = Closer(mounts=self.mounts, copier=self.copier, budget=self.budget)
        self.cache.release_file = self.closer.release_file
        self.filler = Filler(
            cache=self.cache,
            copier=self.copier,
            pins=self.pins,
            guard=self.guard,
            closer=self.closer,
            latency=self.latency,
            budget=self.budget,
        )
        self.discard = self.closer.discard

    @property
    def nursery(self) -> trio.Nursery | None:
        """The server's nursery while it serves: flights and closes run in it."""
        return self._nursery

    @nursery.setter
    def nursery(self, nursery: trio.Nursery | None) -> None:
        self._nursery = self.closer.nursery = self.filler.nursery = nursery

    @property
    def watches(self) -> Watches:
        """The inotify watches of cached files and memfds (the guard's)."""
        return self.guard.watches

    # -- at once, on the loop -------------------------------------------

    def serve_now(
        self,
        fd: int,
        label: str | None,
        share: UidShare,
        *,
        wait: bool = True,
        told: bool = False,
        serve: bool = True,
    ) -> Hit | Flight | Miss | _Throttled | None:
        """Answer from the cache, or join the copy of this version, without waiting.

        Returns (cached file, size, version) on a hit (the caller reopens it
        for the client), the Flight to wait for on a miss, THROTTLED when a
        new copy must wait for the uid's quota, or None for an fd of an
        untrusted filesystem, which a worker must inspect. With *wait* False
        a miss is a Miss instead: a copy is started in the background when
        it would be cached, and nothing waits; *told* (an item of a batch)
        makes that copy wait for every other job of the uid (filling.py); with
        *serve* False too (a told file its client copied itself) a hit serves
        nobody and counts as the miss it was for that client.
        Raises RequestError for an fd that is refused. *fd* stays the
        caller's in every case.
        """
        st = stat_nosync(fd)
        if st is None or not self.mounts.is_local(st.dev, st.mnt):
            return None if wait else UNTRUSTED
        check_readable(fd)
        if not st.is_regular:
            check_regular(st)  # raises, naming what it is
        if st.size > self.limits.max_file_size:
            self.check_size(st.size)  # raises
        return self.lookup_or_fly(
            fd, st, label, share, remote=False, wait=wait, told=told, serve=serve
        )

    def lookup_or_fly(
        self,
        fd: int,
        st: SourceStat,
        label: str | None,
        share: UidShare,
        *,
        remote: bool,
        wait: bool = True,
        told: bool = False,
        serve: bool = True,
    ) -> Hit | Flight | Miss | _Throttled:
        """A hit, or the flight that will copy this version (joined as a waiter).

        Synchronous on purpose: between the miss and joining the flight
        nothing else runs, so two requests for one version make one copy. A
        new flight copies from a dup of *fd*, so *fd* stays the caller's. It
        takes a slot of the uid's quota first (THROTTLED when there is none):
        a flight that exists is always copying, never queued behind a quota,
        so no other uid can be made to wait on a hostile uid's share. With
        *wait* False nothing is joined and nothing waits: a Miss says whether
        a copy into the cache is under way; with *told* too, that copy is
        queued and takes a slot only when none of the uid's other jobs and
        waiting opens wants one (the files a client only tells of go last,
        several to a worker job); with *serve* False a
        hit serves nobody (serve_now).
        """
        key = HostKey(st.dev, st.ino)
        version = st.version
        entry = self.cache.lookup(key, version)
        if entry is not None:
            if self.guard.usable(entry, fd, st, remote=remote):
                if serve:
                    self.guard.found(entry.file, share.uid)
                else:
                    # Its client copied it and holds none of ours: a miss to
                    # it, and no find that would move the memfd's charge.
                    self.cache.unserved(entry)
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
            if told and not wait:
                # Queued even with a slot free: the pump starts told files
                # together, in one worker job (filling.Filler._fly_told).
                return (
                    FILLING
                    if self.filler.queue(fd, st, label, share, remote=remote, told=True)
                    else NOT_FILLING
                )
            quota = share.quota
            if not (quota.try_acquire_last() if told else quota.try_acquire()):
                if not wait:
                    # Copied when one of the uid's copies ends (bounded).
                    return (
                        FILLING
                        if self.filler.queue(fd, st, label, share, remote=remote, told=told)
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
                flight = self.filler.fly(flight_key, source, st, label, share, remote=remote)
            except RequestError:
                if not wait:
                    return NOT_FILLING  # its uid's copy budget is used up
                raise
            if not wait:
                return FILLING
        elif flight.uid != share.uid:
            flight.shared = True  # its memfd is served to two uids (pins.py)
        flight.join()
        return flight

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

    def abandon(self, later: list[tuple[int, Pending]], share: UidShare) -> None:
        """Give back what waiting items hold (they will never be served)."""
        for _, pending in later:
            if isinstance(pending, Flight):
                pending.leave()
            else:
                holder = pending if isinstance(pending, FdHolder) else pending.holder
                self.discard([holder.detach()], share)

    # -- what waits ------------------------------------------------------

    async def finish(self, pending: Pending, label: str | None, share: UidShare) -> Served:
        """Wait for a flight or a slot of the quota, or inspect an untrusted fd, then serve."""
        if isinstance(pending, Flight):
            return await self._await_flight(pending)
        if isinstance(pending, Waiting):
            return await self._serve_waiting(pending.holder, label, share)
        return await self._serve_untrusted(pending, label, share)

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
            self.closer.close_later(src, share)
            raise
        try:
            self.check_size(st.size)
            outcome = await self._when_allowed(
                share, lambda: self.lookup_or_fly(src.fd, st, label, share, remote=True)
            )
        finally:
            self.closer.close_later(src, share)  # in a worker, never here
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
        counted = woken = False
        while True:
            try:
                # Not on the poller's path, which read the events after the
                # request: read those of changes made meanwhile before a hit.
                self.watches.drain()
                outcome = attempt()
            finally:
                if woken:
                    share.quota.pass_on()  # a slot it did not take: the next one's turn
            assert not isinstance(outcome, Miss)  # only asked for with wait
            if not isinstance(outcome, _Throttled):
                return outcome
            if not counted:
                counted = True
                share.quota.count_wait()
            await share.quota.wait_freed()
            woken = True

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
