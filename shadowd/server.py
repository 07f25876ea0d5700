# The I/O loop: serves on the listening socket and answers connections in
# the poller's rounds.
#
# One trio thread owns the cache. Connections are accepted, and each one's
# life run, by accepting.py. Connections waiting for a request are parked in
# the poller (poller.py); in each round, for each ready connection, one
# datagram is read here and answered at once where it can be: a hit whole in
# the C extension when it is built (hotcalls.answer_hit: recvmsg, statx,
# lookup, reopen through /proc/self/fd, sendmsg), anything else parsed by
# protocol.py and answered by dispatch.py. What must wait goes on in the
# connection's nursery (connection.py); opens of host files are decided in
# opens.py, private files in private.py, stats gathered in metrics.py (the
# fd count in a worker thread).
#
# Must never: await between a cache lookup and the use of what it returned;
# leave a received fd unclosed on any path (errors, truncation, disconnects,
# shutdown); block the loop on a client's filesystem (fds of untrusted mounts
# are inspected, copied and closed in worker threads, see source.py).
from __future__ import annotations

import logging
import resource
import socket
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, cast

import attrs
import trio

from . import hotcalls
from .accepting import Acceptor
from .access import AccessPolicy, Gate
from .cache import Cache, CacheLimits, Entry
from .connection import (
    GONE,
    HIT_REPLY_LENGTH,
    MSG_CTRUNC,
    MSG_TRUNC,
    Bug,
    Connection,
    Malformed,
    Received,
    Services,
)
from .copier import Copier
from .dispatch import Dispatcher
from .fdrange import FdRange
from .fds import close_all
from .index import ORDERED_STORES, Index, slots_for
from .inflight import FdBudget
from .leases import ignore_sigio
from .memfd import SealedFile
from .metrics import StatsCollector, count_open_fds
from .opens import HostOpens
from .peer_limits import PeerLimits
from .pins import Pins
from .poller import Poller
from .private import PrivateFiles
from .protocol import (
    MAX_NAMESPACE_BYTES,
    SCM_MAX_FD,
    ConnectionState,
    Hello,
    IndexRequest,
    Lookup,
    Open,
    OpenBatch,
    ProtocolError,
    Report,
    WireLimits,
)
from .refusals import Refusals
from .source import MountTrust
from .stats import Latencies, Stats
from .warmup import warm_up
from .watches import Watches

if TYPE_CHECKING:
    from .fdstore import FdStore

__all__ = ["Connection", "Server", "ServerConfig", "count_open_fds"]

logger = logging.getLogger(__name__)

# recvmsg hands MSG_CMSG_CLOEXEC back in the flags; only these two matter.
_TRUNCATED = MSG_TRUNC | MSG_CTRUNC
_recv = hotcalls.recv
_answer_hit = hotcalls.answer_hit
_now = time.perf_counter
_READY = ConnectionState.READY


