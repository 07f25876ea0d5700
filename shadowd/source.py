# What the daemon learns about a descriptor a client passed, before it decides
# anything: type, identity, version, whether the client could read it, and
# whether its filesystem is one we may touch from the event loop.
#
# Must never: block the event loop on a filesystem a client controls. A file
# on a FUSE or network mount can make fstat and even close() wait forever, so
# the loop inspects fds with statx(AT_STATX_DONT_SYNC), which answers from
# what the kernel has cached, and hands fds of such filesystems to worker
# threads for everything else (a fresh fstat, the copy, the close).
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import select
import stat
import struct
import time
from typing import NamedTuple

import attrs

from . import hotcalls
from .errors import RequestError, refusing_os_errors, request_error_from_os
from .fds import move_high
from .protocol import ErrorCode

logger = logging.getLogger(__name__)

# Filesystems without a backing block device whose inspection and close never
# wait on anyone but the local kernel.
LOCAL_ANON_FSTYPES = frozenset({"tmpfs", "ramfs", "overlay", "btrfs", "hugetlbfs"})


class SourceStat(NamedTuple):
    """The part of a file's stat that identifies its bytes.

    A NamedTuple rather than an attrs class: one is built per request on the
    hit path, and tuple construction is several times cheaper.
    """

    dev: int
    ino: int
    mode: int
    size: int
    mtime_ns: int
    ctime_ns: int
    #: The mount's unique ID (Linux 6.8+), 0 when the kernel gave none.
    mnt: int = 0

    @property
    def is_regular(self) -> bool:
        return stat.S_ISREG(self.mode)

    @property
    def executable(self) -> bool:
        return bool(self.mode & 0o111)

    @property
    def identity(self) -> tuple[int, int]:
        return (self.dev, self.ino)

    @property
    def version(self) -> tuple[int, int, int]:
        return (self.size, self.mtime_ns, self.ctime_ns)

    def same_file_as(self, other: SourceStat) -> bool:
        """The same identity, mode and version; the mount ID is left out (fstat has none)."""
        return self[:6] == other[:6]

    @classmethod
    def from_stat_result(cls, st: os.stat_result) -> SourceStat:
        return cls(
            dev=st.st_dev,
            ino=st.st_ino,
            mode=st.st_mode,
            size=st.st_size,
            mtime_ns=st.st_mtime_ns,
            ctime_ns=st.st_ctime_ns,
        )


def _statx_usable() -> bool:
    """Whether this kernel and C library have statx (Linux 4.11, glibc 2.28)."""
    try:
        hotcalls.statx_nosync(-1)
    except OSError as exc:
        return exc.errno not in (errno.ENOSYS, errno.EINVAL)
    return True


_HAVE_STATX = _statx_usable()


def stat_nosync(fd: int) -> SourceStat | None:
    """Stat *fd* from the kernel's cached attributes; never waits on the filesystem.

    Returns None when statx is unavailable or the filesystem did not fill in
    every field; the caller then treats the fd as one to inspect off the loop.
    """
    if not _HAVE_STATX:
        return None
    try:
        fields = _statx_nosync(fd)
    except OSError as exc:
        raise RequestError(
            ErrorCode.BAD_FDS, f"cannot stat the passed fd: {os.strerror(exc.errno or 0)}"
        ) from None
    if fields is None:
        return None
    # tuple.__new__ directly: the NamedTuple constructor's keyword handling
    # is a measurable part of the hit path.
    return _new_tuple(SourceStat, fields)


_statx_nosync = hotcalls.statx_nosync
_new_tuple = tuple.__new__


def stat_sync(fd: int) -> SourceStat:
    """A full fstat, which may wait on the filesystem: for worker threads."""
    with refusing_os_errors("cannot stat the passed fd"):
        return SourceStat.from_stat_result(os.fstat(fd))


def check_readable(fd: int) -> None:
    """Refuse an fd the client could not read from (O_PATH or write-only).

    Possession of a readable fd is the proof that the client may read the
    file; an O_PATH fd can be had for files one cannot read.
    """
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    except OSError as exc:
        raise request_error_from_os(exc, "cannot inspect the passed fd") from exc
    if flags & os.O_PATH or flags & os.O_ACCMODE == os.O_WRONLY:
        raise RequestError(
            ErrorCode.NOT_READABLE, "the passed fd is not open for reading (O_PATH or O_WRONLY)"
        )


