# Accepting connections and seeing each through its life: a new peer is
# admitted by the gate (access.py), or told why not without waiting and
# turned away; an admitted one is served by its connection's task
# (connection.py) until it ends; then its socket stays open, while its peer
# has not read every fd sent to it, until it has.
#
# Connections are taken in slices, each as long as the poller's longest
# round since the last slice (one connection at least; ACCEPT_MAX_TIME and
# ACCEPT_BUDGET connections at most), then the rest of the loop runs. While
# the rounds are quick, that is one connection per turn of the loop: a flood
# of connects costs a client that is already connected almost nothing. While
# they are long (another uid's costly datagrams), the backlog is taken about
# as fast as the rounds go: the kernel's backlog is one queue for every uid,
# in the order they connected, and taken one per turn, a connection waited a
# whole round for each one queued before it.
#
# A peer turned away may have sent datagrams before it was accepted, with
# descriptors: read without room for them, or closed unread, they are closed
# by the kernel in the thread that does it, and such a last close can wait
# without bound (a TCP socket lingering over unsent data, attack 21; the free
# of a large file a client unlinked, attack 19). So its reading is shut down
# and what it queued received here (connection.drain_final), the descriptors
# given to the Closer on its uid's quota; a socket with more datagrams than a
# turn-away reads is read on a slice a turn (Closer.drain_later, attack 26),
# and one with fds past its uid's bound is closed by a worker on that quota,
# never on the loop.
#
# Must never: wait on a peer that is turned away (one reply tried without
# waiting, a bounded drain, the close); take connections for longer than its
# slice without letting the rest of the loop run; let a bug serving one
# connection end the server or anyone else's connection; close, while serving, the socket
# of a finished connection whose peer has fds unread in it (they would stay
# in flight, counted against the daemon's user); keep a uid's place at the
# gate after its connection is gone, or give it back twice (its seat leaves
# the gate once, when the socket is closed, whether or not the gate stopped
# counting it earlier for a peer that hung up).
from __future__ import annotations

import errno
import logging
import socket
import time
from collections.abc import Awaitable, Callable

import attrs
import trio

from . import hotcalls
from .access import Gate, Peer, Seat, reads_daemon_fds
from .connection import SEND_FLAGS, Connection, Services, drain_final
from .errors import RequestError
from .fds import LONG_LIVED_BASE
from .metrics import StatsCollector
from .protocol import ErrorReply, ServerConnection, WireLimits, encode_reply
from .refusals import Refusals

# Logged as the server, as before these lines moved here from server.py: the
# name operators (and tests/test_cli.py) know them by.
logger = logging.getLogger("shadowd.server")

# Datagrams read from a peer that is turned away (the rest, if any, are the
# Closer's, with its socket).
_DRAIN_AT_REFUSAL = 8

#: Seconds of accepting in one slice at most, however long the poller's
#: rounds take (an accept and its admission take tens of microseconds, the
#: connection's task starting as much again).
ACCEPT_MAX_TIME = 0.01
#: Connections taken in one slice at most.
ACCEPT_BUDGET = 256
#: Seconds between two log lines saying that accepting pauses.
PAUSED_SAID_EVERY = 1.0

_now = time.perf_counter


_accept_peer = hotcalls.accept_peer
# A connection's socket object, made from the fd accept_peer gives (non-blocking
# already): with SOCK_NONBLOCK in its type the object says so without a system call.
_CONN_TYPE = socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK


