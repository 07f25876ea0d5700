# Copies of missed files, made in worker threads, one per file version at a
# time (single flight), with their results applied on the event loop.
#
# Must never: touch the cache from a worker thread; copy one file version
# twice at once; lose or double-close an fd when a waiting request is
# cancelled or a thread is abandoned at shutdown; let fds of untrusted
# filesystems be closed on the event loop (close() on FUSE can block).
from __future__ import annotations

import functools
import logging
import os
import threading
import time
from collections.abc import Callable, Hashable, Sequence
from typing import Any, TypeVar, cast

import attrs
import trio

from . import leases
from .errors import RequestError, SourceChanged, refusing_os_errors, request_error_from_os
from .fds import FdHolder
from .leases import Writers
from .memfd import SealedFile, sealed_copy
from .protocol import ErrorCode
from .source import SourceStat, check_readable, check_regular, check_size, stat_sync
from .watches import Watches

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: How often a copy is retried when the source changes under it.
COPY_ATTEMPTS = 3

#: Seconds a worker copying a group of files (Copier.start_group) sleeps between
#: two of them, so that it is runnable no longer than one file's copy at a time,
#: as a lone flight's worker is. A worker at WORKER_NICE that stayed runnable for
#: a whole group kept a client of the daemon off its CPU for a scheduler slice
#: whenever the daemon's wake-up landed there (benchmarks/connect.py under load:
#: the told batch's sendmsg 3.7-7.5 ms at the 90th percentile, against 13-25 us
#: with a flight per file; 14-22 us with this pause). The pauses hold only the
#: uid's own slot, and a request that joined one of the group's flights.
GROUP_PAUSE = 0.0002


#: The nice value of worker threads: under load the event loop's thread (nice
#: 0) gets the CPU first, so one uid's copies cannot slow everyone's hits.
WORKER_NICE = 10
_worker_state = threading.local()


def _yield_to_the_loop() -> None:
    """Lower this worker thread's CPU priority, once per thread (never the loop's)."""
    if getattr(_worker_state, "niced", False):
        return
    _worker_state.niced = True
    try:
        tid = threading.get_native_id()
        current = os.getpriority(os.PRIO_PROCESS, tid)
        if current < WORKER_NICE:
            os.setpriority(os.PRIO_PROCESS, tid, WORKER_NICE)
    except OSError:
        pass  # a seccomp filter or an old kernel: the workers keep the loop's priority


class ThreadJob:
    """Work for one worker thread that owns fds and may outlive its waiter.

    When the waiting task is cancelled (only at shutdown), trio abandons the
    thread. Whichever side finishes last releases what the job owns, so
    nothing leaks and nothing is released twice: the thread releases its
    result if nobody is left to take it; if the thread never started, the
    job's inputs are released by *unstarted* in a throwaway daemon thread
    (closing an fd of a hung mount must not block the loop or the exit).
    """

    def __init__(
        self,
        fn: Callable[[], T],
        cleanup: Callable[[T], None],
        unstarted: Callable[[], None],
    ) -> None:
        self._fn: Callable[[], object] = fn
        self._cleanup: Callable[[Any], None] = cleanup
        self._unstarted = unstarted
        self._lock = threading.Lock()
        self._started = False
        self._abandoned = False
        self._finished = False
        self._result: object = None

    def run_in_thread(self) -> object:
        _yield_to_the_loop()
        with self._lock:
            if self._abandoned:
                return None
            self._started = True
        result = self._fn()
        with self._lock:
            # Re-read: abandon() may have run while fn did.
            if self._was_abandoned():
                self._cleanup(result)
                return None
            self._finished = True
            self._result = result
            return result

    def _was_abandoned(self) -> bool:
        return self._abandoned

    def abandon(self) -> None:
        with self._lock:
            self._abandoned = True
            if not self._started:
                threading.Thread(target=self._unstarted, daemon=True).start()
            elif self._finished:
                result, self._result = self._result, None
                self._cleanup(result)


