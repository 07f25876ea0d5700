# The supervisor's open path, cheapest tier first (docs/protocol.md, "The
# open path"): a version this process already holds is reopened here; a
# version the daemon holds is reopened from its index (no round trip) where
# this peer may read the daemon's descriptors anyway; files
# the daemon would not cache, or that are cheaper to copy than to ask for, are
# copied here; the rest are asked of the daemon without waiting for its copy
# (a miss is copied here while the daemon fills its cache). A daemon that is
# down, slow or restarting costs at most one short timeout per backoff window
# (a circuit breaker), never seconds per open.
#
# Must never: hand out a version other than the one the caller's own fstat
# sees; keep an fd of a version the daemon did not cache; serve a kept memfd
# the daemon no longer serves (its index, where readable, says so at each
# open; elsewhere the daemon's word lasts held_recheck); let shadowd being
# down, slow, restarting or full break or stall a supervisor's open path.
from __future__ import annotations

import collections
import logging
import os
import threading
import time
import weakref

import attrs

from shadowd.fds import FdHolder, close_all
from shadowd.memfd import reopen_readonly
from shadowd.protocol import FileKey

from ._session import Answer, Fill, check_sealed, label_for, open_source, serves
from .errors import (
    DaemonTimeout,
    DaemonUnavailable,
    NotPermitted,
    ProtocolViolation,
    Refused,
    ShadowdError,
    TooManyOpenFiles,
    UnsealedDescriptor,
    source_error,
)
from .index import Held, IndexView
from .local import local_copy_fd, local_private
from .sync import Client

logger = logging.getLogger(__name__)
_monotonic = time.monotonic

#: Below this size Opener copies locally instead of asking the daemon: the
#: crossover `shadowd bench` measured for the Python client on the 2-vCPU
#: machines this project is developed on (a round trip costs about what
#: copying 256 KiB does; see docs/performance.md). Re-measure and pass
#: local_below.
DEFAULT_LOCAL_BELOW = 256 * 1024
#: How long the daemon may take to accept, greet and answer. A hit takes well
#: under a millisecond; a miss is answered at once (version 2): a daemon that
#: needs longer is better left alone for a while.
DEFAULT_TIMEOUT = 0.25
#: An answer that took this part of the timeout or more is slow; this many slow in a
#: row open the breaker as a failure does (and after its window one more slow answer
#: opens it again): a daemon that answers each request just within the timeout would
#: otherwise cost every open nearly a timeout, for good. A hit takes 25-150 us; on
#: this project's 2-vCPU VM at a load of 10-13, 446,768 hits asked one after another
#: took over 125 ms three times, never twice in a row (docs/performance.md, "How
#: late a hit comes on a loaded machine"). An
#: Opener's requests never wait for a copy (misses are answered at once, version 2);
#: a version 1 daemon's do, so its answers are not timed.
SLOW_FRACTION = 0.5
SLOW_IN_A_ROW = 3
#: Opener.preload asks one batch a call; all of them within so many reply timeouts.
ASK_MANY_TIMEOUTS = 4
#: The first backoff window after a failure, doubled after each failed retry.
DEFAULT_BACKOFF = 1.0
MAX_BACKOFF = 30.0
#: The daemon's racy window until its hello says (version 2 says it).
DEFAULT_RACY_NS = 1_000_000_000
#: Index hits are reported to the daemon this often, or after this many.
REPORT_EVERY_SECONDS = 1.0
REPORT_EVERY_HITS = 256
#: The most files whose hits are kept apart until reported (the C client's
#: table); while it is full and cannot be sent, hits of other files are counted
#: as the file (0, 0) (docs/protocol.md, "report"). A full table is tried at
#: most this often.
REPORT_FILES = 256
REPORT_FULL_RETRY = 0.001
#: The most files copied here that the daemon's index lacked kept to tell it of
#: (their sources held open until told): told when this many wait, with each
#: report, and at close; one batch of the daemon's default max_batch. (It
#: queues at most 512 fills per uid, shadowd/filling.py FILL_QUEUE: items of
#: batches past that are dropped.)
TELL_FILES = 64
#: How long the process-local tier serves a kept version without the daemon
#: vouching for it again, where no index of the daemon's can (another uid's
#: daemon, the breaker open, a daemon gone): then the next open asks the
#: daemon. The cost is one round trip per file and bound, whatever the
#: opens: at 1 s, 10 ms a second for 128 held files all in use, measured
#: (docs/performance.md, "The process-local tier checks the daemon").
DEFAULT_HELD_RECHECK = 1.0


