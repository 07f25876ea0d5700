# inotify on the files a daemon is handed as descriptors: can it watch them,
# which events come for which changes and when, and what a memfd's watch sees.
from __future__ import annotations

import ctypes
import mmap
import os
import select
import socket
import struct
import sys
import time
from pathlib import Path

from _fs import REPO, attempt, errno_name, kernel, show, writable_filesystems

sys.path.insert(0, str(REPO))
from tests.mounts import mount, mount_tmpfs, umount
from tests.uffd import PAGE, StalledWrite

libc = ctypes.CDLL(None, use_errno=True)
IN = {
    "IN_ACCESS": 0x1,
    "IN_MODIFY": 0x2,
    "IN_ATTRIB": 0x4,
    "IN_CLOSE_WRITE": 0x8,
    "IN_CLOSE_NOWRITE": 0x10,
    "IN_OPEN": 0x20,
    "IN_DELETE_SELF": 0x400,
    "IN_MOVE_SELF": 0x800,
    "IN_UNMOUNT": 0x2000,
    "IN_IGNORED": 0x8000,
}
IN_ALL = 0xFFF
_EVENT = struct.Struct("iIII")


class Watcher:
    def __init__(self) -> None:
        self.fd = libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        if self.fd < 0:
            raise OSError(ctypes.get_errno(), "inotify_init1")

    def add(self, path: str, mask: int = IN_ALL) -> int:
        wd = libc.inotify_add_watch(self.fd, path.encode(), mask)
        if wd < 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err))
        return int(wd)

    def events(self, wait: float = 0.05) -> list[str]:
        """Names of the events queued within *wait* seconds, in order."""
        out: list[str] = []
        deadline = time.monotonic() + wait
        while True:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                return out
            buf = os.read(self.fd, 65536)
            i = 0
            while i < len(buf):
                _wd, mask, _cookie, length = _EVENT.unpack_from(buf, i)
                i += _EVENT.size + length
                out.append("|".join(n for n, bit in IN.items() if mask & bit) or hex(mask))

    def close(self) -> None:
        os.close(self.fd)


def watch_fd(fd: int, mask: int = IN_ALL) -> tuple[Watcher, int]:
    w = Watcher()
    return w, w.add(f"/proc/self/fd/{fd}", mask)


def probe_other_namespace(base: Path) -> None:
    """A watch through /proc/self/fd/N on an fd a process of another mount namespace sent."""
    parent, kid = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    pid = os.fork()
    if pid == 0:
        parent.close()
        try:
            if libc.unshare(0x20000) or libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None):
                raise OSError(ctypes.get_errno(), "unshare")
            where = base / "elsewhere"
            mount_tmpfs(where)
            (where / "f").write_bytes(b"only in that namespace")
            fd = os.open(where / "f", os.O_RDONLY)
            socket.send_fds(kid, [b"f"], [fd])
            kid.recv(1)  # until the parent is done
        finally:
            os._exit(0)
    kid.close()
    _, fds, _, _ = socket.recv_fds(parent, 10, 1)
    fd = fds[0]
    show(
        "other mount namespace: the path seen through /proc/self/fd",
        os.readlink(f"/proc/self/fd/{fd}"),
    )
    show(
        "other mount namespace: that path resolves here",
        os.path.exists(os.readlink(f"/proc/self/fd/{fd}")),
    )
    w = Watcher()
    show(
        "other mount namespace: inotify_add_watch(/proc/self/fd/N)",
        attempt(w.add, f"/proc/self/fd/{fd}"),
    )
    os.close(fd)
    show("other mount namespace: events after the last close of it here", w.events())
    parent.send(b"x")
    os.waitpid(pid, 0)
    show(
        "other mount namespace: events after that namespace ended (its tmpfs with it)",
        w.events(0.2),
    )
    w.close()
    parent.close()


def probe_permission(d: Path) -> None:
    """Does a watch need read permission on the inode, for the watching uid?"""
    f = d / "secret"
    f.write_bytes(b"root only")
    f.chmod(0o600)
    r, wpipe = os.pipe()
    fd = os.open(f, os.O_RDONLY)  # opened by root, then watched by nobody
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            w = Watcher()
            res = attempt(w.add, f"/proc/self/fd/{fd}")
            os.write(wpipe, res.encode())
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(wpipe)
    show(
        "permission: nobody watching root's 0600 file through an fd it holds",
        os.read(r, 100).decode(),
    )
    os.close(r)
    os.close(fd)


