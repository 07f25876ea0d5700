# The client library's exception family, and the one place that turns what
# goes wrong (an OSError, an error reply, a broken reply) into it.
#
# Must never: let a bare OSError, a trio exception or a protocol-internal
# exception reach the caller. Everything raised is a ShadowdError.
from __future__ import annotations

import errno
import grp
import os
import pwd
import stat
from collections.abc import Iterator
from contextlib import contextmanager


class ShadowdError(Exception):
    """Root of every error the client library raises."""


class DaemonUnavailable(ShadowdError):
    """No daemon answers on the socket, or the connection broke and could not be reopened."""

    def __init__(self, message: str, *, socket_path: str | None = None) -> None:
        super().__init__(message)
        self.socket_path = socket_path


class DaemonTimeout(DaemonUnavailable):
    """The daemon did not answer in time."""


class ProtocolViolation(ShadowdError):
    """The daemon's reply broke the protocol (what it says, or the fds it carries: each
    was closed, none returned). A connection whose replies can no longer be matched
    to its requests is dropped."""


class UnsealedDescriptor(ProtocolViolation):
    """The daemon sent an fd without the four seals; it was closed, not returned."""


class UnsupportedProtocolVersion(ProtocolViolation):
    """The daemon answered hello with a protocol version this client does not speak
    (0, or above the one it said: a daemon of a newer major version). The connection
    is dropped and nothing is asked on it; an :class:`Opener` copies locally
    meanwhile, as while the daemon is down. ``version`` is what the daemon said."""

    def __init__(self, message: str, *, version: int | None = None) -> None:
        super().__init__(message)
        self.version = version


class VersionMismatch(ShadowdError):
    """The daemon served the file in another version than this client's own ``fstat``
    of the source saw (the version its reply says, or the served descriptor's size),
    and again when asked once more: the file kept changing, or the daemon serves what
    it should not. Every such descriptor was closed, none returned. An :class:`Opener`
    never raises it: it copies the file here instead."""


class SourceError(ShadowdError):
    """The client could not open or read the file itself (before asking the daemon)."""

    def __init__(self, message: str, *, errno: int | None = None, filename: str | None = None):
        super().__init__(message)
        self.errno = errno
        self.filename = filename


class TooManyOpenFiles(SourceError):
    """This process has no descriptor number left (its RLIMIT_NOFILE, or the
    system's limit): it could not open the source, make a socket to the daemon,
    take in the descriptor a reply carried (the kernel dropped it: MSG_CTRUNC),
    or make a local copy. The client's own trouble, not the daemon's: the
    connection stays, and an :class:`Opener` keeps asking the daemon (no
    breaker) and copies the file here when it can. ``errno`` is EMFILE (or
    ENFILE), as an ``open`` at the limit would say."""

    #: For a reply whose descriptors were dropped: the id of the request it
    #: answered (an AsyncClient hands the error to that request's task).
    reply_id: int | None = None


#: What an OSError says when this process (or the system) is out of descriptors.
FD_LIMIT_ERRNOS = (errno.EMFILE, errno.ENFILE)


