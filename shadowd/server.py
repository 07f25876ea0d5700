# The I/O loop: accepts connections, reads datagrams, answers requests.
#
# One trio thread owns the cache. Connections waiting for a request are parked
# in the poller (poller.py), which answers a hit right there, without any
# await between lookup and reply (recvmsg, statx, fcntl, open of
# /proc/self/fd/N, sendmsg; the round's fds closed together at its end), in
# one call into the C extension when it is built (hotcalls.answer_hit). What
# must wait goes on in the connection's nursery, counted in flight: a miss
# becomes a flight copied in a worker thread, a reply that does not fit waits
# for room, and the connection goes on reading meanwhile. The rare requests
# (hello, stats, publish) are handed to the connection's own task.
#
# Must never: await between a cache lookup and the use of what it returned;
# leave a received fd unclosed on any path (errors, truncation, disconnects,
# shutdown); block the loop on a client's filesystem (fds of untrusted mounts
# are inspected, copied and closed in worker threads, see source.py).
from __future__ import annotations

import errno
import logging
import os
import resource
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import TYPE_CHECKING, cast

import attrs
import trio

from . import __version__, hotcalls
from .access import AccessPolicy, Gate, Peer, PeerLimits, UidShare
from .cache import Admission, Cache, CacheLimits, Entry, HostKey, PrivateKey, Shareable
from .copier import Copier, Flight
from .errors import RequestError, refusing_os_errors, request_error_from_os
from .fds import FdHolder, close_all, move_high, scm_rights
from .memfd import SealedFile
from .poller import Poller
from .private import (
    PrivateCounters,
    adopt,
    copy_published,
    memfd_seals,
    private_key,
    seal_in_place,
)
from .protocol import (
    MAX_NAMESPACE_BYTES,
    BatchOpened,
    ConnectionState,
    ErrorCode,
    ErrorReply,
    Hello,
    HelloReply,
    Lookup,
    LookupMiss,
    Open,
    OpenBatch,
    Opened,
    OpenedItem,
    ProtocolError,
    Publish,
    Refusal,
    Reply,
    Request,
    ServerConnection,
    StatsReply,
    StatsRequest,
    WireLimits,
    encode_reply,
)
from .source import MountTrust, SourceStat, check_readable, check_regular, stat_nosync
from .stats import Stats, TopEntry

if TYPE_CHECKING:
    from .fdstore import FdStore

logger = logging.getLogger(__name__)

_SOL_SOCKET = socket.SOL_SOCKET
# Plain ints: socket.MSG_* are IntFlag members, and `int & IntFlag` goes
# through enum machinery that costs a microsecond per request.
_SEND_FLAGS = int(socket.MSG_NOSIGNAL)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)
# recvmsg hands MSG_CMSG_CLOEXEC back in the flags; only these two matter.
_TRUNCATED = _MSG_TRUNC | _MSG_CTRUNC
_recv = hotcalls.recv
_send = hotcalls.send
_send_reopened = hotcalls.send_reopened
_answer_hit = hotcalls.answer_hit
_READY = ConnectionState.READY
_INTERNAL_MESSAGE = "internal error in shadowd; see its log"
# Datagrams read and dropped from a peer that is turned away, and from a
# connection that ends with requests unread (say, at shutdown).
_DRAIN_AT_REFUSAL = 8
_DRAIN_AT_CLOSE = 1024


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
    #: Seconds for which the costly parts of stats (the fd count, resident
    #: memory, the top files: milliseconds of the loop's time with thousands
    #: of entries) are reused, so that asking for stats in a loop cannot keep
    #: the loop from answering hits.
    stats_refresh: float = 1.0
    #: Descriptors the service manager keeps for warm restarts (its
    #: FileDescriptorStoreMax=); 0 keeps none.
    fd_store_max: int = 0
    access: AccessPolicy = attrs.field(factory=AccessPolicy)
    peers: PeerLimits = attrs.field(factory=PeerLimits)

    def __attrs_post_init__(self) -> None:
        if self.max_inflight < 1 or self.copy_workers < 1 or self.remote_workers < 1:
            raise ValueError("max_inflight and the worker counts must be at least 1")


class _Throttled:
    """A copy must wait: its uid's quota of worker jobs is in use."""


THROTTLED = _Throttled()


class PeerGone(Exception):
    """The client went away while we were answering it."""


# What the poller hands to a connection's task: whatever it read that cannot
# be answered without waiting. Each owns the fds it names until answered.


@attrs.frozen
class _Gone:
    """The peer closed the connection, or reading it failed."""


GONE = _Gone()


@attrs.frozen
class _Bug:
    """An exception of ours escaped while the poller answered."""

    exc: Exception


@attrs.frozen
class _Malformed:
    """A datagram the protocol refused, with the fds that came with it."""

    exc: ProtocolError
    fds: list[int]
    flags: int


@attrs.frozen
class _Received:
    """A request to answer in the connection's task, with its fds."""

    event: Request
    fds: list[int]


Job = _Gone | _Bug | _Malformed | _Received


@attrs.define(eq=False)
class Connection:
    sock: socket.socket
    peer: Peer
    share: UidShare
    proto: ServerConnection
    read_scope: trio.CancelScope = attrs.field(factory=trio.CancelScope)
    send_lock: trio.Lock = attrs.field(factory=trio.Lock)
    inflight: int = 0
    slot_freed: trio.Event = attrs.field(factory=trio.Event)
    nursery: trio.Nursery | None = None
    #: Set by the poller, with :attr:`job`, when the task must take over.
    wakeup: trio.Event = attrs.field(factory=trio.Event)
    job: Job | None = None