@attrs.define(eq=False)
class Quota:
    """How many worker jobs one peer (a uid) may have at once.

    A plain counter, used only on the event loop. A job that would exceed it
    waits for one of the same peer's jobs to end, so a peer whose files hang
    ties up at most ``limit`` workers, never anyone else's. A freed slot goes
    to the first task waiting in :meth:`acquire`, else to a turn of those
    waiting in :meth:`wait_freed`, else to the first in :meth:`acquire_last`.
    """

    limit: int
    #: Shared counters of the server; ``key`` is counted there once per wait.
    hits: dict[str, int] = attrs.field(factory=dict)
    key: str = "max_copies_per_uid"
    used: int = 0
    #: Tasks waiting in :meth:`acquire`, first come first served: a released
    #: slot goes to one of them, not to a herd that all wake to retry (a
    #: client that sent thousands of fds to close would make every release
    #: wake thousands of tasks).
    _queue: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    #: Tasks waiting in :meth:`wait_freed` to try again, first come first
    #: served: a slot freed wakes one, which passes the turn on
    #: (:meth:`pass_on`) when its try did not take the slot. Waking them all
    #: cost the loop a retry per waiter per release: a uid with thousands of
    #: requests waiting made every one of its copies' ends cost the whole
    #: daemon tens of milliseconds and more.
    _retries: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)
    #: Tasks waiting in :meth:`acquire_last` (the uid's fills of files it only
    #: told of, filling.py): a freed slot goes to them only when nobody in
    #: the two lots above wants it, so a request someone waits for, or the
    #: miss a lone open asked for, never queues behind a batch of such fills.
    _last: trio.lowlevel.ParkingLot = attrs.field(factory=trio.lowlevel.ParkingLot)

    def try_acquire(self) -> bool:
        """Take a slot if one is free, without waiting."""
        if self.used < self.limit:
            self.used += 1
            return True
        return False

    def try_acquire_last(self) -> bool:
        """Take a slot if one is free and nobody waits for one (see :meth:`acquire_last`)."""
        if self._queue or self._retries or self._last:
            return False
        return self.try_acquire()

    async def acquire(self) -> None:
        """Take a slot, waiting for one of this peer's jobs to end if needed."""
        if not self._queue and self.try_acquire():
            # A schedule point, never a cancel point: the slot is ours, and a
            # Cancelled raised here would leave it taken for good.
            await trio.lowlevel.cancel_shielded_checkpoint()
            return
        self.count_wait()
        await self._queue.park()  # woken by release() with its slot ours

    async def acquire_last(self) -> None:
        """Take a slot once none of this peer's other jobs and waiting requests
        wants one, first come first served among those that wait here."""
        if self.try_acquire_last():
            await trio.lowlevel.cancel_shielded_checkpoint()  # as in acquire()
            return
        self.count_wait()
        await self._last.park()  # woken by release() or pass_on() with its slot ours

    def hurry(self) -> None:
        """Those waiting in :meth:`acquire_last` wait in :meth:`acquire`'s turn from
        now on (a fill someone asked for joined them)."""
        # A slot is free while they wait only when release() woke a retry that
        # has not tried yet: its pass_on() hands the slot to them if it does
        # not take it.
        if self._last:
            self._last.repark_all(self._queue)

    def count_wait(self) -> None:
        self.hits[self.key] = self.hits.get(self.key, 0) + 1

    async def wait_freed(self) -> None:
        """Wait for a turn to try again once a slot is free (it may be taken again by
        then). The caller must call :meth:`pass_on` after its try, whatever came of it."""
        await self._retries.park()

    def pass_on(self) -> None:
        """After the try of a task woken by :meth:`wait_freed`: the next waiter's turn,
        if a slot is still free (the try did not need it, or failed)."""
        if self.used >= self.limit:
            return
        if self._queue:
            self.used += 1
            self._queue.unpark()
        elif self._retries:
            self._retries.unpark()
        elif self._last:
            self.used += 1
            self._last.unpark()  # the slot passes to it, used

    def release(self) -> None:
        if self._queue:
            self._queue.unpark()  # the slot passes to the first waiter, still used
        elif self._retries:
            self.used -= 1
            self._retries.unpark()  # it tries, then passes the turn on (pass_on)
        elif self._last:
            self._last.unpark()  # no one else wants it: the slot passes on, still used
        else:
            self.used -= 1

    @property
    def idle(self) -> bool:
        return self.used == 0 and not self._queue and not self._retries and not self._last