class Refused(ShadowdError):
    """The daemon refused the request. ``code`` is the stable code from the protocol."""

    code: str = "refused"

    def __init__(self, message: str, *, code: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code

    def naming(self, path: str | os.PathLike[str]) -> Refused:
        """The same refusal, its message naming the file the caller asked for (the
        daemon saw only a descriptor)."""
        shown = os.fsdecode(path) or repr("")
        return type(self)(f"{shown}: {self.message}", code=self.code)


class BadRequest(Refused):
    """The daemon did not understand the request (a bug in the client, or a version mismatch)."""

    code = "bad-request"


class NotRegularFile(Refused):
    """Only regular files are served: FIFOs, directories, sockets and devices are refused."""

    code = "not-regular"


class NotReadable(Refused):
    """The passed descriptor was not open for reading."""

    code = "not-readable"


class FileTooLarge(Refused):
    """The file is above the daemon's --max-file-size; copy it locally instead."""

    code = "file-too-large"


class FileUnstable(Refused):
    """The file kept changing while the daemon copied it."""

    code = "unstable"


class DaemonIOError(Refused):
    """The daemon could not read the file."""

    code = "io-error"


class NotPermitted(Refused):
    """This peer (uid/gid) is not allowed to use the daemon (its --allow-uid/--allow-gid)."""

    code = "not-permitted"


class SizeMismatch(Refused):
    """A published private file does not hold the number of bytes its key says."""

    code = "size-mismatch"


class Busy(Refused):
    """The daemon is at one of its limits; try again later."""

    code = "busy"


class ShuttingDown(Refused):
    """The daemon is stopping."""

    code = "shutting-down"


class InternalError(Refused):
    """The daemon hit a bug of its own."""

    code = "internal"


_BY_CODE: dict[str, type[Refused]] = {
    cls.code: cls
    for cls in (
        BadRequest,
        NotRegularFile,
        NotReadable,
        FileTooLarge,
        FileUnstable,
        DaemonIOError,
        NotPermitted,
        SizeMismatch,
        Busy,
        ShuttingDown,
        InternalError,
    )
}
for _code in (
    "request-too-large",
    "unsupported-version",
    "hello-required",
    "unknown-op",
    "bad-fds",
):
    _BY_CODE[_code] = BadRequest


def refused(code: str, message: str) -> Refused:
    """The exception for an error reply with *code*."""
    return _BY_CODE.get(code, Refused)(message, code=code)


def source_error(exc: OSError, path: str) -> SourceError:
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    kind = TooManyOpenFiles if exc.errno in FD_LIMIT_ERRNOS else SourceError
    shown = path or repr(path)  # an empty path named as one, not as nothing
    return kind(f"cannot open {shown}: {reason}", errno=exc.errno, filename=path)


def no_socket(exc: OSError, socket_path: str, where: str = "") -> ShadowdError:
    """The error for a socket to the daemon at *socket_path* that could not be made
    or connected: this process's descriptor limit (not the daemon's fault), else
    :func:`unavailable`."""
    if exc.errno in FD_LIMIT_ERRNOS:
        return TooManyOpenFiles(
            f"no descriptor left for a socket to shadowd at {socket_path}: "
            f"{os.strerror(exc.errno)}",
            errno=exc.errno,
        )
    return unavailable(exc, socket_path, "connecting", where)


def unavailable(exc: OSError, socket_path: str, doing: str, where: str = "") -> DaemonUnavailable:
    """The error for an OSError met while *doing* something with the daemon's socket.

    *where* says how the path was found (``SocketChoice.describe``), so that a
    client that found no daemon says which places it looked at.
    """
    context = f"{doing}; {where}" if where else doing
    if isinstance(exc, TimeoutError):
        return DaemonTimeout(
            f"shadowd at {socket_path} did not answer in time ({context})",
            socket_path=socket_path,
        )
    return DaemonUnavailable(
        f"cannot reach shadowd at {socket_path}: {_reason(exc, socket_path)} ({context})",
        socket_path=socket_path,
    )


def hello_violation(exc: ProtocolViolation, socket_path: str) -> ProtocolViolation:
    """*exc*, raised before the hello was answered, naming the socket: what answered
    there is most likely not a shadowd daemon (unless it said a version we do not speak:
    a shadowd of another version)."""
    if isinstance(exc, UnsupportedProtocolVersion):
        return UnsupportedProtocolVersion(f"shadowd at {socket_path}: {exc}", version=exc.version)
    return type(exc)(f"{socket_path} is not a shadowd socket? its answer to hello: {exc}")


def _reason(exc: OSError, socket_path: str) -> str:
    """Why connecting failed, in the words of what is at *socket_path*."""
    if exc.errno == errno.EPROTOTYPE:
        # Something listens there, with another socket type (stream, datagram).
        return "not a shadowd socket (a socket of another type; shadowd speaks SOCK_SEQPACKET)"
    if exc.errno == errno.ECONNREFUSED:
        # connect() says "refused" for a path that is no socket at all, too.
        try:
            mode = os.lstat(socket_path).st_mode
        except OSError:
            pass
        else:
            if not stat.S_ISSOCK(mode):
                return "not a socket"
            return "no daemon is listening on this socket (Connection refused)"
    if exc.errno == errno.EACCES:
        return _access_denied(socket_path)
    return os.strerror(exc.errno) if exc.errno else str(exc)


def _access_denied(socket_path: str) -> str:
    """EACCES at connect, with who the socket lets in when that is why.

    A bare "Permission denied" left a new user guessing: most often the socket
    is the host daemon's, which lets in only root (``make run`` as root) or the
    members of its group (the system units; docs/operations.md).
    """
    denied = os.strerror(errno.EACCES)
    try:
        st = os.stat(socket_path)
    except OSError:
        return denied  # a directory on the way refused us: the kernel's words say it
    mode = stat.S_IMODE(st.st_mode)
    if not stat.S_ISSOCK(st.st_mode) or mode & 0o002:
        return denied  # not the socket's mode that refused us
    owner, group = _user_name(st.st_uid), _group_name(st.st_gid)
    who = (
        f"only {owner} and the members of group {group} may connect"
        if mode & 0o020
        else f"only {owner} may connect"
    )
    return f"{denied}: the socket is {owner}:{group}, mode {mode:04o}: {who}"


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def _group_name(gid: int) -> str:
    try:
        return grp.getgrgid(gid).gr_name
    except KeyError:
        return str(gid)


@contextmanager
def connecting(socket_path: str, where: str = "") -> Iterator[None]:
    """Turn an OSError met making or connecting a socket in the block into
    :func:`no_socket`'s error."""
    try:
        yield
    except OSError as exc:
        raise no_socket(exc, socket_path, where) from exc