@attrs.frozen
class ServerConfig:
    """Everything the server needs to know; see ``shadowd serve --help``."""

    #: Where to create the socket; "" when the service manager passes it.
    socket_path: str
    socket_mode: int = 0o600
    socket_group: str | int | None = None
    cache: CacheLimits = attrs.field(factory=CacheLimits)
    wire: WireLimits = attrs.field(factory=WireLimits)
    copy_workers: int = 4
    # Workers for files of filesystems that may hang (FUSE, NFS): each uid
    # holds at most peers.max_copies_per_uid of them, so this many take
    # that many hostile uids to use up.
    remote_workers: int = 64
    max_inflight: int = 32
    shutdown_grace: float = 10.0
    top_files: int = 10
    #: Seconds for which the costly parts of stats (resident memory, the top
    #: files: milliseconds of the loop's time with thousands of entries) are
    #: reused, so that asking for stats in a loop cannot keep the loop from
    #: answering hits; and the least time between the starts of two fd
    #: counts (made in a worker thread, metrics.py).
    stats_refresh: float = 1.0
    #: Descriptors the service manager keeps for warm restarts (its
    #: FileDescriptorStoreMax=); 0 keeps none.
    fd_store_max: int = 0
    access: AccessPolicy = attrs.field(factory=AccessPolicy)
    peers: PeerLimits = attrs.field(factory=PeerLimits)
    #: Publish the index of the cache to peers that may read it (index.py).
    index: bool = True

    def __attrs_post_init__(self) -> None:
        if self.max_inflight < 1 or self.copy_workers < 1 or self.remote_workers < 1:
            raise ValueError("max_inflight and the worker counts must be at least 1")

    def configured_limits(self) -> dict[str, int]:
        """What the configuration allows, as the stats' ``limits`` say it."""
        wire, peers = self.wire, self.peers
        return {
            "max_request": wire.max_request,
            "max_batch": wire.max_batch,
            "max_fds": wire.max_fds,
            "max_clients": peers.max_clients,
            "max_clients_per_uid": peers.max_clients_per_uid,
            "max_inflight": self.max_inflight,
            "max_copies_per_uid": peers.max_copies_per_uid,
            "max_fds_per_uid": peers.max_fds_per_uid,
            "max_pinned_bytes_per_uid": peers.max_pinned_bytes_per_uid,
        }

    def hello_limits(self) -> dict[str, int]:
        """What a hello reply says of this daemon's limits."""
        return {
            "max_request": self.wire.max_request,
            "max_batch": self.wire.max_batch,
            "max_file_size": self.cache.max_file_size,
            "max_inflight": self.max_inflight,
            "max_namespace": MAX_NAMESPACE_BYTES,
        }


