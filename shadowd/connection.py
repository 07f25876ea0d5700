# One client connection: its task, what the poller hands it, and sending its
# replies in order, at once or waiting for room.
#
# A connection spends its life parked in the poller (poller.py), which reads
# and answers what it can without waiting (dispatch.py), refusals included
# (refuse_now). What must wait (a miss, or a reply that finds the socket
# full) runs in the connection's nursery, counted in flight; at --max-inflight the connection
# stops being read until one finishes (back-pressure). The rare requests
# (stats, publish) are handed to the connection's own task.
#
# Must never: reorder replies (a reply waits behind those already waiting,
# in the order they were made: tasks started in one step of the loop run in
# any order, so a reply's turn is taken when it is made, not when its task
# first runs);
# leave a received fd unclosed on any path (a job that is never answered is
# dropped with its fds); close on the loop a socket that still has a peer's
# fds queued (the kernel would release them here: drain_final); let one
# client's bug end anyone else's connection; do more than a bounded amount of
# work on what a closing connection left queued (FinalReports).
from __future__ import annotations

import collections
import enum
import errno
import functools
import logging
import socket
import time
from collections.abc import Awaitable, Callable, Sequence

import attrs
import trio

from . import hotcalls
from .access import Gate, Peer, UidShare
from .errors import RequestError
from .fds import FdHolder, close_all, close_holders, fds_from_ancdata, scm_rights
from .inflight import FdBudget, Outbox
from .poller import Poller
from .protocol import (
    MAX_REPORT,
    SCM_MAX_FD,
    ErrorCode,
    ErrorReply,
    ProtocolError,
    Reply,
    Report,
    Request,
    ServerConnection,
)
from .refusals import INTERNAL_MESSAGE, Refusals

logger = logging.getLogger(__name__)

# Plain ints: socket.MSG_* are IntFlag members, and `int & IntFlag` goes
# through enum machinery that costs a microsecond per request.
SEND_FLAGS = int(socket.MSG_NOSIGNAL)
MSG_TRUNC = int(socket.MSG_TRUNC)
MSG_CTRUNC = int(socket.MSG_CTRUNC)
_send = hotcalls.send
# Datagrams read and dropped from a connection that ends with requests
# unread (say, at shutdown), in its task; the rest are read on in turn with
# every other such socket (Closer.drain_later): a thousand connections ending
# in one round each reading 1,024 held the loop seconds (attack 31).
DRAIN_AT_CLOSE = 8
#: Seconds between asking the kernel what all of a uid's peers have read,
#: when the uid is at its bound of fds (see Connection.room).
REFRESH_EVERY = 0.01
#: How long a connection of a uid at its bound of fds waits before looking again.
OVER_BUDGET_PAUSE = 0.05
#: The reports a closing connection left queued are counted up to this many
#: files in all (FinalReports): about one report's work more, on the loop.
FINAL_REPORT_FILES = MAX_REPORT
#: ...in at most this many of its first datagrams (each read whole): those the
#: connection's own drain reads (DRAIN_AT_CLOSE); the rest are read on by the
#: Closer with every other such socket, and not looked into (attack 31)...
FINAL_REPORT_DATAGRAMS = DRAIN_AT_CLOSE
#: ...until they took this many bytes: unpacking a pathological datagram of
#: 64 KiB takes milliseconds (docs/security.md, attack 14), so at most two are.
FINAL_REPORT_BYTES = 64 * 1024
#: Datagrams a new connection's task answers before it first parks.
FIRST_ANSWERED = 2
#: A stand-in length for a hit's reply sent by the C path: every reply
#: shorter than about 190 bytes is charged the same by the kernel.
HIT_REPLY_LENGTH = 64


class PeerGone(Exception):
    """The client went away while we were answering it."""


# What the poller hands to a connection's task: whatever it read that cannot
# be answered without waiting. Each owns the fds it names until answered.


