# What the blocking and the trio client share: opening the source file,
# building requests, reading replies into results, checking every received
# fd. No I/O on the daemon's socket here; Client and AsyncClient do that.
#
# Must never: return an fd that is not sealed; leave an fd that
# came with a reply unclosed when the reply is not handed to the caller;
# close on the caller's thread an fd the daemon sent that is no memfd (its
# close may wait for good: attack 47).
from __future__ import annotations

import errno
import fcntl
import os
import signal
import socket
import struct
import threading
from collections.abc import Callable, Sequence
from typing import Any, TypeAlias

import attrs

from shadowd import __version__
from shadowd.fds import FdHolder, close_all, fds_from_ancdata
from shadowd.memfd import REQUIRED_SEALS, create
from shadowd.paths import SocketChoice, find_socket
from shadowd.protocol import (
    MAX_BATCH_LIMIT,
    MAX_REPORT,
    MIN_MAX_REQUEST,
    PROTOCOL_VERSION,
    BadFds,
    BatchOpened,
    ClientConnection,
    ErrorReply,
    FileKey,
    Hello,
    HelloReply,
    IndexReply,
    LookupMiss,
    Missed,
    MissedItem,
    OpenBatch,
    Opened,
    OpenedItem,
    ProtocolError,
    Reply,
    Request,
    StatsReply,
    Version,
)

from .errors import (
    BadRequest,
    DaemonUnavailable,
    ProtocolViolation,
    Refused,
    ShadowdError,
    SizeMismatch,
    SourceError,
    TooManyOpenFiles,
    UnsealedDescriptor,
    UnsupportedProtocolVersion,
    VersionMismatch,
    refused,
    source_error,
    unavailable,
)

CLIENT_NAME = f"shadowd_client/{__version__}"
# O_NONBLOCK: a FIFO's open does not wait for a writer; O_NOCTTY: a terminal's
# does not become the controlling terminal of a session leader that has none.
SOURCE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
# A SOCK_SEQPACKET datagram cannot exceed the sender's socket buffer (about
# 208 KiB by default), so this holds any reply.
REPLY_BUFFER = 256 * 1024
ANC_SPACE = socket.CMSG_SPACE(MAX_BATCH_LIMIT * 4)
#: How many descriptors a reply read with ANC_SPACE can take in: the kernel
#: truncates to this many when more came (MSG_CTRUNC). Fewer than this with
#: MSG_CTRUNC set, it could not install the next one here (no number left).
_FDS_ROOM = (ANC_SPACE - socket.CMSG_LEN(0)) // 4
REFUSAL_BUFFER = 4096
#: What open_private calls on a miss: write the file into the memfd it is given.
Fill = Callable[[int], object]
RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC)
SEND_FLAGS = int(socket.MSG_NOSIGNAL)
_MSG_TRUNC = int(socket.MSG_TRUNC)
_MSG_CTRUNC = int(socket.MSG_CTRUNC)


def open_source(path: str | os.PathLike[str]) -> int:
    """Open *path* the way the protocol wants it: read-only, never blocking, cloexec."""
    try:
        return os.open(path, SOURCE_FLAGS)
    except OSError as exc:
        raise source_error(exc, os.fsdecode(path)) from None


def choose_socket(socket_path: str | os.PathLike[str] | None) -> SocketChoice:
    """The socket to connect to, by the one rule (``shadowd.paths.find_socket``).

    Raises DaemonUnavailable for a path no socket can have (empty, too long).
    """
    try:
        return find_socket(socket_path)
    except Exception as exc:  # ConfigError of the daemon's family
        raise DaemonUnavailable(str(exc)) from None


# struct ucred: pid_t signed, uid_t and gid_t not (3000000000 is a uid).
_UCRED = struct.Struct("iII")


def peer_of(sock: socket.socket) -> tuple[int, int] | None:
    """(pid, uid) of the other end of the connected *sock* as SO_PEERCRED says (that
    of whoever called listen() on the socket it connected to); None if unknown."""
    try:
        pid, uid, _ = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
    except (OSError, struct.error):
        return None
    return pid, uid


def label_for(path: str | os.PathLike[str]) -> str:
    """The path label sent for stats: absolute, valid UTF-8, never used for access."""
    if type(path) is str and path[:1] == "/" and path.isascii():
        return path  # the common case, already what we would make of it
    raw = os.path.abspath(os.fsencode(path))
    return raw.decode("utf-8", "replace")