def check_regular(st: SourceStat) -> None:
    if not st.is_regular:
        kind = _KIND_NAMES.get(stat.S_IFMT(st.mode), "special file")
        raise RequestError(
            ErrorCode.NOT_REGULAR, f"only regular files are served; the passed fd is a {kind}"
        )


def check_size(size: int, limit: int) -> None:
    """Refuse a file above the daemon's --max-file-size of *limit* bytes."""
    if size > limit:
        raise RequestError(
            ErrorCode.FILE_TOO_LARGE,
            f"file is {size} bytes, above the daemon's --max-file-size of {limit}; copy it locally",
        )


_KIND_NAMES = {
    stat.S_IFDIR: "directory",
    stat.S_IFIFO: "FIFO",
    stat.S_IFSOCK: "socket",
    stat.S_IFCHR: "character device",
    stat.S_IFBLK: "block device",
    stat.S_IFLNK: "symbolic link",
}


def parse_mountinfo(text: str) -> dict[int, str]:
    """Map each mount's st_dev to its filesystem type, from a mountinfo text."""
    devs: dict[int, str] = {}
    for line in text.splitlines():
        left, sep, right = line.partition(" - ")
        fields = left.split()
        if not sep or len(fields) < 3 or not right:
            continue
        major, _, minor = fields[2].partition(":")
        try:
            dev = os.makedev(int(major), int(minor))
        except ValueError:
            continue
        devs[dev] = right.split()[0]
    return devs


# Superblock magics (include/uapi/linux/magic.h) of the anonymous-device
# filesystems in LOCAL_ANON_FSTYPES, and FUSE's, whose fuseblk variant sits
# on a block device and may hang all the same.
LOCAL_ANON_MAGICS = frozenset(
    {
        0x01021994,  # tmpfs
        0x858458F6,  # ramfs
        0x794C7630,  # overlay
        0x9123683E,  # btrfs
        0x958458F6,  # hugetlbfs
    }
)
FUSE_MAGIC = 0x65735546
_NR_STATMOUNT = 457  # the same on every architecture but alpha and mips
_STATMOUNT_SB_BASIC = 0x1
# struct mnt_id_req (version 0) and the head of struct statmount: size, mask,
# sb_dev_major, sb_dev_minor, sb_magic (include/uapi/linux/mount.h).
_MNT_ID_REQ = struct.Struct("<IIQQ")
_STATMOUNT_HEAD = struct.Struct("<I4xQIIQ")
_STATMOUNT_SIZE = 512
#: Verdicts kept per unique mount ID; the table starts over when full, so
#: a user who churns mounts cannot make it grow without bound.
MAX_MOUNT_VERDICTS = 4096


_syscall = hotcalls.libc_function("syscall")


def statmount_magic(mnt: int) -> tuple[int, int] | None:
    """(sb_dev_major, superblock magic) of the mount with unique ID *mnt*.

    None when this kernel has no statmount (before 6.8). Raises OSError
    for a mount this process cannot see (another mount namespace) or one
    that is gone. Never waits on the filesystem: it reads the superblock
    the kernel holds.
    """
    if _syscall is None:
        return None
    req = _MNT_ID_REQ.pack(_MNT_ID_REQ.size, 0, mnt, _STATMOUNT_SB_BASIC)
    out = ctypes.create_string_buffer(_STATMOUNT_SIZE)
    if _syscall(_NR_STATMOUNT, req, out, _STATMOUNT_SIZE, 0) != 0:
        err = ctypes.get_errno()
        if err in (errno.ENOSYS, errno.EINVAL):
            return None
        raise OSError(err, os.strerror(err))
    _size, mask, major, _minor, magic = _STATMOUNT_HEAD.unpack_from(out)
    if not mask & _STATMOUNT_SB_BASIC:
        return None
    return major, magic