@attrs.frozen
class _CostlyStats:
    """The parts of stats that take a scan (of fds, of entries) to compute."""

    at: float
    open_fds: int
    rss_bytes: int
    top_by_hits: tuple[TopEntry, ...]
    top_by_bytes: tuple[TopEntry, ...]


@attrs.frozen
class Served:
    """A descriptor ready to send, and what to say about it."""

    fd: FdHolder
    size: int
    hit: bool


def _renumbered(sock: socket.socket) -> socket.socket:
    """The same connection on a high fd number (see fds.LONG_LIVED_BASE)."""
    fd = move_high(sock.detach())
    return socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=fd)


@attrs.frozen
class Waiting:
    """A local source fd whose copy waits for a slot of its uid's quota."""

    holder: FdHolder


# What an open that cannot be answered at once waits for: a flight, an fd of
# an untrusted filesystem (a worker inspects it), or a slot of the quota.
Pending = Flight | FdHolder | Waiting


def count_open_fds() -> int:
    try:
        return len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    except OSError:
        return -1


def resident_bytes() -> int:
    """The daemon's resident memory (memfd pages it has not mapped are not in it)."""
    try:
        with open("/proc/self/statm", "rb") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return -1


@attrs.define
class LogBudget:
    """At most *per_minute* lines of one kind a minute, so a client cannot flood the log."""

    per_minute: int = 20
    window_start: float = -60.0
    used: int = 0
    suppressed: int = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """(may log now, lines suppressed since the last one that was logged)."""
        if now - self.window_start >= 60.0:
            self.window_start, self.used = now, 0
        if self.used >= self.per_minute:
            self.suppressed += 1
            return False, 0
        self.used += 1
        suppressed, self.suppressed = self.suppressed, 0
        return True, suppressed


