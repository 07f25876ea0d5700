# memfd handling: create, copy into, seal, and hand out private read-only
# descriptors of a sealed memfd.
#
# Must never: hand out the daemon's own fd or a dup of it (dup and SCM_RIGHTS
# share one file offset between all holders); hand out a memfd before all four
# seals are set; make a copy executable when its source was not, or the other
# way round; name a memfd after anything but the basename the kernel reports
# for the copied file's own fd (never its full path: a tracee can readlink
# the memfd, and the directories are the host's; never a label a client
# chose: the name shows in /proc/PID/maps, perf and gdb as the file's);
# reopen through another process's /proc/PID/fd (a forked child reopens
# through its own).
from __future__ import annotations

import errno
import fcntl
import os
import stat
import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import attrs

from . import hotcalls
from .errors import SourceChanged
from .fds import LONG_LIVED_BASE, FdHolder, move_high
from .source import SourceStat, stat_sync

if TYPE_CHECKING:
    from .fdrange import FdRange

MFD_EXEC = getattr(os, "MFD_EXEC", 0x0010)
MFD_NOEXEC_SEAL = getattr(os, "MFD_NOEXEC_SEAL", 0x0008)
F_SEAL_EXEC = getattr(fcntl, "F_SEAL_EXEC", 0x0020)

#: The seals every served memfd carries before its first hand-out.
REQUIRED_SEALS = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL

#: The name of memfds that copy no host file (private files, tests).
MEMFD_NAME = "shadowd"
#: The longest name memfd_create takes: NAME_MAX less the "memfd:" prefix.
MAX_MEMFD_NAME = 255 - len("memfd:")
_DELETED = " (deleted)"
_SENDFILE_CHUNK = 0x7FFFF000
_PREAD_CHUNK = 1 << 20

# Whether the kernel knows MFD_EXEC / MFD_NOEXEC_SEAL (Linux 6.3+): None
# until the first memfd_create tells.
_kernel: dict[str, bool | None] = {"exec_flags": None}


def create(*, executable: bool, name: str = MEMFD_NAME) -> int:
    """A new empty memfd that allows sealing, executable iff *executable*."""
    base = os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING
    known = _kernel["exec_flags"]
    if known is not False:
        extra = MFD_EXEC if executable else MFD_NOEXEC_SEAL
        try:
            fd = os.memfd_create(name, base | extra)
        except OSError as exc:
            if exc.errno != errno.EINVAL or known:
                raise
            _kernel["exec_flags"] = False
        else:
            _kernel["exec_flags"] = True
            return fd
    # Old kernel: a memfd starts as mode 0777; seal() narrows it.
    return os.memfd_create(name, base)


def name_for(fd: int) -> str:
    """The name for a memfd copy of the file open at *fd*: its basename.

    As the kernel reports it (``readlink /proc/self/fd/N``): the name it was
    opened by, or renamed to since. ``MEMFD_NAME`` for what has no file name
    of its own: another memfd (a published private file), a pipe, an
    anonymous inode. Cut to what memfd_create takes, at a character boundary.
    """
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError:
        return MEMFD_NAME
    if not target.startswith("/") or target.startswith("/memfd:"):
        return MEMFD_NAME
    if target.endswith(_DELETED):
        try:
            unlinked = os.fstat(fd).st_nlink == 0
        except OSError:
            unlinked = True
        if unlinked:  # else " (deleted)" is part of the name itself
            target = target[: -len(_DELETED)]
    base = target.rpartition("/")[2]
    if not base:
        return MEMFD_NAME
    raw = os.fsencode(base)
    if len(raw) > MAX_MEMFD_NAME:
        raw = _cut_utf8(raw, MAX_MEMFD_NAME)
    return os.fsdecode(raw)


def _cut_utf8(raw: bytes, limit: int) -> bytes:
    """At most *limit* bytes of *raw*, without splitting a UTF-8 character."""
    for end in range(limit, max(limit - 4, 0), -1):
        try:
            raw[:end].decode("utf-8")
        except UnicodeDecodeError:
            continue
        return raw[:end]
    return raw[:limit]  # not UTF-8 at all: bytes are bytes