@attrs.define
class MountTrust:
    """Which filesystems the event loop may inspect and close fds of.

    Filesystems on a block device are local, but for fuseblk. Of the
    anonymous-device ones, only the types in LOCAL_ANON_FSTYPES are;
    everything else (FUSE, NFS, CIFS, 9p, procfs, mounts of other
    namespaces the daemon cannot see) goes to worker threads.

    On Linux 6.8+ a file's mount comes with a unique ID (statx) that is
    never reused, and a verdict is made once per mount: for a mount of this
    process's mount namespace by its superblock's magic (statmount), for
    another's by its device number and this namespace's mount table. The
    table is re-read whenever the kernel says it changed (mountinfo is
    pollable) before it decides anything, so a device number freed by an
    unmount and taken by a FUSE mount is never classed by the old mount.
    A verdict holds for the mount's life: the client's fd pins the mount,
    and a mount's superblock never changes. On older kernels (no mount ID)
    the device number decides every time, from a table as fresh.
    """

    mountinfo_path: str = "/proc/self/mountinfo"
    #: Seconds after which the table is re-read even without a change
    #: event (only where mountinfo cannot be polled).
    ttl: float = 10.0
    _devs: dict[int, str] = attrs.field(factory=dict, init=False)
    _read_at: float = attrs.field(default=-1e9, init=False)
    #: Per unique mount ID, whether the loop may touch its files.
    _mounts: dict[int, bool] = attrs.field(factory=dict, init=False)
    _by_mount: bool = attrs.field(default=True, init=False)
    #: The open mountinfo, polled for changes; None until first needed.
    _watch: select.poll | None = attrs.field(default=None, init=False)
    _watch_fd: int = attrs.field(default=-1, init=False)

    def is_local(self, dev: int, mnt: int = 0) -> bool:
        """Whether the loop may touch files of device *dev* on mount *mnt* (0: unknown)."""
        if mnt and self._by_mount:
            verdict = self._mounts.get(mnt)
            if verdict is None:
                verdict = self._classify_mount(mnt, dev)
            return verdict
        return self._by_device(dev)

    def _by_device(self, dev: int) -> bool:
        if os.major(dev) != 0:
            return True
        self._refresh_if_changed()
        return self._devs.get(dev) in LOCAL_ANON_FSTYPES

    def _classify_mount(self, mnt: int, dev: int) -> bool:
        try:
            found = statmount_magic(mnt)
        except OSError:
            # Not in our mount namespace (a daemon with PrivateTmp= or
            # ProtectSystem= has its own; a client may be in a container),
            # or refused by a seccomp filter: the device number decides,
            # by a table that is fresh now.
            verdict = self._by_device(dev)
        else:
            if found is None:
                self._by_mount = False  # no statmount here: device numbers decide
                return self._by_device(dev)
            major, magic = found
            verdict = magic != FUSE_MAGIC and (major != 0 or magic in LOCAL_ANON_MAGICS)
        if len(self._mounts) >= MAX_MOUNT_VERDICTS:
            self._mounts.clear()
        self._mounts[mnt] = verdict
        return verdict

    def _refresh_if_changed(self) -> None:
        """Re-read the mount table if the kernel says it changed since the last read."""
        watch = self._open_watch()
        if watch is None:
            now = time.monotonic()
            if now - self._read_at > self.ttl:
                self.refresh(now)
            return
        if watch.poll(0) or self._read_at < 0:
            self.refresh()

    def open(self) -> None:
        """Open the mount table's fd now (a server does at start, not on first use)."""
        self._open_watch()

    def _open_watch(self) -> select.poll | None:
        if self._watch is not None or self._watch_fd == -2:
            return self._watch
        try:
            fd = move_high(os.open(self.mountinfo_path, os.O_RDONLY | os.O_CLOEXEC))
        except OSError:
            self._watch_fd = -2  # not pollable here: re-read by age
            return None
        watch = select.poll()
        watch.register(fd, select.POLLPRI | select.POLLERR)
        self._watch, self._watch_fd = watch, fd
        return watch

    def close(self) -> None:
        """Let go of the mount table's fd (a new one is opened if needed again)."""
        if self._watch_fd >= 0:
            os.close(self._watch_fd)
        self._watch, self._watch_fd = None, -1

    def refresh(self, now: float | None = None) -> None:
        if self._watch is not None:
            self._watch.poll(0)  # take the pending change event: this read covers it
        self._read_at = time.monotonic() if now is None else now
        try:
            with open(self.mountinfo_path, encoding="utf-8", errors="replace") as f:
                self._devs = parse_mountinfo(f.read())
        except OSError as exc:
            logger.warning("cannot read %s: %s", self.mountinfo_path, exc)
            self._devs = {}