@attrs.frozen
class Gone:
    """The peer closed the connection, or reading it failed."""


GONE = Gone()


@attrs.frozen
class Bug:
    """An exception of ours escaped while the poller answered."""

    exc: Exception


@attrs.frozen
class Malformed:
    """A datagram the protocol refused, with the fds that came with it."""

    exc: ProtocolError
    fds: list[int]
    flags: int


@attrs.frozen
class Received:
    """A request to answer in the connection's task, with its fds."""

    event: Request
    fds: list[int]


Job = Gone | Bug | Malformed | Received


@attrs.frozen
class Services:
    """What every connection uses of the server."""

    poller: Poller[Connection]
    refusals: Refusals
    gate: Gate
    #: The descriptors peers may have the daemon send or hold (inflight.py).
    budget: FdBudget
    #: Closes fds a client sent that will not be used, never blocking the loop.
    discard: Callable[[Sequence[int], UidShare], None]
    #: Closes a client's socket as drain_final left it (Closer.close_socket): at
    #: once when empty, else held (counted, attack 27) while it is read on, a slice
    #: at a time (Left.MORE), or until a worker on the uid's quota closes it.
    close_socket: Callable[[socket.socket, UidShare, Left], None]
    #: Answers a request handed to the connection's task (stats, publish).
    handle: Callable[[Connection, Request, list[FdHolder]], Awaitable[None]]
    max_inflight: int
    #: The poller's answer to one datagram of a connection (server.py).
    answer: Callable[[Connection], bool]
    #: Counts a report read from a closing connection's queue, unanswered
    #: (dispatch.py; raises the refusal of a peer that may not report).
    count_report: Callable[[Connection, Report], None]


class Left(enum.Enum):
    """What drain_final left queued on a socket."""

    #: Nothing: closing the socket releases nothing of its peer's.
    EMPTY = "empty"
    #: More datagrams than it read, none it could not take: read on, a slice at
    #: a time (Closer.drain_later), never a reason to wait for a worker (attack 26).
    MORE = "more"
    #: A datagram with fds past the uid's bound, or not known: the socket is
    #: closed by a worker on the uid's quota.
    HELD = "held"


class FinalReports:
    """The `report` requests a closing connection left queued, counted unanswered.

    A client that closes without waiting for the answers to its last reports
    (client/c's shadowd_close, an Opener's close) has them queued behind an
    answer that fails once it is gone (EPIPE), or behind the reset its close
    made; its connection then ends with them unread. Statistics are no
    reason to answer anything, but what a client told should be counted:
    drain_final hands each datagram it reads whole to this, which counts the
    reports among them, bounded (FINAL_REPORT_FILES, FINAL_REPORT_DATAGRAMS,
    FINAL_REPORT_BYTES), and ignores the rest (nothing else is answered or done).
    """

    def __init__(self, conn: Connection) -> None:
        self.conn = conn
        #: The size drain_final reads each datagram with.
        self.size = conn.proto.limits.max_request
        self.files = 0
        self.datagrams = 0
        self.bytes = 0

    def __call__(self, data: bytes, nfds: int) -> bool:
        """Count *data* if it is a report (none carries fds); False: take no more."""
        self.datagrams += 1
        self.bytes += len(data)
        conn = self.conn
        if not nfds:
            try:
                event = conn.proto.receive(data)
            except ProtocolError:
                pass  # not a request: nothing to count
            except Exception as exc:  # a bug of ours: logged, the close goes on
                conn.services.refusals.internal(conn.peer, None, exc)
                return False
            else:
                if type(event) is Report:
                    try:
                        conn.services.count_report(conn, event)
                    except RequestError:
                        return False  # a peer that may not report: none is read
                    except Exception as exc:  # a bug of ours: logged, the close goes on
                        conn.services.refusals.internal(conn.peer, event.id, exc)
                        return False
                    self.files += len(event.hits)
        return (
            self.files < FINAL_REPORT_FILES
            and self.datagrams < FINAL_REPORT_DATAGRAMS
            and self.bytes < FINAL_REPORT_BYTES
        )