def seal(fd: int, *, executable: bool) -> None:
    """Make *fd* read-only for good: mode r-x or r--, then the four seals.

    The mode makes even an O_RDWR reopen through /proc fail for anyone but
    root; the seals make every write, grow and shrink fail for everyone.
    """
    os.fchmod(fd, 0o555 if executable else 0o444)
    try:
        # Freeze the exec bits too, where the kernel knows F_SEAL_EXEC.
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_EXEC)
    except OSError as exc:
        if exc.errno != errno.EINVAL:
            raise
    for delay in _SEAL_RETRY_DELAYS:
        try:
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
            return
        except OSError as exc:
            # EBUSY: pages of the file are pinned for a moment (seen under
            # load right after sendfile filled it), or something maps it
            # writable; the kernel waited some tens of ms before saying so.
            if exc.errno != errno.EBUSY:
                raise
        time.sleep(delay)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)


#: Pauses between attempts to seal a file the kernel says is busy. seal()
#: runs in worker threads and clients, never on the daemon's loop.
_SEAL_RETRY_DELAYS = (0.01, 0.02, 0.04)


def seals_of(fd: int) -> int:
    return fcntl.fcntl(fd, fcntl.F_GET_SEALS)


def memfd_seals(fd: int) -> int | None:
    """The seals of *fd* when it is a shmem file (a memfd); None otherwise.

    F_GET_SEALS never reaches a filesystem's code, so it is safe on any fd.
    """
    try:
        return fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    except OSError:
        return None


def is_sealed(fd: int) -> bool:
    """True when *fd* carries all of REQUIRED_SEALS."""
    try:
        return seals_of(fd) & REQUIRED_SEALS == REQUIRED_SEALS
    except OSError:
        return False


def reopen_readonly(fd: int) -> int:
    """A new open file description of *fd*'s file, read-only, with its own offset
    (opened through this process's /proc/self/fd, as a hit's reopen is)."""
    return _reopen(_proc_fd_dir(), fd)


def copy_into(dst: int, src: int, size: int) -> None:
    """Copy exactly *size* bytes from offset 0 of *src* to *dst* (empty, at offset 0).

    Uses sendfile (the fastest path measured here into a memfd) and falls back
    to pread/write where the source filesystem cannot splice. The holes of a
    sparse source stay holes: they cost the copy no memory. Raises
    SourceChanged when the source has fewer or more than *size* bytes.
    """
    ranges = _data_ranges(src, size)
    if ranges != [(0, size)]:
        os.ftruncate(dst, size)  # holes, at the start, between and at the end
    for start, end in ranges:
        _copy_range(dst, src, start, end)
    # One more byte means the file is longer than its stat said (a pseudo
    # file, or a writer racing us): not an exact copy.
    if os.pread(src, 1, size):
        raise SourceChanged(f"source holds more than the {size} bytes its stat reports")


def _copy_range(dst: int, src: int, start: int, end: int) -> None:
    """Copy bytes [start, end) of *src* to the same offsets of *dst*."""
    copied = start
    try:
        if start:
            os.lseek(dst, start, os.SEEK_SET)  # sendfile writes at dst's position
        while copied < end:
            n = os.sendfile(dst, src, copied, min(end - copied, _SENDFILE_CHUNK))
            if n == 0:
                raise SourceChanged(f"source ended at {copied} of {end} bytes")
            copied += n
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
            raise
        _copy_pread(dst, src, copied, end)


def _data_ranges(src: int, size: int) -> list[tuple[int, int]]:
    """Where *src*'s bytes are: the whole file, or, for a sparse one, its data.

    A file whose blocks cover its size has no holes to skip (most files:
    no lseek then). Otherwise SEEK_DATA and SEEK_HOLE find the data; they
    move the file offset, which a passed fd shares with its sender, so it
    is put back.
    """
    if size == 0:
        return []
    st = os.fstat(src)
    if st.st_blocks * 512 >= size:
        return [(0, size)]
    try:
        saved = os.lseek(src, 0, os.SEEK_CUR)
    except OSError:
        return [(0, size)]
    ranges: list[tuple[int, int]] = []
    try:
        offset = 0
        while offset < size:
            try:
                start = os.lseek(src, offset, os.SEEK_DATA)
            except OSError as exc:
                if exc.errno == errno.ENXIO:
                    break  # a hole up to the end
                return [(0, size)]  # no hole support: copy it all
            if start >= size:
                break
            end = min(os.lseek(src, start, os.SEEK_HOLE), size)
            ranges.append((start, end))
            offset = end
    except OSError:
        return [(0, size)]
    finally:
        try:
            os.lseek(src, saved, os.SEEK_SET)
        except OSError:
            pass
    return ranges