class Server:
    """The shadowd request server. Run :meth:`serve`; stop with :meth:`shutdown`."""

    def __init__(self, config: ServerConfig) -> None:
        self.config = config
        self.cache = Cache(config.cache)
        self.copier = Copier(
            local_limiter=trio.CapacityLimiter(config.copy_workers),
            remote_limiter=trio.CapacityLimiter(config.remote_workers),
        )
        self.mounts = MountTrust()
        self.gate = Gate(config.access, config.peers)
        self.private = PrivateCounters()
        self.fds_refused = 0
        self.clients_total = 0
        self.refused = 0
        self.refused_by_code: dict[str, int] = {}
        self._refusal_log = LogBudget()
        self._internal_log = LogBudget()
        #: The warm-restart store, when the daemon runs with one.
        self.fd_store: FdStore | None = None
        self.uncached = 0
        self.internal_errors = 0
        self._connections: set[Connection] = set()
        # Made by serve(): a Server that never serves holds no epoll fd.
        self._poller: Poller[Connection]
        self._poller_scope = trio.CancelScope()
        # One receive buffer for every parked connection: the poller reads
        # and parses a datagram before it reads the next.
        self._buf = bytearray(config.wire.max_request)
        self._view = memoryview(self._buf)
        self._ancsize = socket.CMSG_SPACE(config.wire.max_fds * 4)
        self._max_inflight = config.max_inflight
        self._costly_stats: _CostlyStats | None = None
        self._started = time.monotonic()
        self._draining = False
        self._accept_scope = trio.CancelScope()
        self._outer_scope = trio.CancelScope()
        self._nursery: trio.Nursery | None = None
        self._max_file_size = config.cache.max_file_size
        # Bound once: hotcalls.answer_hit gets them on every request.
        self._index = self.cache.index
        self._is_local = self.mounts.is_local
        self._count_host_hit = self.cache.count_host_hit
        self._hello_limits = {
            "max_request": config.wire.max_request,
            "max_batch": config.wire.max_batch,
            "max_file_size": config.cache.max_file_size,
            "max_inflight": config.max_inflight,
            "max_namespace": MAX_NAMESPACE_BYTES,
        }

        peers = config.peers
        self._limits = {
            "max_request": config.wire.max_request,
            "max_batch": config.wire.max_batch,
            "max_fds": config.wire.max_fds,
            "max_clients": peers.max_clients,
            "max_clients_per_uid": peers.max_clients_per_uid,
            "max_inflight": config.max_inflight,
            "max_copies_per_uid": peers.max_copies_per_uid,
        }

    @property
    def clients(self) -> int:
        return self.gate.clients

    # -- lifecycle -------------------------------------------------------

    async def serve(
        self,
        listen_sock: socket.socket,
        *,
        task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Serve on *listen_sock* (listening, non-blocking) until :meth:`shutdown`."""
        listen_sock.setblocking(False)
        self._poller = Poller()
        try:
            with self._outer_scope:
                async with trio.open_nursery() as nursery:
                    self._nursery = nursery
                    nursery.start_soon(self._run_poller)
                    with self._accept_scope:
                        task_status.started()
                        await self._accept_loop(listen_sock, nursery)
        finally:
            self._nursery = None
            self._poller.close()
            self.cache.clear()
            logger.info(
                "stopped after %.1fs: %d hits, %d misses",
                time.monotonic() - self._started,
                self.cache.hits,
                self.cache.misses,
            )

    def shutdown(self) -> None:
        """Stop accepting, let in-flight requests finish, then stop.

        Connections stop reading at once; what they already received is
        answered. After ``shutdown_grace`` seconds whatever remains (a copy
        stuck on a hung mount) is cancelled.
        """
        if self._draining:
            return
        self._draining = True
        self._accept_scope.cancel()
        # Nobody reads any more: every connection's read scope goes too.
        self._poller_scope.cancel()
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

    # -- accepting -------------------------------------------------------

    async def _accept_loop(self, lsock: socket.socket, nursery: trio.Nursery) -> None:
        backoff = 0.01
        while True:
            try:
                sock, _ = lsock.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(lsock)
                continue
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM):
                    # The pending connection stays queued; try again soon.
                    logger.warning("accept failed (%s); retrying in %.2fs", exc.strerror, backoff)
                    await trio.sleep(backoff)
                    backoff = min(backoff * 2, 1.0)
                    continue
                if exc.errno in (errno.ECONNABORTED, errno.EPROTO, errno.EINTR):
                    continue
                raise
            backoff = 0.01
            try:
                sock = _renumbered(sock)
                sock.setblocking(False)
                peer = Peer.from_socket(sock)
            except OSError:
                sock.close()
                continue
            try:
                share = self.gate.admit(peer, sock)
            except RequestError as exc:
                self._turn_away(sock, peer, exc)
                continue
            self.clients_total += 1
            nursery.start_soon(self._run_connection, sock, peer, share)

    def _turn_away(self, sock: socket.socket, peer: Peer, exc: RequestError) -> None:
        """Tell a refused peer why (without waiting), then close its connection."""
        self._count_refusal(peer, exc.code, exc.message)
        data, _ = encode_reply(ErrorReply(id=None, code=exc.code, message=exc.message))
        try:
            sock.sendmsg([data], [], _SEND_FLAGS)
        except OSError:
            pass  # it left already, or its buffer is full: the close tells it enough
        _drop_unread(sock, _DRAIN_AT_REFUSAL)
        sock.close()

    # -- one connection --------------------------------------------------

    async def _run_connection(self, sock: socket.socket, peer: Peer, share: UidShare) -> None:
        conn = Connection(
            sock=sock, peer=peer, share=share, proto=ServerConnection(self.config.wire)
        )
        self._connections.add(conn)
        logger.debug("client connected: pid %d uid %d gid %d", peer.pid, peer.uid, peer.gid)
        try:
            async with trio.open_nursery() as inflight:
                conn.nursery = inflight
                with conn.read_scope:
                    if self._draining:
                        conn.read_scope.cancel()
                    try:
                        await self._read_loop(conn)
                    except PeerGone:
                        pass
        except Exception:
            # A bug of ours: end this connection, keep serving everyone else.
            self.internal_errors += 1
            logger.exception("error serving pid %d; connection closed", peer.pid)
        finally:
            self._poller.unpark(sock.fileno())
            if conn.job is not None:
                self._drop_job(conn, conn.job)
                conn.job = None
            self._connections.discard(conn)
            self.gate.leave(share)
            _drop_unread(sock, _DRAIN_AT_CLOSE)
            sock.close()
            logger.debug("client gone: pid %d", peer.pid)

    async def _read_loop(self, conn: Connection) -> None:
        """Park the connection in the poller; answer what it hands back."""
        fd = conn.sock.fileno()
        while True:
            if conn.inflight >= self._max_inflight:
                # Back-pressure: read nothing more until a slow request finishes.
                self.gate.hit("max_inflight")
                conn.slot_freed = trio.Event()
                await conn.slot_freed.wait()
                continue
            if conn.job is None:
                conn.wakeup = trio.Event()
                self._poller.park(fd, conn)
                try:
                    await conn.wakeup.wait()
                finally:
                    self._poller.unpark(fd)  # nothing to do when the poller did it
            job, conn.job = conn.job, None
            if job is not None and not await self._answer(conn, job):
                return

    async def _run_poller(self) -> None:
        with self._poller_scope:
            await self._poller.run(self._answer_ready)

    # -- the poller's side: answer at once, or hand over -----------------

    def _answer_ready(self, conn: Connection) -> bool:
        """Read and answer one datagram of a parked connection, without waiting.

        False hands the connection to its task, with what it must do in
        ``conn.job``. Never raises an Exception: a bug becomes that task's.
        """
        try:
            return self._answer_datagram(conn)
        except Exception as exc:
            return self._hand_over(conn, _Bug(exc))

    def _hand_over(self, conn: Connection, job: Job | None) -> bool:
        conn.job = job
        conn.wakeup.set()
        return False

    def _answer_datagram(self, conn: Connection) -> bool:
        if self._draining:
            # A round that was due as shutdown() ran: read nothing more, as
            # a connection's own task would not have either.
            return True
        if conn.inflight >= self._max_inflight:
            return self._hand_over(conn, None)  # its task waits for a slot
        try:
            if conn.proto.state is _READY and not conn.send_lock.locked():
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
                )
                if type(got) is not tuple:
                    self._count_host_hit(cast(Entry, got))
                    return True
                n, flags, fds = got
            else:
                n, flags, fds = _recv(conn.sock, self._buf, self._ancsize)
        except BlockingIOError:
            return True
        except OSError:
            return self._hand_over(conn, GONE)
        if n == 0 and not fds and not flags & _MSG_TRUNC:
            return self._hand_over(conn, GONE)  # orderly shutdown by the peer
        try:
            if flags & _TRUNCATED:
                event = conn.proto.receive(
                    self._view[:n],
                    fds,
                    data_truncated=bool(flags & _MSG_TRUNC),
                    fds_truncated=bool(flags & _MSG_CTRUNC),
                )
            else:  # the usual case, without the keywords' cost
                event = conn.proto.receive(self._view[:n], fds)
        except ProtocolError as exc:
            return self._hand_over(conn, _Malformed(exc, fds, flags))
        except BaseException:
            close_all(fds)
            raise
        if type(event) is Open:
            return self._answer_open(conn, event)
        if type(event) is OpenBatch:
            return self._answer_batch(conn, event, fds)
        if type(event) is Lookup:  # it carries no fds: the protocol saw to that
            return self._answer_lookup(conn, event)
        return self._hand_over(conn, _Received(event, fds))

    def _answer_open(self, conn: Connection, event: Open) -> bool:
        """The hot path: a hit is answered here, with no coroutine and no await.

        A miss starts its wait in the connection's nursery, from here too,
        as does a refusal (its reply is sent in turn).
        """
        fd = event.fd
        try:
            outcome = self._serve_now(fd, event.label, conn.share)
        except Exception as exc:  # a refusal, or a bug of ours
            self._discard([fd], conn.share)
            self._refuse_later(conn, event.id, exc)
            return True
        except BaseException:
            os.close(fd)
            raise
        if type(outcome) is not tuple:
            self._open_deferred(conn, event, outcome)  # type: ignore[arg-type]
            return True
        self._poller.close_later(fd)
        file = outcome[0]
        reply = conn.proto.send_opened(event.id, outcome[1], True)
        if not conn.send_lock.locked():  # else replies queue: keep their order
            try:
                # The reopen, the send and the close of the new fd in one call.
                err = _send_reopened(conn.sock, reply, file.dir_fd, file.fd)
            except BlockingIOError:
                pass  # no room: sent from the nursery below, in turn
            except OSError:
                return self._hand_over(conn, GONE)
            else:
                if not err:
                    return True
                self._refuse_later(conn, event.id, _share_error(OSError(err, os.strerror(err))))
                return True
        try:
            served = _share(file)
        except RequestError as exc:
            self._refuse_later(conn, event.id, exc)
            return True
        return self._reply_now(conn, event.id, reply, (served,), (served,))

    def _answer_batch(self, conn: Connection, event: OpenBatch, fds: list[int]) -> bool:
        """A batch: every item served now or deferred, the reply sent now if all were."""
        holders = [FdHolder(fd) for fd in fds]
        try:
            results = self._batch_now(conn, event, holders)
        finally:
            for h in holders:  # the ones a deferred item did not take
                if not h.closed:
                    self._poller.close_later(h.detach())
        if results is None:
            return True  # deferred: the reply goes when the last item is in
        served = [r.fd for r in results if isinstance(r, Served)]
        try:
            data, out = conn.proto.send(BatchOpened(id=event.id, results=_batch_items(results)))
        except BaseException:
            _close_holders(served)
            raise
        for holder in served:
            holder.detach()  # now in *out*
        return self._reply_now(conn, event.id, data, tuple(out), tuple(out))

    def _answer_lookup(self, conn: Connection, event: Lookup) -> bool:
        """A private file of this uid and namespace, or a miss: answered at once."""
        try:
            entry = self.cache.lookup(
                private_key(conn.peer.uid, event), event.key.version, private=True
            )
            if entry is None:
                data, _ = conn.proto.send(LookupMiss(id=event.id))
                return self._reply_now(conn, event.id, data, (), ())
            with refusing_os_errors("cannot open a served descriptor"):
                served = entry.file.share()
        except Exception as exc:  # a refusal, or a bug of ours
            self._refuse_later(conn, event.id, exc)
            return True
        try:
            data = conn.proto.send_opened(event.id, entry.size, True)
        except BaseException:
            os.close(served)
            raise
        return self._reply_now(conn, event.id, data, (served,), (served,))

    def _reply_now(
        self, conn: Connection, id: int, data: bytes, fds: tuple[int, ...], owned: tuple[int, ...]
    ) -> bool:
        """Send the reply to request *id* now, or from the connection's nursery in turn.

        The *owned* fds (those sent among them) are closed once it is sent:
        at the end of the round, or by the task that sends it later.
        """
        try:
            if not conn.send_lock.locked():  # else replies queue: keep their order
                _send(conn.sock, data, fds)
                for fd in owned:
                    self._poller.close_later(fd)
                return True
        except BlockingIOError:
            pass
        except OSError:
            close_all(owned)
            return self._hand_over(conn, GONE)
        except BaseException:
            close_all(owned)
            raise
        try:
            # Counted in flight: a client that does not read its replies
            # meets --max-inflight, then the daemon stops reading it.
            self._start_deferred(conn, id, self._send_later, data, fds, owned)
        except BaseException:
            close_all(owned)
            raise
        return True

    def _refuse_later(self, conn: Connection, id: int, exc: Exception) -> None:
        """Refuse request *id* from the connection's nursery: the reply is sent in turn."""
        self._start_deferred(conn, id, self._send_refusal, id, exc)

    async def _send_later(
        self, conn: Connection, data: bytes, fds: tuple[int, ...], owned: tuple[int, ...]
    ) -> None:
        try:
            await self._send_bytes(conn, data, fds)
        finally:
            close_all(owned)

    async def _send_refusal(self, conn: Connection, id: int, exc: Exception) -> None:
        if isinstance(exc, RequestError):
            await self._refuse(conn, id, exc)
        else:
            await self._internal_error(conn, id, exc)

    # -- the connection's task: what had to wait -------------------------

    async def _answer(self, conn: Connection, job: Job) -> bool:
        """Answer what the poller handed over; False when the connection must end."""
        if isinstance(job, _Received):
            holders = [FdHolder(fd) for fd in job.fds]
            event = job.event
            try:
                await self._dispatch(conn, event, holders)
            except (PeerGone, trio.Cancelled):
                raise
            except RequestError as exc:
                await self._refuse(conn, event.id, exc)
            except Exception as exc:
                await self._internal_error(conn, event.id, exc)
            finally:
                _close_holders(holders)
            return True
        if isinstance(job, _Malformed):
            error = job.exc
            self._refused_fds(conn, job.fds, job.flags)
            self._count_refusal(conn.peer, error.code, error.message)
            await self._send(conn, conn.proto.error_for(error))
            return not error.fatal
        if isinstance(job, _Bug):
            raise job.exc
        return False  # GONE

    def _drop_job(self, conn: Connection, job: Job) -> None:
        """Get rid of a job its task never answered (it was cancelled first)."""
        if isinstance(job, _Malformed):
            self._refused_fds(conn, job.fds, job.flags)
            return
        if isinstance(job, _Bug):
            self._log_internal_error(conn, None, job.exc)
            return
        if isinstance(job, _Received):
            self._discard(job.fds, conn.share)

    def _refused_fds(self, conn: Connection, fds: list[int], flags: int) -> None:
        """Account for and get rid of the fds of a datagram the protocol refused."""
        if flags & _MSG_TRUNC:
            self.gate.hit("max_request")
        if flags & _MSG_CTRUNC:
            self.gate.hit("max_fds")  # the kernel closed the fds that did not fit
        self.fds_refused += len(fds)
        self._discard(fds, conn.share)

    def _discard(self, fds: Sequence[int], share: UidShare) -> None:
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
            if self._nursery is None:
                os.close(fd)
            else:
                self.copier.close_later(self._nursery, FdHolder(fd), share.quota)

    def _closes_quickly(self, fd: int) -> bool:
        if memfd_seals(fd) is not None:
            return True
        try:
            st = stat_nosync(fd)
        except RequestError:
            return False
        return st is not None and self.mounts.is_local(st.dev, st.mnt)

    async def _dispatch(self, conn: Connection, event: Request, holders: list[FdHolder]) -> None:
        if isinstance(event, Publish):
            await self._on_publish(conn, event, holders[0])
        elif isinstance(event, StatsRequest):
            await self._send(conn, StatsReply(id=event.id, stats=self.stats().to_wire()))
        elif isinstance(event, Hello):
            await self._send(
                conn,
                HelloReply(
                    id=event.id,
                    version=event.version,
                    server=f"shadowd/{__version__}",
                    limits=self._hello_limits,
                ),
            )

    async def _internal_error(
        self, conn: Connection, id: int, exc: BaseException | None = None
    ) -> None:
        """Answer a request that hit a bug of ours (*exc*, or the one being handled); log it."""
        self._log_internal_error(conn, id, exc)
        await self._refuse(conn, id, RequestError(ErrorCode.INTERNAL, _INTERNAL_MESSAGE))

    def _log_internal_error(
        self, conn: Connection, id: int | None, exc: BaseException | None
    ) -> None:
        self.internal_errors += 1
        # Rate-limited like refusals: input that trips a bug must not flood the log.
        allowed, suppressed = self._internal_log.allow(time.monotonic())
        if allowed:
            logger.error(
                "internal error answering request %s of pid %d%s",
                "?" if id is None else id,
                conn.peer.pid,
                f" ({suppressed} more internal errors not logged)" if suppressed else "",
                exc_info=exc if exc is not None else True,
            )

    # -- open ------------------------------------------------------------

    def _serve_now(
        self, fd: int, label: str | None, share: UidShare
    ) -> Hit | Flight | _Throttled | None:
        """Answer from the cache, or join the copy of this version, without waiting.

        Returns (cached file, size) on a hit (the caller reopens it for the
        client), the Flight to wait for on a miss, THROTTLED when a new copy
        must wait for the uid's quota, or None for an fd of an untrusted
        filesystem, which a worker must inspect. Raises
        RequestError for an fd that is refused. *fd* stays the caller's in
        every case.
        """
        st = stat_nosync(fd)
        if st is None or not self.mounts.is_local(st.dev, st.mnt):
            return None
        check_readable(fd)
        if not st.is_regular:
            check_regular(st)  # raises, naming what it is
        if st.size > self._max_file_size:
            self._check_size(st.size)  # raises
        return self._lookup_or_fly(fd, st, label, share, remote=False)

    def _lookup_or_fly(
        self, fd: int, st: SourceStat, label: str | None, share: UidShare, *, remote: bool
    ) -> Hit | Flight | _Throttled:
        """A hit, or the flight that will copy this version (joined as a waiter).

        Synchronous on purpose: between the miss and joining the flight
        nothing else runs, so two requests for one version make one copy. A
        new flight copies from a dup of *fd*, so *fd* stays the caller's. It
        takes a slot of the uid's quota first (THROTTLED when there is none):
        a flight that exists is always copying, never queued behind a quota,
        so no other uid can be made to wait on a hostile uid's share.
        """
        key = HostKey(st.dev, st.ino)
        entry = self.cache.lookup(key, st.version)
        if entry is not None:
            return entry.file, entry.size
        assert self._nursery is not None
        flight_key = (key, st.version)
        flight = self.copier.flight(flight_key)
        if flight is None:
            quota = share.quota
            if not quota.try_acquire():
                self.cache.uncount_miss()  # the retry counts it
                return THROTTLED
            try:
                with refusing_os_errors("cannot keep the passed fd"):
                    source = FdHolder(os.dup(fd))
            except BaseException:
                quota.release()
                raise
            flight = self.copier.start(
                self._nursery,
                flight_key,
                source,
                st,
                self._on_copied(label),
                remote=remote,
                quota=quota,
            )
        flight.join()
        return flight

    def _check_size(self, size: int) -> None:
        limit = self.config.cache.max_file_size
        if size > limit:
            raise RequestError(
                ErrorCode.FILE_TOO_LARGE,
                f"file is {size} bytes, above the daemon's --max-file-size of {limit}; "
                "copy it locally",
            )

    def _open_deferred(
        self, conn: Connection, event: Open, outcome: Flight | _Throttled | None
    ) -> None:
        """A miss (wait for its flight), a copy that waits for the quota, or an untrusted fd."""
        pending: Pending
        if isinstance(outcome, Flight):
            os.close(event.fd)  # the flight copies from its own dup
            pending = outcome
        elif outcome is None:
            pending = FdHolder(event.fd)
        else:
            pending = Waiting(FdHolder(event.fd))
        self._start_deferred(conn, event.id, self._finish_open, event, pending)

    async def _finish_open(self, conn: Connection, event: Open, pending: Pending) -> None:
        try:
            served = await self._finish(pending, event.label, conn.share)
        except RequestError as exc:
            await self._refuse(conn, event.id, exc)
            return
        await self._send_served(conn, event.id, served)

    async def _send_served(self, conn: Connection, id: int, served: Served) -> None:
        try:
            await self._send(conn, Opened(id=id, fd=served.fd.fd, size=served.size, hit=served.hit))
        finally:
            served.fd.close()

    async def _finish(self, pending: Pending, label: str | None, share: UidShare) -> Served:
        """Wait for a flight or a slot of the quota, or inspect an untrusted fd, then serve."""
        if isinstance(pending, Flight):
            return await self._await_flight(pending)
        if isinstance(pending, Waiting):
            return await self._serve_waiting(pending.holder, label, share)
        return await self._serve_untrusted(pending, label, share)

    async def _serve_waiting(self, holder: FdHolder, label: str | None, share: UidShare) -> Served:
        """Serve a local fd once its uid may start another copy."""
        try:
            outcome = await self._when_allowed(
                share, lambda: self._serve_now(holder.fd, label, share)
            )
            if outcome is None:  # the mount table changed its mind meanwhile
                return await self._serve_untrusted(holder, label, share)
            return await self._served(outcome)
        finally:
            holder.close()  # a local fd (an untrusted one was detached above)

    async def _when_allowed(
        self, share: UidShare, attempt: Callable[[], Hit | Flight | _Throttled | None]
    ) -> Hit | Flight | None:
        """*attempt* until it is not THROTTLED, waiting for the uid's jobs to end."""
        counted = False
        while True:
            outcome = attempt()
            if not isinstance(outcome, _Throttled):
                return outcome
            if not counted:
                counted = True
                share.quota.count_wait()
            await share.quota.wait_freed()

    async def _served(self, outcome: Hit | Flight) -> Served:
        if isinstance(outcome, Flight):
            return await self._await_flight(outcome)
        return Served(fd=FdHolder(_share(outcome[0])), size=outcome[1], hit=True)

    def _batch_now(
        self, conn: Connection, event: OpenBatch, holders: list[FdHolder]
    ) -> list[Served | Refusal | None] | None:
        """Serve every item that can be now; None when some must wait (then deferred).

        An item that must wait detaches the holder it needs; the caller
        closes the rest.
        """
        labels = event.labels or (None,) * len(holders)
        results: list[Served | Refusal | None] = [None] * len(holders)
        later: list[tuple[int, Pending]] = []
        try:
            for i, src in enumerate(holders):
                try:
                    outcome = self._serve_now(src.fd, labels[i], conn.share)
                except RequestError as exc:
                    self._count_refusal(conn.peer, exc.code, exc.message)
                    results[i] = Refusal(code=exc.code, message=exc.message)
                    continue
                except Exception as exc:  # a bug of ours: this item fails, not the batch
                    self._log_internal_error(conn, event.id, exc)
                    self._count_refusal(conn.peer, ErrorCode.INTERNAL, _INTERNAL_MESSAGE)
                    results[i] = Refusal(code=ErrorCode.INTERNAL, message=_INTERNAL_MESSAGE)
                    continue
                if type(outcome) is tuple:
                    try:
                        served = FdHolder(_share(outcome[0]))
                    except RequestError as exc:
                        self._count_refusal(conn.peer, exc.code, exc.message)
                        results[i] = Refusal(code=exc.code, message=exc.message)
                        continue
                    results[i] = Served(fd=served, size=outcome[1], hit=True)
                elif outcome is None:
                    later.append((i, FdHolder(src.detach())))  # a worker closes it
                elif isinstance(outcome, Flight):
                    later.append((i, outcome))
                else:
                    later.append((i, Waiting(FdHolder(src.detach()))))
        except BaseException:
            # A bug of ours part way: give back what the items before it took.
            _close_holders([r.fd for r in results if isinstance(r, Served)])
            for _, pending in later:
                if isinstance(pending, Flight):
                    pending.leave()
                else:
                    holder = pending if isinstance(pending, FdHolder) else pending.holder
                    self._discard([holder.detach()], conn.share)
            raise
        if not later:
            return results
        self._start_deferred(conn, event.id, self._finish_batch, event, results, later, labels)
        return None

    async def _finish_batch(
        self,
        conn: Connection,
        event: OpenBatch,
        results: list[Served | Refusal | None],
        later: list[tuple[int, Pending]],
        labels: Sequence[str | None],
    ) -> None:
        async def one(i: int, pending: Pending) -> None:
            try:
                results[i] = await self._finish(pending, labels[i], conn.share)
            except RequestError as exc:
                self._count_refusal(conn.peer, exc.code, exc.message)
                results[i] = Refusal(code=exc.code, message=exc.message)

        try:
            async with trio.open_nursery() as nursery:
                for i, pending in later:
                    nursery.start_soon(one, i, pending)
            await self._send_batch(conn, event.id, results)
        finally:
            # Descriptors served but not sent (on cancellation) are still ours.
            _close_holders([r.fd for r in results if isinstance(r, Served)])

    async def _send_batch(
        self, conn: Connection, id: int, results: list[Served | Refusal | None]
    ) -> None:
        try:
            await self._send(conn, BatchOpened(id=id, results=_batch_items(results)))
        finally:
            _close_holders([r.fd for r in results if isinstance(r, Served)])

    def _start_deferred(
        self, conn: Connection, id: int, fn: Callable[..., Awaitable[None]], *args: object
    ) -> None:
        """Run *fn* for request *id* in the connection's nursery, counted in flight."""

        async def run() -> None:
            try:
                await fn(conn, *args)
            except PeerGone:
                pass
            except Exception:
                try:
                    await self._internal_error(conn, id)
                except PeerGone:
                    pass
            finally:
                conn.inflight -= 1
                conn.slot_freed.set()

        assert conn.nursery is not None
        conn.nursery.start_soon(run)
        conn.inflight += 1  # once it is sure to run (and to count itself out)

    async def _await_flight(self, flight: Flight) -> Served:
        fd, sealed = await flight.wait()
        if not flight.cached:
            self.uncached += 1
        return Served(fd=FdHolder(fd), size=sealed.size, hit=False)

    async def _serve_untrusted(self, taken: FdHolder, label: str | None, share: UidShare) -> Served:
        """Serve an fd of an untrusted filesystem: stat, copy and close it off the loop.

        Every worker job for it runs on the uid's quota: a file of a hung
        mount ties up only its own uid's share of the workers.
        """
        assert self._nursery is not None
        # This call owns the fd from here on; the caller's holder is empty, so
        # its cleanup cannot race the worker thread that closes the fd.
        src = FdHolder(taken.detach())
        logger.debug("fd of a filesystem the loop does not trust: a worker inspects it")
        try:
            st = await self.copier.inspect(src, share.quota)
        except trio.Cancelled:
            raise  # the inspecting job closes the fd
        except BaseException:
            self.copier.close_later(self._nursery, src, share.quota)
            raise
        try:
            self._check_size(st.size)
            outcome = await self._when_allowed(
                share, lambda: self._lookup_or_fly(src.fd, st, label, share, remote=True)
            )
        finally:
            self.copier.close_later(self._nursery, src, share.quota)  # in a worker, never here
        assert outcome is not None
        return await self._served(outcome)

    # -- private files ---------------------------------------------------

    async def _on_publish(self, conn: Connection, event: Publish, src: FdHolder) -> None:
        """Take a published file: seal it in place, or copy it in a worker."""
        share = conn.share
        try:
            served = self._publish_now(conn.peer.uid, event, src)
        except RequestError:
            self._discard([src.detach()], share)
            raise
        if served is not None:
            if not src.closed:
                self._discard([src.detach()], share)  # it was not needed
            await self._send_served(conn, event.id, served)
            return
        # A copy in a worker thread, which owns the fd from here on.
        shmem = memfd_seals(src.fd) is not None
        self._start_deferred(
            conn, event.id, self._finish_publish, event, FdHolder(src.detach()), shmem
        )

    def _publish_now(self, uid: int, event: Publish, src: FdHolder) -> Served | None:
        """A published file served at once (an entry of this version, or sealed in place).

        None when the file must be copied. The received fd stays *src*'s.
        """
        self._check_size(event.key.size)
        key = private_key(uid, event)
        entry = self.cache.peek(key)
        if entry is not None and entry.version == event.key.version:
            # Another publisher of this uid and namespace was first.
            self.private.races_lost += 1
            with refusing_os_errors("cannot open a served descriptor"):
                return Served(fd=FdHolder(entry.file.share()), size=entry.size, hit=True)
        check_readable(src.fd)
        with refusing_os_errors("cannot inspect the published fd"):
            sealed = seal_in_place(src.fd, event.key)
        if sealed is None:
            return None
        self.private.publishes += 1
        self.private.sealed_in_place += 1
        return self._adopt(key, event, sealed)

    def _adopt(self, key: PrivateKey, event: Publish, sealed: SealedFile) -> Served:
        """Cache *sealed* (taking over our reference) and serve it or the winner's copy."""
        fd, size, lost, cached = adopt(self.cache, key, event.key, sealed, self.private)
        if not cached:
            self.uncached += 1
        return Served(fd=FdHolder(fd), size=size, hit=lost)

    async def _finish_publish(
        self, conn: Connection, event: Publish, src: FdHolder, shmem: bool
    ) -> None:
        key = event.key
        try:
            sealed = await self.copier.run(
                lambda: copy_published(src, key), src, remote=not shmem, quota=conn.share.quota
            )
        except RequestError as exc:
            await self._refuse(conn, event.id, exc)
            return
        self.copier.copies += 1
        self.copier.bytes_copied += sealed.size
        self.private.publishes += 1
        self.private.copied += 1
        try:
            served = self._adopt(private_key(conn.peer.uid, event), event, sealed)
        except RequestError as exc:
            await self._refuse(conn, event.id, exc)
            return
        await self._send_served(conn, event.id, served)

    def _on_copied(self, label: str | None) -> Callable[[Flight, SealedFile, SourceStat], None]:
        def apply(flight: Flight, sealed: SealedFile, st: SourceStat) -> None:
            admission, _entry = self.cache.insert(
                HostKey(st.dev, st.ino), st.version, sealed, label=label, ctime_ns=st.ctime_ns
            )
            flight.cached = admission is Admission.CACHED
            if not flight.cached:
                logger.debug("served uncached (%s): %s", admission.value, label or "?")

        return apply

    # -- replies ---------------------------------------------------------

    async def _refuse(self, conn: Connection, id: int, exc: RequestError) -> None:
        self._count_refusal(conn.peer, exc.code, exc.message)
        await self._send(conn, ErrorReply(id=id, code=exc.code, message=exc.message))

    def _count_refusal(self, peer: Peer, code: str, message: str) -> None:
        self.refused += 1
        self.refused_by_code[code] = self.refused_by_code.get(code, 0) + 1
        allowed, suppressed = self._refusal_log.allow(time.monotonic())
        if allowed:
            logger.info(
                "refused pid %d uid %d: %s: %s%s",
                peer.pid,
                peer.uid,
                code,
                message,
                f" ({suppressed} more refusals not logged)" if suppressed else "",
            )

    async def _send(self, conn: Connection, reply: Reply) -> None:
        """Send one reply; the fds in it stay the caller's to close."""
        data, fds = conn.proto.send(reply)
        if not self._send_now(conn, data, fds):
            await self._send_bytes(conn, data, fds)

    def _send_now(self, conn: Connection, data: bytes, fds: Sequence[int]) -> bool:
        """Send without waiting; False when the socket is full or others queue."""
        if conn.send_lock.locked():
            return False  # keep the order of replies already waiting
        try:
            _send(conn.sock, data, fds)
        except BlockingIOError:
            return False
        except OSError as exc:
            raise PeerGone() from exc
        return True

    async def _send_bytes(self, conn: Connection, data: bytes, fds: Sequence[int]) -> None:
        """Send one datagram, waiting for room in the socket."""
        anc = scm_rights(fds)
        async with conn.send_lock:
            while True:
                try:
                    conn.sock.sendmsg([data], anc, _SEND_FLAGS)
                    return
                except BlockingIOError:
                    await trio.lowlevel.wait_writable(conn.sock)
                except OSError as exc:
                    raise PeerGone() from exc

    # -- stats -----------------------------------------------------------

    def stats(self) -> Stats:
        cache = self.cache
        limits = self.config.cache
        store = self.fd_store
        costly = self._costly()
        return Stats(
            server=f"shadowd/{__version__}",
            uptime_seconds=round(time.monotonic() - self._started, 3),
            hits=cache.hits,
            misses=cache.misses,
            entries=len(cache),
            bytes=cache.bytes,
            memory_bytes=cache.memory_bytes,
            rss_bytes=costly.rss_bytes,
            evictions=cache.evictions,
            invalidations=cache.invalidations,
            uncached=self.uncached,
            refused=self.refused,
            copies=self.copier.copies,
            bytes_copied=self.copier.bytes_copied,
            clients=self.clients,
            clients_total=self.clients_total,
            max_entries=limits.max_entries,
            max_bytes=limits.max_bytes,
            max_file_size=limits.max_file_size,
            private_hits=cache.private.hits,
            private_misses=cache.private.misses,
            private_entries=cache.private.entries,
            private_bytes=cache.private.bytes,
            open_fds=costly.open_fds,
            fd_limit=resource.getrlimit(resource.RLIMIT_NOFILE)[0],
            top_by_hits=costly.top_by_hits,
            top_by_bytes=costly.top_by_bytes,
            refused_by_code=dict(self.refused_by_code),
            fdstore_entries=store.entries if store is not None else 0,
            fdstore_max=store.max_entries if store is not None else 0,
            restored_entries=store.restored if store is not None else 0,
            private_publishes=self.private.publishes,
            private_sealed_in_place=self.private.sealed_in_place,
            private_copied=self.private.copied,
            private_races_lost=self.private.races_lost,
            peers_refused=self.gate.refused_peers,
            fds_refused=self.fds_refused,
            limits=self._limits,
            limit_hits=dict(self.gate.hits),
        )

    def _costly(self) -> _CostlyStats:
        """The costly parts of stats: computed at most once per ``stats_refresh``."""
        now = time.monotonic()
        costly = self._costly_stats
        if costly is None or now - costly.at >= self.config.stats_refresh:
            n = self.config.top_files
            costly = self._costly_stats = _CostlyStats(
                at=now,
                open_fds=count_open_fds(),
                rss_bytes=resident_bytes(),
                top_by_hits=tuple(self.cache.top(n, by="hits")),
                top_by_bytes=tuple(self.cache.top(n, by="bytes")),
            )
        return costly


def _drop_unread(sock: socket.socket, limit: int) -> None:
    """Read and drop up to *limit* datagrams the peer sent that we will not answer.

    Closing with unread data makes the peer's next read fail with
    ECONNRESET before it sees the replies already queued for it. A recv
    without room for control data: the kernel drops any fds itself.
    """
    for _ in range(limit):
        try:
            if not sock.recv(1, socket.MSG_DONTWAIT):
                break
        except OSError:
            break


def _batch_items(results: list[Served | Refusal | None]) -> tuple[OpenedItem | Refusal, ...]:
    """The items of a batch reply, in order (every slot is filled before sending)."""
    items: list[OpenedItem | Refusal] = []
    for r in results:
        if isinstance(r, Served):
            items.append(OpenedItem(fd=r.fd.fd, size=r.size, hit=r.hit))
        elif isinstance(r, Refusal):
            items.append(r)
        else:  # pragma: no cover - every slot is filled before sending
            items.append(Refusal(code=ErrorCode.INTERNAL, message="no result"))
    return tuple(items)


#: A cache hit: the file to reopen for the client, and its size.
Hit = tuple[Shareable, int]


def _share_error(exc: OSError) -> RequestError:
    return request_error_from_os(exc, "cannot open a served descriptor")


def _share(file: Shareable) -> int:
    """A fresh read-only open of a cached file; RequestError when the daemon cannot make one."""
    try:
        return file.share()
    except OSError as exc:
        raise _share_error(exc) from exc


def _close_holders(holders: Sequence[FdHolder]) -> None:
    """Close every still-owned holder, with as few syscalls as is safe."""
    close_all([h.detach() for h in holders if h.fd >= 0])