async def run_job(
    fn: Callable[[], T],
    cleanup: Callable[[T], None],
    limiter: trio.CapacityLimiter,
    *,
    unstarted: Callable[[], None] = lambda: None,
    quota: Quota | None = None,
) -> T:
    """Run *fn* in a worker thread; on cancellation nothing it owns is leaked.

    With a *quota*, a slot of it is held from before the thread starts until
    it ends (or is abandoned at shutdown).
    """
    job = ThreadJob(fn, cleanup, unstarted)
    try:
        if quota is not None:
            await quota.acquire()
        try:
            result = await trio.to_thread.run_sync(
                job.run_in_thread, limiter=limiter, abandon_on_cancel=True
            )
        finally:
            if quota is not None:
                quota.release()
    except trio.Cancelled:
        job.abandon()
        raise
    return cast(T, result)


def _failed(flight: Flight) -> None:
    on_failed, flight.on_failed = flight.on_failed, None
    if on_failed is not None:
        on_failed()


def _ignore(result: object) -> None:
    pass


def _release(result: object) -> None:
    if isinstance(result, tuple):
        for item in result:
            _release(item)
    elif isinstance(result, SealedFile):
        result.release()
    elif isinstance(result, Copied):
        result.sealed.release()


@attrs.frozen
class Copied:
    """A copy made by a flight, and what tells whether it may be cached."""

    sealed: SealedFile
    stat: SourceStat
    #: The inotify watch on the source's inode, added before the copy; -1
    #: when none could be added (then the copy is not cached).
    wd: int
    #: Whether a writer had the file open, or opened it, during the copy.
    writers: Writers
    #: How long the copy took, in its worker thread.
    seconds: float = 0.0
    #: The inotify watch on the copy's own memfd (Watches.add_memfd), added in the
    #: worker: 30 us of path lookup through /proc that the loop no longer pays for
    #: each fill. -1: none (the loop tries again when it tracks the memfd).
    memfd_wd: int = -1


def copy_source(
    src: FdHolder,
    expected: SourceStat | None,
    watches: Watches | None = None,
    *,
    max_size: int | None = None,
    left: int | None = None,
) -> Copied:
    """Blocking: a sealed copy of *src*, retried while the file keeps changing.

    Takes ownership of *src* and closes it, in this thread. *expected* is the
    stat the request was made with (None for an fd not yet inspected). The
    source's inode is watched first, and a read lease is held around each
    attempt, so that a change the stat cannot show is seen either way. A source
    found larger than *max_size* (--max-file-size: the size asked with was checked,
    a retry's is here) is not copied (FILE_TOO_LARGE), nor one larger than *left*,
    what its group may still copy (copy_sources; UNSTABLE).
    """
    wd = -1
    try:
        if watches is not None:
            try:
                wd = watches.add(src.fd)
            except OSError:
                wd = -1
        st = expected
        for _attempt in range(COPY_ATTEMPTS):
            if st is None:
                st = stat_sync(src.fd)
                check_readable(src.fd)
                check_regular(st)
            if max_size is not None:
                check_size(st.size, max_size)
            if left is not None and st.size > left:
                # Grown since it was asked for, past what its group may copy.
                raise RequestError(
                    ErrorCode.UNSTABLE,
                    f"the file grew to {st.size} bytes since it was asked for "
                    f"(at most {left} could be copied with it)",
                )
            refused = leases.take(src.fd)
            started = time.perf_counter()
            try:
                sealed = sealed_copy(src.fd, st)
            except SourceChanged:
                st = None
                continue
            except OSError as exc:
                raise request_error_from_os(exc, "cannot copy the file") from exc
            finally:
                writers = leases.give_back(src.fd) if refused is None else refused
            seconds = time.perf_counter() - started
            memfd_wd = -1
            if watches is not None:
                try:
                    memfd_wd = watches.add_memfd(sealed.fd)
                except OSError:
                    pass
            return Copied(
                sealed=sealed,
                stat=st,
                wd=wd,
                writers=writers,
                seconds=seconds,
                memfd_wd=memfd_wd,
            )
        raise RequestError(
            ErrorCode.UNSTABLE, f"the file kept changing during {COPY_ATTEMPTS} copies"
        )
    except BaseException:
        if wd >= 0 and watches is not None:
            watches.forget(wd)
        raise
    finally:
        src.close()


