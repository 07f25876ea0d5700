# The trio client: one connection shared by any number of tasks, whose
# requests are pipelined and matched to replies by id; reconnected once when
# the daemon restarts. A forked child drops the connection it inherited and
# makes its own.
#
# Must never: raise anything but a ShadowdError (trio.Cancelled excepted);
# lose an fd when a waiting task is cancelled (its reply is closed when it
# arrives); return an fd that is not sealed; talk on a connection another
# process also talks on (two processes would read each other's replies).
from __future__ import annotations

import functools
import inspect
import os
import socket
import weakref
from collections.abc import Sequence
from types import TracebackType
from typing import Any

import trio

from shadowd.fds import close_all, scm_rights
from shadowd.protocol import (
    PROTOCOL_VERSION,
    ErrorCode,
    FileKey,
    Lookup,
    Publish,
    Reply,
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
    batch_request,
    batch_results,
    check_filled,
    choose_socket,
    close_reply,
    label_for,
    lookup_result,
    new_memfd,
    open_source,
    own_stat,
    own_stats,
    private_fd,
    queued_refusal,
    reply_fds,
    request_of,
    served_as,
    stats_of,
    version_mismatch,
)
from .errors import (
    DaemonTimeout,
    DaemonUnavailable,
    ProtocolViolation,
    Refused,
    ShadowdError,
    TooManyOpenFiles,
    VersionMismatch,
    hello_violation,
    no_socket,
)


class _Parts:
    """The waits on the daemon of one call made of several requests (``open_many``'s
    batches): together they have one reply timeout, not one each (a daemon that
    answered each just within it held the caller one timeout a batch)."""

    __slots__ = ("spent",)

    def __init__(self) -> None:
        self.spent = 0.0


class _Conn:
    """One connection and the replies that arrived for tasks not yet reading."""

    def __init__(self, sock: trio.socket.SocketType, version: int = PROTOCOL_VERSION) -> None:
        self.sock = sock
        self.session = Session(version)
        self.send_lock = trio.Lock()
        self.recv_lock = trio.Lock()
        self.replies: dict[int, Reply] = {}
        #: The errors of requests whose replies came with their descriptors
        #: dropped (this process had no number left), read by another task.
        self.dropped: dict[int, TooManyOpenFiles] = {}
        self.abandoned: set[int] = set()
        self.broken: Broken | None = None
        self.buf = bytearray(REPLY_BUFFER)

    def close(self) -> None:
        self.sock.close()
        for reply in self.replies.values():
            close_reply(reply)
        self.replies.clear()
        self.dropped.clear()

    def forget(self) -> None:
        """In a forked child: close this process's copies of the connection's fds.

        Without trio: no run may be going on, and a trio close would change the
        epoll set the child shares with its parent (the parent's registration
        of this very socket).
        """
        self.broken = Broken(None, "the connection belongs to the parent process")
        os.close(self.sock.detach())
        for reply in self.replies.values():
            close_reply(reply)
        self.replies.clear()
        self.dropped.clear()


def _hello_pending(conn: _Conn) -> bool:
    return conn.session.hello_id is not None


#: Every client, so that a forked child can drop the connections it inherited.
_CLIENTS: weakref.WeakSet[AsyncClient] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._forked()


os.register_at_fork(after_in_child=_after_fork_in_child)