@attrs.define(eq=False)
class _Held:
    fd: FdHolder
    version: tuple[int, int, int]
    size: int
    #: The file's (dev, ino, size, mtime_ns, ctime_ns) and the kept memfd's
    #: (st_dev, st_ino, st_ctime_ns): what the daemon's index must still say.
    memfd: Held
    #: When the daemon last vouched for this memfd in this version (monotonic):
    #: the time before the request it answered; and the index view that last
    #: held it, which vouches as of the last time its daemon was seen alive.
    vouched: float
    seen: IndexView | None = None

    def vouched_at(self) -> float:
        seen = self.seen
        return self.vouched if seen is None else max(self.vouched, seen.alive_at)


@attrs.define
class HeldFiles:
    """The process-local tier: sealed memfds of versions the daemon cached.

    Keyed by (st_dev, st_ino); a hit needs the caller's own fstat of the
    source to show the very version kept, and the daemon to still serve that
    very memfd: its index must say so at the hit (where the caller passes a
    view it may read), or else the daemon must have said so less than
    *recheck* seconds ago. Bounded by entries and bytes, least recently used
    first out. Not thread-safe by itself (Opener locks).
    """

    max_files: int = 128
    max_bytes: int = 64 * 1024 * 1024
    recheck: float = DEFAULT_HELD_RECHECK
    _held: collections.OrderedDict[tuple[int, int], _Held] = attrs.field(
        factory=collections.OrderedDict
    )
    bytes: int = 0

    def __len__(self) -> int:
        return len(self._held)

    def reopen(
        self,
        key: tuple[int, int],
        version: tuple[int, int, int],
        index: IndexView | None = None,
    ) -> int | None:
        """A fresh read-only fd of the kept *version*, or None: not kept, changed, or
        no longer vouched for (then it is dropped, and the open goes on down the tiers).

        *index*: a view of the daemon's index, alive, that this process may read
        (Opener passes it): the kept memfd must be in it. None: the daemon must
        have vouched for it less than :attr:`recheck` seconds ago.
        """
        held = self._held.get(key)
        if held is None:
            return None
        if held.version != version:
            self._drop(key)  # the file changed: never served stale
            return None
        if index is not None:
            if not index.holds(held.memfd):
                self._drop(key)  # the daemon dropped or replaced it: so do we
                return None
            held.seen = index
        elif _monotonic() - held.vouched_at() >= self.recheck:
            self._drop(key)  # ask the daemon again; what it serves is kept afresh
            return None
        try:
            fd = reopen_readonly(held.fd.fd)
        except OSError:
            self._drop(key)
            return None
        try:
            check_sealed(fd)  # closes fd when it is not sealed (our own reopen: read-only)
        except UnsealedDescriptor:
            self._drop(key)
            return None
        self._held.move_to_end(key)
        return fd

    def keep(
        self,
        key: tuple[int, int],
        version: tuple[int, int, int],
        fd: int,
        size: int,
        vouched: float | None = None,
    ) -> bool:
        """Keep a reopen of the served *fd* (which stays the caller's), which the daemon
        vouched for at *vouched* (monotonic; None: now). The memfd kept already, served
        again in the same version, is only vouched for afresh."""
        if size > self.max_bytes or self.max_files <= 0:
            return False
        if vouched is None:
            vouched = time.monotonic()
        try:
            st = os.fstat(fd)
        except OSError:
            return False
        memfd = (*key, *version, st.st_dev, st.st_ino, st.st_ctime_ns)
        kept = self._held.get(key)
        if kept is not None and kept.memfd == memfd:
            kept.vouched = max(kept.vouched_at(), vouched)
            self._held.move_to_end(key)
            return True
        try:
            own = FdHolder(reopen_readonly(fd))
        except OSError:
            return False
        self._drop(key)
        while self._held and (
            len(self._held) >= self.max_files or self.bytes + size > self.max_bytes
        ):
            self._drop(next(iter(self._held)))
        self._held[key] = _Held(fd=own, version=version, size=size, memfd=memfd, vouched=vouched)
        self.bytes += size
        return True

    def _drop(self, key: tuple[int, int]) -> None:
        held = self._held.pop(key, None)
        if held is not None:
            self.bytes -= held.size
            held.fd.close()

    def clear(self) -> None:
        while self._held:
            self._drop(next(iter(self._held)))


@attrs.define(eq=False)
class _Index:
    """The daemon's index as an Opener has it: the view (None: the daemon gives
    none), the client's connection it came with, and how many opens are reading
    through it now. A view that another replaced (a new connection, another
    thread's fetch) or that close() let go of is closed when the last of them
    is done with it, never under one. Changed only with the Opener's lock held.
    """

    view: IndexView | None
    connection: int
    users: int = 0
    retired: bool = False

    def retire(self) -> IndexView | None:
        """No more users from now on; the view to close now, if nobody reads it."""
        self.retired = True
        return self.view if self.users == 0 else None