def drain_final(
    sock: socket.socket,
    limit: int,
    room: Callable[[int], bool] = lambda _n: True,
    take: FinalReports | None = None,
) -> tuple[list[int], Left]:
    """Make what the peer queued on *sock* final and read it, before *sock* is closed:
    the fds its datagrams carried (for the caller to give to the Closer), and what is
    left queued (:class:`Left`; EMPTY: closing *sock* releases nothing of the peer's).

    Reading is shut down first (the peer's sends fail from then on), so the
    queue only shrinks. Each datagram is received with room for every fd it
    may carry, and with its sender's credentials (SO_PASSCRED), which tell a
    datagram (even an empty one without fds) from the end of the queue. At
    most *limit* datagrams are read; while *room(n)* says no to n more fds,
    a datagram that carries fds is left queued and the queue is not empty. It
    is looked at with MSG_PEEK and room for the credentials alone: the kernel
    installs none of its fds (MSG_CTRUNC says it has some) and drops its
    duplicate references without a close(2). Installed duplicates would have
    to be closed here, and although the queue still holds each file (never
    its last close), every close(2) flushes the file: a FUSE server that
    never answers FLUSH would hold the loop (attack 23).

    *take*: each datagram read whole (at most take.size bytes), with how many
    fds it carried, until it says no more (FinalReports); else one byte of
    each is read.

    The kernel drops what a socket still has queued in the thread that closes
    it (or that reads it without room for its fds), and the last close of a
    file can wait without bound: a TCP socket set to linger over unsent data
    (attack 21), a large file a client unlinked (attack 19). So a socket whose
    queue is not empty must be closed where waiting costs only its peer's uid
    (Closer.discard: a worker on its quota), never on the loop.
    """
    fds: list[int] = []
    try:
        sock.shutdown(socket.SHUT_RD)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_PASSCRED, 1)
    except OSError:
        return fds, Left.HELD  # not known: as if something were queued
    for _ in range(limit):
        if not room(len(fds) + SCM_MAX_FD):
            try:
                _n, anc, flags, _ = sock.recvmsg(1, _CREDS_ANCSIZE, _DROP_FLAGS | _PEEK)
            except OSError:
                return fds, Left.HELD
            if not anc:
                return fds, Left.EMPTY  # the end (see below)
            if flags & MSG_CTRUNC or fds_from_ancdata(anc):
                return fds, Left.HELD  # it carries fds: left queued, for a worker's close
            # No fds: taken out of the queue below, with nothing to release.
        try:
            data, anc, flags, _ = sock.recvmsg(
                1 if take is None else take.size, _FINAL_ANCSIZE, _DROP_FLAGS
            )
        except OSError:
            return fds, Left.HELD
        if not anc:
            return fds, Left.EMPTY  # the end: a datagram comes with its sender's credentials
        if flags & MSG_CTRUNC:
            # No room in our fd table: the kernel dropped the rest, here.
            logger.warning("fds of a closing connection dropped by the kernel (fd limit)")
        got = fds_from_ancdata(anc)
        fds.extend(got)
        if take is not None and not flags & MSG_TRUNC and not take(data, len(got)):
            take = None
    return fds, Left.MORE


_DROP_FLAGS = int(socket.MSG_DONTWAIT | socket.MSG_CMSG_CLOEXEC)
_PEEK = int(socket.MSG_PEEK)
# Room for every fd a datagram may carry and for its sender's credentials.
_FINAL_ANCSIZE = socket.CMSG_SPACE(SCM_MAX_FD * 4) + socket.CMSG_SPACE(12)
# Room for the credentials alone: a peek installs no fd (attack 23).
_CREDS_ANCSIZE = socket.CMSG_SPACE(12)


