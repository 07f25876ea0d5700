# Who may talk to the daemon, and how much of it each peer may use.
#
# Peers are identified by SO_PEERCRED when they connect (and SO_PEERGROUPS
# for their supplementary groups); the allow lists and the connection limits
# are checked right there, before the peer may send anything. Each uid gets
# a share: its connections, a quota of worker jobs and its turn in the
# poller (poller.Flow), so a user whose files hang, or who floods requests
# over many connections, ties up only its own share.
#
# Every admitted connection has a seat at the gate until it leaves. At a
# connection limit, before a peer is refused, the seats whose peers have hung
# up and whose connections can only end stop counting (a burst of short-lived
# connections, accepted before their tasks could see them go, must not turn a
# live client away); the seat stays, uncounted, until its connection leaves.
#
# Must never: admit a peer that the allow lists exclude; count a connection
# twice or forget one (the per-uid record would leak or go negative); stop
# counting a connection that may still serve its peer or hold anything for it;
# block (this runs on the event loop, at every accept); look for gone peers
# before a limit is reached (an accept below the limits costs what it did).
from __future__ import annotations

import array
import collections
import errno
import fcntl
import os
import select
import socket
import struct
import termios
import time
from collections.abc import Callable
from typing import Any

import attrs
import trio

from .copier import Quota
from .errors import RequestError
from .peer_limits import PeerLimits
from .poller import Flow
from .protocol import ErrorCode

# struct ucred: pid_t signed, uid_t and gid_t not (3000000000 is a uid).
_UCRED = struct.Struct("iII")
# socket.SO_PEERGROUPS is missing from some Pythons; Linux has it since 4.13.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_NGROUPS_MAX = 65536


@attrs.frozen
class Peer:
    """Who is on the other end, from SO_PEERCRED at accept time."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def from_socket(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return cls(pid=pid, uid=uid, gid=gid)


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups at connect time (empty if the kernel cannot tell)."""
    for count in (64, _NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, count * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return ()
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % 4])
        return tuple(groups)
    return ()


@attrs.frozen
class AccessPolicy:
    """Which peers may use the daemon, beyond the socket file's own permissions.

    With both lists empty, everyone who can connect to the socket may use it.
    Otherwise a peer is admitted when its uid is in ``allow_uids``, or its
    gid or one of its supplementary groups is in ``allow_gids``. The daemon's
    own uid is always admitted (its operator runs ``shadowd stats``).
    """

    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    owner_uid: int = attrs.field(factory=os.geteuid)

    @property
    def open_to_all(self) -> bool:
        return not self.allow_uids and not self.allow_gids

    def permits(self, peer: Peer, sock: socket.socket) -> bool:
        if self.open_to_all or peer.uid == self.owner_uid or peer.uid in self.allow_uids:
            return True
        if not self.allow_gids:
            return False
        if peer.gid in self.allow_gids:
            return True
        return not self.allow_gids.isdisjoint(peer_groups(sock))


@attrs.define(eq=False)
class UidShare:
    """What one uid holds: its connections, its quota of worker jobs, and the
    descriptors it has the daemon send or hold for it (see inflight.py)."""

    uid: int
    quota: Quota
    connections: int = 0
    #: Descriptors in replies to this uid not known to be read, and held by
    #: the daemon for its replies that wait.
    fds: int = 0
    #: Its connections (for asking each what its peer has read).
    members: set[Any] = attrs.field(factory=set)
    #: When its connections were last asked (monotonic seconds).
    refreshed_at: float = -1e9
    #: Misses that did not wait, queued for a copy slot (filling.Filler), one
    #: per file version: those of lone opens (``asked``: a program is opening
    #: the file now) are started before the items of batches (``told``: files
    #: a client copied itself, or a preload's), each lane first in, first out.
    fills: dict[Any, Any] = attrs.field(factory=dict)
    asked: collections.deque[Any] = attrs.field(factory=collections.deque)
    told: collections.deque[Any] = attrs.field(factory=collections.deque)
    #: Whether a task starts its queued fills (filling.Filler._pump).
    filling: bool = False
    #: Slots of its quota that told files' jobs hold (filling.told_slots bounds them),
    #: and what the pump waits on when they hold all they may: set when one of those
    #: jobs ends, or when a miss is queued in ``asked``.
    told_jobs: int = 0
    told_turn: trio.Event = attrs.field(factory=trio.Event)
    #: Its connections' seats, counted or not, until each leaves.
    seats: set[Seat] = attrs.field(factory=set)
    #: What looking for its gone peers may still cost (made at its first limit).
    sweeps: SweepBudget | None = None
    #: Its place in the poller's order: the loop's time is shared per uid.
    flow: Flow = attrs.field(factory=Flow)


