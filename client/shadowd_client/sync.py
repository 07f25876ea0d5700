# The blocking client: one connection to the daemon, safe to share between
# threads (one request at a time), reconnected once when the daemon restarts.
# A forked child drops the connection it inherited and makes its own.
#
# Must never: raise anything but a ShadowdError; return an fd that is not
# sealed; keep an fd the caller was not given; talk on a connection another
# process also talks on (two processes would read each other's replies).
from __future__ import annotations

import functools
import math
import os
import socket
import struct
import threading
import time
import weakref
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Any

from shadowd.fds import close_all, scm_rights
from shadowd.protocol import (
    PROTOCOL_VERSION,
    ClientConnection,
    ErrorCode,
    ErrorReply,
    FileKey,
    IndexReply,
    IndexRequest,
    Lookup,
    Publish,
    Reply,
    Report,
    StatsRequest,
)

from ._session import (
    ANC_SPACE,
    RECV_FLAGS,
    REPLY_BUFFER,
    SEND_FLAGS,
    Answer,
    Broken,
    Fill,
    Make,
    Session,
    answer_of,
    answers_of,
    batch_request,
    batch_results,
    choose_socket,
    close_reply,
    filled_memfd,
    label_for,
    lookup_result,
    max_report_of,
    open_source,
    own_stat,
    own_stats,
    peer_of,
    private_fd,
    queued_refusal,
    reply_fds,
    request_of,
    served_as,
    stats_of,
    version_mismatch,
)
from .errors import (
    FD_LIMIT_ERRNOS,
    DaemonUnavailable,
    ProtocolViolation,
    Refused,
    ShadowdError,
    TooManyOpenFiles,
    VersionMismatch,
    connecting,
    hello_violation,
    refused,
    unavailable,
)
from .index import BadIndex, IndexView


def _report(hits: tuple[tuple[int, int, int], ...], id: int) -> Report:
    return Report(id=id, hits=hits)


def _report_from(hits: Sequence[tuple[int, int, int]], start: int, took: list[int]) -> Make:
    """A Make for a report of *hits* from *start* on, as many as fit the ``max_request`` of
    the daemon it goes to; ``took[0]`` says how many did."""

    def make(proto: ClientConnection) -> tuple[int, bytes, list[int]]:
        took[0] = max_report_of(proto)
        chunk = tuple(hits[start : start + took[0]])
        return request_of(functools.partial(_report, chunk))(proto)

    return make


def _requests(n: int, per: int, make: Callable[[slice], Make]) -> list[tuple[Make, int]]:
    """The requests that carry *n* items, at most *per* each: the Make of each part
    (*make* of its slice of the items) and how many items it carries."""
    return [(make(slice(i, i + per)), min(per, n - i)) for i in range(0, n, per)]


class _Parts:
    """The waits on the daemon of one call made of several requests (``open_many``'s and
    ``ask_many``'s batches, ``report``'s parts): together they have one reply timeout,
    as a close's answers do (attack 39). Only the time spent on this call's own sends
    and receives counts, not a wait for the lock meanwhile (another thread's requests)."""

    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = 0.0