def _copy_pread(dst: int, src: int, offset: int, size: int) -> None:
    buf = bytearray(min(_PREAD_CHUNK, max(size - offset, 1)))
    view = memoryview(buf)
    while offset < size:
        want = min(len(buf), size - offset)
        n = os.preadv(src, [view[:want]], offset)
        if n == 0:
            raise SourceChanged(f"source ended at {offset} of {size} bytes")
        done = 0
        while done < n:
            done += os.pwrite(dst, view[done:n], offset + done)
        offset += n


def sealed_copy(src: int, expected: SourceStat) -> SealedFile:
    """A sealed memfd holding the bytes of *src*, which must still be *expected*.

    Blocking: call it from a worker thread. Raises SourceChanged when the
    source's stat after the copy differs from *expected* or its length does
    not match, so a torn copy is never returned. The memfd is named after
    the source's basename (:func:`name_for`).
    """
    fd = create(executable=expected.executable, name=name_for(src))
    try:
        copy_into(fd, src, expected.size)
        after = stat_sync(src)
        if not after.same_file_as(expected):
            raise SourceChanged("source changed during the copy")
        seal(fd, executable=expected.executable)
    except BaseException:
        os.close(fd)
        raise
    return own_sealed(fd, size=expected.size, executable=expected.executable)


def sealed_from_bytes(data: bytes, *, executable: bool = False) -> SealedFile:
    """A sealed memfd holding *data* (tests and benchmarks)."""
    fd = create(executable=executable)
    try:
        view = memoryview(data)
        done = 0
        while done < len(data):
            done += os.write(fd, view[done:])
        seal(fd, executable=executable)
    except BaseException:
        os.close(fd)
        raise
    return own_sealed(fd, size=len(data), executable=executable)


def own_sealed(fd: int, *, size: int, executable: bool) -> SealedFile:
    """The SealedFile that owns the sealed memfd *fd*, renumbered high; *fd* is closed
    should making it fail (its first use in a process opens /proc/self/fd: EMFILE at
    the fd limit)."""
    holder = FdHolder(move_high(fd))
    try:
        return SealedFile(holder, size=size, executable=executable)
    except BaseException:
        holder.close()
        raise


_PROC_FD: dict[str, int] = {}


def _proc_fd_dir() -> int:
    """An fd of this process's /proc/self/fd, opened once.

    Reopening through openat(dirfd, "N") skips the walk through /proc and
    the self link that every open of "/proc/self/fd/N" pays.
    """
    fd = _PROC_FD.get("fd")
    if fd is None:
        fd = move_high(os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC))
        _PROC_FD["fd"] = fd
    return fd


def proc_fd_dir_again(fd: int) -> None:
    """In a forked child: this process's /proc/self/fd at *fd*, in place of the
    parent's it inherited there (a reopen of N through that would open the
    parent's fd N). The same number, so whatever holds it keeps it.

    A child of a parent at its fd limit has no number free: the parent's
    handle goes first, which frees *fd* itself. Should the open fail all the
    same, *fd* is left closed and OSError raised: the caller must forget the
    number, never reopen through it.
    """
    try:
        try:
            fresh = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        except OSError:
            os.close(fd)
            fresh = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
        if fresh != fd:
            try:
                os.dup2(fresh, fd, inheritable=False)
            finally:
                os.close(fresh)
    except OSError:
        try:
            os.close(fd)
        except OSError:
            pass  # closed above already
        raise


def _proc_fd_dir_in_child() -> None:
    fd = _PROC_FD.get("fd")
    if fd is not None:
        try:
            proc_fd_dir_again(fd)  # (SealedFiles keep its number)
        except OSError:
            del _PROC_FD["fd"]  # opened again when next needed


os.register_at_fork(after_in_child=_proc_fd_dir_in_child)


_reopen = hotcalls.reopen