def inspect_source(src: FdHolder) -> SourceStat:
    """Blocking: a full stat and the checks, for an fd of an untrusted filesystem."""
    st = stat_sync(src.fd)
    check_readable(src.fd)
    check_regular(st)
    return st


def copy_sources(
    sources: Sequence[tuple[FdHolder, SourceStat]],
    watches: Watches | None,
    max_bytes: int | None = None,
    max_size: int | None = None,
) -> tuple[Copied | Exception, ...]:
    """Blocking: copy_source of each (source, stat) in turn, each source closed here;
    a source's error is its result, never the others'. Sleeps GROUP_PAUSE between
    two copies. With *max_bytes*, the copies made come to at most that many bytes:
    the stats were taken when each file was asked for, and a file that grew since
    past what is left is not copied (a request that joined a later one's flight
    waits on these copies, whoever's file they are). *max_size*: copy_source's."""
    done: list[Copied | Exception] = []
    left = max_bytes
    try:
        for src, st in sources:
            if done:
                time.sleep(GROUP_PAUSE)
            try:
                copied = copy_source(src, st, watches, max_size=max_size, left=left)
            except Exception as exc:
                done.append(exc)
            else:
                done.append(copied)
                if left is not None:
                    left -= copied.stat.size
    except BaseException:
        _release(tuple(done))
        close_sources(sources[len(done) :])
        raise
    return tuple(done)


def close_sources(sources: Sequence[tuple[FdHolder, SourceStat]]) -> None:
    for src, _ in sources:
        src.close()


@attrs.frozen
class GroupItem:
    """One copy of a group (Copier.start_group): its flight's key, the source it owns
    from then on and the stat it was asked with, and what its flight calls."""

    key: Hashable
    src: FdHolder
    stat: SourceStat
    on_copied: Callable[[Flight, Copied], None]
    on_failed: Callable[[], None] | None = None


@attrs.define(eq=False)
class Flight:
    """One copy in progress; requests for the same version wait on it."""

    key: Hashable
    done: trio.Event = attrs.field(factory=trio.Event)
    #: Watches.seq when the copy began (-1: no watches).
    start: int = -1
    result: SealedFile | None = None
    stat: SourceStat | None = None
    error: RequestError | None = None
    cached: bool = False
    waiters: int = 0
    #: The slot of its starter's quota that this copy holds until it ends.
    quota: Quota | None = None
    #: Called once when the copy ends without a result (pins.py's reservation).
    on_failed: Callable[[], None] | None = None
    #: The uid whose request started it, and whether a request of another uid joined
    #: it (its memfd is then charged to no uid, pins.py).
    uid: int | None = None
    shared: bool = False

    def join(self) -> None:
        """Count one more request that will :meth:`wait` (call without awaiting first)."""
        self.waiters += 1

    async def wait(self) -> tuple[int, SealedFile]:
        """Wait for the copy; return a fresh served fd of it and the file.

        Every :meth:`join` must be followed by exactly one call of this (or
        of :meth:`leave`).
        """
        try:
            await self.done.wait()
            if self.error is not None:
                raise RequestError(self.error.code, self.error.message)
            assert self.result is not None
            with refusing_os_errors("cannot open a served descriptor"):
                return self.result.share(), self.result
        finally:
            self.leave()

    def leave(self) -> None:
        """Count out a request that joined and will not :meth:`wait` after all."""
        self.waiters -= 1
        self.drop_if_unwanted()

    def drop_if_unwanted(self) -> None:
        if self.done.is_set() and self.waiters == 0 and self.result is not None:
            result, self.result = self.result, None
            result.release()