def _timeval(seconds: float) -> bytes:
    """A socket timeout of *seconds* (> 0), rounded up to whole microseconds: a
    timeval of 0 is no timeout at all to the kernel, and what is left of a wait
    (Client._within) may be less than a microsecond."""
    micros = max(1, math.ceil(seconds * 1e6))
    return struct.pack("ll", micros // 1_000_000, micros % 1_000_000)


#: Every client, so that a forked child can drop the connections it inherited.
_CLIENTS: weakref.WeakSet[Client] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class Client:
    """A blocking connection to shadowd.

    ``Client()`` finds the socket by the one rule (``shadowd.paths.find_socket``):
    ``$SHADOWD_SOCKET``, else the user's own socket, else the host daemon's
    ``/run/shadowd/shadowd.sock``, whichever is there when it connects.
    Connecting happens on first use. *timeout* bounds each wait on the daemon
    (connecting, each send, each receive: a request on a new connection may
    wait for the hello reply and its own), None for none; a request that waited
    for another thread's, which waited out the timeout meanwhile, fails at once
    (:class:`~shadowd_client.DaemonTimeout`) instead of waiting out another. A call
    that takes several requests (:meth:`open_many`, :meth:`ask_many` past the
    daemon's ``max_batch``, :meth:`report` past its ``max_request``) has one timeout
    for the waits of them all.
    Every method raises only :class:`~shadowd_client.ShadowdError` subclasses.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        timeout: float | None = 30.0,
    ) -> None:
        self._choice = choose_socket(socket_path)
        self.socket_path = self._choice.path
        self._given = socket_path
        self.timeout = timeout
        #: The protocol version said at hello: 1 once a daemon refused 2.
        self.version = PROTOCOL_VERSION
        #: Connections made so far (a new one may be to another daemon).
        self.connections = 0
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self._session: Session | None = None
        self._buf = bytearray(REPLY_BUFFER)
        self._closed = False
        # Requests sent on this connection whose answers nobody waits for: dropped
        # (their fds closed) when read, ahead of a later request's answer.
        self._unawaited: set[int] = set()
        # When a send or receive last waited out the timeout (time.monotonic): a
        # request that waited for the lock meanwhile does not wait out another.
        self._timed_out_at = float("-inf")
        # The socket's receive timeout is cut to what is left of a wait (_within).
        self._cut = False
        # Per thread: seconds its calls held the connection (_spent).
        self._own = threading.local()
        _CLIENTS.add(self)

    # -- public API ------------------------------------------------------

    def connect(self) -> None:
        """Connect now (and say hello) instead of on first use."""
        with self._lock:
            self._connected()

    @property
    def limits(self) -> dict[str, int]:
        """The limits the daemon's hello answer said (``max_request``, ``max_batch``,
        ``racy_window_ns``: docs/protocol.md, "hello"); empty until it is read
        (:meth:`connect` reads it)."""
        session = self._session
        return {} if session is None else dict(session.proto.server_limits)

    def open(self, path: str | os.PathLike[str]) -> int:
        """A sealed, read-only fd with the bytes of *path*; the caller owns it.

        The file is opened here (read-only, non-blocking) and that fd goes to
        the daemon as the proof that we may read it; it is closed before
        returning. The fd returned holds the version this client's own ``fstat``
        of that source saw: one served in another (the file changed in between)
        is closed and the file asked for once more, then
        :class:`~shadowd_client.VersionMismatch` is raised.
        """
        src = open_source(path)
        try:
            return self._open_own(src, label_for(path), os.fsdecode(path))
        except Refused as exc:
            raise exc.naming(path) from None
        finally:
            os.close(src)

    def open_fd(self, fd: int, *, label: str | None = None) -> int:
        """Like :meth:`open` for a file the caller already opened for reading.

        *fd* stays the caller's; *label* names the file in the daemon's stats.
        The version served is checked against this client's own ``fstat`` of
        *fd*, made when it is called (as :meth:`open` says).
        """
        return self._open_own(fd, label, label or "<fd>")

    def _open_own(self, fd: int, label: str | None, name: str) -> int:
        for _ in range(2):  # once more for a file that changed under the first
            st = own_stat(fd, name)
            served = served_as(self._call(lambda proto: proto.send_open(fd, label)), st)
            if served is not None:
                return served
        raise version_mismatch(name)

    def ask(self, fd: int, *, label: str | None = None, wait: bool = False) -> Answer:
        """The daemon's answer for the file open at *fd* (which stays the caller's).

        Unlike :meth:`open_fd`, a miss need not wait for the daemon's copy:
        with *wait* False (protocol version 2) the answer comes at once,
        without an fd on a miss, while the daemon fills its cache; the answer
        says which version was served and whether it is cached. A version 1
        daemon always waits. The answer is as the daemon gave it: unlike
        :meth:`open_fd`, the version served is not checked against the
        caller's fstat here (the caller does: the :class:`Opener` does).
        """
        reply = self._call(lambda proto: proto.send_open(fd, label, wait=wait))
        return answer_of(reply)

    def ask_many(
        self, fds: Sequence[int], labels: Sequence[str | None] | None = None, *, wait: bool = False
    ) -> list[Answer | ShadowdError]:
        """:meth:`ask` for several open files, in as few round trips as batches allow."""
        out: list[Answer | ShadowdError] = []
        names = list(labels) if labels is not None else [None] * len(fds)
        todo = list(range(len(fds)))
        parts = _Parts()
        while todo:
            with self._lock:
                per = self._connected().max_batch
            chunk, todo = todo[:per], todo[per:]
            batch_fds = tuple(fds[i] for i in chunk)
            batch_labels = tuple(names[i] for i in chunk) if labels is not None else ()
            try:
                reply = self._call(
                    request_of(
                        functools.partial(batch_request, batch_fds, batch_labels, wait=wait)
                    ),
                    parts,
                )
                out.extend(answers_of(reply, len(batch_fds)))
            except BaseException:
                close_all(a.fd for a in out if isinstance(a, Answer) and a.fd is not None)
                raise
        return out

    def open_many(
        self, paths: Sequence[str | os.PathLike[str]], *, return_exceptions: bool = False
    ) -> list[Any]:
        """Open several files in as few round trips as the daemon's batch limit allows.

        Returns one fd per path, in order. When an item fails, every fd already
        received is closed and its error raised, unless *return_exceptions*:
        then the error takes that item's place in the list. Each fd holds the
        version this client's own ``fstat`` of its source saw; the items served
        in another are asked for once more (:meth:`open`).
        """
        results: list[int | ShadowdError] = []
        try:
            sources: list[int | ShadowdError] = []
            for path in paths:
                try:
                    sources.append(open_source(path))
                except ShadowdError as exc:
                    sources.append(exc)
            try:
                results = self._open_sources(sources, [label_for(p) for p in paths])
            finally:
                close_all(s for s in sources if isinstance(s, int))
        except BaseException:
            close_all(r for r in results if isinstance(r, int))
            raise
        results = [
            r.naming(p) if isinstance(r, Refused) else r
            for r, p in zip(results, paths, strict=True)
        ]
        if not return_exceptions:
            for r in results:
                if isinstance(r, ShadowdError):
                    close_all(x for x in results if isinstance(x, int))
                    raise r
        return results

    def open_private(
        self, namespace: str, key: FileKey, fill: Fill, *, executable: bool = False
    ) -> int:
        """A sealed, read-only fd of a private file (one the host cannot see).

        Asks the daemon for the file of this uid, *namespace* (say, a digest
        of the disk image it comes from) and *key* (what the caller's own
        fstat of it says). On a miss, ``fill(fd)`` must write the file's
        ``key.size`` bytes into the fresh memfd *fd*; the daemon seals it and
        serves it to later callers of the same uid and namespace. Exceptions
        of *fill* reach the caller unchanged. A file served of another size
        than ``key.size`` is refused (ProtocolViolation).
        """
        found = lookup_result(
            self._call(request_of(lambda id: Lookup(id=id, namespace=namespace, key=key))), key
        )
        if found is not None:
            return found
        with filled_memfd(key, fill, executable=executable) as memfd:
            reply = self._call(
                request_of(lambda id: Publish(id=id, namespace=namespace, key=key, fd=memfd.fd))
            )
        return private_fd(reply, key)

    def index(self) -> IndexView | None:
        """The daemon's index of its cache, mapped read-only; None where it gives none.

        Only peers that may read the daemon's descriptors anyway (its uid, or
        root) get one, from a daemon that publishes one. A view serves hits
        without a round trip (:meth:`IndexView.open`); it belongs to the
        daemon that gave it (a new connection may be to another one: see
        :attr:`connections`). It opens the daemon's descriptor range at once
        only when the daemon runs as this process's effective uid (the
        connection's SO_PEERCRED; :func:`~shadowd_client.index.trusts_range`).
        """
        ask = request_of(IndexRequest)
        peer: list[tuple[int, int] | None] = [None]

        def make(proto: ClientConnection) -> tuple[int, bytes, list[int]]:
            # Under the lock, on the connection the reply will come on.
            assert self._sock is not None
            peer[0] = peer_of(self._sock)
            return ask(proto)

        reply = self._call(make)
        if isinstance(reply, ErrorReply):
            if reply.code in (ErrorCode.NOT_PERMITTED, ErrorCode.NO_INDEX, ErrorCode.UNKNOWN_OP):
                return None
            raise refused(reply.code, reply.message)
        if not isinstance(reply, IndexReply):
            close_reply(reply)
            raise ProtocolViolation(f"expected the index, got {type(reply).__name__}")
        try:
            return IndexView(reply.fd, reply.pid, reply.slots, peer=peer[0])
        except OSError as exc:
            if exc.errno in FD_LIMIT_ERRNOS:  # ours: the daemon does give one
                raise TooManyOpenFiles(
                    f"no descriptor left to read shadowd's index: {exc.strerror}", errno=exc.errno
                ) from None
            return None
        except BadIndex:
            return None
        finally:
            os.close(reply.fd)

    def report(self, hits: Sequence[tuple[int, int, int]]) -> None:
        """Tell the daemon of hits served through its index: (dev, ino, hits) per file.

        Sent in requests that fit the daemon's ``max_request`` (as its hello said;
        until then, as small as any daemon takes), one answer awaited at a time; the
        waits for them all have one timeout together."""
        start = 0
        parts = _Parts()
        while start < len(hits):
            took = [0]
            reply = self._call(_report_from(hits, start, took), parts)
            if isinstance(reply, ErrorReply):
                raise refused(reply.code, reply.message)
            start += took[0]

    def _report_here(
        self, hits: Sequence[tuple[int, int, int]], *, last: bool = False
    ) -> tuple[int, ShadowdError | None]:
        """:meth:`report` on the connection there is, never on a new one (the hits were
        counted of the daemon at its other end), in requests that fit the daemon's
        ``max_request``: how many of *hits* were sent, and what failed (see
        :meth:`_send_here`, which *last* goes to)."""

        def split(session: Session) -> list[tuple[Make, int]]:
            return _requests(
                len(hits),
                session.max_report,
                lambda part: request_of(functools.partial(_report, tuple(hits[part]))),
            )

        return self._send_here(split, last=last)

    def _tell_here(
        self, fds: Sequence[int], labels: Sequence[str | None], *, last: bool = False
    ) -> tuple[int, ShadowdError | None]:
        """Tell the daemon at the other end of the connection there is (never a new one)
        of the open files *fds* (which stay the caller's), for it to fill its cache
        with: ``open_batch`` requests of at most its ``max_batch`` items that do not
        wait and want no fd (``serve`` false: an fd would sit unread in the socket
        until the next request, counted in the uid's fd budget), whose answers are not
        waited for (the daemon looks at every item before it answers: a millisecond or
        more for a full batch); they are read and dropped (any fd in them, from a
        daemon older than ``serve``, closed) ahead of a later request's answer. How many of *fds*
        were sent, and what failed (see :meth:`_send_here`, which *last* goes to)."""

        def split(session: Session) -> list[tuple[Make, int]]:
            return _requests(
                len(fds),
                session.max_batch,
                lambda part: request_of(
                    functools.partial(
                        batch_request,
                        tuple(fds[part]),
                        tuple(labels[part]),
                        wait=False,
                        serve=False,
                    )
                ),
            )

        return self._send_here(split, last=last, await_answers=False)

    def _send_here(
        self,
        split: Callable[[Session], list[tuple[Make, int]]],
        *,
        last: bool = False,
        await_answers: bool = True,
    ) -> tuple[int, ShadowdError | None]:
        """Send the requests *split* makes for this connection's session, in order, on
        the connection there is, never on a new one: how many items they carry were
        sent, and what failed (None: nothing, or a connection found gone; a send that
        waited out the timeout is a failure). Each answer is read before the next
        request goes: a daemon that answers into a socket closed meanwhile (a late
        answer, the connection dropped) may read none of the rest. The caller keeps
        what was not sent (no connection whose hello was answered, a send failed, or
        an answer failed before the next request went: a daemon stopped, which reads
        what was sent later); once sent they count as told.

        *last*: the client is closed after them. Every request is sent first, then
        the answers to all but the last are read (and those nobody waited for,
        which come before them), within one reply timeout together: a socket closed with
        an answer unread in it resets the connection, and a daemon whose answer
        fails (its client gone) reads no further, but counts the reports it finds
        queued when the connection ends (docs/protocol.md, "report"). The last
        answer is not waited for: every earlier one was read, so nothing the daemon
        has not read is behind it (the close of an Opener costs no round trip), and
        a stopped daemon holds the close one reply timeout at most, losing nothing
        that was sent.

        Without *await_answers* (and *last*) no answer is waited for: each is
        dropped when a later request's is read, or with the connection.
        """
        sent = 0
        entered = time.monotonic()
        with self._lock:
            held = time.monotonic()
            try:
                session = self._session
                if self._closed or self._sock is None or session is None or not session.server:
                    return 0, None
                try:
                    self._not_just_timed_out(entered)
                except DaemonUnavailable as exc:
                    return 0, exc
                ids: list[int] = []
                # Every send and every answer awaited, within one reply timeout from
                # here: a daemon that took each just within it held a report of
                # several parts one timeout a part.
                begun = time.monotonic()
                for make, count in split(session):
                    id, data, fds = make(session.proto)
                    try:
                        self._within(begun)
                        self._sendmsg(data, fds)
                    except Broken as broken:
                        self._drop()
                        if isinstance(broken.cause, TimeoutError):
                            # A daemon that stopped reading (its socket full of
                            # answers nobody waited for): this was its timeout.
                            return sent, broken.error(self.socket_path)
                        return sent, None  # gone (restarted?): the next request reconnects
                    except ShadowdError:
                        # the daemon's refusal, queued before it closed (_broken)
                        return sent, None
                    sent += count
                    if last:
                        ids.append(id)  # the answers once every request is sent
                    elif not await_answers:
                        self._unawaited.add(id)
                    else:
                        failure = self._answered([id], begun)
                        if failure is not None:
                            return sent, failure
                if last:
                    failure = self._answered(ids[:-1], begun, owed=True)
                    if failure is not None:
                        return sent, failure
            finally:
                self._full_timeout()
                if last:
                    self._closed = True
                    self._drop()
                self._spend(time.monotonic() - held)
        return sent, None

    def _answered(
        self, ids: list[int], entered: float, *, owed: bool = False
    ) -> ShadowdError | None:
        """Read the answers to the requests *ids*, in order (any fds in them closed);
        with *owed*, also those nobody waited for, first. What failed (None: nothing);
        lock held."""
        # One reply timeout for them all, from *entered*: a daemon that answered each
        # just within it held the close of an Opener one timeout a request (its hello
        # may make every file a request of its own: max_batch 1).
        try:
            if owed:
                self._read_unawaited(entered)
            for id in ids:
                reply = self._reply_to(id, entered)
                if isinstance(reply, ErrorReply):
                    return refused(reply.code, reply.message)
                close_reply(reply)
        except Broken as broken:
            self._drop()
            return broken.error(self.socket_path)
        except ShadowdError as exc:
            return exc
        return None

    def stats(self) -> dict[str, Any]:
        """The daemon's statistics (see ``shadowd stats --json``)."""
        return stats_of(self._call(request_of(StatsRequest)))

    def close(self) -> None:
        """Close the connection. Fds already returned stay valid."""
        with self._lock:
            self._closed = True
            self._drop()

    def _forked(self) -> None:
        # In the child of a fork: the socket is the parent's connection too,
        # and the lock may have been held by a thread that is not here.
        # Closing our copy of the fd leaves the parent's connection as it is.
        self._lock = threading.Lock()
        self._drop()

    def __enter__(self) -> Client:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    # -- internals -------------------------------------------------------

    def _open_sources(
        self, sources: list[int | ShadowdError], labels: list[str]
    ) -> list[int | ShadowdError]:
        results: list[int | ShadowdError] = list(sources)
        received: list[int] = []  # closed should a later batch fail
        again = [i for i, s in enumerate(sources) if isinstance(s, int)]
        parts = _Parts()
        try:
            for _ in range(2):  # once more for the files served in another version
                stats = own_stats(sources, again, labels, results)
                todo = list(stats)
                while todo:
                    with self._lock:
                        per = self._connected().max_batch
                    chunk, todo = todo[:per], todo[per:]
                    fds = tuple(s for i in chunk if isinstance(s := sources[i], int))
                    chunk_labels = tuple(labels[i] for i in chunk)
                    reply = self._call(
                        request_of(functools.partial(batch_request, fds, chunk_labels)), parts
                    )
                    served = batch_results(reply, [stats[i] for i in chunk], chunk_labels)
                    for i, r in zip(chunk, served, strict=True):
                        results[i] = r
                        if isinstance(r, int):
                            received.append(r)
                again = [i for i in stats if isinstance(results[i], VersionMismatch)]
        except BaseException:
            close_all(received)
            raise
        return results

    def _call(self, make: Make, parts: _Parts | None = None) -> Reply:
        """The reply to the request *make* makes; *parts*: the call it is a part of,
        whose requests have one reply timeout together."""
        try:
            return self._call_once(make, parts)
        except Refused as exc:
            if exc.code != ErrorCode.UNSUPPORTED_VERSION or self.version == 1:
                raise
            self.version = 1  # a daemon older than version 2: speak 1 from now on
            return self._call_once(make, parts)

    def _call_once(self, make: Make, parts: _Parts | None = None) -> Reply:
        entered = time.monotonic()
        with self._lock:
            if self._closed:
                raise DaemonUnavailable("this client is closed", socket_path=self.socket_path)
            self._not_just_timed_out(entered)
            begun = time.monotonic()
            # The parts before this one spent some of the timeout: what is left of it.
            since = None if parts is None else begun - parts.spent
            try:
                fresh = self._sock is None
                try:
                    return self._attempt(make, since)
                except Broken as broken:
                    self._drop()
                    if fresh or isinstance(broken.cause, TimeoutError):
                        raise broken.error(self.socket_path) from None
                # The connection we had broke (the daemon restarted?): one retry.
                try:
                    return self._attempt(make, since)
                except Broken as broken:
                    self._drop()
                    raise broken.error(self.socket_path) from None
            finally:
                spent = time.monotonic() - begun
                self._spend(spent)
                if parts is not None:
                    parts.spent += spent

    def _spent(self) -> float:
        """Seconds the calls of this thread have held the connection: connecting, saying
        hello, sending their requests and waiting for the answers (those nobody waited
        for, read ahead of theirs, included), never waiting for the lock while another
        thread's request had it. What the Opener's latency breaker times: the daemon's
        own slowness, whatever the number of threads sharing this client."""
        spent: float = getattr(self._own, "spent", 0.0)
        return spent

    def _spend(self, seconds: float) -> None:
        own = self._own
        own.spent = getattr(own, "spent", 0.0) + seconds

    def _not_just_timed_out(self, entered: float) -> None:
        """Raise DaemonTimeout when a request of another thread waited out the timeout
        since *entered* (while this one waited for the lock): the daemon that did not
        answer it costs this one no second wait (lock held)."""
        if self._timed_out_at >= entered:
            raise unavailable(TimeoutError(), self.socket_path, "a request just before this one")

    def _attempt(self, make: Make, since: float | None = None) -> Reply:
        """Send the request *make* makes and read its reply (lock held); *since*: the
        wait began then (a part of a call, _Parts), its send and receive within what is
        left of the reply timeout."""
        if self._sock is None:
            self._connect()
        assert self._session is not None
        id, data, fds = make(self._session.proto)
        if since is None:
            self._sendmsg(data, fds)
        else:
            try:
                self._within(since)
                self._sendmsg(data, fds)
            finally:
                self._full_timeout()
        return self._reply_to(id, since)

    def _reply_to(self, id: int, entered: float | None = None) -> Reply:
        """The reply to request *id*, sent; a connection that can no longer be trusted
        dropped (lock held). *entered*: see _wait_reply."""
        try:
            return self._wait_reply(id, entered)
        except ProtocolViolation as exc:
            before_hello = self._session is not None and self._session.hello_id is not None
            self._drop()
            if before_hello:  # the first words of what answered were not shadowd's
                raise hello_violation(exc, self.socket_path) from None
            raise
        except TooManyOpenFiles:
            raise  # ours, not the daemon's: the connection is as good as it was
        except ShadowdError:
            self._drop()
            raise

    def _connected(self) -> Session:
        """:meth:`_ensure_connected`, its time counted as this thread's (_spent); the
        session. Lock held."""
        begun = time.monotonic()
        try:
            self._ensure_connected()
        finally:
            self._spend(time.monotonic() - begun)
        assert self._session is not None
        return self._session

    def _ensure_connected(self) -> None:
        """Connected, hello answered; lock held. Raises only ShadowdError."""
        try:
            self._ensure_connected_once()
        except Refused as exc:
            if exc.code != ErrorCode.UNSUPPORTED_VERSION or self.version == 1:
                raise
            self.version = 1  # a daemon older than version 2: speak 1 from now on
            self._ensure_connected_once()

    def _ensure_connected_once(self) -> None:
        if self._closed:
            raise DaemonUnavailable("this client is closed", socket_path=self.socket_path)
        if self._sock is not None and self._session is not None and self._session.server:
            return
        try:
            if self._sock is None:
                self._connect()
            self._finish_hello()
        except Broken as broken:
            self._drop()
            raise broken.error(self.socket_path) from None
        except ProtocolViolation as exc:
            self._drop()
            raise hello_violation(exc, self.socket_path) from None
        except ShadowdError:
            self._drop()
            raise

    def _connect(self) -> None:
        if self._choice.source == "searched":
            # Look again: the daemon may have come up on another candidate.
            self._choice = choose_socket(self._given)
            self.socket_path = self._choice.path
        with connecting(self.socket_path, self._choice.describe()):
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            try:
                sock.settimeout(self.timeout)
                sock.connect(self.socket_path)
                # From here on the kernel keeps the timeout (SO_RCVTIMEO and
                # SO_SNDTIMEO): a Python-level timeout would cost a poll()
                # before every send and every receive.
                sock.settimeout(None)
                if self.timeout is not None:
                    tv = _timeval(self.timeout)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
            except BaseException:
                sock.close()
                raise
        self._sock = sock
        self._session = Session(self.version)
        self.connections += 1
        # Hello goes out now; its reply is read along with the first request's.
        data, _ = self._session.hello()
        self._sendmsg(data, [])

    def _finish_hello(self) -> None:
        assert self._session is not None
        while self._session.hello_id is not None:
            reply = self._recv()
            if reply is not None:
                close_reply(reply)
                raise ProtocolViolation("reply before the hello reply")

    def _sendmsg(self, data: bytes, fds: list[int]) -> None:
        assert self._sock is not None
        try:
            self._sock.sendmsg([data], scm_rights(fds), SEND_FLAGS)
        except BlockingIOError:  # SO_SNDTIMEO ran out
            self._timed_out_at = time.monotonic()
            raise Broken(TimeoutError(), "sending a request") from None
        except OSError as exc:
            raise self._broken(exc, "sending a request") from None

    def _recv(self) -> Reply | None:
        assert self._sock is not None and self._session is not None
        try:
            n, ancdata, flags, _ = self._sock.recvmsg_into([self._buf], ANC_SPACE, RECV_FLAGS)
        except BlockingIOError:  # SO_RCVTIMEO ran out
            self._timed_out_at = time.monotonic()
            raise Broken(TimeoutError(), "waiting for a reply") from None
        except OSError as exc:
            raise self._broken(exc, "waiting for a reply") from None
        fds = reply_fds(ancdata)
        if n == 0 and not fds:
            raise Broken(None, "waiting for a reply")
        return self._session.receive(memoryview(self._buf)[:n], fds, flags)

    def _broken(self, exc: OSError, doing: str) -> Exception:
        """What to raise for a failed send or receive: the daemon's refusal if it sent one.

        A daemon that turns a peer away answers and closes at once; the
        peer's send then fails with EPIPE, or its receive with ECONNRESET,
        while the answer still waits to be read.
        """
        assert self._sock is not None and self._session is not None
        refusal = queued_refusal(self._sock.fileno(), self._session)
        if refusal is None:
            return Broken(exc, doing)
        self._drop()  # the daemon closed this connection
        return refusal

    def _wait_reply(self, id: int, entered: float | None = None) -> Reply:
        """The reply to *id*, the answers nobody waits for before it dropped, all within
        one reply timeout: from *entered* (a wait for several answers, _answered), else
        from now; lock held."""
        if entered is None:
            entered = time.monotonic()
        else:
            self._within(entered)  # what is left of the wait for them all
        try:
            while True:
                reply = self._recv()
                if reply is None:
                    continue
                if reply.id == id:
                    return reply
                close_reply(reply)
                if reply.id in self._unawaited:
                    self._unawaited.discard(reply.id)
                    self._within(entered)
                    continue
                raise ProtocolViolation(f"reply to request {reply.id} while waiting for {id}")
        finally:
            self._full_timeout()

    def _read_unawaited(self, entered: float) -> None:
        """Read (and drop) the answers nobody waits for, within the reply timeout from
        *entered*; lock held."""
        self._within(entered)
        try:
            while self._unawaited:
                reply = self._recv()
                if reply is None:
                    continue
                close_reply(reply)
                if reply.id not in self._unawaited:
                    raise ProtocolViolation(f"reply to request {reply.id}, not one sent")
                self._unawaited.discard(reply.id)
                self._within(entered)
        finally:
            self._full_timeout()

    def _within(self, entered: float) -> None:
        """An answer nobody waited for was read in a wait that began at *entered*, or a
        part of a call made of several requests is sent or awaited: the wait as a whole
        has the reply timeout, not each datagram (a daemon that answered
        each of many told batches just within it held the next request one timeout a
        batch: 4 s for 20 under a timeout of 0.25 s). The rest of it for the next
        send and receive, or Broken (a timeout) when none is left; lock held."""
        if self.timeout is None or self._sock is None:
            return
        now = time.monotonic()
        left = entered + self.timeout - now
        if left <= 0:
            self._timed_out_at = now
            raise Broken(TimeoutError(), "waiting for a reply")
        tv = _timeval(max(left, 1e-6))  # (0 would be no timeout at all)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
        self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)
        self._cut = True

    def _full_timeout(self) -> None:
        """The socket's timeouts back to the whole reply timeout after _within."""
        if self._cut:
            self._cut = False
            if self._sock is not None and self.timeout is not None:
                tv = _timeval(self.timeout)
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVTIMEO, tv)
                self._sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDTIMEO, tv)

    def _drop(self) -> None:
        sock, self._sock, self._session = self._sock, None, None
        self._unawaited.clear()
        if sock is not None:
            sock.close()