class AsyncClient:
    """A trio connection to shadowd; the API of :class:`Client`, awaited (``open``,
    ``open_fd``, ``ask``, ``open_many``, ``open_private``, ``stats``; ``aclose``
    for ``close``), without ``ask_many``, ``index`` and ``report``.

    Several tasks may use one AsyncClient at once: their requests are in
    flight together and each gets its own reply. *timeout* bounds each request's
    wait as a whole (its send and its reply), and the batches of one
    :meth:`open_many` together. It finds the socket as
    :class:`Client` does. A forked child (in a ``trio.run`` of its own) makes
    a connection of its own.
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
        self._conn: _Conn | None = None
        self._connect_lock = trio.Lock()
        self._closed = False
        _CLIENTS.add(self)

    # -- public API ------------------------------------------------------

    async def connect(self) -> None:
        """Connect now (and say hello) instead of on first use."""
        await self._ensure_hello()

    async def open(self, path: str | os.PathLike[str]) -> int:
        """A sealed, read-only fd with the bytes of *path*; the caller owns it. It holds
        the version this client's own ``fstat`` of the file saw (:meth:`Client.open`)."""
        src = open_source(path)
        try:
            return await self._open_own(src, label_for(path), os.fsdecode(path))
        except Refused as exc:
            raise exc.naming(path) from None
        finally:
            os.close(src)

    async def open_fd(self, fd: int, *, label: str | None = None) -> int:
        """Like :meth:`open` for a file the caller already opened; *fd* stays theirs."""
        return await self._open_own(fd, label, label or "<fd>")

    async def _open_own(self, fd: int, label: str | None, name: str) -> int:
        for _ in range(2):  # once more for a file that changed under the first
            st = own_stat(fd, name)
            reply = await self._call(lambda proto: proto.send_open(fd, label))
            served = served_as(reply, st)
            if served is not None:
                return served
        raise version_mismatch(name)

    async def ask(self, fd: int, *, label: str | None = None, wait: bool = False) -> Answer:
        """:meth:`Client.ask`: a miss need not wait for the daemon's copy."""
        return answer_of(await self._call(lambda proto: proto.send_open(fd, label, wait=wait)))

    async def open_many(
        self, paths: Sequence[str | os.PathLike[str]], *, return_exceptions: bool = False
    ) -> list[Any]:
        """Open several files in as few round trips as the batch limit allows."""
        sources: list[int | ShadowdError] = []
        for path in paths:
            try:
                sources.append(open_source(path))
            except ShadowdError as exc:
                sources.append(exc)
        results: list[int | ShadowdError] = list(sources)
        try:
            again = [i for i, s in enumerate(sources) if isinstance(s, int)]
            labels = [label_for(p) for p in paths]
            parts = _Parts()
            for _ in range(2):  # once more for the files served in another version
                stats = own_stats(sources, again, labels, results)
                todo = list(stats)
                while todo:
                    conn = await self._ensure_hello()
                    chunk, todo = todo[: conn.session.max_batch], todo[conn.session.max_batch :]
                    fds = tuple(s for i in chunk if isinstance(s := sources[i], int))
                    chunk_labels = tuple(labels[i] for i in chunk)
                    reply = await self._call(
                        request_of(functools.partial(batch_request, fds, chunk_labels)), parts
                    )
                    served = batch_results(reply, [stats[i] for i in chunk], chunk_labels)
                    for i, r in zip(chunk, served, strict=True):
                        results[i] = r
                again = [i for i in stats if isinstance(results[i], VersionMismatch)]
        except BaseException:
            close_all(r for i, r in enumerate(results) if isinstance(r, int) and r != sources[i])
            raise
        finally:
            close_all(s for s in sources if isinstance(s, int))
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

    async def open_private(
        self, namespace: str, key: FileKey, fill: Fill, *, executable: bool = False
    ) -> int:
        """Like :meth:`Client.open_private`; *fill* may be a plain or an async function."""
        reply = await self._call(request_of(lambda id: Lookup(id=id, namespace=namespace, key=key)))
        found = lookup_result(reply, key)
        if found is not None:
            return found
        with new_memfd(executable=executable) as memfd:
            result = fill(memfd.fd)
            if inspect.isawaitable(result):
                await result
            check_filled(memfd, key)
            reply = await self._call(
                request_of(lambda id: Publish(id=id, namespace=namespace, key=key, fd=memfd.fd))
            )
        return private_fd(reply, key)

    async def stats(self) -> dict[str, Any]:
        return stats_of(await self._call(request_of(StatsRequest)))

    async def aclose(self) -> None:
        """Close the connection. Fds already returned stay valid."""
        self._closed = True
        conn, self._conn = self._conn, None
        if conn is not None:
            conn.close()
        await trio.lowlevel.checkpoint()

    def _forked(self) -> None:
        # In the child of a fork: the socket is the parent's connection too,
        # and the lock may be held by a task that is not running here.
        conn, self._conn = self._conn, None
        self._connect_lock = trio.Lock()
        if conn is not None:
            conn.forget()

    async def __aenter__(self) -> AsyncClient:
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- internals -------------------------------------------------------

    async def _call(self, make: Make, parts: _Parts | None = None) -> Reply:
        """The reply to the request *make* makes; *parts*: the call it is a part of,
        whose requests have one reply timeout together."""
        try:
            return await self._call_once(make, parts)
        except Refused as exc:
            if exc.code != ErrorCode.UNSUPPORTED_VERSION or self.version == 1:
                raise
            self.version = 1  # a daemon older than version 2: speak 1 from now on
            return await self._call_once(make, parts)

    async def _call_once(self, make: Make, parts: _Parts | None = None) -> Reply:
        fresh = self._conn is None
        try:
            return await self._attempt(make, parts)
        except Broken as broken:
            if fresh or isinstance(broken.cause, TimeoutError):
                raise broken.error(self.socket_path) from None
        try:
            return await self._attempt(make, parts)
        except Broken as broken:
            raise broken.error(self.socket_path) from None

    async def _attempt(self, make: Make, parts: _Parts | None = None) -> Reply:
        conn = await self._connection()
        id, data, fds = make(conn.session.proto)
        sent = False
        limit = self.timeout if self.timeout is not None else float("inf")
        if parts is not None:
            limit -= parts.spent  # what the call's earlier requests left of it
        begun = trio.current_time()
        try:
            with trio.fail_after(max(limit, 0.0)):
                async with conn.send_lock:
                    await self._io(
                        conn,
                        conn.sock.sendmsg([data], scm_rights(fds), SEND_FLAGS),
                        "sending a request",
                    )
                sent = True
                return await self._wait_reply(conn, id)
        except trio.TooSlowError:
            broken = Broken(TimeoutError(), "waiting for a reply")
            self._drop(conn, broken)
            raise broken.error(self.socket_path) from None  # a DaemonTimeout
        except trio.Cancelled:
            if not sent:
                conn.session.proto.forget(id)  # never sent: no reply will come
            elif id in conn.replies:
                close_reply(conn.replies.pop(id))  # another task read it as we were cancelled
            elif id in conn.dropped:
                del conn.dropped[id]  # the same, its descriptors dropped by the kernel
            else:
                conn.abandoned.add(id)  # its reply is closed when it comes
            raise
        except Broken as broken:
            self._drop(conn, broken)
            raise
        except ProtocolViolation as exc:
            before_hello = _hello_pending(conn)
            self._drop(conn, Broken(None, "a bad reply"))
            if before_hello:  # the first words of what answered were not shadowd's
                raise hello_violation(exc, self.socket_path) from None
            raise
        except TooManyOpenFiles:
            raise  # ours, not the daemon's: the connection is as good as it was
        except ShadowdError:
            self._drop(conn, Broken(None, "a bad reply"))
            raise
        finally:
            if parts is not None:
                parts.spent += trio.current_time() - begun

    async def _io(self, conn: _Conn, coro: Any, doing: str) -> Any:
        try:
            return await coro
        except (OSError, trio.ClosedResourceError, trio.BusyResourceError) as exc:
            if conn.broken is not None:
                raise conn.broken from None
            if isinstance(exc, OSError):
                refusal = queued_refusal(conn.sock.fileno(), conn.session)
                if refusal is not None:
                    raise refusal from None
            raise Broken(exc if isinstance(exc, OSError) else None, doing) from None

    async def _wait_reply(self, conn: _Conn, id: int) -> Reply:
        while True:
            if id in conn.replies:
                return conn.replies.pop(id)
            if id in conn.dropped:
                raise conn.dropped.pop(id)
            if conn.broken is not None:
                raise conn.broken
            async with conn.recv_lock:
                if id in conn.replies:
                    return conn.replies.pop(id)
                if id in conn.dropped:
                    raise conn.dropped.pop(id)
                reply = await self._recv_for(conn, id)
                if reply is None:
                    continue
                if reply.id == id:
                    return reply
                assert reply.id is not None
                if reply.id in conn.abandoned:
                    conn.abandoned.discard(reply.id)
                    close_reply(reply)
                else:
                    conn.replies[reply.id] = reply

    async def _recv_for(self, conn: _Conn, id: int | None) -> Reply | None:
        """:meth:`_recv` by the task waiting for request *id*'s reply (None: the hello's):
        a reply whose descriptors were dropped here is the error of the request it
        answers, kept for that request's task (None is returned), not this one's."""
        try:
            return await self._recv(conn)
        except TooManyOpenFiles as exc:
            other = exc.reply_id
            if other is None or other == id:
                raise
            if other in conn.abandoned:
                conn.abandoned.discard(other)
            else:
                conn.dropped[other] = exc
            return None

    async def _recv(self, conn: _Conn) -> Reply | None:
        n, ancdata, flags, _ = await self._io(
            conn,
            conn.sock.recvmsg_into([conn.buf], ANC_SPACE, RECV_FLAGS),
            "waiting for a reply",
        )
        fds = reply_fds(ancdata)
        if n == 0 and not fds:
            raise Broken(None, "waiting for a reply")
        return conn.session.receive(memoryview(conn.buf)[:n], fds, flags)

    async def _connection(self) -> _Conn:
        if self._closed:
            raise DaemonUnavailable("this client is closed", socket_path=self.socket_path)
        if self._conn is not None:
            return self._conn
        async with self._connect_lock:
            # Another task may have connected while we waited for the lock.
            current = self._current()
            if current is not None:
                return current
            if self._choice.source == "searched":
                # Look again: the daemon may have come up on another candidate.
                self._choice = choose_socket(self._given)
                self.socket_path = self._choice.path
            try:
                sock = trio.socket.socket(
                    socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
                )
            except OSError as exc:  # no descriptor left here, say
                raise no_socket(exc, self.socket_path, self._choice.describe()) from None
            try:
                with trio.fail_after(self.timeout if self.timeout is not None else float("inf")):
                    await sock.connect(self.socket_path)
            except trio.TooSlowError:
                sock.close()
                where = self._choice.describe()
                raise DaemonTimeout(
                    f"shadowd at {self.socket_path} did not accept in time"
                    + (f" ({where})" if where else ""),
                    socket_path=self.socket_path,
                ) from None
            except OSError as exc:
                sock.close()
                raise no_socket(exc, self.socket_path, self._choice.describe()) from None
            conn = _Conn(sock, self.version)
            data, _ = conn.session.hello()
            try:
                await self._io(conn, sock.sendmsg([data], [], SEND_FLAGS), "saying hello")
            except Broken as broken:
                conn.close()
                raise broken.error(self.socket_path) from None
            except ShadowdError:
                conn.close()  # turned away: the daemon said why
                raise
            self._conn = conn
            return conn

    def _current(self) -> _Conn | None:
        return self._conn

    async def _ensure_hello(self) -> _Conn:
        """A connection whose hello was answered (so its limits are known)."""
        try:
            return await self._ensure_hello_once()
        except Refused as exc:
            if exc.code != ErrorCode.UNSUPPORTED_VERSION or self.version == 1:
                raise
            self.version = 1  # a daemon older than version 2: speak 1 from now on
            return await self._ensure_hello_once()

    async def _ensure_hello_once(self) -> _Conn:
        conn = await self._connection()
        try:
            with trio.fail_after(self.timeout if self.timeout is not None else float("inf")):
                while _hello_pending(conn):
                    async with conn.recv_lock:
                        # Another task may have read the hello reply meanwhile.
                        if not _hello_pending(conn):
                            break
                        reply = await self._recv_for(conn, None)
                        if reply is None or reply.id is None:
                            continue
                        if reply.id in conn.abandoned:
                            conn.abandoned.discard(reply.id)
                            close_reply(reply)
                        else:
                            conn.replies[reply.id] = reply
            return conn
        except trio.TooSlowError:
            broken = Broken(TimeoutError(), "waiting for the hello reply")
            self._drop(conn, broken)
            raise broken.error(self.socket_path) from None  # a DaemonTimeout
        except Broken as broken:
            self._drop(conn, broken)
            raise broken.error(self.socket_path) from None
        except ProtocolViolation as exc:
            self._drop(conn, Broken(None, "saying hello"))
            raise hello_violation(exc, self.socket_path) from None
        except ShadowdError:
            self._drop(conn, Broken(None, "saying hello"))  # turned away: it closes
            raise

    def _drop(self, conn: _Conn, broken: Broken) -> None:
        conn.broken = broken
        if self._conn is conn:
            self._conn = None
        conn.close()