@attrs.define
class Copier:
    """Worker threads for blocking file work, and the table of flights."""

    local_limiter: trio.CapacityLimiter
    remote_limiter: trio.CapacityLimiter
    #: The watches a flight's source is added to (while the server serves).
    watches: Watches | None = None
    #: --max-file-size: a copy that finds its source grown past it stops (copy_source).
    max_file_size: int | None = None
    _flights: dict[Hashable, Flight] = attrs.field(factory=dict)
    copies: int = 0
    bytes_copied: int = 0
    copy_failures: int = 0

    @property
    def in_flight(self) -> int:
        return len(self._flights)

    def flight(self, key: Hashable) -> Flight | None:
        return self._flights.get(key)

    def start(
        self,
        nursery: trio.Nursery,
        key: Hashable,
        src: FdHolder,
        expected: SourceStat | None,
        on_copied: Callable[[Flight, Copied], None],
        *,
        remote: bool,
        quota: Quota | None = None,
        on_failed: Callable[[], None] | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> Flight:
        """Start copying *src* (whose ownership moves here) as flight *key*.

        *quota* is a slot the caller already took for this copy; it is
        released when the copy ends. It is taken before the flight exists so
        that nobody can join a flight that is still queued behind its
        starter's quota. *on_end* is called on the loop once it has ended and
        its slot is released, on every path (cancelled too).
        """
        watches = self.watches
        flight = Flight(
            key=key,
            quota=quota,
            start=-1 if watches is None else watches.begin(),
            on_failed=on_failed,
        )
        self._flights[key] = flight
        nursery.start_soon(
            functools.partial(
                self._run, flight, src, expected, on_copied, remote=remote, on_end=on_end
            )
        )
        return flight

    async def _run(
        self,
        flight: Flight,
        src: FdHolder,
        expected: SourceStat | None,
        on_copied: Callable[[Flight, Copied], None],
        *,
        remote: bool,
        on_end: Callable[[], None] | None,
    ) -> None:
        limiter = self.remote_limiter if remote else self.local_limiter
        watches, max_size = self.watches, self.max_file_size
        try:
            try:
                copied: Copied | BaseException = await run_job(
                    lambda: copy_source(src, expected, watches, max_size=max_size),
                    _release,
                    limiter,
                    unstarted=src.close,
                )
            except Exception as exc:
                copied = exc
            except BaseException:
                _failed(flight)
                raise
            self._settle(flight, copied, on_copied)
        finally:
            if flight.quota is not None:
                flight.quota.release()
            self._done(flight)
            if on_end is not None:
                on_end()

    def start_group(
        self,
        nursery: trio.Nursery,
        items: Sequence[GroupItem],
        quota: Quota,
        max_bytes: int | None = None,
        on_end: Callable[[], None] | None = None,
    ) -> list[Flight]:
        """Start copying several local sources (each item's *src* moves here) in one
        worker job, one after another, on the one slot of *quota* the caller took:
        a flight for each, all copying from now on (a request that joins one waits
        for the copies before it in the group). Their results are applied together,
        in order, when the job ends; the slot is released then, and *on_end* called
        (on every path, cancelled too). With *max_bytes*, the job copies at most that
        many bytes (copy_sources)."""
        watches = self.watches
        flights = []
        for item in items:
            flight = Flight(
                key=item.key,
                start=-1 if watches is None else watches.begin(),
                on_failed=item.on_failed,
            )
            self._flights[item.key] = flight
            flights.append(flight)
        nursery.start_soon(self._run_group, flights, items, quota, max_bytes, on_end)
        return flights

    async def _run_group(
        self,
        flights: list[Flight],
        items: Sequence[GroupItem],
        quota: Quota,
        max_bytes: int | None,
        on_end: Callable[[], None] | None,
    ) -> None:
        watches, max_size = self.watches, self.max_file_size
        sources = [(item.src, item.stat) for item in items]
        results: tuple[Copied | Exception, ...] = ()
        settled = 0
        try:
            try:
                results = await run_job(
                    lambda: copy_sources(sources, watches, max_bytes, max_size),
                    _release,
                    self.local_limiter,
                    unstarted=lambda: close_sources(sources),
                )
            except Exception as exc:  # pragma: no cover - copy_sources returns each error
                results = (exc,) * len(items)
            except BaseException:
                for flight in flights:
                    _failed(flight)
                raise
            for flight, item, copied in zip(flights, items, results, strict=True):
                settled += 1
                try:
                    self._settle(flight, copied, item.on_copied)
                finally:
                    self._done(flight)
        finally:
            # A bug part way (an on_copied that raised): the rest are let go of.
            for flight, copied in zip(flights[settled:], results[settled:], strict=False):
                _failed(flight)
                if isinstance(copied, Copied):
                    _release(copied)
                    if watches is not None and copied.wd >= 0:
                        watches.forget(copied.wd)
            for flight in flights[settled:]:
                self._done(flight)
            quota.release()
            if on_end is not None:
                on_end()

    def _settle(
        self,
        flight: Flight,
        copied: Copied | BaseException,
        on_copied: Callable[[Flight, Copied], None],
    ) -> None:
        """Apply a copy's result (or its error) to its flight, on the loop. *on_copied*
        may refuse the copy with a RequestError, raised before it kept anything."""
        if isinstance(copied, RequestError):
            self.copy_failures += 1
            flight.error = copied
            _failed(flight)
        elif isinstance(copied, BaseException):
            logger.error("copy failed", exc_info=copied)
            self.copy_failures += 1
            flight.error = RequestError(ErrorCode.INTERNAL, f"copy failed: {copied!r}")
            _failed(flight)
        else:
            flight.result = copied.sealed
            flight.stat = copied.stat
            try:
                on_copied(flight, copied)
            except RequestError as exc:
                # Refused on the loop before anything kept it (a copy grown past what
                # its uid may hold): not served, not cached.
                flight.result = flight.stat = None
                _release(copied)
                if self.watches is not None and copied.wd >= 0:
                    self.watches.forget(copied.wd)
                self.copy_failures += 1
                flight.error = exc
                _failed(flight)
                return
            self.copies += 1
            self.bytes_copied += copied.stat.size

    def _done(self, flight: Flight) -> None:
        """A flight ends (its result applied, or none): its waiters wake."""
        watches = self.watches
        if watches is not None and flight.start >= 0:
            watches.end(flight.start)
        self._flights.pop(flight.key, None)
        flight.done.set()
        flight.drop_if_unwanted()

    async def inspect(self, src: FdHolder, quota: Quota | None = None) -> SourceStat:
        """Stat an fd of an untrusted filesystem in a worker thread.

        The caller keeps *src* unless this is cancelled; then the job closes it.
        """
        return await run_job(
            lambda: inspect_source(src),
            lambda _st: src.close(),
            self.remote_limiter,
            unstarted=src.close,
            quota=quota,
        )

    async def run(
        self,
        fn: Callable[[], T],
        src: FdHolder,
        *,
        remote: bool,
        quota: Quota | None = None,
    ) -> T:
        """Run blocking *fn*, which owns and closes *src*, in a worker thread.

        A SealedFile in its result is released if nobody is left to take it.
        """
        limiter = self.remote_limiter if remote else self.local_limiter
        return await run_job(fn, _release, limiter, unstarted=src.close, quota=quota)

    def close_later(
        self,
        nursery: trio.Nursery,
        src: FdHolder,
        quota: Quota | None = None,
        on_closed: Callable[[], None] | None = None,
    ) -> None:
        """Close an fd of an untrusted filesystem in a worker thread.

        *on_closed* is called on the loop once it is closed (or abandoned).
        """
        if src.closed:
            if on_closed is not None:
                on_closed()
            return
        nursery.start_soon(self._close, src, quota, on_closed)

    async def _close(
        self, src: FdHolder, quota: Quota | None, on_closed: Callable[[], None] | None
    ) -> None:
        try:
            await run_job(src.close, _ignore, self.remote_limiter, unstarted=src.close, quota=quota)
        finally:
            if on_closed is not None:
                on_closed()