#: The uid of the share of peers turned away whose uid has none (Gate.share_of):
#: no uid's, so it is never one in the gate's map.
TURNED_AWAY_UID = -1

#: Seats that looking for gone peers may poll, per uid and for all uids
#: together: this many at once, and this many more a second (at least twice
#: the limit at hand). A uid flooding the daemon with connections at its
#: limit costs a sweep of its seats a few times a second, not at every accept.
SWEEP_SEATS = 8192


def reads_daemon_fds(uid: int, owner_uid: int) -> bool:
    """Whether a peer of *uid* may read the daemon's descriptors anyway: the kernel
    lets the daemon's uid (*owner_uid*) and root open its /proc/PID/fd/N. The
    index, and reports of hits served through it, are for those peers alone."""
    return uid in (0, owner_uid)


@attrs.define
class SweepBudget:
    """How many seats sweeps may poll: ``size`` at once, ``size`` more a second."""

    size: int
    #: When it was last spent (seconds on the gate's clock); full then.
    at: float
    tokens: float = attrs.field(default=attrs.Factory(lambda self: self.size, takes_self=True))

    def take(self, n: int, now: float) -> bool:
        """Spend *n* at *now*, if there are that many."""
        self.tokens = min(self.size, self.tokens + (now - self.at) * self.size)
        self.at = now
        if n > self.tokens:
            return False
        self.tokens -= n
        return True


@attrs.define(eq=False)
class Seat:
    """One admitted connection's place at the gate, from its accept until it leaves."""

    share: UidShare
    sock: socket.socket
    #: Whether it counts against the connection limits: until it leaves, or
    #: until its peer is found gone (see :meth:`Gate.admit`).
    counted: bool = True
    #: Set when its connection's task first runs: whether the connection holds
    #: nothing for its peer and answers nothing (Connection.waits_holding_nothing).
    #: Before that, it has read nothing and sent nothing.
    idle: Callable[[], bool] | None = None


def _hung_up(seats: list[Seat]) -> list[Seat]:
    """The *seats* whose peers have hung up (one poll, without waiting)."""
    by_fd: dict[int, Seat] = {}
    poll = select.poll()
    for seat in seats:
        fd = seat.sock.fileno()
        if fd >= 0:
            by_fd[fd] = seat
            poll.register(fd, 0)  # POLLHUP is reported whatever is asked for
    return [by_fd[fd] for fd, events in poll.poll(0) if events & select.POLLHUP]


def _queued_bytes(sock: socket.socket) -> int:
    """Bytes of the datagrams waiting to be read on *sock* (all of them: SOCK_SEQPACKET)."""
    buf = array.array("i", [0])
    try:
        fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf, True)
    except OSError:
        return 1  # not known: as if something waited
    return buf[0]


