# Is anyone writing this file? A read lease (fcntl F_SETLEASE, F_RDLCK) can
# only be taken while nobody has the file open for writing (a writable
# mapping keeps it so), and is broken when someone opens it for writing: held
# around a copy, it tells whether a write could have been under way during
# it. Used in worker threads, around each copy.
#
# A lease needs the file's owner or CAP_LEASE; without either, nothing can be
# told this way (the caller relies on its inotify watch alone). A writer that
# opens the file during the copy waits until the lease is let go (at the
# latest when the copy ends), never longer.
#
# Must never: keep a lease past the copy; let the kernel's lease-break signal
# (SIGIO) reach a process that has not ignored it (ignore_sigio first).
from __future__ import annotations

import enum
import errno
import fcntl
import signal
import threading

F_SETLEASE = getattr(fcntl, "F_SETLEASE", 1024)
F_GETLEASE = getattr(fcntl, "F_GETLEASE", 1025)


class Writers(enum.Enum):
    """What a lease said about writers of a file during a copy."""

    NONE = "none"  # the lease was held throughout: no write was under way
    PRESENT = "present"  # someone had or opened it for writing
    UNKNOWN = "unknown"  # no lease could be taken (not the owner, no CAP_LEASE, no support)


def ignore_sigio() -> None:
    """Ignore SIGIO, which a broken lease sends to its holder (default: terminate).

    Only the main thread may set a signal's disposition; elsewhere this does
    nothing (the daemon calls it at start, from its main thread).
    """
    if threading.current_thread() is threading.main_thread():
        signal.signal(signal.SIGIO, signal.SIG_IGN)


def take(fd: int) -> Writers | None:
    """Take a read lease on *fd* (open read-only): None when taken, else why not."""
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_RDLCK)
    except OSError as exc:
        if exc.errno in (errno.EAGAIN, errno.EBUSY):
            return Writers.PRESENT  # open for writing (or mapped writable) right now
        return Writers.UNKNOWN  # EACCES, EPERM, EINVAL: no lease here
    return None


def give_back(fd: int) -> Writers:
    """Let go of the lease taken on *fd*; whether it held until now."""
    try:
        held = fcntl.fcntl(fd, F_GETLEASE) == fcntl.F_RDLCK
    except OSError:
        held = False
    try:
        fcntl.fcntl(fd, F_SETLEASE, fcntl.F_UNLCK)
    except OSError:
        pass  # broken and gone already
    return Writers.NONE if held else Writers.PRESENT
