# A sealed memfd as shadowd serves it: which operations through a read-only
# reopen change its ctime (and mode), and who may make them.
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import struct
import time

from _fs import attempt, kernel, show

FS_IOC_GETFLAGS = 0x80086601
FS_IOC_SETFLAGS = 0x40086602
FS_NOATIME_FL = 0x80
REQUIRED = fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL
F_SEAL_EXEC = 0x20
ACL = struct.pack("<IHHIHHIHHI", 2, 1, 7, 0xFFFFFFFF, 4, 4, 0xFFFFFFFF, 0x20, 4, 0xFFFFFFFF)


def sealed(executable: bool) -> int:
    fd = os.memfd_create("probe", os.MFD_ALLOW_SEALING | (0x10 if executable else 0x8))
    os.write(fd, b"x" * 10000)
    os.fchmod(fd, 0o555 if executable else 0o444)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, F_SEAL_EXEC)
    fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED)
    return fd


def change(fd: int, what: str) -> str:
    """Do *what* through a fresh O_RDONLY reopen of *fd*; say whether ctime and mode moved."""
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    before = os.fstat(fd)
    time.sleep(0.01)
    if what == "fchmod 0":
        result = attempt(os.fchmod, ro, 0)
    elif what == "fchmod 0555 (add exec bits)":
        result = attempt(os.fchmod, ro, 0o555)
    elif what == "fsetxattr(system.posix_acl_access) u=rwx,g=r,o=r":
        result = attempt(os.setxattr, ro, "system.posix_acl_access", ACL)
    elif what == "futimens":
        result = attempt(os.utime, ro, (1, 1))
    elif what == "FS_IOC_SETFLAGS(NOATIME)":
        result = attempt(fcntl.ioctl, ro, FS_IOC_SETFLAGS, struct.pack("l", FS_NOATIME_FL))
    elif what == "pread":
        result = attempt(os.pread, ro, 100, 0)
        result = "ok"
    elif what == "mmap read":
        m = mmap.mmap(ro, 10000, mmap.MAP_SHARED, mmap.PROT_READ)
        _ = m[5000]
        m.close()
        result = "ok"
    else:
        raise ValueError(what)
    after = os.fstat(fd)
    os.close(ro)
    moved = []
    if after.st_ctime_ns != before.st_ctime_ns:
        moved.append("ctime")
    if after.st_mtime_ns != before.st_mtime_ns:
        moved.append("mtime")
    if after.st_mode != before.st_mode:
        moved.append(f"mode {before.st_mode & 0o7777:o}->{after.st_mode & 0o7777:o}")
    return f"{result}; changed: {', '.join(moved) or 'nothing'}"


def as_uid(uid: int, fn: object) -> str:
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.setresgid(uid, uid, uid)
            os.setresuid(uid, uid, uid)
            os.write(w, str(fn()).encode())  # type: ignore[operator]
        finally:
            os._exit(0)
    os.waitpid(pid, 0)
    os.close(w)
    out = os.read(r, 1000).decode()
    os.close(r)
    return out


def main() -> None:
    show("kernel", kernel())
    for executable in (False, True):
        kind = "0555 (MFD_EXEC)" if executable else "0444 (MFD_NOEXEC_SEAL)"
        for what in (
            "pread",
            "mmap read",
            "futimens",
            "FS_IOC_SETFLAGS(NOATIME)",
            "fchmod 0555 (add exec bits)",
            "fsetxattr(system.posix_acl_access) u=rwx,g=r,o=r",
            "fchmod 0",
        ):
            fd = sealed(executable)
            show(f"sealed memfd {kind}, by its owner: {what}", change(fd, what))
            os.close(fd)
    # Another uid holding a read-only reopen (as a client of a root daemon).
    fd = sealed(False)
    ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
    show(
        "another uid (nobody) with a read-only reopen: fchmod 0",
        as_uid(65534, lambda: attempt(os.fchmod, ro, 0)),
    )
    show(
        "another uid (nobody): fsetxattr(ACL)",
        as_uid(65534, lambda: attempt(os.setxattr, ro, "system.posix_acl_access", ACL)),
    )
    show("another uid (nobody): futimens", as_uid(65534, lambda: attempt(os.utime, ro, (1, 1))))
    show(
        "another uid (nobody): futimens(NULL) (now)",
        as_uid(65534, lambda: attempt(os.utime, ro, None)),
    )
    # The same uid, not the creator (a memfd of uid 4321, changed by another process of 4321).
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setresgid(4321, 4321, 4321)
        os.setresuid(4321, 4321, 4321)
        # A uid change makes a process undumpable (its /proc/PID/fd then
        # belongs to root); a daemon started as that user is dumpable.
        ctypes.CDLL(None).prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE
        mine = sealed(False)
        os.write(w, f"{os.getpid()} {mine}\n".encode())
        time.sleep(2)
        os._exit(0)
    other_pid, other_fd = map(int, os.read(r, 100).split())
    got = as_uid(
        4321,
        lambda: attempt(
            lambda: os.fchmod(os.open(f"/proc/{other_pid}/fd/{other_fd}", os.O_RDONLY), 0)
        ),
    )
    show("a second process of the creator's uid, reopening through /proc/PID/fd: fchmod 0", got)
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(fd)
    os.close(ro)


if __name__ == "__main__":
    main()