#: Every Opener, so that a forked child can take over the ones it inherited.
_OPENERS: weakref.WeakSet[Opener] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for opener in list(_OPENERS):
        opener._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _release(
    held: HeldFiles, told: list[tuple[FdHolder, str | None]], client: Client | None
) -> None:
    """What an Opener holds, released: by :meth:`Opener.close`, or when an Opener
    nobody closed is collected (its finaliser; it must not refer to the Opener)."""
    held.clear()
    _let_go(told)
    if client is not None:
        client.close()


def _let_go(told: list[tuple[FdHolder, str | None]]) -> None:
    """Close the sources kept to tell the daemon of, emptying *told* in place."""
    kept = told[:]
    told.clear()
    for source, _ in kept:
        source.close()


def _cacheable(st: os.stat_result, limits: dict[str, int]) -> bool:
    """Whether a daemon whose hello said *limits* would cache this file now: not larger
    than its --max-file-size (it would refuse it), not younger than its racy window."""
    if st.st_size > limits.get("max_file_size", 1 << 62):
        return False
    return time.time_ns() - st.st_ctime_ns >= limits.get("racy_window_ns", DEFAULT_RACY_NS)


def _version(st: os.stat_result) -> tuple[int, int, int]:
    return (st.st_size, st.st_mtime_ns, st.st_ctime_ns)