@attrs.define(eq=False)
class Connection:
    sock: socket.socket
    peer: Peer
    share: UidShare
    proto: ServerConnection
    services: Services
    read_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    #: The replies waiting to be sent, in the order they were made: an Event
    #: each, set when it is that reply's turn (the first one's at once). Empty
    #: when none waits: then a reply may be sent at once.
    sending: collections.deque[trio.Event] = attrs.field(factory=collections.deque)
    inflight: int = 0
    slot_freed: trio.Event = attrs.field(factory=trio.Event)
    nursery: trio.Nursery | None = None
    #: Set by the poller, with :attr:`job`, when the task must take over.
    wakeup: trio.Event = attrs.field(factory=trio.Event)
    job: Job | None = None
    #: What was sent that the peer may not have read (inflight.py).
    outbox: Outbox = attrs.field(factory=Outbox)
    #: Whether its task answers a job the poller handed over.
    answering: bool = False
    #: What the peer sent is left queued, as drain_final said (None: not drained yet).
    _left: Left | None = attrs.field(default=None, init=False)

    # -- descriptors sent and held for the peer (inflight.py) ------------

    def sent(self, length: int, nfds: int) -> None:
        """Count a reply of *length* bytes carrying *nfds* fds, just sent."""
        self.outbox.sent(length, nfds)
        if nfds:
            self._use(nfds)

    def _use(self, n: int) -> None:
        self.services.budget.use(self.share, n)

    def room(self, want: int) -> bool:
        """Whether this peer's uid may have *want* more fds sent or held for it.

        When it seems not, what its peers read since is asked of the kernel
        first: this connection always, all of the uid's at most every
        REFRESH_EVERY seconds (a hostile uid's flood costs it, not the loop).
        """
        share = self.share
        budget = self.services.budget
        if budget.allows(share.fds, want):
            return True
        self.refresh_share()
        return budget.allows(share.fds, want)

    def refresh_share(self) -> None:
        """Ask what this uid's peers have read: this connection always, all of the uid's
        at most every REFRESH_EVERY seconds (a hostile uid's flood costs it, not the loop)."""
        share = self.share
        now = time.monotonic()
        if now - share.refreshed_at >= REFRESH_EVERY:
            share.refreshed_at = now
            for conn in list(share.members):
                conn.refresh()
        else:
            self.refresh()

    def refresh(self) -> None:
        """Forget the fds of the replies the peer has read."""
        if self.outbox.fds:
            freed = self.outbox.refresh(self.sock)
            if freed:
                self._use(-freed)

    def waits_holding_nothing(self) -> bool:
        """Whether it holds nothing for its peer and answers nothing: no request in
        flight, none handed to its task (but its end) or being answered there, no fd
        sent that the peer may not have read (asked of the kernel). The gate asks, for a peer
        that hung up: such a connection ends at its next read (or, lingering, at its
        next look)."""
        if self.answering or self.inflight or not isinstance(self.job, Gone | None):
            return False
        self.refresh()
        return not self.outbox.fds

    def over_budget(self, want: int) -> RequestError:
        """The refusal for a request that would take the uid past its bound."""
        self.services.gate.hit("max_fds_per_uid")
        return RequestError(
            ErrorCode.BUSY,
            f"uid {self.peer.uid} has {self.share.fds} descriptors in replies not read yet "
            f"or waiting to be sent (at most {self.services.budget.per_uid}, and the daemon "
            f"{self.services.budget.total} in all); read the replies, then ask again",
        )

    # -- the connection's task -------------------------------------------

    async def run(self) -> None:
        """Serve this connection until it ends; the caller closes it (:meth:`close`)."""
        async with trio.open_nursery() as inflight:
            self.nursery = inflight
            with self.read_scope:
                try:
                    await self._read_loop()
                except PeerGone:
                    pass

    async def _read_loop(self) -> None:
        """Park the connection in the poller; answer what it hands back."""
        fd = self.sock.fileno()
        poller = self.services.poller
        max_inflight = self.services.max_inflight
        budget = self.services.budget
        flow = self.share.flow
        # A new client's first requests are usually there already: its hello,
        # and often an index request right behind it (client/c sends both
        # before it waits). Answered before the connection is parked, they
        # cost no round of the poller; anything more waits for one, and so
        # does a uid that has had more than its share of the loop (a flood of
        # new connections is answered in turn with everyone else).
        for _ in range(FIRST_ANSWERED):
            if not poller.answer_first(self.services.answer, self, flow) or self.job is not None:
                break
        while True:
            if self.inflight >= max_inflight:
                # Back-pressure: read nothing more until a slow request finishes.
                self.services.gate.hit("max_inflight")
                self.slot_freed = trio.Event()
                await self.slot_freed.wait()
                continue
            if self.share.fds >= budget.per_uid:
                # The uid holds all the fds it may (unread replies, replies
                # waiting, fds of a hung file system waiting to be closed):
                # read nothing more from it, so no more fds come in, until
                # that drains. What its peers read shows only when asked.
                self.refresh_share()
                if self.share.fds >= budget.per_uid:
                    await trio.sleep(OVER_BUDGET_PAUSE)
                    continue
            if self.job is None:
                self.wakeup = trio.Event()
                poller.park(fd, self, flow)
                try:
                    await self.wakeup.wait()
                finally:
                    poller.unpark(fd)  # nothing to do when the poller did it
            job, self.job = self.job, None
            if job is not None:
                self.answering = True
                try:
                    more = await self.answer(job)
                finally:
                    self.answering = False
                if not more:
                    return

    def hand_over(self, job: Job | None) -> bool:
        """Wake the task to do *job* (None: wait for a slot); False for the poller."""
        self.job = job
        self.wakeup.set()
        return False

    async def answer(self, job: Job) -> bool:
        """Answer what the poller handed over; False when the connection must end."""
        if isinstance(job, Received):
            holders = [FdHolder(fd) for fd in job.fds]
            event = job.event
            try:
                await self.services.handle(self, event, holders)
            except (PeerGone, trio.Cancelled):
                raise
            except RequestError as exc:
                await self.refuse(event.id, exc)
            except Exception as exc:
                await self.internal_error(event.id, exc)
            finally:
                close_holders(holders)
            return True
        if isinstance(job, Malformed):
            error = job.exc
            self._refused_fds(job.fds, job.flags)
            self.services.refusals.count(self.peer, error.code, error.message)
            await self.send(self.proto.error_for(error))
            return not error.fatal
        if isinstance(job, Bug):
            raise job.exc
        return False  # GONE

    def close(self) -> bool:
        """After the task ended: give back what it held, then close the socket.

        False when the peer has not read every fd sent to it yet: closing
        our end would not take them out of its queue (they would stay in
        flight, counted against the daemon's user, out of our sight), so
        the socket stays open until they are read (see :meth:`release`).
        """
        self.services.poller.unpark(self.sock.fileno())
        if self.job is not None:
            self._drop_job(self.job)
            self.job = None
        self._drain()
        self.refresh()
        if self.outbox.fds:
            return False
        self.release()
        return True

    def release(self) -> None:
        """Close the socket for good; what it sent no longer counts."""
        if self.outbox.fds:
            self._use(-self.outbox.fds)
            self.outbox = Outbox()
        self.share.members.discard(self)
        # What close() left queued (its uid had no room for more fds then)
        # goes as the rest did, its fds through discard; more datagrams than a
        # drain reads are read on, a slice at a time; a queue with fds past the
        # uid's bound is closed by a worker on its quota, never here.
        if self._left is not Left.EMPTY:
            self._drain()
        assert self._left is not None
        self.services.close_socket(self.sock, self.share, self._left)

    def _drain(self) -> None:
        budget, share = self.services.budget, self.share
        # Reports are counted from the first drain only: one bounded amount of work.
        take = FinalReports(self) if self._left is None and self.proto.reports else None
        fds, self._left = drain_final(
            self.sock, DRAIN_AT_CLOSE, lambda n: budget.allows(share.fds, n), take
        )
        if fds:
            self.services.discard(fds, self.share)

    def _drop_job(self, job: Job) -> None:
        """Get rid of a job its task never answered (it was cancelled first)."""
        if isinstance(job, Malformed):
            self._refused_fds(job.fds, job.flags)
            return
        if isinstance(job, Bug):
            self.services.refusals.internal(self.peer, None, job.exc)
            return
        if isinstance(job, Received):
            self.services.discard(job.fds, self.share)

    def _refused_fds(self, fds: list[int], flags: int) -> None:
        """Account for and get rid of the fds of a datagram the protocol refused."""
        gate = self.services.gate
        if flags & MSG_TRUNC:
            gate.hit("max_request")
        if flags & MSG_CTRUNC or len(fds) > self.proto.limits.max_fds:
            gate.hit("max_fds")  # more than a request may carry
        self.services.refusals.fds_refused += len(fds)
        self.services.discard(fds, self.share)

    # -- what waits, in the connection's nursery -------------------------

    def start_deferred(
        self, id: int, fn: Callable[..., Awaitable[None]], *args: object, holds: int = 0
    ) -> None:
        """Run *fn* for request *id* in the connection's nursery, counted in flight.

        *holds* is the most fds it holds for the peer meanwhile (its received
        fds, the served ones waiting to be sent), counted in the uid's budget.
        """

        async def run() -> None:
            try:
                await fn(self, *args)
            except PeerGone:
                pass
            except Exception:
                try:
                    await self.internal_error(id)
                except PeerGone:
                    pass
            finally:
                self.inflight -= 1
                self.slot_freed.set()
                if holds:
                    self._use(-holds)

        assert self.nursery is not None
        self.nursery.start_soon(run)
        self.inflight += 1  # once it is sure to run (and to count itself out)
        if holds:
            self._use(holds)

    def refuse_now(self, id: int, exc: Exception) -> bool:
        """Refuse request *id* from the poller's round: a refusal (a RequestError) or
        a bug of ours (anything else, logged), its reply sent now, in turn with the
        replies before it (reply_now). False when the peer is gone.

        Not from the nursery: a task started there sends only when it first runs,
        and the next round could answer this connection's next request first.
        """
        if not isinstance(exc, RequestError):
            exc = self._bug(id, exc)
        data, _ = self.proto.send(self._refusal(id, exc))
        return self.reply_now(id, data, (), ())

    async def refuse(self, id: int, exc: RequestError) -> None:
        await self.send(self._refusal(id, exc))

    async def internal_error(self, id: int, exc: BaseException | None = None) -> None:
        """Answer a request that hit a bug of ours (*exc*, or the one being handled); log it."""
        await self.refuse(id, self._bug(id, exc))

    def _refusal(self, id: int, exc: RequestError) -> ErrorReply:
        """The reply refusing request *id* with *exc*, counted."""
        self.services.refusals.count(self.peer, exc.code, exc.message)
        return ErrorReply(id=id, code=exc.code, message=exc.message)

    def _bug(self, id: int, exc: BaseException | None) -> RequestError:
        """A bug of ours met answering request *id*, logged; the refusal it gets."""
        self.services.refusals.internal(self.peer, id, exc)
        return RequestError(ErrorCode.INTERNAL, INTERNAL_MESSAGE)

    # -- sending ---------------------------------------------------------

    async def send(self, reply: Reply) -> None:
        """Send one reply; the fds in it stay the caller's to close.

        When the kernel refuses its fds (ETOOMANYREFS: the daemon's user
        has its limit of fds in flight), the peer is told `busy` instead.
        """
        data, fds = self.proto.send(reply)
        try:
            if not self.send_now(data, fds):
                await self.send_bytes(data, fds)
        except TooManyInFlight:
            if reply.id is None:
                raise PeerGone() from None
            await self.refuse(reply.id, too_many_in_flight())

    def send_now(self, data: bytes, fds: Sequence[int]) -> bool:
        """Send without waiting; False when the socket is full or others queue."""
        if self.sending:
            return False  # keep the order of replies already waiting
        try:
            _send(self.sock, data, fds)
        except BlockingIOError:
            return False
        except OSError as exc:
            if exc.errno == errno.ETOOMANYREFS:
                raise TooManyInFlight() from exc
            raise PeerGone() from exc
        self.sent(len(data), len(fds))
        return True

    async def send_bytes(
        self, data: bytes, fds: Sequence[int], turn: trio.Event | None = None
    ) -> None:
        """Send one datagram once the replies made before it are sent, waiting for
        room in the socket. *turn*: its place in that order, taken when the reply
        was made (take_turn); else it is taken now."""
        if turn is None:
            turn = self.take_turn()
        try:
            await turn.wait()
            anc = scm_rights(fds)
            while True:
                try:
                    self.sock.sendmsg([data], anc, SEND_FLAGS)
                    break
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(self.sock)
                except OSError as exc:
                    if exc.errno == errno.ETOOMANYREFS:
                        raise TooManyInFlight() from exc
                    raise PeerGone() from exc
        finally:
            self._turn_done(turn)
        self.sent(len(data), len(fds))

    def take_turn(self) -> trio.Event:
        """A place behind the replies waiting now; set when it is this one's turn."""
        turn = trio.Event()
        self.sending.append(turn)
        if len(self.sending) == 1:
            turn.set()
        return turn

    def _turn_done(self, turn: trio.Event) -> None:
        """*turn*'s reply is sent, or will not be: the next one's turn."""
        sending = self.sending
        first = sending[0] is turn
        sending.remove(turn)
        if first and sending:
            sending[0].set()

    def reply_now(self, id: int, data: bytes, fds: tuple[int, ...], owned: tuple[int, ...]) -> bool:
        """Send the reply to request *id* now, or from the connection's nursery in turn.

        For the poller's round. The *owned* fds (those sent among them) are
        closed once it is sent: at the end of the round, or by the task that
        sends it later. False when the peer is gone (the task takes over).
        """
        try:
            if not self.sending:  # else replies queue: keep their order
                _send(self.sock, data, fds)
                self.sent(len(data), len(fds))
                closing = self.services.poller.close_later
                for fd in owned:
                    closing(fd)
                return True
        except BlockingIOError:
            pass
        except OSError as exc:
            close_all(owned)
            if exc.errno == errno.ETOOMANYREFS:
                return self.refuse_now(id, too_many_in_flight())
            return self.hand_over(GONE)
        except BaseException:
            close_all(owned)
            raise
        # Its turn is taken now, in the order the round made the replies: the
        # tasks started in this step of the loop run in any order.
        turn = self.take_turn()
        try:
            # Counted in flight: a client that does not read its replies
            # meets --max-inflight, then the daemon stops reading it.
            send = functools.partial(_send_later, id=id, turn=turn)
            self.start_deferred(id, send, data, fds, owned, holds=len(owned))
        except BaseException:
            self._turn_done(turn)
            close_all(owned)
            raise
        return True


async def _send_later(
    conn: Connection,
    data: bytes,
    fds: tuple[int, ...],
    owned: tuple[int, ...],
    *,
    id: int,
    turn: trio.Event,
) -> None:
    try:
        try:
            await conn.send_bytes(data, fds, turn)
        finally:
            close_all(owned)
    except TooManyInFlight:
        await conn.refuse(id, too_many_in_flight())


class TooManyInFlight(Exception):
    """The kernel refused a reply's fds: the daemon's user has its limit in flight."""


def too_many_in_flight() -> RequestError:
    return RequestError(
        ErrorCode.BUSY,
        "the daemon has its limit of descriptors in flight to its clients; ask again shortly",
    )