class Server:
    """The shadowd request server. Run :meth:`serve`; stop with :meth:`shutdown`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cache = Cache(config.cache)
        self.copier = Copier(
            local_limiter=trio.CapacityLimiter(config.copy_workers),
            remote_limiter=trio.CapacityLimiter(config.remote_workers),
            max_file_size=config.cache.max_file_size,
        )
        self.mounts = MountTrust()
        self.gate = Gate(config.access, config.peers)
        self.refusals = Refusals()
        self.pins = Pins(
            per_uid=config.peers.max_pinned_bytes_per_uid,
            # All uids together: as much again as the cache (attack 40).
            total=max(config.cache.max_bytes, config.peers.max_pinned_bytes_per_uid),
            hits=self.gate.hits,
        )
        fd_limit = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
        #: Half the fd limit for fds in flight and held for replies: the
        #: kernel's limit on fds in flight is the same number, and the other
        #: half is left for cached memfds, connections and received fds.
        self.budget = FdBudget(per_uid=config.peers.max_fds_per_uid, total=max(64, fd_limit // 2))
        #: How long hits, misses and copies take (in the stats).
        self.latency = Latencies()
        self.opens = HostOpens(
            cache=self.cache,
            copier=self.copier,
            mounts=self.mounts,
            refusals=self.refusals,
            limits=config.cache,
            pins=self.pins,
            latency=self.latency,
            budget=self.budget,
        )
        #: Client sockets held to be closed (their peers' fds queued past their
        #: uid's bound, or datagrams left to read): a sixteenth of the fd limit
        #: at most, then the acceptor waits (attack 27).
        self.opens.closer.max_sockets = max(64, fd_limit // 16)
        self.private = PrivateFiles(
            cache=self.cache,
            copier=self.copier,
            limits=config.cache,
            pins=self.pins,
            track=self.opens.guard.track,
            made_here=self.opens.guard.made_here,
        )
        self.collector = StatsCollector(
            cache=self.cache,
            limits=config.cache,
            copier=self.copier,
            gate=self.gate,
            refusals=self.refusals,
            opens=self.opens,
            private=self.private,
            pins=self.pins,
            budget=self.budget,
            latency=self.latency,
            index=lambda: self.index,
            index_hits=lambda: self.dispatcher.index_hits,
            configured=config.configured_limits(),
            top_files=config.top_files,
            refresh=config.stats_refresh,
        )
        self.dispatcher = Dispatcher(
            opens=self.opens,
            private=self.private,
            stats=self.stats,
            latency=self.latency,
            hello_limits=config.hello_limits(),
            fresh_stats=self.collector.fresh,
        )
        #: The index of the cache, while serving (index.py).
        self.index: Index | None = None
        self._connections: set[Connection] = set()
        # Made by serve(): a Server that never serves holds no epoll fd.
        self._poller: Poller[Connection]
        self._services: Services
        self._poller_scope = trio.CancelScope()
        self._watch_scope = trio.CancelScope()
        # One receive buffer for every parked connection: the poller reads
        # and parses a datagram before it reads the next.
        self._buf = bytearray(config.wire.max_request)
        self._view = memoryview(self._buf)
        # Room for every fd a datagram may carry, not only for what a request
        # may: the kernel closes what does not fit, here, on the loop (attack 19).
        self._ancsize = socket.CMSG_SPACE(SCM_MAX_FD * 4)
        self._max_inflight = config.max_inflight
        self._draining = False
        # Made here, not in serve(): a shutdown() that comes before serve()
        # enters them cancels them all the same.
        self._warmup_scope = trio.CancelScope()
        self._accept_scope = trio.CancelScope()
        self._outer_scope = trio.CancelScope()
        self._max_file_size = config.cache.max_file_size
        # Bound once: hotcalls.answer_hit gets them on every request.
        self._index = self.cache.index
        self._is_local = self.mounts.is_local
        self._count_host_hit = self.cache.count_host_hit
        self._found = self.opens.guard.found
        self._answer_open = self.dispatcher.answer_open
        self._hit_latency = self.latency.hit.observe
        # Set by serve(): the cache's inotify fd, and what reads its events.
        self._watch_fd = -1
        self._drain: Callable[[], None] = lambda: None
        self._answer_batch = self.dispatcher.answer_batch
        self._answer_lookup = self.dispatcher.answer_lookup
        self._answer_hello = self.dispatcher.answer_hello
        self._answer_index = self.dispatcher.answer_index
        self._answer_report = self.dispatcher.answer_report

    @property
    def clients(self) -> int:
        return self.gate.clients

    @property
    def fd_store(self) -> FdStore | None:
        """The warm-restart store, when the daemon runs with one."""
        return self.collector.fd_store

    @fd_store.setter
    def fd_store(self, store: FdStore | None) -> None:
        self.collector.fd_store = store

    def stats(self, viewer: int | None = None) -> Stats:
        """The stats as uid *viewer* may see them (None: everything)."""
        return self.collector.stats(viewer)

    # -- lifecycle -------------------------------------------------------

    async def serve(
        self,
        listen_sock: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on *listen_sock* (listening, non-blocking) until :meth:`shutdown`.

        *task_status* is told started once the warm-up is over and connections
        are accepted, or once the server stopped before that (:meth:`shutdown`
        during the warm-up): then :attr:`draining` is already true, and it
        never served.
        """
        listen_sock.setblocking(False)
        ignore_sigio()  # a broken read lease (leases.py) signals its holder
        watches = self.opens.watches
        watches.open()
        self._watch_fd = watches.fd
        self._drain = watches.drain
        self.mounts.open()
        self.opens.guard.track_unwatched_entries()  # restored from the fd store
        if ORDERED_STORES and self.config.index:
            max_entries = self.config.cache.max_entries
            self.index = Index(slots_for(max_entries), FdRange.reserve(max_entries))
            self.cache.add_observer(self.index)
            self.dispatcher.index = self.opens.guard.index = self.index
        self._poller = Poller()
        self.copier.watches = watches
        self.dispatcher.poller = self._poller
        closer = self.opens.closer
        self._services = Services(
            poller=self._poller,
            refusals=self.refusals,
            gate=self.gate,
            budget=self.budget,
            discard=self.opens.discard,
            close_socket=self.opens.closer.close_socket,
            handle=self.dispatcher.handle,
            max_inflight=self._max_inflight,
            answer=self._answer_ready,
            count_report=self.dispatcher.count_report,
        )
        acceptor = Acceptor(
            gate=self.gate,
            refusals=self.refusals,
            collector=self.collector,
            wire=self.config.wire,
            services=self._services,
            connections=self._connections,
            draining=lambda: self._draining,
            pace=self._poller.longest_round,
            has_room_for_sockets=closer.has_room_for_sockets,
            socket_room=closer.socket_room,
            sockets_closing=lambda: closer.sockets_closing,
        )
        started = False
        try:
            with self._outer_scope:
                async with trio.open_nursery() as nursery:
                    self.opens.nursery = self.collector.nursery = nursery
                    nursery.start_soon(self._run_poller)
                    nursery.start_soon(self._read_watches, watches)
                    # Before saying started (and READY=1): what a fresh
                    # daemon's first requests would pay for (warmup.py).
                    # shutdown() cuts it short: a daemon that is stopping
                    # has no first request to warm up for.
                    with self._warmup_scope:
                        await warm_up(
                            workers=self.config.copy_workers,
                            limiter=self.copier.local_limiter,
                            wire=self.config.wire,
                            hello_limits=self.config.hello_limits(),
                        )
                        # And a first fd count (in a worker thread), after the
                        # warm-up let go of its fds: no stats answer lacks one.
                        await self.collector.fds.since(time.monotonic())
                    with self._accept_scope:
                        started = True
                        task_status.started()
                        # Not even a connection already in the backlog is
                        # accepted once shutdown() ran (accept() does not
                        # wait, so a cancelled scope would not stop it).
                        if not self._draining:
                            await acceptor.run(listen_sock, nursery)
        finally:
            self.opens.nursery = self.collector.nursery = None
            self.copier.watches = None
            self._watch_fd, self._drain = -1, lambda: None
            self._poller.close()
            self.mounts.close()
            self.cache.clear()
            watches.close()
            if self.index is not None:
                self.dispatcher.index = self.opens.guard.index = None
                self.cache.remove_observer(self.index)
                self.index.close()
                self.index = None
            self.refusals.flush_log()
            logger.info(
                "stopped after %.1fs: %d hits, %d misses",
                time.monotonic() - self.collector.started,
                self.cache.hits,
                self.cache.misses,
            )
        if not started:
            # The shutdown's grace ran out, or stop_now() came, during the
            # warm-up: the caller's start() returns all the same, and
            # draining tells it that this server never served.
            task_status.started()

    def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, then stop.

        A warm-up still running is cut short, and then nothing is ever
        accepted. Connections stop reading at once; what they already
        received is answered. After ``shutdown_grace`` seconds whatever remains (a copy
        stuck on a hung mount) is cancelled.
        """
        if self._draining:
            return
        self._draining = True
        self._warmup_scope.cancel()
        self._accept_scope.cancel()
        # Nobody reads any more: every connection's read scope goes too.
        self._poller_scope.cancel()
        self._watch_scope.cancel()  # as before: the events count for hits only
        # Files queued only to fill the cache are let go of, not copied (attack 35).
        self.opens.filler.stop()
        for conn in list(self._connections):
            conn.read_scope.cancel()
        self._outer_scope.deadline = trio.current_time() + self.config.shutdown_grace

    def stop_now(self) -> None:
        """Cancel everything still running, in-flight copies included."""
        self.shutdown()
        self._outer_scope.cancel()

    @property
    def draining(self) -> bool:
        return self._draining

    # -- the poller's rounds: one datagram per ready connection -----------

    async def _read_watches(self, watches: Watches) -> None:
        """Read the cache's inotify events as they come.

        Not a member of the poller's set: a request is never answered from an
        entry while events wait (the C hit path declines when FIONREAD says
        any do, the Python path reads them after the request), so a wake-up
        for a request need not read them first, which cost every hit a read.
        """
        with self._watch_scope:
            while True:
                await trio.lowlevel.wait_readable(watches.fd)
                watches.drain()

    async def _run_poller(self) -> None:
        with self._poller_scope:
            await self._poller.run(self._answer_ready)

    def _answer_ready(self, conn: Connection) -> bool:
        """Read and answer one datagram of a parked connection, without waiting.

        False hands the connection to its task, with what it must do in
        ``conn.job``. Never raises an Exception: a bug becomes that task's.
        """
        try:
            return self._answer_datagram(conn)
        except Exception as exc:
            return conn.hand_over(Bug(exc))

    def _answer_datagram(self, conn: Connection) -> bool:
        if self._draining:
            # A round that was due as shutdown() ran: read nothing more, as
            # a connection's own task would not have either.
            return True
        if conn.inflight >= self._max_inflight or conn.share.fds >= self.budget.per_uid:
            return conn.hand_over(None)  # its task waits for a slot, or for fds to drain
        budget = self.budget
        self.dispatcher.started = started = _now()
        try:
            if (
                conn.proto.state is _READY
                and not conn.sending
                and conn.share.fds < budget.per_uid
                and budget.used < budget.total
            ):
                # With the C extension, a hit is answered whole in there:
                # read, checked, looked up, reopened, replied to. Anything
                # else comes back as a datagram for the path below.
                got = _answer_hit(
                    conn.sock,
                    self._buf,
                    self._ancsize,
                    self._index,
                    self._is_local,
                    self._max_file_size,
                    self._poller.closing,
                    conn.proto.version == 2,
                    self._watch_fd,
                )
                if type(got) is not tuple:
                    entry = cast(Entry, got)
                    self._count_host_hit(entry)
                    file = cast(SealedFile, entry.file)
                    if file.sole_uid is not None and file.sole_uid != conn.share.uid:
                        self._found(file, conn.share.uid)  # another uid's copy (pins.py)
                    conn.sent(HIT_REPLY_LENGTH, 1)
                    self._hit_latency(_now() - started)
                    return True
                n, flags, fds = got
            else:
                n, flags, fds = _recv(conn.sock, self._buf, self._ancsize)
        except BlockingIOError:
            return True
        except OSError:
            return conn.hand_over(GONE)
        # Every inotify event of a change made before this request was sent
        # is read before it is answered (the C path declines while any wait).
        self._drain()
        if n == 0 and not fds and not flags & MSG_TRUNC:
            return conn.hand_over(GONE)  # orderly shutdown by the peer
        try:
            if flags & _TRUNCATED:
                event = conn.proto.receive(
                    self._view[:n],
                    fds,
                    data_truncated=bool(flags & MSG_TRUNC),
                    fds_truncated=bool(flags & MSG_CTRUNC),
                )
            else:  # the usual case, without the keywords' cost
                event = conn.proto.receive(self._view[:n], fds)
        except ProtocolError as exc:
            return conn.hand_over(Malformed(exc, fds, flags))
        except BaseException:
            close_all(fds)
            raise
        if type(event) is Open:
            return self._answer_open(conn, event)
        if type(event) is OpenBatch:
            return self._answer_batch(conn, event, fds)
        if type(event) is Lookup:  # it carries no fds: the protocol saw to that
            return self._answer_lookup(conn, event)
        # Neither carries fds either. Answered here, not in the connection's
        # task: a new client's pipelined hello and index request then cost
        # no wake-up of that task, and no leaving and rejoining the poller.
        if type(event) is Hello:
            return self._answer_hello(conn, event)
        if type(event) is IndexRequest:
            return self._answer_index(conn, event)
        if type(event) is Report:
            return self._answer_report(conn, event)
        return conn.hand_over(Received(event, fds))
