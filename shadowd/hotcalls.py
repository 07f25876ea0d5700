# The hit path's system calls (recvmsg with descriptors, statx without
# sync, the reopen of a memfd, sendmsg with descriptors), a new connection's
# (accept_peer: accept4, the renumbering, SO_PEERCRED) and a whole cache
# hit in one call (answer_hit), from the C extension shadowd/_hotcalls.c
# when it was built, else in Python; and the client's hit through the index
# in one call (index_open, for client/shadowd_client/index.py). Measured in
# one process, a hit took the daemon about 37 us in Python and 16-24 us with
# the extension; under load its CPU per hit fell from 45-66 us to 27-37 us
# (docs/performance.md).
#
# Must never: differ between the two versions in anything but speed (the
# same results, flags, fds and exceptions; tests/test_hotcalls.py runs
# both; the Python answer_hit answers nothing and leaves every hit to the
# server's Python path); close or keep an fd it was only shown.
from __future__ import annotations

import ctypes
import errno
import fcntl
import os
import socket
import struct
import threading
from collections.abc import Callable, Hashable, Mapping, Sequence
from typing import cast

from .fds import fds_from_ancdata, scm_rights

_RECV_FLAGS = int(socket.MSG_CMSG_CLOEXEC | socket.MSG_DONTWAIT)
_SEND_FLAGS = int(socket.MSG_NOSIGNAL | socket.MSG_DONTWAIT)
_REOPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC

_AT_EMPTY_PATH = 0x1000
_AT_STATX_DONT_SYNC = 0x4000
# TYPE | MODE | MTIME | CTIME | INO | SIZE
_STATX_WANTED = 0x1 | 0x2 | 0x40 | 0x80 | 0x100 | 0x200
# Linux 6.8+: a mount ID that is never reused while the system runs.
_STATX_MNT_ID_UNIQUE = 0x4000
_STATX_ASKED = 0x7FF | _STATX_MNT_ID_UNIQUE  # STATX_BASIC_STATS and the mount
# struct statx: mask at 0, mode at 28, ino at 32, size at 40, ctime at 96,
# mtime at 112, dev major/minor at 136, mnt_id at 144
# (include/uapi/linux/stat.h).
_STATX_LAYOUT = struct.Struct("<I24xH2xQQ48xqI4xqI4x8xIIQ")
_STATX_SIZE = 256

#: (dev, ino, mode, size, mtime_ns, ctime_ns, mnt): what statx_nosync returns.
StatxFields = tuple[int, int, int, int, int, int, int]


def libc_function(name: str) -> Callable[..., int] | None:
    """*name* from the C library, errno kept for ctypes.get_errno; None if it has none."""
    try:
        return cast(Callable[..., int], getattr(ctypes.CDLL(None, use_errno=True), name))
    except (OSError, AttributeError):
        return None


_libc_statx_fn = libc_function("statx")
_tls = threading.local()  # one statx buffer per thread


def py_statx_nosync(fd: int) -> StatxFields | None:
    """statx(AT_EMPTY_PATH | AT_STATX_DONT_SYNC) of *fd*: the kernel's cached attributes.

    None when the file system left out a field a key needs. Raises OSError.
    """
    if _libc_statx_fn is None:
        raise OSError(38, os.strerror(38))  # ENOSYS: the C library has no statx
    try:
        buf = _tls.buf
    except AttributeError:
        buf = _tls.buf = ctypes.create_string_buffer(_STATX_SIZE)
    # No argtypes on purpose: every argument is a small int, bytes or a
    # buffer, which ctypes passes right by default.
    if _libc_statx_fn(fd, b"", _AT_EMPTY_PATH | _AT_STATX_DONT_SYNC, _STATX_ASKED, buf) != 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    (mask, mode, ino, size, c_sec, c_nsec, m_sec, m_nsec, major, minor, mnt) = (
        _STATX_LAYOUT.unpack_from(buf)
    )
    if mask & _STATX_WANTED != _STATX_WANTED:
        return None
    return (
        os.makedev(major, minor),
        ino,
        mode,
        size,
        m_sec * 1_000_000_000 + m_nsec,
        c_sec * 1_000_000_000 + c_nsec,
        mnt if mask & _STATX_MNT_ID_UNIQUE else 0,
    )