@attrs.define
class Gate:
    """Admits peers at accept time and keeps each uid's share.

    ``hits`` counts, per limit, how often a peer ran into it; the server adds
    its own limits (request size, fds, in-flight requests) to the same map.
    """

    policy: AccessPolicy = attrs.field(factory=AccessPolicy)
    limits: PeerLimits = attrs.field(factory=PeerLimits)
    hits: dict[str, int] = attrs.field(factory=dict)
    refused_peers: int = 0
    #: Seats that count (every uid's).
    clients: int = 0
    _shares: dict[int, UidShare] = attrs.field(factory=dict)
    #: Shares whose connections have all left while their jobs ran or their
    #: replies were unread: forgotten once idle (see :meth:`_forget_lingering`).
    _lingering: set[UidShare] = attrs.field(factory=set)
    _sweeps: SweepBudget | None = None
    #: What closing the sockets of peers turned away whose uid has no share costs
    #: (see :meth:`share_of`), made at the first.
    _turned_away: UidShare | None = None
    #: Seconds, for the sweeps' budgets.
    clock: Callable[[], float] = time.monotonic

    def admit(self, peer: Peer, sock: socket.socket) -> Seat:
        """Seat a new connection of *peer*, or raise the refusal to send it.

        At a connection limit, the seats of the peers that have hung up (of
        every uid, or of *peer*'s) are given back first, when their
        connections can only end (:meth:`_make_room`); *peer* is refused only
        if that leaves no room.
        """
        if not self.policy.permits(peer, sock):
            self.refused_peers += 1
            raise RequestError(
                ErrorCode.NOT_PERMITTED,
                f"uid {peer.uid} (gid {peer.gid}) is not allowed to use this shadowd",
            )
        limits = self.limits
        if self._lingering:
            self._forget_lingering()
        if self.clients >= limits.max_clients and not self._make_room(None):
            self.hit("max_clients")
            raise RequestError(
                ErrorCode.BUSY, f"the daemon serves {limits.max_clients} clients already"
            )
        share = self._shares.get(peer.uid)
        if (
            share is not None
            and share.connections >= limits.max_clients_per_uid
            and not self._make_room(share)
        ):
            self.hit("max_clients_per_uid")
            raise RequestError(
                ErrorCode.BUSY,
                f"uid {peer.uid} has {limits.max_clients_per_uid} connections already",
            )
        if share is None:
            share = UidShare(peer.uid, Quota(limits.max_copies_per_uid, self.hits))
            self._shares[peer.uid] = share
        seat = Seat(share, sock)
        share.seats.add(seat)
        share.connections += 1
        self.clients += 1
        return seat

    def share_of(self, uid: int) -> UidShare:
        """The share that pays for closing a turned-away peer's socket: its uid's, or
        for a uid with none (one not admitted, or with no connection), the one share
        of all such peers (:attr:`turned_away`).

        Not one made per uid (attack 24): the workers of file systems that may
        hang are one pool for every uid, and peers of uids the daemon does not
        admit, whatever their number, must not hold more of it, or more fds,
        than one admitted uid may.
        """
        share = self._shares.get(uid)
        if share is None:
            if self._turned_away is None:
                self._turned_away = UidShare(
                    TURNED_AWAY_UID, Quota(self.limits.max_copies_per_uid, self.hits)
                )
            share = self._turned_away
        return share

    def _make_room(self, share: UidShare | None) -> bool:
        """Give back the seats, of *share*'s uid or of every uid (None), whose peers
        have hung up and whose connections can only end; whether that made room.

        Such a connection has nothing left to read (its next read is the end),
        and its task has not run yet, or waits for a datagram holding nothing
        for its peer (no request in flight, no fd its peer may not have read:
        a peer that only shut its socket down may still read them). It ends
        at its task's next step, and leaves (:meth:`leave`) without counting
        out twice. A connection still answering, or that would, keeps its seat.
        """
        limits = self.limits
        now = self.clock()
        if share is None:
            seats = [s for each in self._shares.values() for s in each.seats if s.counted]
            if self._sweeps is None:
                self._sweeps = SweepBudget(max(SWEEP_SEATS, 2 * limits.max_clients), now)
            budget = self._sweeps
        else:
            seats = [s for s in share.seats if s.counted]
            if share.sweeps is None:
                share.sweeps = SweepBudget(max(SWEEP_SEATS, 2 * limits.max_clients_per_uid), now)
            budget = share.sweeps
        if not budget.take(len(seats), now):
            return False
        for seat in _hung_up(seats):
            if (seat.idle is None or seat.idle()) and _queued_bytes(seat.sock) == 0:
                seat.counted = False
                seat.share.connections -= 1
                self.clients -= 1
        if share is None:
            return self.clients < limits.max_clients
        return share.connections < limits.max_clients_per_uid

    def leave(self, seat: Seat) -> None:
        """*seat*'s connection ended (its socket closed): it no longer counts."""
        share = seat.share
        share.seats.discard(seat)
        if seat.counted:
            seat.counted = False
            share.connections -= 1
            self.clients -= 1
        if not share.seats and not self.forget_if_idle(share):
            self._lingering.add(share)

    def forget_if_idle(self, share: UidShare) -> bool:
        """Forget *share* if nothing of its uid is left (no seat, no job, no fd
        counted, no fill); whether it is forgotten."""
        # A share whose jobs still run stays, so that the uid cannot get a
        # fresh quota by reconnecting while its old jobs hang; so does one
        # with a seat given back whose connection has not left yet.
        if self._shares.get(share.uid) is not share:
            return True  # forgotten already
        if share.seats or not share.quota.idle or share.fds > 0 or share.filling:
            return False
        del self._shares[share.uid]
        return True

    def _forget_lingering(self) -> None:
        # At most one share per uid: a uid whose last connection left with
        # work under way, checked again at the next accept or stats.
        self._lingering = {share for share in self._lingering if not self.forget_if_idle(share)}

    def hit(self, limit: str) -> None:
        self.hits[limit] = self.hits.get(limit, 0) + 1

    @property
    def uids(self) -> int:
        """The uids with a connection, or with work of theirs still under way."""
        if self._lingering:
            self._forget_lingering()
        return len(self._shares)