class Opener:
    """What a supervisor calls on its open path; never fails or stalls because of shadowd.

    For each open, cheapest first: a version this process holds (kept from an
    earlier hit) is reopened here; a version the daemon holds is reopened
    from its index, without a round trip, where this process may read the
    daemon's descriptors (*use_index*; its uid, or root); a file below
    *local_below* bytes, above the daemon's --max-file-size, or whose ctime
    is younger than the daemon's racy window (it would not cache it; its
    hello says the window, and the first open of a file younger than the 1 s
    default connects to hear it) is copied here, and where the index is read
    and lacks a file the daemon would cache, the daemon is told of it later
    (in batches of at most TELL_FILES that do not wait: when full, with each
    report of index hits, and at :meth:`close`; :attr:`told_files` counts
    them), so that the next process's open of it is an index hit; otherwise the daemon is
    asked without waiting for its copy (protocol version 2): a hit is served
    (and kept), a miss is copied here while the daemon fills its cache, and
    so is a file the daemon refuses for any reason (the copy here raises the
    errors that are the file's: not a regular file, unreadable). After a
    timeout, a refused connection, a broken one, a reply that breaks the
    protocol, or three answers in a row that took half the timeout or more
    (SLOW_IN_A_ROW, SLOW_FRACTION; the daemon's time alone, never a thread's
    wait behind other threads' requests) the daemon is left alone for a backoff
    window (1 s, doubled after each failed retry, at most 30 s) and every open
    is copied here; one
    log line says it is gone, one that it is back. This process out of
    descriptors (its RLIMIT_NOFILE: a socket not made, a reply's descriptor the
    kernel could not hand over) is no fault of the daemon's and opens no
    window: the file is copied here, or, when that needs a number there is not
    either, :class:`TooManyOpenFiles` is raised (errno EMFILE). Thread-safe; a
    forked child goes on with a connection of its own. :meth:`close` gives back
    its descriptors (the kept memfds, the connection); an Opener nobody closes
    gives them back when it is collected.

    A kept version is served only while the daemon still serves that very
    memfd: where this process reads the daemon's index, the index must name
    it at each open (so a change the daemon saw, even one stat cannot show,
    such as a write through a shared mapping, ends it at once); elsewhere
    (another uid's daemon, or while the index is not usable) the daemon must
    have vouched for it less than *held_recheck* seconds ago (1 s; settable
    at run time as :attr:`held_recheck`), or the open asks the daemon again
    and keeps what it serves. While the daemon is away nothing kept is
    served past that bound: opens are copied here.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        local_below: int = DEFAULT_LOCAL_BELOW,
        timeout: float | None = DEFAULT_TIMEOUT,
        retry_after: float = DEFAULT_BACKOFF,
        max_backoff: float = MAX_BACKOFF,
        held_files: int = 128,
        held_bytes: int = 64 * 1024 * 1024,
        use_index: bool = True,
        held_recheck: float = DEFAULT_HELD_RECHECK,
    ) -> None:
        self.local_below = local_below
        self.retry_after = retry_after
        self.max_backoff = max_backoff
        self._client: Client | None
        try:
            self._client = Client(socket_path, timeout=timeout)
        except DaemonUnavailable as exc:
            logger.warning("shadowd not usable (%s); copying locally", exc)
            self._client = None
        self._lock = threading.Lock()
        self._held = HeldFiles(max_files=held_files, max_bytes=held_bytes)
        self.held_recheck = held_recheck
        self._down_until = 0.0
        self._backoff = retry_after
        self._heard: dict[str, int] | None = None  # the last hello's limits (_limits)
        self._down = False
        self._slow = 0  # answers slower than SLOW_FRACTION of the timeout, in a row
        #: Opens served by the daemon (hits), copied here, reopened from this process.
        self.daemon_opens = 0
        self.local_opens = 0
        self.held_opens = 0
        #: Seconds spent waiting on the daemon (requests that failed included).
        self.waited = 0.0
        #: Hits served through the daemon's index (no round trip).
        self.index_opens = 0
        self.use_index = use_index
        self._index: _Index | None = None
        # Index hits not told to the daemon yet, per file (at most REPORT_FILES),
        # those of files past that, and of which daemon (its pid and index
        # generation): kept until a report carries them to that very daemon.
        self._unreported: collections.Counter[tuple[int, int]] = collections.Counter()
        self._spilled = 0
        self._report_daemon: tuple[int, int] | None = None
        self._unreported_hits = 0  # counted since the last report was tried
        self._reported_at = time.monotonic()  # when it was
        # Files copied here that the daemon's index lacked and that it would cache:
        # a duplicate of each source and its label, until told (_tell).
        self._told: list[tuple[FdHolder, str | None]] = []
        self._closing = False  # close() began: no source is kept any more
        # The lists _tell took and sends now (a thread's each), until let go of.
        self._telling: list[list[tuple[FdHolder, str | None]]] = []
        #: Files told to the daemon after they were copied here (the next
        #: process's opens of them are then hits through its index).
        self.told_files = 0
        # The tier's memfds and the connection are owned: by close(), or, for an
        # Opener nobody closes, by its finaliser when it is collected (a closed
        # holder's fd is -1: a use after close never reaches a reused number).
        self._finalizer = weakref.finalize(self, _release, self._held, self._told, self._client)
        _OPENERS.add(self)

    @property
    def held_recheck(self) -> float:
        """Seconds a kept version is served without the daemon vouching for it again,
        where its index cannot (see the class); settable at any time, 0 or more."""
        return self._held.recheck

    @held_recheck.setter
    def held_recheck(self, seconds: float) -> None:
        if not seconds >= 0:
            raise ValueError(f"held_recheck must be 0 or more seconds, not {seconds!r}")
        self._held.recheck = float(seconds)

    # -- the open path ---------------------------------------------------

    def open(self, path: str | os.PathLike[str]) -> int:
        """A sealed, read-only fd with the bytes of *path*; the caller owns it."""
        with FdHolder(open_source(path)) as src:
            return self.open_fd(src.fd, label=label_for(path), name=os.fsdecode(path))

    def open_fd(self, fd: int, *, label: str | None = None, name: str = "<fd>") -> int:
        """Like :meth:`open` for a file the caller already opened (it stays theirs)."""
        try:
            st = os.fstat(fd)
        except OSError as exc:
            raise source_error(exc, name) from None
        key, version = (st.st_dev, st.st_ino), _version(st)
        with self._lock:
            held = self._held.reopen(key, version, self._vouching())
            if held is not None:
                self.held_opens += 1
                return held
            index = self._reading()  # in use until _index_done
        if index is None:
            index = self._current_index()  # fetched on a new connection (or None)
        indexed = index is not None
        if index is not None:
            served = None
            try:
                assert index.view is not None
                served = index.view.open(st)
            finally:
                self._index_done(index, key if served is not None else None)
            if served is not None:
                return served
        if self._worth_asking(st):
            asked = time.monotonic()
            answer = self._ask(fd, label)
            if answer is not None and answer.fd is not None:
                if serves(answer.fd, answer.version, st):
                    self._keep(key, version, answer, asked)
                    with self._lock:
                        self.daemon_opens += 1
                    return answer.fd
                # Another version than the caller's fstat saw (the file changed since,
                # or the daemon is wrong): never handed out as that one. The copy here
                # reads the file as it is now.
                os.close(answer.fd)
        copy = local_copy_fd(fd, name=name)
        with self._lock:
            self.local_opens += 1
        if indexed and self._would_cache(st):
            # Its index lacked it, so the daemon almost surely has no copy: told
            # (not asked: a round trip for a miss), the next process's open of it
            # is an index hit.
            self._tell_later(fd, label)
        return copy

    def preload(self, paths: list[str | os.PathLike[str]]) -> int:
        """Ask for many files in one round trip and keep the versions the daemon has.

        For the files a program is about to open (the DSOs the loader will
        map, what a previous run opened): their later opens are then
        reopened here. Misses are not waited for (the daemon fills its cache
        meanwhile). Returns how many files are now held. Never raises
        because of the daemon; unreadable paths are skipped.
        """
        sources: list[tuple[FdHolder, os.stat_result, str]] = []
        try:
            for path in paths:
                try:
                    src = FdHolder(open_source(path))
                except ShadowdError:
                    continue
                try:
                    st = os.fstat(src.fd)
                except OSError:
                    src.close()
                    continue
                sources.append((src, st, label_for(path)))
            wanted = [(src, st, label) for src, st, label in sources if self._worth_asking(st)]
            if not wanted or not self._usable():
                return len(self._held)
            # The daemon's index too, once per connection, where this process may
            # read it: the entries kept now are checked against it at each open.
            index = self._current_index()
            if index is not None:
                self._index_done(index, None)
            if not self._usable():
                return len(self._held)
            asked = time.monotonic()
            answers = self._ask_many(
                [s.fd for s, _, _ in wanted], [label for _, _, label in wanted]
            )
            for (_, st, _), answer in zip(wanted, answers, strict=True):
                if isinstance(answer, Answer) and answer.fd is not None:
                    if serves(answer.fd, answer.version, st):
                        self._keep((st.st_dev, st.st_ino), _version(st), answer, asked)
                    os.close(answer.fd)
        finally:
            close_all(src.detach() for src, _, _ in sources)
        with self._lock:
            return len(self._held)

    def open_private(
        self, namespace: str, key: FileKey, fill: Fill, *, executable: bool = False
    ) -> int:
        """:meth:`Client.open_private`, or the same kind of fd made here when the daemon
        cannot help (then *fill* may run a second time, into a memfd of our own)."""
        client = self._client
        if client is not None and self._usable():
            started = time.monotonic()
            try:
                served = client.open_private(namespace, key, fill, executable=executable)
            except (DaemonUnavailable, NotPermitted, ProtocolViolation) as exc:
                self._failed(exc, started)
            except (Refused, TooManyOpenFiles):
                pass  # whatever the daemon will not do, the copy here does (or says why not)
            else:
                self._worked(started)
                with self._lock:
                    self.daemon_opens += 1
                return served
            finally:
                self.waited += time.monotonic() - started
        fd = local_private(key, fill, executable=executable)
        with self._lock:
            self.local_opens += 1
        return fd

    # -- routing ---------------------------------------------------------

    def _worth_asking(self, st: os.stat_result) -> bool:
        """Whether the daemon might serve this file cheaper than a copy here."""
        if st.st_size < self.local_below or not self._usable():
            return False
        limits = self._limits()
        if limits is None and time.time_ns() - st.st_ctime_ns < DEFAULT_RACY_NS:
            # No hello heard on this connection, and the default window calls
            # the file young: learn the daemon's own window first (one round
            # trip per connection), or a file younger than 1 s would never be
            # asked of a daemon that caches it sooner, and without the index
            # nothing else would connect while every file is that young.
            limits = self._hello()
            if not self._usable():
                return False
        return _cacheable(st, limits or {})

    def _would_cache(self, st: os.stat_result) -> bool:
        """Whether the daemon whose hello this connection heard would cache this file
        now (not larger than its limit, not younger than its racy window)."""
        limits = self._limits()
        return limits is not None and self._usable() and _cacheable(st, limits)

    def _limits(self) -> dict[str, int] | None:
        """The limits the daemon's last hello said; None before any.

        Kept after its connection is dropped (a timeout, a bad reply) until a
        new hello says otherwise: a daemon that comes back is most likely run
        as it was, and the defaults would send it files it refuses (above its
        --max-file-size) or will not cache (inside its racy window).
        """
        client = self._client
        session = None if client is None else client._session
        if session is not None and session.server is not None:
            self._heard = dict(session.proto.server_limits)
        return self._heard

    def _hello(self) -> dict[str, int] | None:
        """Connect and hear the hello now, behind the breaker; its limits, or None."""
        client = self._client
        assert client is not None
        started = time.monotonic()
        held = client._spent()
        try:
            client.connect()
        except (DaemonUnavailable, NotPermitted, ProtocolViolation) as exc:
            self._failed(exc, started)
            return None
        except ShadowdError:
            return None  # busy at the gate, say: the default window, this time
        finally:
            self.waited += time.monotonic() - started
        self._worked(started, client._spent() - held)
        return self._limits()

    def _keep(
        self, key: tuple[int, int], version: tuple[int, int, int], answer: Answer, asked: float
    ) -> None:
        # Only a version the daemon cached, and the one the caller's fstat saw:
        # then a later open of the same version gets these very bytes. The
        # daemon vouched for it no earlier than *asked*, when the request left.
        if answer.cached and answer.version == version and answer.fd is not None:
            with self._lock:
                self._held.keep(key, version, answer.fd, answer.size, asked)

    # -- the index: hits without a round trip ----------------------------

    def _current_index(self) -> _Index | None:
        """The daemon's index, fetched once per connection (a new one may be another
        daemon's), counted as in use: give it back with :meth:`_index_done`. None when
        there is none to read through now."""
        client = self._client
        if not self.use_index or client is None or not self._usable():
            return None
        with self._lock:
            index = self._index
            if index is not None and index.connection == client.connections:
                return self._reading()  # None: the daemon gave none on this connection
        started = time.monotonic()
        try:
            view = client.index()
        except (DaemonUnavailable, NotPermitted, ProtocolViolation) as exc:
            self._failed(exc, started)
            return None
        except TooManyOpenFiles:
            return None  # none now, and asked again at the next open: the daemon has one
        except ShadowdError:
            view = None
        finally:
            self.waited += time.monotonic() - started
        fetched = _Index(view, client.connections)
        with self._lock:
            current = self._index
            if current is not None and current.connection == fetched.connection:
                # Another thread fetched this connection's index meanwhile: keep theirs.
                fetched, unused, stale = current, view, None
            else:
                self._index, unused = fetched, None
                stale = None if current is None else current.retire()
            if fetched.view is not None:
                fetched.users += 1
        for old in (unused, stale):
            if old is not None:
                old.close()
        return fetched if fetched.view is not None else None

    def _vouching(self) -> IndexView | None:
        """The view the process-local tier checks a kept memfd against (lock held): the
        current connection's, while the daemon is usable and seen alive within
        :attr:`held_recheck` (else the daemon, not its index, must vouch); None when
        there is none such."""
        index = self._index
        if index is None or (view := index.view) is None or not self.use_index:
            return None
        client = self._client
        if client is None or index.connection != client.connections:
            return None  # (a closed view holds nothing: no need to ask here)
        now = _monotonic()
        if now < self._down_until:
            return None
        if now - view.alive_at >= self._held.recheck and not view.alive():
            return None  # its daemon is gone: its index no longer changes
        return view

    def _reading(self) -> _Index | None:
        """The current connection's index, counted as in use, when there is one to read
        through now (lock held); else None."""
        index, client = self._index, self._client
        if (
            index is None
            or index.view is None
            or client is None
            or index.connection != client.connections
            or not self.use_index
            or time.monotonic() < self._down_until
        ):
            return None
        index.users += 1
        return index

    def _index_done(self, index: _Index, hit: tuple[int, int] | None) -> None:
        """*index* no longer in use by this open; *hit*: the file it served, counted."""
        with self._lock:
            index.users -= 1
            stale = index.view if index.retired and index.users == 0 else None
            due = False
            if hit is not None:
                self.index_opens += 1
                assert index.view is not None
                due = self._count(hit, (index.view.pid, index.view.generation))
        if stale is not None:
            stale.close()
        if due:
            self._report()
            if self._told:
                self._tell()  # the files copied here meanwhile go with it

    def _count(self, hit: tuple[int, int], daemon: tuple[int, int]) -> bool:
        """Count an index hit of the file *hit* served through *daemon*'s index (lock
        held); whether a report is due."""
        if daemon != self._report_daemon:
            self._unreported.clear()  # another daemon's (restarted since): not ours to tell
            self._spilled = 0
            self._report_daemon = daemon
        self._unreported_hits += 1
        since = time.monotonic() - self._reported_at
        if hit in self._unreported or len(self._unreported) < REPORT_FILES:
            self._unreported[hit] += 1
        else:
            self._spilled += 1  # the table full and not sent yet: a hit of no file
            if since >= REPORT_FULL_RETRY:
                return True
        return self._unreported_hits >= REPORT_EVERY_HITS or since >= REPORT_EVERY_SECONDS

    def _keep_unsent(self, hits: list[tuple[int, int, int]], daemon: tuple[int, int]) -> None:
        """Hits a report could not carry, merged back with those counted meanwhile (lock
        held), unless they were another daemon's by now."""
        if daemon != self._report_daemon:
            return
        for dev, ino, n in hits:
            key = (dev, ino)
            if key != (0, 0) and (key in self._unreported or len(self._unreported) < REPORT_FILES):
                self._unreported[key] += n
            else:
                self._spilled += n

    def _report(self, *, last: bool = False) -> None:
        """Tell the daemon the hits served through its index (for its stats and LRU order).

        Only to the daemon they were counted of (the same pid and index generation),
        on a connection that holds its index: one is made when the last was dropped
        (behind the breaker). What cannot be sent now (no such connection, the send
        failed) is kept for the next report; a daemon restarted meanwhile is not told
        of the old one's hits. Once sent they count as told, whatever the answer.
        *last* (at close): the last request's answer is not waited for, and the
        connection is closed after it (Client._report_here).
        """
        with self._lock:
            self._unreported_hits = 0
            self._reported_at = time.monotonic()
            pending = bool(self._unreported or self._spilled)
        client = self._client
        if not pending or client is None or not self._usable():
            return
        started = time.monotonic()
        try:
            session = client._session
            if (session is None or session.server is None) and self._hello() is None:
                return  # no connection now: kept
            index = self._current_index()  # this connection's (fetched once per connection)
            if index is None:
                return  # none to check the daemon by: kept
            try:
                with self._lock:
                    assert index.view is not None
                    daemon = (index.view.pid, index.view.generation)
                    hits = [(dev, ino, n) for (dev, ino), n in self._unreported.items()]
                    if self._spilled:
                        hits.append((0, 0, self._spilled))
                    ours = daemon == self._report_daemon
                    if ours:
                        self._unreported.clear()
                        self._spilled = 0
            finally:
                self._index_done(index, None)
            if not ours or not hits:
                return
            try:
                sent, failure = client._report_here(hits, last=last)
            except ShadowdError as exc:  # (none is raised before a request is sent)
                sent, failure = 0, exc
            if sent < len(hits):
                with self._lock:
                    self._keep_unsent(hits[sent:], daemon)
            if isinstance(failure, (DaemonUnavailable, ProtocolViolation)):
                self._failed(failure, started)  # a stopped daemon: one timeout a window
        finally:
            self.waited += time.monotonic() - started

    # -- files copied here, told to the daemon ----------------------------

    def _tell_later(self, fd: int, label: str | None) -> None:
        """Keep a duplicate of *fd* (the caller's) to tell the daemon of; told at once
        when TELL_FILES wait."""
        try:
            source = FdHolder(os.dup(fd))
        except OSError:
            return  # out of descriptors: the daemon only misses hearing of it
        with self._lock:
            closed = self._closing  # close() came meanwhile (another thread)
            if not closed:
                self._told.append((source, label))
            full = len(self._told) >= TELL_FILES
        if closed:
            source.close()  # nothing would ever tell of it, or close it
        elif full:
            self._tell()

    def _tell(self, *, last: bool = False) -> None:
        """Tell the daemon of the files copied here that its index lacked, in batches
        that do not wait (it fills its cache with them); then let their sources go.
        On the connection there is (whichever daemon is at its other end: the files
        are what they are), behind the breaker; what cannot be sent is let go (only
        the cache's warmth is lost). *last* (at close): the last batch's answer is not
        waited for (Client._send_here)."""
        with self._lock:
            told = self._told[:]
            self._told.clear()
            if told:
                # In this thread's hands from here on: listed for a forked child,
                # which has no such thread and lets go of them (_forked).
                self._telling.append(told)
        if not told:
            return
        client = self._client
        started = time.monotonic()
        try:
            if client is None or not self._usable():
                return
            asked = time.monotonic()  # (after the breaker let it: a retry's, when one)
            try:
                sent, failure = client._tell_here(
                    [source.fd for source, _ in told], [label for _, label in told], last=last
                )
            except ShadowdError as exc:  # (none is raised before a request is sent)
                sent, failure = 0, exc
            with self._lock:
                self.told_files += sent
            if isinstance(failure, (DaemonUnavailable, ProtocolViolation)):
                self._failed(failure, asked)
        finally:
            self.waited += time.monotonic() - started
            with self._lock:
                self._telling.remove(told)
            _let_go(told)

    # -- the daemon, behind a breaker -------------------------------------

    def _usable(self) -> bool:
        return self._client is not None and time.monotonic() >= self._down_until

    def _ask(self, fd: int, label: str | None) -> Answer | None:
        """The daemon's answer, or None when the caller should copy itself."""
        client = self._client
        assert client is not None
        started = time.monotonic()
        held = client._spent()
        try:
            answer = client.ask(fd, label=label, wait=False)
        except (DaemonUnavailable, NotPermitted, ProtocolViolation) as exc:
            self._failed(exc, started)
            return None
        except (Refused, TooManyOpenFiles):
            # Whatever the daemon will not do, the copy here does (or says why not);
            # out of descriptors here is no fault of the daemon's: no breaker.
            return None
        finally:
            self.waited += time.monotonic() - started
        self._worked(started, client._spent() - held)
        return answer

    def _ask_many(self, fds: list[int], labels: list[str]) -> list[Answer | ShadowdError]:
        """One call a batch (max_batch), each with its own timeout and timed for the
        latency breaker: one call of many batches has one timeout for them all, which a
        healthy daemon asked of thousands of files overran (the breaker opened); a daemon
        slow at every batch opens the latency breaker, which ends the asking here, and one
        just under that ends it after ASK_MANY_TIMEOUTS timeouts in all (the files not
        asked are opened as any other, later)."""
        out: list[Answer | ShadowdError] = []
        limit = None if self._client is None else self._client.timeout
        until = None if limit is None else time.monotonic() + ASK_MANY_TIMEOUTS * limit
        while len(out) < len(fds):
            if not self._usable() or (until is not None and time.monotonic() >= until):
                why = "its breaker is open" if not self._usable() else "the time to ask is up"
                gone = DaemonUnavailable(f"shadowd not asked of these files ({why})")
                return out + [gone] * (len(fds) - len(out))
            # (Heard at the first call's hello: until then, the protocol's default.)
            at, step = len(out), max(1, (self._limits() or {}).get("max_batch") or 64)
            out += self._ask_batch(fds[at : at + step], labels[at : at + step])
        return out

    def _ask_batch(self, fds: list[int], labels: list[str]) -> list[Answer | ShadowdError]:
        client = self._client
        assert client is not None
        started = time.monotonic()
        held = client._spent()
        try:
            answers = client.ask_many(fds, labels, wait=False)
        except (DaemonUnavailable, NotPermitted, ProtocolViolation) as exc:
            self._failed(exc, started)
            return [exc] * len(fds)
        except ShadowdError as exc:
            return [exc] * len(fds)
        finally:
            self.waited += time.monotonic() - started
        self._worked(started, client._spent() - held)
        return answers

    def _failed(self, exc: ShadowdError, asked: float) -> None:
        """The daemon failed a request asked at *asked* (time.monotonic()): the breaker
        opens for a window from now (doubled after each failed retry). A failure counts
        against the window its request was asked in, whenever it comes: one asked before
        the last window ended (before it opened: another thread's, queued on the
        connection meanwhile, or waiting out a timeout longer than the window) is the
        outage that window is for, not a retry that failed after it; it opens nothing
        more."""
        with self._lock:
            now = time.monotonic()
            if asked < self._down_until:
                return
            self._down_until = now + self._backoff
            window, self._backoff = self._backoff, min(2 * self._backoff, self.max_backoff)
            first, self._down = not self._down, True
        if first:
            logger.warning(
                "shadowd unavailable (%s); copying locally, retrying in %gs", exc, window
            )

    def _worked(self, asked: float, took: float | None = None) -> None:
        """The daemon answered a request asked at *asked*; *took*: in so many seconds
        (None: not timed), the client's own send and wait for the answer alone
        (Client._spent), never a wait for its lock behind other threads' requests. The
        SLOW_IN_A_ROW-th slow answer in a row opens the breaker instead (_failed, as of
        *asked*). An answer that comes while the breaker is open was asked before it
        opened: it changes nothing."""
        client = self._client
        limit = None if client is None else client.timeout
        slow = (
            took is not None
            and client is not None
            and limit is not None
            and took >= SLOW_FRACTION * limit
            and client.version != 1  # its misses wait for its copy
        )
        with self._lock:
            if time.monotonic() < self._down_until:
                # Asked before the breaker opened (nothing is asked while it is
                # open): says nothing of the retry that ends the window (_failed).
                return
            self._slow = self._slow + 1 if slow else 0
            tripped = self._slow >= SLOW_IN_A_ROW
            if not tripped:
                back, self._down = self._down, False
                self._backoff = self.retry_after
        if tripped:
            assert client is not None and limit is not None
            self._failed(
                DaemonTimeout(
                    f"shadowd at {client.socket_path} answered {SLOW_IN_A_ROW} requests in a "
                    f"row in {SLOW_FRACTION:g} of the timeout ({limit:g} s) or more",
                    socket_path=client.socket_path,
                ),
                asked,
            )
        elif back:
            logger.warning("shadowd is back; asking it again")

    def close(self) -> None:
        # What cannot be sent now goes with this Opener. The last request's answer
        # is not waited for; one sent before it is (a daemon whose answer finds the
        # socket closed stops reading it: what came after would be lost).
        with self._lock:
            # From here on an open copied here keeps no source to tell of: nothing
            # would tell of it, or close it (_tell_later).
            self._closing = True
        told = bool(self._told)
        if self._unreported or self._spilled:
            self._report(last=not told)
        if told:
            self._tell(last=True)
        with self._lock:
            self._held.clear()
            index, self._index = self._index, None
            stale = None if index is None else index.retire()
        if stale is not None:
            stale.close()
        self._finalizer()  # the client closed (and the tier, emptied above)

    def _forked(self) -> None:
        # In the child of a fork: the lock may have been held by a thread that is
        # not here, and so may the index (none reads it in the child); the hits
        # not reported yet are the parent's to report. The held fds are the
        # child's own copies of the same sealed memfds: they serve as well here.
        # (The Client makes a connection of its own, the index view reopens
        # through the child's own /proc/self/fd.)
        self._lock = threading.Lock()
        if self._index is not None:
            self._index.users = 0
        self._unreported.clear()
        self._spilled = 0
        self._unreported_hits = 0
        self._reported_at = time.monotonic()
        _let_go(self._told)  # the parent tells of its own
        for told in self._telling:  # in the hands of threads the child does not have
            _let_go(told)
        self._telling = []

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
