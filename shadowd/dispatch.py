# Answering each request a connection sent, by kind. The poller's round calls
# the `answer_*` methods with a parsed request: a hit, a batch of hits, a
# private lookup, a hello, an index request, a report and any refusal are
# answered right there, with no await between the lookup and the reply; what
# must wait (a miss, a copy, a reply that finds the socket full) goes on in
# the connection's nursery. stats and publish are handed to the connection's
# task, which calls `handle`.
#
# Must never: await between a cache lookup and the use of what it returned;
# leave a received or served fd unclosed on any path; send replies of one
# connection out of order (connection.py keeps them in order).
from __future__ import annotations

import errno
import os
import time
from collections.abc import Awaitable, Callable, Sequence

import attrs

from . import __version__, hotcalls
from .access import reads_daemon_fds
from .batches import Batches, batch_items
from .cache import HostKey
from .connection import GONE, Connection, too_many_in_flight
from .errors import RequestError, refusing_os_errors
from .fds import FdHolder, close_holders
from .index import Index
from .opens import HostOpens, Miss, Pending, Served, served_fd, share_error
from .poller import Poller
from .private import PrivateFiles
from .protocol import (
    BatchOpened,
    ErrorCode,
    Hello,
    HelloReply,
    IndexReply,
    IndexRequest,
    Lookup,
    LookupMiss,
    Missed,
    Open,
    OpenBatch,
    Opened,
    Publish,
    Refusal,
    Report,
    Reported,
    Request,
    StatsReply,
    StatsRequest,
)
from .stats import MAX_COUNT, Latencies, Stats

_send_reopened = hotcalls.send_reopened
_now = time.perf_counter


