# F_SETLEASE F_RDLCK: when the kernel grants a read lease, what a writer's
# open does to its holder, on tmpfs, ext4, overlayfs and FUSE.
from __future__ import annotations

import fcntl
import mmap
import os
import signal
import time
from pathlib import Path

from _fs import FUSE_FILE, attempt, fuse, kernel, show, writable_filesystems

F_SETSIG = 10


def set_lease(fd: int, kind: int) -> None:
    fcntl.fcntl(fd, fcntl.F_SETLEASE, kind)


def probe_grants(name: str, f: Path) -> None:
    """When a read lease is granted, with other opens of the file about."""
    r = os.open(f, os.O_RDONLY)
    show(
        f"{name}: F_RDLCK on O_RDONLY, nobody else has it open",
        attempt(set_lease, r, fcntl.F_RDLCK),
    )
    set_lease(r, fcntl.F_UNLCK)
    for what, flags in (("O_RDWR", os.O_RDWR), ("O_WRONLY", os.O_WRONLY)):
        w = os.open(f, flags)
        show(f"{name}: F_RDLCK while another fd is {what}", attempt(set_lease, r, fcntl.F_RDLCK))
        os.close(w)
    w = os.open(f, os.O_RDWR)
    m = mmap.mmap(w, 4096, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    os.close(w)
    show(
        f"{name}: F_RDLCK while a MAP_SHARED writable mapping exists (its fd closed)",
        attempt(set_lease, r, fcntl.F_RDLCK),
    )
    m.close()
    show(f"{name}: F_RDLCK after munmap", attempt(set_lease, r, fcntl.F_RDLCK))
    set_lease(r, fcntl.F_UNLCK)
    os.close(r)


def probe_not_owner(name: str, f: Path) -> None:
    """A read lease on a world-readable root file, taken by nobody (no CAP_LEASE)."""
    os.chmod(f, 0o644)
    rd, wr = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(rd)
        try:
            os.setresgid(65534, 65534, 65534)
            os.setresuid(65534, 65534, 65534)
            fd = os.open(f, os.O_RDONLY)
            os.write(wr, attempt(set_lease, fd, fcntl.F_RDLCK).encode())
        finally:
            os._exit(0)
    os.close(wr)
    got = os.read(rd, 100).decode()
    os.waitpid(pid, 0)
    os.close(rd)
    show(f"{name}: F_RDLCK by another uid (nobody, no CAP_LEASE) on root's 0644 file", got)


def holder(f: Path, release_after: float | None, ready: int, report: int) -> None:
    """In a child: take a read lease; with release_after, handle the break and release then."""
    fd = os.open(f, os.O_RDONLY)
    set_lease(fd, fcntl.F_RDLCK)
    if release_after is not None:
        broke = []
        signal.signal(signal.SIGIO, lambda *_: broke.append(time.monotonic()))
    os.write(ready, b"x")
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        if release_after is not None and broke:
            lease_now = fcntl.fcntl(fd, fcntl.F_GETLEASE)
            time.sleep(release_after)
            set_lease(fd, fcntl.F_UNLCK)
            os.write(report, f"{lease_now}".encode())
            break
        time.sleep(0.001)
    os._exit(0)


def probe_break(name: str, f: Path, release_after: float | None) -> None:
    """A writer's open while another process holds a read lease."""
    ready_r, ready_w = os.pipe()
    rep_r, rep_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        holder(f, release_after, ready_w, rep_w)
    os.read(ready_r, 1)
    started = time.monotonic()
    w = os.open(f, os.O_WRONLY)
    waited = time.monotonic() - started
    os.close(w)
    _, status = os.waitpid(pid, 0)
    os.close(rep_w)
    lease_seen = os.read(rep_r, 100).decode()
    for fd in (ready_r, ready_w, rep_r):
        os.close(fd)
    if release_after is None:
        fate = (
            f"killed by {signal.Signals(os.WTERMSIG(status)).name}"
            if os.WIFSIGNALED(status)
            else f"exited {os.WEXITSTATUS(status)}"
        )
        show(f"{name}: writer's open during a read lease, SIGIO left at default", fate)
        show(f"{name}:   the writer's open waited", f"{waited * 1000:.1f} ms")
    else:
        names = {fcntl.F_RDLCK: "F_RDLCK", fcntl.F_WRLCK: "F_WRLCK", fcntl.F_UNLCK: "F_UNLCK"}
        seen = names.get(int(lease_seen), lease_seen) if lease_seen else "?"
        show(
            f"{name}: writer open, holder releasing {release_after * 1000:.0f} ms after SIGIO",
            f"waited {waited * 1000:.1f} ms; F_GETLEASE in the holder after the break: {seen}",
        )


def main() -> None:
    show("kernel", kernel())
    show("/proc/sys/fs/lease-break-time", Path("/proc/sys/fs/lease-break-time").read_text().strip())
    show("/proc/sys/fs/leases-enable", Path("/proc/sys/fs/leases-enable").read_text().strip())
    with writable_filesystems() as filesystems:
        for name, d in filesystems:
            f = d / "f"
            f.write_bytes(b"x" * 8192)
            probe_grants(name, f)
            probe_not_owner(name, f)
            probe_break(name, f, None)
            probe_break(name, f, 0.1)
        base = filesystems[0][1].parent
        with fuse(base) as (mnt, _fs):
            f = mnt / "f"
            assert f.read_bytes() == FUSE_FILE
            probe_grants("fuse", f)
            probe_break("fuse", f, None)
            probe_break("fuse", f, 0.1)


if __name__ == "__main__":
    main()