def check_sealed(fd: int) -> None:
    """Accept *fd* only if it carries the four seals (then nobody can change its bytes);
    otherwise close it and raise UnsealedDescriptor.

    One fcntl: with F_SEAL_WRITE set even a read-write descriptor cannot
    write, so the seals are what makes the fd safe to hand to a tracee.
    """
    try:
        seals = fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        seals = 0
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        os.close(fd)
        raise UnsealedDescriptor("the daemon sent a descriptor that is not sealed; refused it")


def check_served(fd: int) -> None:
    """Accept an fd the daemon sent only if it is sealed (:func:`check_sealed`), open
    read-only and at offset 0 (a description of its own), as the protocol promises;
    otherwise close it and raise ProtocolViolation.

    A write-only fd could not even be read; a read-write one is not what was promised.
    """
    check_sealed(fd)
    try:
        mode = fcntl.fcntl(fd, _F_GETFL) & os.O_ACCMODE
    except OSError:
        mode = -1
    if mode != os.O_RDONLY:
        os.close(fd)
        raise ProtocolViolation("the daemon sent a descriptor not open read-only; refused it")
    # A new open file description starts at offset 0, and the daemon never reads
    # through the one it sends: elsewhere another holder moved it (a dup, or one
    # description sent to several), and a tracee's reads would move under it
    # (attack 48; the C client's served_refusal checks the same).
    try:
        offset = os.lseek(fd, 0, os.SEEK_CUR)
    except OSError:
        offset = -1
    if offset != 0:
        os.close(fd)
        raise ProtocolViolation(
            "the daemon sent a descriptor whose offset is not 0 (a description another "
            "holder shares); refused it"
        )


_F_GET_SEALS = fcntl.F_GET_SEALS
_F_GETFL = fcntl.F_GETFL


def reply_fds(ancdata: Sequence[tuple[int, int, bytes]]) -> list[int]:
    """The fds of a reply from the daemon (recvmsg's *ancdata*), each a shmem file (a
    memfd), the only kind the protocol sends; otherwise every one of them is let go of
    (:func:`close_apart`) and UnsealedDescriptor raised: the reply is refused.

    Closing a file runs its file system's flush, which for a file of a FUSE mount
    waits for the mount's server: a daemon that sent one of its own mount's, whose
    server never answers, held the client's close, and so its open, for good
    (attack 47). F_GET_SEALS is answered by shmem and hugetlbfs alone, whose close
    waits on nobody.
    """
    fds = fds_from_ancdata(ancdata)
    shmem = [_shmem(fd) for fd in fds]
    if all(shmem):
        return fds
    close_apart([fd for fd, ok in zip(fds, shmem, strict=True) if not ok])
    close_all(fd for fd, ok in zip(fds, shmem, strict=True) if ok)
    raise UnsealedDescriptor(
        "the daemon sent a descriptor that is no memfd (its close may wait on a "
        "file system); refused it, and closed it apart"
    )


def _shmem(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, _F_GET_SEALS)
    except OSError:
        return False
    return True


def close_apart(fds: Sequence[int]) -> None:
    """Close each of *fds* on a thread of its own: a close that waits for good holds
    that thread, never the caller. One thread a descriptor: a close takes its number out
    of the process's table before it waits, whereas a descriptor queued behind a close
    that waits would stay in it, and the child of every later fork would wait on its
    flush when it execs (or exits). Each blocks every signal (it is made with them
    blocked), so that none meant for the process waits on it."""
    before = signal.pthread_sigmask(signal.SIG_BLOCK, signal.valid_signals())
    try:
        for fd in fds:
            closer = threading.Thread(target=_close_quietly, args=(fd,), name="shadowd-close-apart")
            closer.daemon = True
            try:
                closer.start()
            except RuntimeError:
                pass  # no thread to be had: the descriptor is left open, as in C
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)