def py_recv(
    sock: socket.socket, buffer: bytearray | memoryview, ancsize: int
) -> tuple[int, int, list[int]]:
    """One recvmsg(MSG_CMSG_CLOEXEC | MSG_DONTWAIT) into *buffer*: (nbytes, flags, fds).

    The fds of every SCM_RIGHTS message are the caller's. Raises OSError
    (BlockingIOError when nothing is queued).
    """
    n, ancdata, flags, _ = sock.recvmsg_into([buffer], ancsize, _RECV_FLAGS)
    return n, flags, fds_from_ancdata(ancdata)


def py_send(sock: socket.socket, data: bytes | memoryview, fds: Sequence[int]) -> int:
    """One sendmsg(MSG_NOSIGNAL | MSG_DONTWAIT) of *data* with *fds*; they stay the caller's."""
    return sock.sendmsg([data], scm_rights(fds), _SEND_FLAGS)


def py_reopen(dirfd: int, fd: int) -> int:
    """A new read-only open file description of *fd*, *dirfd* being /proc/self/fd."""
    if fd < 0:
        raise OSError(9, os.strerror(9))  # EBADF, as openat would say for "-1"
    return os.open(str(fd), _REOPEN_FLAGS, dir_fd=dirfd)


# struct ucred: pid_t signed, uid_t and gid_t not (3000000000 is a uid).
_UCRED = struct.Struct("iII")
_ACCEPT_TYPE = socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK


def py_accept_peer(lfd: int, base: int) -> tuple[int, int, int, int] | None:
    """accept4 on the listening socket *lfd*: (fd, pid, uid, gid), or None when no
    connection waits. The new socket is non-blocking and close-on-exec, renumbered
    to *base* or above (where a number is free), its peer read with SO_PEERCRED;
    ECONNABORTED (the socket closed) when that fails."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET, 0, fileno=lfd)
    try:
        fd, _ = listener._accept()  # type: ignore[attr-defined]
    except BlockingIOError:
        return None
    finally:
        listener.detach()
    conn = socket.socket(socket.AF_UNIX, _ACCEPT_TYPE, 0, fileno=fd)
    try:
        conn.setblocking(False)
        try:
            high = fcntl.fcntl(conn.fileno(), fcntl.F_DUPFD_CLOEXEC, base)
        except OSError:
            pass  # kept where it is
        else:
            conn.close()
            conn = socket.socket(socket.AF_UNIX, _ACCEPT_TYPE, 0, fileno=high)
        try:
            raw = conn.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        except OSError:
            conn.close()
            raise OSError(errno.ECONNABORTED, os.strerror(errno.ECONNABORTED)) from None
        fd = conn.detach()
    except BaseException:
        conn.close()
        raise
    pid, uid, gid = _UCRED.unpack(raw)
    return fd, pid, uid, gid


def py_send_reopened(sock: socket.socket, data: bytes | memoryview, dirfd: int, fd: int) -> int:
    """reopen(dirfd, fd), send *data* with that new fd, close it: a hit's reply in one call.

    Returns 0 when sent, the errno when the reopen failed (nothing was
    sent). Raises OSError when the send failed (BlockingIOError: no room);
    the new fd is closed in every case.
    """
    try:
        served = py_reopen(dirfd, fd)
    except OSError as exc:
        return exc.errno or errno.EIO
    try:
        py_send(sock, data, (served,))
    finally:
        os.close(served)
    return 0


def py_answer_hit(  # noqa: PLR0917 (the C function's positional signature)
    sock: socket.socket,
    buffer: bytearray | memoryview,
    ancsize: int,
    entries: Mapping[Hashable, object],
    is_local: Callable[[int, int], bool],
    max_file_size: int,
    closing: list[int],
    v2: bool = False,
    watch_fd: int = -1,
) -> tuple[int, int, list[int]]:
    """Read one datagram; the C version answers a cache hit itself.

    This one always declines: it returns recv()'s (nbytes, flags, fds) for
    the server's ordinary path, which is the same work done in Python.
    """
    return py_recv(sock, buffer, ancsize)


statx_nosync: Callable[[int], StatxFields | None]
recv: Callable[[socket.socket, bytearray | memoryview, int], tuple[int, int, list[int]]]
send: Callable[[socket.socket, bytes | memoryview, Sequence[int]], int]
reopen: Callable[[int, int], int]
send_reopened: Callable[[socket.socket, bytes | memoryview, int, int], int]
#: Returns the answered hit's cache entry (its two fds appended to the last
#: argument, to be closed), or recv()'s tuple (see py_answer_hit).
answer_hit: Callable[
    [
        socket.socket,
        bytearray | memoryview,
        int,
        Mapping[Hashable, object],
        Callable[[int, int], bool],
        int,
        list[int],
        bool,
        int,
    ],
    object,
]

#: IndexView.open and IndexView.open_fd, each in one call
#: (client/shadowd_client/index.py, whose Python path is the reference), the
#: index layout (version, header, slot size) they read, and the version of
#: their arguments (2: the view's `direct` flag before the file); None when
#: the C extension is not in use (or was built before it had them): the
#: view's Python path is used then.
index_open: Callable[..., int | None] | None = None
index_open_fd: Callable[..., int | None] | None = None
#: IndexView.holds in one call (the process-local tier's check of a memfd it
#: keeps); None as above, or from an extension built before it had it.
index_holds: Callable[..., bool] | None = None
INDEX_LAYOUT: tuple[int, int, int] | None = None
INDEX_CALLS: int | None = None

#: Set (to anything but "" or "0") to use the Python versions even when the
#: C extension is built: to compare the two, or to rule the C out.
DISABLE_ENV = "SHADOWD_NO_C"


def _load_c() -> tuple[object | None, str]:
    """The C extension (or None) and what the log calls the versions in use."""
    if os.environ.get(DISABLE_ENV, "") not in ("", "0"):
        return None, f"Python ({DISABLE_ENV} is set)"
    try:
        from . import _hotcalls  # type: ignore[attr-defined]
    except ImportError:
        return None, "Python (the C extension is not built)"
    return cast(object, _hotcalls), "C"


#: Which versions are in use, for the log and the benchmark: "C" or "Python (why)".
_c, DESCRIPTION = _load_c()
#: Whether the C versions are in use.
IN_C = _c is not None
if _c is None:
    statx_nosync, recv, send, reopen = py_statx_nosync, py_recv, py_send, py_reopen
    send_reopened, answer_hit = py_send_reopened, py_answer_hit
    accept_peer = py_accept_peer
else:
    statx_nosync = _c.statx_nosync  # type: ignore[attr-defined]
    recv = _c.recv  # type: ignore[attr-defined]
    send = _c.send  # type: ignore[attr-defined]
    reopen = _c.reopen  # type: ignore[attr-defined]
    send_reopened = _c.send_reopened  # type: ignore[attr-defined]
    answer_hit = _c.answer_hit  # type: ignore[attr-defined]
    # An extension built before accept_peer (an older build left in place).
    accept_peer = getattr(_c, "accept_peer", py_accept_peer)
    index_open = getattr(_c, "index_open", None)
    index_open_fd = getattr(_c, "index_open_fd", None)
    index_holds = getattr(_c, "index_holds", None)
    INDEX_LAYOUT = getattr(_c, "INDEX_LAYOUT", None)
    INDEX_CALLS = getattr(_c, "INDEX_CALLS", None)