@attrs.define(eq=False)
class SealedFile:
    """A sealed memfd owned by the daemon, shared by the cache and copies in flight.

    Reference counted: whoever keeps it (the cache, a request waiting on a
    copy) holds a reference; the fd closes when the last one is released.
    """

    holder: FdHolder
    size: int
    executable: bool
    refs: int = 1
    #: /proc/self/fd, for reopening (see hotcalls.send_reopened).
    dir_fd: int = attrs.field(init=False)
    #: (mode, ctime_ns) of the memfd once sealed: any change to its mode,
    #: owner, ACL, times or flags (which a holder of its own uid can make
    #: through a served fd) moves its ctime. See :meth:`intact`.
    stamp: tuple[int, int] = attrs.field(init=False)
    #: The inotify watch that tells when the memfd is freed (pins.py); -1 none.
    #: It also says when its attributes change (IN_ATTRIB): see :meth:`intact`.
    pin_wd: int = attrs.field(default=-1, init=False)
    #: An IN_ATTRIB of that watch was read: intact() asks the inode again.
    attr_changed: bool = attrs.field(default=False, init=False)
    #: The uid charged for it out of the cache while only its requests found it
    #: (pins.py); None once another uid's did, or when no uid is charged. Read on
    #: every hit: a hit of another uid tells EntryGuard.found.
    sole_uid: int | None = attrs.field(default=None, init=False)
    #: The index's descriptor range, once the memfd was moved into it: its
    #: number is then given back there, never closed (see fdrange.py).
    fd_range: FdRange | None = attrs.field(default=None, init=False)
    #: (st_dev, st_ino) of the memfd: which inode it is (EntryGuard.made_here).
    inode: tuple[int, int] = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        self.dir_fd = _proc_fd_dir()
        st = os.fstat(self.holder.fd)
        self.stamp = (st.st_mode, st.st_ctime_ns)
        self.inode = (st.st_dev, st.st_ino)
        if st.st_uid == os.geteuid() and stat.S_IMODE(st.st_mode) not in (0o444, 0o555):
            # One of ours, not as sealed (0444, 0555 for executables): someone
            # changed it between the seal and now. Never served as intact.
            # (A published memfd of another uid keeps its publisher's mode.)
            self.stamp = (-1, -1)

    def intact(self, *, times: bool = True) -> bool:
        """Whether the memfd's inode is as it was sealed (nobody changed its attributes).

        With *times* False only its mode counts: a publisher that keeps a
        writable fd of its sealed memfd moves its times with every write,
        refused or not, and its private entries are its own uid's business.

        A watched memfd (pin_wd) with no IN_ATTRIB read is intact without
        asking the kernel: every change to its stamp comes as IN_ATTRIB, and
        the caller reads the pending events first.
        """
        if self.pin_wd >= 0 and not self.attr_changed and self.stamp[0] >= 0:
            return True
        try:
            st = os.fstat(self.holder.fd)
        except OSError:
            return False
        if not times:
            return st.st_mode == self.stamp[0]
        return (st.st_mode, st.st_ctime_ns) == self.stamp

    @property
    def fd(self) -> int:
        return self.holder.fd

    @property
    def closed(self) -> bool:
        return self.holder.closed

    def share(self) -> int:
        """A fresh read-only open of the memfd, for one client: the caller owns it."""
        fd = self.holder.fd
        if fd < 0:
            raise ValueError("sealed file is closed")
        return _reopen(self.dir_fd, fd)

    def move_into(self, fd_range: FdRange) -> bool:
        """Renumber the memfd into *fd_range* (the holder keeps its identity, with
        the new number); False when it is full, or the memfd is closed or in it.

        Only on the loop, where every user of the number runs: the old number
        is closed once the holder says the new one.
        """
        old = self.holder.fd
        if old < 0 or self.fd_range is not None:
            return False
        n = fd_range.take(old)
        if n < 0:
            return False
        self.holder.fd = n
        self.fd_range = fd_range
        os.close(old)
        return True

    def retain(self) -> SealedFile:
        if self.refs <= 0:
            raise ValueError("retain of a released sealed file")
        self.refs += 1
        return self

    def release(self, free: Callable[[int], None] | None = None) -> None:
        """Let go of one reference; the last closes the memfd, or with *free*, hands
        *free* a descriptor of it to close (off the loop: freeing a large memfd's
        pages takes the kernel milliseconds, attack 32)."""
        if self.refs <= 0:
            raise ValueError("release of a released sealed file")
        self.refs -= 1
        if self.refs == 0:
            fd = self.holder.detach()
            out = -1
            if free is not None and fd >= 0:
                try:
                    # A number of its own (a high one: the low ones are each
                    # round's), so that the range's or the old one is not the
                    # last; with no number left, closed here after all.
                    out = fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, LONG_LIVED_BASE)
                except OSError:
                    pass
            if self.fd_range is not None:
                self.fd_range.give_back(fd)
            else:
                FdHolder(fd).close()
            if free is not None and out >= 0:
                free(out)