def _close_quietly(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


class Broken(Exception):
    """The connection broke mid-request; the request may be retried once."""

    def __init__(self, cause: OSError | None, doing: str) -> None:
        super().__init__(doing)
        self.cause = cause
        self.doing = doing

    def error(self, socket_path: str) -> DaemonUnavailable:
        """What the caller sees when the request cannot be retried."""
        if self.cause is None:
            return DaemonUnavailable(
                f"shadowd at {socket_path} closed the connection ({self.doing})",
                socket_path=socket_path,
            )
        return unavailable(self.cause, socket_path, self.doing)


def batch_request(
    fds: tuple[int, ...],
    labels: tuple[str | None, ...],
    id: int,
    *,
    wait: bool = True,
    serve: bool = True,
) -> OpenBatch:
    return OpenBatch(id=id, fds=fds, labels=labels, wait=wait, serve=serve)


#: Numbers and encodes one request: returns its id, bytes and fds.
Make: TypeAlias = Callable[[ClientConnection], tuple[int, bytes, list[int]]]


def request_of(factory: Callable[[int], Request]) -> Make:
    """A Make for any request event built from its id.

    A request that cannot be encoded (a namespace that is no UTF-8, a key's
    number past 64 bits) raises BadRequest, as the daemon would have.
    """

    def make(proto: ClientConnection) -> tuple[int, bytes, list[int]]:
        event = factory(proto.next_id())
        try:
            data, fds = proto.send(event)
        except (ValueError, OverflowError, TypeError) as exc:  # msgpack's, UnicodeEncodeError
            raise BadRequest(f"cannot encode the request: {exc}") from None
        return event.id, data, fds

    return make


class Session:
    """The protocol state of one connection, seen from the client."""

    def __init__(self, version: int = PROTOCOL_VERSION) -> None:
        self.proto = ClientConnection()
        self.version = version
        self.hello_id: int | None = None
        self.server: str | None = None

    def hello(self) -> tuple[bytes, list[int]]:
        event = Hello(id=self.proto.next_id(), version=self.version, client=CLIENT_NAME)
        self.hello_id = event.id
        return self.proto.send(event)

    def receive(self, data: bytes | memoryview, fds: list[int], flags: int) -> Reply | None:
        """Parse one reply datagram; None when it was the hello reply (already checked).

        Raises ShadowdError for a protocol violation or a refused hello.
        """
        try:
            reply = self.proto.receive(
                data,
                fds,
                data_truncated=bool(flags & _MSG_TRUNC),
                fds_truncated=bool(flags & _MSG_CTRUNC),
            )
        except ProtocolError as exc:
            close_all(exc.fds)
            if flags & _MSG_CTRUNC and len(fds) < _FDS_ROOM and isinstance(exc, BadFds):
                # Room for more, yet some were dropped: the kernel could not give
                # this process a number (EMFILE). The reply was read and matched
                # to its request all the same: the connection is in step.
                # The error is that request's, whoever reads (reply_id).
                dropped = TooManyOpenFiles(
                    "the daemon's reply carried a descriptor this process had no number "
                    f"left for (MSG_CTRUNC): {os.strerror(errno.EMFILE)}",
                    errno=errno.EMFILE,
                )
                dropped.reply_id = exc.id
                raise dropped from None
            raise ProtocolViolation(f"bad reply from the daemon: {exc.message}") from None
        if reply.id is None:
            assert isinstance(reply, ErrorReply)
            raise refused(reply.code, reply.message)
        if reply.id == self.hello_id:
            if isinstance(reply, ErrorReply):
                self.hello_id = None
                raise refused(reply.code, reply.message)
            assert isinstance(reply, HelloReply)
            if not 1 <= reply.version <= self.version:
                # A daemon answers with the version the client said, or one below it
                # that both speak (docs/protocol.md, "Versioning"); the hello stays
                # unanswered, and the connection is dropped.
                spoken = "1" if self.version == 1 else f"1 to {self.version}"
                raise UnsupportedProtocolVersion(
                    f"the daemon answered hello with protocol version {reply.version}; "
                    f"this client speaks {spoken}",
                    version=reply.version,
                )
            self.hello_id = None
            self.server = reply.server
            return None
        return reply

    @property
    def max_report(self) -> int:
        """The most files one report carries within the daemon's ``max_request``
        (:func:`max_report_of`)."""
        return max_report_of(self.proto)

    @property
    def max_batch(self) -> int:
        """The most fds one batch carries: the daemon's limit, kept from 1 to what a
        reply can carry back (MAX_BATCH_LIMIT) whatever its hello said."""
        return min(max(self.proto.server_limits.get("max_batch", 1), 1), MAX_BATCH_LIMIT)


def max_report_of(proto: ClientConnection) -> int:
    """The most files one report carries within the daemon's ``max_request``: a
    file's triple takes at most 28 bytes, the map around them 32 (kept from 1 to
    the protocol's MAX_REPORT). Until the hello's answer says, the least any
    daemon accepts (MIN_MAX_REQUEST)."""
    room = proto.server_limits.get("max_request", MIN_MAX_REQUEST)
    return min(max((room - 32) // 28, 1), MAX_REPORT)


def opened_fd(reply: Reply) -> int:
    """The fd of an open reply, checked; raises the refusal of an error reply."""
    if isinstance(reply, ErrorReply):
        raise refused(reply.code, reply.message)
    if not isinstance(reply, Opened):
        close_reply(reply)
        raise ProtocolViolation(f"expected an open reply, got {type(reply).__name__}")
    check_served(reply.fd)
    return reply.fd


def serves(fd: int, version: Version | None, st: os.stat_result) -> bool:
    """Whether the served *fd* holds the version of the file that the caller's own
    ``fstat`` *st* of the source saw, as far as a client can tell: the *version* its
    reply says (when it says one) is st's (size, mtime_ns, ctime_ns), and the fd's own
    size st's. The daemon stats the source after the caller did: a change between the
    two is served in its new version, which is not the one the caller saw."""
    if version is not None and version != (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
        return False
    # The one other way to a memfd's size in one call is FIONREAD, an int: a sparse
    # memfd 4 GiB larger reads as the right size. lseek to the end and back moves an
    # offset that other holders of a shared description read by. Hence fstat.
    try:
        return os.fstat(fd).st_size == st.st_size
    except OSError:
        return False


def served_as(reply: Reply, st: os.stat_result) -> int | None:
    """The fd of an open reply (:func:`opened_fd`) when it holds the version the
    caller's ``fstat`` *st* saw (:func:`serves`); otherwise it is closed: None."""
    fd = opened_fd(reply)
    assert isinstance(reply, Opened)
    if serves(fd, reply.version, st):
        return fd
    os.close(fd)
    return None


def version_mismatch(name: str) -> VersionMismatch:
    """The error of a file served twice in another version than the client's fstat."""
    return VersionMismatch(
        f"{name or repr(name)}: the daemon served another version of it than this "
        "client's fstat of it saw, and again when asked once more (the file kept "
        "changing, or the daemon serves what it should not); refused it"
    )


def own_stat(fd: int, name: str) -> os.stat_result:
    """The client's own ``fstat`` of the source *fd* (the file *name*)."""
    try:
        return os.fstat(fd)
    except OSError as exc:
        raise source_error(exc, name) from None


def own_stats(
    sources: Sequence[int | ShadowdError],
    items: Sequence[int],
    names: Sequence[str],
    results: list[int | ShadowdError],
) -> dict[int, os.stat_result]:
    """The client's own ``fstat`` of the source of each of *items* (indices into
    *sources*, each an open fd), by item: what the fd served for it must hold. An
    item whose fstat failed has that error for its result in *results*, and none."""
    stats: dict[int, os.stat_result] = {}
    for i in items:
        src = sources[i]
        assert isinstance(src, int)
        try:
            stats[i] = own_stat(src, names[i])
        except SourceError as exc:
            results[i] = exc
    return stats


def batch_results(
    reply: Reply, stats: Sequence[os.stat_result], names: Sequence[str]
) -> list[int | ShadowdError]:
    """Per-item results of the reply to a batch of fds whose sources the client's own
    fstat saw as *stats* (one per fd sent, the files called *names*): checked fds, the
    refusal of an item, or VersionMismatch for one served in another version (its fd
    closed: :func:`serves`)."""
    answers = answers_of(reply, len(stats))
    if any(isinstance(a, Answer) and a.fd is None for a in answers):
        # A miss without an fd answers only a batch that asked not to wait.
        close_all(a.fd for a in answers if isinstance(a, Answer) and a.fd is not None)
        raise ProtocolViolation("the daemon answered a miss without an fd to a waiting batch")
    out: list[int | ShadowdError] = []
    for a, st, name in zip(answers, stats, names, strict=True):
        if not isinstance(a, Answer):
            out.append(a)
            continue
        assert a.fd is not None
        if serves(a.fd, a.version, st):
            out.append(a.fd)
        else:
            os.close(a.fd)
            out.append(version_mismatch(name))
    return out


@attrs.frozen
class Answer:
    """The daemon's answer to one open that may not wait (protocol version 2).

    ``fd`` is a checked, sealed fd (the caller's), or None on a miss the
    daemon did not wait for (then ``filling`` says whether it is copying that
    version into its cache now). ``version`` is whose bytes ``fd`` holds
    (size, mtime_ns, ctime_ns) and ``cached`` whether that version is in the
    daemon's cache; both None from a version 1 daemon.
    """

    fd: int | None
    size: int = 0
    hit: bool = False
    version: tuple[int, int, int] | None = None
    cached: bool | None = None
    filling: bool = False


def answer_of(reply: Reply) -> Answer:
    """The Answer in an open reply; raises the refusal of an error reply."""
    if isinstance(reply, Missed):
        return Answer(fd=None, filling=reply.filling)
    fd = opened_fd(reply)
    assert isinstance(reply, Opened)
    return Answer(fd, reply.size, reply.hit, reply.version, reply.cached)


def answers_of(reply: Reply, sent: int) -> list[Answer | ShadowdError]:
    """Per item of a batch of *sent* fds that may not wait: an Answer, or the refusal
    of that item."""
    if isinstance(reply, ErrorReply):
        raise refused(reply.code, reply.message)
    if not isinstance(reply, BatchOpened):
        close_reply(reply)
        raise ProtocolViolation(f"expected a batch reply, got {type(reply).__name__}")
    if len(reply.results) != sent:
        close_reply(reply)
        raise ProtocolViolation(f"{len(reply.results)} results to a batch of {sent} fds")
    out: list[Answer | ShadowdError] = []
    for i, item in enumerate(reply.results):
        if isinstance(item, OpenedItem):
            try:
                check_served(item.fd)
            except ProtocolViolation:
                close_all(r.fd for r in reply.results[i + 1 :] if isinstance(r, OpenedItem))
                close_all(a.fd for a in out if isinstance(a, Answer) and a.fd is not None)
                raise
            out.append(Answer(item.fd, item.size, item.hit, item.version, item.cached))
        elif isinstance(item, MissedItem):
            out.append(Answer(fd=None, filling=item.filling))
        else:
            out.append(refused(item.code, item.message))
    return out


def lookup_result(reply: Reply, key: FileKey) -> int | None:
    """The checked fd of a lookup hit of *key* (:func:`private_fd`); None on a miss."""
    if isinstance(reply, LookupMiss):
        return None
    return private_fd(reply, key)


def private_fd(reply: Reply, key: FileKey) -> int:
    """The fd of a reply to a lookup or publish of the private file *key*, checked
    (:func:`opened_fd`) and holding ``key.size`` bytes: the key is the caller's own
    fstat of the file, and the daemon refuses a publish of another size, so an entry
    served in another is not that file (the fd is closed: ProtocolViolation)."""
    fd = opened_fd(reply)
    try:
        size = os.fstat(fd).st_size
    except OSError:
        size = -1
    if size != key.size:
        os.close(fd)
        raise ProtocolViolation(
            f"the daemon served a private file of {size} bytes for a key of {key.size}; refused it"
        )
    return fd


def new_memfd(*, executable: bool) -> FdHolder:
    """A fresh memfd for a private file: sealable, executable iff *executable*."""
    try:
        return FdHolder(create(executable=executable))
    except OSError as exc:
        raise SourceError(f"cannot create a memfd: {os.strerror(exc.errno or 0)}") from None


def check_filled(memfd: FdHolder, key: FileKey) -> None:
    """Raise SizeMismatch when the memfd does not hold ``key.size`` bytes."""
    size = os.fstat(memfd.fd).st_size
    if size != key.size:
        raise SizeMismatch(f"fill wrote {size} bytes; the key says {key.size}")


def filled_memfd(key: FileKey, fill: Fill, *, executable: bool) -> FdHolder:
    """A new memfd that *fill* wrote the file into, checked for its size.

    Whatever *fill* raises goes to the caller unchanged.
    """
    memfd = new_memfd(executable=executable)
    try:
        fill(memfd.fd)
        check_filled(memfd, key)
    except BaseException:
        memfd.close()
        raise
    return memfd


def queued_refusal(fd: int, session: Session) -> ShadowdError | None:
    """The error reply a daemon sent before it closed the connection, if one is queued.

    A daemon that turns a peer away answers at once and closes; the peer's
    next send then fails (EPIPE), but the answer still waits to be read.
    """
    try:
        sock = socket.socket(fileno=os.dup(fd))
    except OSError:
        return None
    with sock:
        try:
            data, ancdata, flags, _ = sock.recvmsg(
                REFUSAL_BUFFER, ANC_SPACE, RECV_FLAGS | socket.MSG_DONTWAIT
            )
        except OSError:
            return None
    try:
        fds = reply_fds(ancdata)
    except ShadowdError:
        return None
    if not data:
        close_all(fds)
        return None
    try:
        reply = session.receive(data, fds, flags)
    except Refused as exc:
        return exc
    except ShadowdError:
        return None
    if reply is not None:
        close_reply(reply)
    return None


def stats_of(reply: Reply) -> dict[str, Any]:
    if isinstance(reply, ErrorReply):
        raise refused(reply.code, reply.message)
    if not isinstance(reply, StatsReply):
        close_reply(reply)
        raise ProtocolViolation(f"expected a stats reply, got {type(reply).__name__}")
    return dict(reply.stats)


def close_reply(reply: Reply) -> None:
    """Close whatever fds a reply carries (a reply nobody will take)."""
    if isinstance(reply, (Opened, IndexReply)):
        os.close(reply.fd)
    elif isinstance(reply, BatchOpened):
        close_all(reply.fds)