@attrs.define(eq=False)
class Acceptor:
    """Accepts connections on the listening socket and runs each one's life."""

    gate: Gate
    refusals: Refusals
    #: Counts every connection admitted (clients_total in the stats).
    collector: StatsCollector
    wire: WireLimits
    services: Services
    #: The connections whose task runs (the server's set: shutdown stops their reading).
    connections: set[Connection]
    #: Whether the server is shutting down.
    draining: Callable[[], bool]
    #: Seconds of the poller's longest round since the last call (Poller.longest_round):
    #: the length of a slice of accepts.
    pace: Callable[[], float] = lambda: 0.0
    #: Whether the Closer holds fewer client sockets than it may (Closer.has_room_for_sockets).
    has_room_for_sockets: Callable[[], bool] = lambda: True
    #: Waits until it does (Closer.socket_room).
    socket_room: Callable[[], Awaitable[None]] = trio.lowlevel.checkpoint
    #: How many it holds (for the log).
    sockets_closing: Callable[[], int] = lambda: 0
    #: When a pause of accepting was last logged, and the pauses since.
    _paused_said: float = attrs.field(default=-1e9, init=False)
    _pauses: int = attrs.field(default=0, init=False)

    async def run(self, lsock: socket.socket, nursery: trio.Nursery) -> None:
        """Accept on *lsock* until cancelled; each connection runs in *nursery*."""
        backoff = 0.01
        began, length, taken = _now(), self._first_slice(), 0
        lfd = lsock.fileno()
        while True:
            try:
                # In one call: no exception when none waits, the socket made
                # once, on its high number, non-blocking from accept4 on.
                accepted = _accept_peer(lfd, LONG_LIVED_BASE)
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The pending connection stays queued; try again soon.
                    logger.warning("accept failed (%s); retrying in %.2fs", exc.strerror, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    began, length, taken = _now(), self._slice(), 0
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            if accepted is None:
                await trio.lowlevel.wait_readable(lsock)
                began, length, taken = _now(), self._first_slice(), 0
                continue
            backoff = 0.01
            fd, pid, uid, gid = accepted
            sock = socket.socket(socket.AF_UNIX, _CONN_TYPE, 0, fileno=fd)
            self._take(sock, Peer(pid=pid, uid=uid, gid=gid), nursery)
            if not self.has_room_for_sockets():
                # Client sockets held to be closed are at their bound: each is a
                # descriptor of the daemon's for as long as its peer's closes
                # wait. Taking more would fill the fd table (and the kernel would
                # drop what it cannot install, on the loop, attack 27); the
                # connections wait in the kernel's backlog meanwhile.
                self.gate.hit("max_sockets_closing")
                self._say_paused()
                await self.socket_room()
                began, length, taken = _now(), self._first_slice(), 0
                continue
            taken += 1
            if taken >= ACCEPT_BUDGET or _now() - began >= length:
                # Peers that connect faster than we accept (a flood, hostile
                # or not) must not keep every other connection waiting until
                # the backlog is empty; nor must the poller's rounds (another
                # uid's costly datagrams) hold the backlog to one a turn.
                await trio.lowlevel.checkpoint()
                began, length, taken = _now(), self._slice(), 0

    def _say_paused(self) -> None:
        """Log that accepting pauses, at most once a PAUSED_SAID_EVERY: a peer whose
        sockets keep the Closer at its bound makes a pause of each socket closed (936
        lines in 1.7 s of attack 33's peers with short queues); each is counted in
        limit_hits.max_sockets_closing all the same."""
        self._pauses += 1
        now = _now()
        if now - self._paused_said < PAUSED_SAID_EVERY:
            return
        logger.warning(
            "%d client sockets wait to be closed; not accepting until one is "
            "(%d pauses since this was last said)",
            self.sockets_closing(),
            self._pauses,
        )
        self._paused_said, self._pauses = now, 0

    def _slice(self) -> float:
        """Seconds of accepting before the rest of the loop runs again."""
        return min(ACCEPT_MAX_TIME, self.pace())

    def _first_slice(self) -> float:
        """The same after a wait: a round that long ago says nothing of now."""
        self.pace()
        return 0.0

    def _take(self, sock: socket.socket, peer: Peer, nursery: trio.Nursery) -> None:
        """Admit the accepted *sock* of *peer* (its task started in *nursery*) or turn
        it away."""
        try:
            seat = self.gate.admit(peer, sock)
        except RequestError as exc:
            self._turn_away(sock, peer, exc)
            return
        self.collector.clients_total += 1
        nursery.start_soon(self._run_connection, sock, peer, seat, nursery)

    def _turn_away(self, sock: socket.socket, peer: Peer, exc: RequestError) -> None:
        """Tell a refused peer why (without waiting), then close its connection."""
        self.refusals.count(peer, exc.code, exc.message)
        data, _ = encode_reply(ErrorReply(id=None, code=exc.code, message=exc.message))
        try:
            sock.sendmsg([data], [], SEND_FLAGS)
        except OSError:
            pass  # it left already, or its buffer is full: the close tells it enough
        # What a close here may wait on goes on the peer's uid's share, or on
        # the one share of all turned-away peers whose uid has none (attack 24).
        share = self.gate.share_of(peer.uid)
        budget, discard = self.services.budget, self.services.discard
        fds, left = drain_final(sock, _DRAIN_AT_REFUSAL, lambda n: budget.allows(share.fds, n))
        if fds:
            discard(fds, share)
        # Closed now if nothing is left queued; else held, counted against
        # the sockets the Closer may hold (run() waits for room, attack 27).
        self.services.close_socket(sock, share, left)

    # -- one connection --------------------------------------------------

    async def _run_connection(
        self, sock: socket.socket, peer: Peer, seat: Seat, nursery: trio.Nursery
    ) -> None:
        conn = Connection(
            sock=sock,
            peer=peer,
            share=seat.share,
            # Only root and the daemon's uid may report index hits (dispatch.py):
            # another peer's reports are refused unread.
            proto=ServerConnection(
                self.wire, reports=reads_daemon_fds(peer.uid, self.services.gate.policy.owner_uid)
            ),
            services=self.services,
        )
        seat.idle = conn.waits_holding_nothing
        self.connections.add(conn)
        seat.share.members.add(conn)
        logger.debug("client connected: pid %d uid %d gid %d", peer.pid, peer.uid, peer.gid)
        lingers = False
        try:
            if self.draining():
                conn.read_scope.cancel()
            await conn.run()
        except Exception:
            # A bug of ours: end this connection, keep serving everyone else.
            self.refusals.internal_errors += 1
            logger.exception("error serving pid %d; connection closed", peer.pid)
        finally:
            self.connections.discard(conn)
            if not conn.close():
                if not self.draining():
                    lingers = True
                    nursery.start_soon(self._linger, conn, seat)
                else:
                    conn.release()  # no longer serving: let it all go
            if not lingers:
                self.gate.leave(seat)
            logger.debug("client gone: pid %d", peer.pid)

    async def _linger(self, conn: Connection, seat: Seat) -> None:
        """Keep a finished connection's socket until its peer read every fd sent.

        Closing our end would leave them in the peer's queue, in flight and
        counted against the daemon's user for as long as the peer likes; open,
        they stay counted against the peer's uid (and its connections).
        """
        try:
            delay = 0.05
            while conn.outbox.fds:
                await trio.sleep(delay)
                delay = min(2 * delay, 1.0)
                conn.refresh()
        finally:
            conn.release()
            self.gate.leave(seat)