@attrs.define(eq=False)
class Dispatcher:
    """Answers every kind of request; see the module comment."""

    opens: HostOpens
    private: PrivateFiles
    #: The stats as the given uid may see them.
    stats: Callable[[int], Stats]
    #: What a hello reply says of this daemon's limits.
    hello_limits: dict[str, int]
    #: Awaited before a stats answer: brings its costly parts up to date
    #: without holding the loop (metrics.StatsCollector.fresh).
    fresh_stats: Callable[[], Awaitable[None]] | None = None
    #: How long requests take (the server's; in the stats).
    latency: Latencies = attrs.field(factory=Latencies)
    #: The poller whose round closes the fds a hit used (set when serving).
    poller: Poller[Connection] | None = None
    #: When the request being answered was read (perf_counter), set per datagram.
    started: float = 0.0
    #: The index of the cache while the daemon publishes one (index.py).
    index: Index | None = None
    #: Hits clients reported having served through the index.
    index_hits: int = 0
    owner_uid: int = attrs.field(factory=os.geteuid)
    #: Answers the items of batches (batches.py).
    batches: Batches = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.batches = Batches(self.opens)

    # -- on the poller's round --------------------------------------------

    def answer_open(self, conn: Connection, event: Open) -> bool:
        """The hot path: a hit is answered here, with no coroutine and no await.

        A miss starts its wait in the connection's nursery, from here too,
        as does a refusal (its reply is sent in turn). False when the
        connection's task must take over.
        """
        fd = event.fd
        if not conn.room(1):
            self.opens.discard([fd], conn.share)
            return conn.refuse_now(event.id, conn.over_budget(1))
        try:
            outcome = self.opens.serve_now(fd, event.label, conn.share, wait=event.wait)
        except Exception as exc:  # a refusal, or a bug of ours
            self.opens.discard([fd], conn.share)
            return conn.refuse_now(event.id, exc)
        except BaseException:
            self.opens.discard([fd], conn.share)
            raise
        assert self.poller is not None
        if type(outcome) is Miss:
            # Answered now, without an fd; a flight, if any, copies from its own dup.
            if outcome.untrusted:
                self.opens.discard([fd], conn.share)  # in a worker
            else:  # in a worker too should its close free a large file (attack 19)
                self.opens.closer.discard_local(fd, conn.share, self.poller.close_later)
            data, _ = conn.proto.send(Missed(id=event.id, filling=outcome.filling))
            self.latency.miss.observe(_now() - self.started)
            return conn.reply_now(event.id, data, (), ())
        if type(outcome) is not tuple:
            pending = self.opens.pending(fd, outcome)  # type: ignore[arg-type]
            conn.start_deferred(event.id, self._finish_open, event, pending, self.started, holds=1)
            return True
        self.poller.close_later(fd)
        file = outcome[0]
        reply = conn.proto.send_opened(event.id, outcome[1], True, outcome[2])
        if not conn.sending:  # else replies queue: keep their order
            try:
                # The reopen, the send and the close of the new fd in one call.
                err = _send_reopened(conn.sock, reply, file.dir_fd, file.fd)
            except BlockingIOError:
                pass  # no room: sent from the nursery below, in turn
            except OSError as exc:
                if exc.errno == errno.ETOOMANYREFS:
                    return conn.refuse_now(event.id, too_many_in_flight())
                return conn.hand_over(GONE)
            else:
                if not err:
                    conn.sent(len(reply), 1)
                    self.latency.hit.observe(_now() - self.started)
                    return True
                return conn.refuse_now(event.id, share_error(OSError(err, os.strerror(err))))
        try:
            served = served_fd(file)
        except RequestError as exc:
            return conn.refuse_now(event.id, exc)
        return conn.reply_now(event.id, reply, (served,), (served,))

    def answer_batch(self, conn: Connection, event: OpenBatch, fds: list[int]) -> bool:
        """A batch: every item served now or deferred, the reply sent now if all were."""
        holders = [FdHolder(fd) for fd in fds]
        labels = event.labels or (None,) * len(holders)
        assert self.poller is not None
        if not conn.room(len(fds)):
            self.opens.discard([h.detach() for h in holders], conn.share)
            return conn.refuse_now(event.id, conn.over_budget(len(fds)))
        results: list[Served | Miss | Refusal | None] | None = None
        try:
            results, later = self.batches.now(
                holders,
                labels,
                conn.share,
                conn.peer,
                event.id,
                wait=event.wait,
                serve=event.serve,
            )
            if later:
                try:
                    conn.start_deferred(
                        event.id,
                        self._finish_batch,
                        event,
                        results,
                        later,
                        labels,
                        holds=len(fds),
                    )
                except BaseException:
                    close_holders([r.fd for r in results if isinstance(r, Served)])
                    self.opens.abandon(later, conn.share)
                    raise
                return True  # the reply goes when the last item is in
        finally:
            # The ones a deferred item did not take: a hit's at the end of the
            # round; a missed or refused item's as a lone open's (the Closer
            # knows one whose close would free a large file, attack 19).
            closing = self.poller.close_later
            rest = []
            for i, h in enumerate(holders):
                if not h.closed:
                    kind = None if results is None else type(results[i])
                    if kind is Served:
                        closing(h.detach())
                    elif kind is Miss:
                        self.opens.closer.discard_local(h.detach(), conn.share, closing)
                    else:
                        rest.append(h.detach())
            if rest:
                self.opens.discard(rest, conn.share)
        served = [r.fd for r in results if isinstance(r, Served)]
        try:
            data, out = conn.proto.send(
                BatchOpened(id=event.id, results=batch_items(results, versions=_v2(conn)))
            )
        except BaseException:
            close_holders(served)
            raise
        for holder in served:
            holder.detach()  # now in *out*
        elapsed = _now() - self.started
        for r in results:
            # A told file the cache holds (HELD: no fd, serve false) was a miss to
            # its client, which copied it: counted as one (HostOpens.serve_now).
            if isinstance(r, Served):
                self.latency.hit.observe(elapsed)
            elif isinstance(r, Miss):
                self.latency.miss.observe(elapsed)
        return conn.reply_now(event.id, data, tuple(out), tuple(out))

    def answer_lookup(self, conn: Connection, event: Lookup) -> bool:
        """A private file of this uid and namespace, or a miss: answered at once."""
        if not conn.room(1):
            return conn.refuse_now(event.id, conn.over_budget(1))
        try:
            served = self.private.lookup(conn.peer.uid, event)
        except Exception as exc:  # a refusal, or a bug of ours
            return conn.refuse_now(event.id, exc)
        if served is None:
            data, _ = conn.proto.send(LookupMiss(id=event.id))
            return conn.reply_now(event.id, data, (), ())
        fd = served.fd.detach()
        try:
            data = conn.proto.send_opened(event.id, served.size, True)
        except BaseException:
            os.close(fd)
            raise
        return conn.reply_now(event.id, data, (fd,), (fd,))

    def answer_hello(self, conn: Connection, event: Hello) -> bool:
        """The hello: its reply says this daemon's version and limits, sent now."""
        data, _ = conn.proto.send(self._hello_reply(event))
        return conn.reply_now(event.id, data, (), ())

    def answer_index(self, conn: Connection, event: IndexRequest) -> bool:
        """The index (its uid or root only): a read-only fd of it, sent now."""
        if not conn.room(1):
            return conn.refuse_now(event.id, conn.over_budget(1))
        try:
            fd = self._index_fd(conn)
        except Exception as exc:  # a refusal, or a bug of ours
            return conn.refuse_now(event.id, exc)
        try:
            data, _ = conn.proto.send(self._index_reply(event, fd))
        except BaseException:
            os.close(fd)
            raise
        return conn.reply_now(event.id, data, (fd,), (fd,))

    def answer_report(self, conn: Connection, event: Report) -> bool:
        """Index hits a client served itself: counted, acknowledged now."""
        try:
            self.count_report(conn, event)
        except Exception as exc:  # a refusal, or a bug of ours
            return conn.refuse_now(event.id, exc)
        data, _ = conn.proto.send(Reported(id=event.id))
        return conn.reply_now(event.id, data, (), ())

    # -- in the connection's nursery: what waits -------------------------

    async def _finish_open(
        self, conn: Connection, event: Open, pending: Pending, started: float
    ) -> None:
        try:
            served = await self.opens.finish(pending, event.label, conn.share)
        except RequestError as exc:
            await conn.refuse(event.id, exc)
            return
        await _send_served(conn, event.id, served)
        self.latency.miss.observe(_now() - started)

    async def _finish_batch(
        self,
        conn: Connection,
        event: OpenBatch,
        results: list[Served | Miss | Refusal | None],
        later: list[tuple[int, Pending]],
        labels: Sequence[str | None],
    ) -> None:
        try:
            await self.batches.finish(results, later, labels, conn.share, conn.peer)
            await conn.send(
                BatchOpened(id=event.id, results=batch_items(results, versions=_v2(conn)))
            )
        finally:
            # Descriptors served but not sent (on cancellation) are still ours.
            _let_go(conn, [r for r in results if isinstance(r, Served)])

    # -- in the connection's task: the rare requests ---------------------

    async def handle(self, conn: Connection, event: Request, holders: list[FdHolder]) -> None:
        """Answer a request the poller handed to the connection's task."""
        if isinstance(event, Publish):
            await self._on_publish(conn, event, holders[0])
        elif isinstance(event, StatsRequest):
            if self.fresh_stats is not None:
                await self.fresh_stats()
            await conn.send(StatsReply(id=event.id, stats=self.stats(conn.peer.uid).to_wire()))

    def _hello_reply(self, event: Hello) -> HelloReply:
        limits = self.hello_limits
        if event.version >= 2:
            limits = {**limits, "racy_window_ns": self.opens.limits.racy_window_ns}
        return HelloReply(
            id=event.id, version=event.version, server=f"shadowd/{__version__}", limits=limits
        )

    def _may_read_index(self, conn: Connection) -> None:
        """Only a peer that may read the daemon's fds anyway (its uid, or root) gets the
        index: the kernel lets exactly those open /proc/PID/fd/N of the daemon."""
        uid = conn.peer.uid
        if not reads_daemon_fds(uid, self.owner_uid):
            raise RequestError(
                ErrorCode.NOT_PERMITTED,
                f"the index is for root and uid {self.owner_uid} (the daemon's); uid {uid} "
                "asks through the socket",
            )

    def _index_fd(self, conn: Connection) -> int:
        """A new read-only fd of the index for *conn*'s peer, or a refusal."""
        self._may_read_index(conn)
        if self.index is None:
            raise RequestError(ErrorCode.NO_INDEX, "this daemon publishes no index")
        with refusing_os_errors("cannot open the index"):
            return self.index.reader_fd()

    def _index_reply(self, event: IndexRequest, fd: int) -> IndexReply:
        assert self.index is not None
        return IndexReply(id=event.id, fd=fd, pid=os.getpid(), slots=self.index.slots)

    def count_report(self, conn: Connection, event: Report) -> None:
        """Hits a client served itself through the index: counted, and in the LRU order.
        Raises the refusal of a peer that may not report."""
        self._may_read_index(conn)
        cache = self.opens.cache
        index = cache.index
        reported = 0
        for dev, ino, n in event.hits:
            reported += n  # counted even if the entry is gone since
            entry = index.get(HostKey(dev, ino))
            if entry is not None and not entry.private and n > 0:
                cache.touch(entry, n)  # its place in the LRU order and its top-file count
                # The reader may hold it as a socket hit's client may: a find.
                self.opens.guard.found(entry.file, conn.peer.uid)
        # The client says how many: saturated, so the stats can always be sent.
        self.index_hits = min(self.index_hits + reported, MAX_COUNT)

    async def _on_publish(self, conn: Connection, event: Publish, src: FdHolder) -> None:
        """Take a published file: seal it in place, or copy it in a worker."""
        share = conn.share
        if not conn.room(1):
            self.opens.discard([src.detach()], share)
            raise conn.over_budget(1)
        try:
            served = self.private.publish_now(conn.peer.uid, event, src)
        except RequestError:
            self.opens.discard([src.detach()], share)
            raise
        if served is not None:
            if not src.closed:
                self.opens.discard([src.detach()], share)  # it was not needed
            await _send_served(conn, event.id, served)
            return
        # A copy in a worker thread, which owns the fd from here on.
        conn.start_deferred(event.id, self._finish_publish, event, FdHolder(src.detach()), holds=1)

    async def _finish_publish(self, conn: Connection, event: Publish, src: FdHolder) -> None:
        try:
            served = await self.private.finish_publish(conn.peer.uid, event, src, conn.share.quota)
        except RequestError as exc:
            if not src.closed:  # refused before a worker took it
                self.opens.discard([src.detach()], conn.share)
            await conn.refuse(event.id, exc)
            return
        await _send_served(conn, event.id, served)


async def _send_served(conn: Connection, id: int, served: Served) -> None:
    try:
        if _v2(conn) and served.version is not None:
            reply = Opened(
                id=id,
                fd=served.fd.fd,
                size=served.size,
                hit=served.hit,
                version=served.version,
                cached=served.cached,
            )
        else:
            reply = Opened(id=id, fd=served.fd.fd, size=served.size, hit=served.hit)
        await conn.send(reply)
    finally:
        _let_go(conn, [served])


def _let_go(conn: Connection, served: Sequence[Served]) -> None:
    """Close the descriptors of *served* after their reply. One of a copy the cache
    did not keep may be its memfd's last (the client went away before the reply
    could be sent): the Closer frees its pages, off the loop if they are many
    (attack 34). A hit's or a cached copy's is never the last."""
    kept = [s.fd for s in served if s.hit or s.cached]
    close_holders(kept)
    rest = [s.fd.detach() for s in served if not (s.hit or s.cached) and not s.fd.closed]
    if rest:
        conn.services.discard(rest, conn.share)


def _v2(conn: Connection) -> bool:
    """Whether the connection speaks protocol version 2 (replies say versions)."""
    return conn.proto.version == 2