def probe_changes(name: str, d: Path) -> None:
    f = d / "f"
    f.write_bytes(b"a" * (4 * PAGE))
    rfd = os.open(f, os.O_RDONLY)
    w, _wd = watch_fd(rfd, IN_ALL & ~(IN["IN_ACCESS"] | IN["IN_OPEN"] | IN["IN_CLOSE_NOWRITE"]))

    # A write() stalled half way in its source buffer.
    wfd = os.open(f, os.O_WRONLY)
    w.events()
    writer = StalledWrite(wfd, b"b" * (4 * PAGE), stall_at=2 * PAGE)
    writer.wait_stalled()
    during = w.events(0.1)
    writer.finish()
    after = w.events()
    writer.close()
    show(f"{name}: write() stalled half way: events while it waits", during)
    show(f"{name}: write() stalled half way: events once it returns", after)
    os.close(wfd)
    show(f"{name}: close of the writer's fd", w.events())

    # A shared writable mapping: the writer's fd closed first, then writes, then munmap.
    wfd = os.open(f, os.O_RDWR)
    m = mmap.mmap(wfd, 4 * PAGE, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    w.events()
    os.close(wfd)
    at_close = w.events()
    m[:PAGE] = b"c" * PAGE
    m[PAGE : 2 * PAGE] = b"d" * PAGE
    at_writes = w.events()
    m.close()
    at_unmap = w.events()
    show(f"{name}: MAP_SHARED writable: at close(fd) while mapped", at_close)
    show(f"{name}: MAP_SHARED writable: at writes through the mapping", at_writes)
    show(f"{name}: MAP_SHARED writable: at munmap (the last reference)", at_unmap)

    os.truncate(f, PAGE)
    show(f"{name}: truncate", w.events())
    os.chmod(f, 0o640)
    show(f"{name}: chmod", w.events())
    try:
        os.setxattr(f, "trusted.probe", b"1")
        show(f"{name}: setxattr(trusted.*)", w.events())
    except OSError as exc:
        show(f"{name}: setxattr(trusted.*)", errno_name(exc))
    os.utime(f, (1, 1))
    show(f"{name}: utimes", w.events())
    os.unlink(f)
    show(f"{name}: unlink of the last link while open", w.events())
    os.close(rfd)
    show(f"{name}: the last close after that unlink", w.events())
    w.close()


def probe_unmount(base: Path) -> None:
    a = base / "um-a"
    b = base / "um-b"
    mount_tmpfs(a)
    b.mkdir()
    mount(str(a), b, "", 0x1000)  # MS_BIND
    (a / "f").write_bytes(b"x")
    fd = os.open(a / "f", os.O_RDONLY)
    w, _ = watch_fd(fd, IN["IN_UNMOUNT"] | IN["IN_IGNORED"] | IN["IN_DELETE_SELF"])
    umount(b)
    show("unmount: umount of one of two bind mounts of the tmpfs", w.events())
    libc.umount2(str(a).encode(), 2)  # lazy, while the fd is open
    show("unmount: lazy umount of the last mount while a file is open", w.events())
    os.close(fd)
    show("unmount: then the last close of that file (superblock shut down)", w.events(0.2))
    w.close()
    # A plain umount with nothing open.
    mount_tmpfs(a)
    (a / "g").write_bytes(b"y")
    w = Watcher()
    w.add(str(a / "g"), IN["IN_UNMOUNT"] | IN["IN_IGNORED"])
    umount(a)
    show("unmount: umount of a tmpfs with a watched (not open) file", w.events(0.2))
    w.close()


def probe_memfd() -> None:
    fd = os.memfd_create("probe", os.MFD_ALLOW_SEALING)
    os.write(fd, b"m" * 100)
    w, _ = watch_fd(fd)
    w.events()
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    os.close(ro)
    show("memfd: one reopen O_RDONLY then close", w.events())
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    w.events()
    os.fchmod(ro, 0o444)
    show("memfd: fchmod through a read-only reopen", w.events())
    acl = struct.pack("<IHHIHHIHHI", 2, 1, 7, 0xFFFFFFFF, 4, 4, 0xFFFFFFFF, 0x20, 4, 0xFFFFFFFF)
    res = attempt(os.setxattr, ro, "system.posix_acl_access", acl)
    show(f"memfd: fsetxattr(system.posix_acl_access) through it ({res})", w.events())
    os.utime(ro, (5, 5))
    show("memfd: futimens through it", w.events())
    import fcntl

    res = attempt(fcntl.ioctl, ro, 0x40086602, struct.pack("l", 0x80))  # FS_IOC_SETFLAGS NOATIME
    show(f"memfd: FS_IOC_SETFLAGS(NOATIME) through it ({res[:2]})", w.events())
    os.pread(ro, 10, 0)
    show("memfd: pread", w.events())
    os.close(ro)
    os.close(fd)
    w.close()


def main() -> None:
    show("kernel", kernel())
    show("max_user_watches", Path("/proc/sys/fs/inotify/max_user_watches").read_text().strip())
    show("max_user_instances", Path("/proc/sys/fs/inotify/max_user_instances").read_text().strip())
    with writable_filesystems() as filesystems:
        base = filesystems[0][1].parent
        probe_other_namespace(base)
        probe_permission(filesystems[0][1])
        for name, d in filesystems:
            probe_changes(name, d)
        probe_unmount(base)
    probe_memfd()


if __name__ == "__main__":
    main()
