# Sparse files: SEEK_DATA/SEEK_HOLE on tmpfs and ext4, what copying one
# costs a memfd (sendfile as shadowd does today), and whether a memfd that is
# ftruncate()d and written only at the data ranges stays sparse.
from __future__ import annotations

import os
import time
from pathlib import Path

from _fs import kernel, show, writable_filesystems

MiB = 1 << 20
SIZE = 200 * MiB


def shmem() -> int:
    with open("/proc/meminfo") as f:
        for line in f:
            if line.startswith("Shmem:"):
                return int(line.split()[1]) * 1024
    return -1


def ranges(fd: int, size: int) -> list[tuple[int, int]]:
    """The data ranges SEEK_DATA/SEEK_HOLE report."""
    out, pos = [], 0
    while pos < size:
        try:
            start = os.lseek(fd, pos, os.SEEK_DATA)
        except OSError:  # ENXIO: no data after pos
            break
        end = os.lseek(fd, start, os.SEEK_HOLE)
        out.append((start, end))
        pos = end
    return out


def make_sparse(path: Path) -> None:
    """200 MiB: 4 KiB of data at 0, 1 MiB at 100 MiB, a hole at the end."""
    with open(path, "wb") as f:
        f.truncate(SIZE)
        f.write(b"h" * 4096)
        f.seek(100 * MiB)
        f.write(b"m" * MiB)


def probe_reading_holes(m: int) -> None:
    """Does reading the holes of a sparse memfd allocate them? (read, then mmap faults)"""
    import fcntl
    import mmap

    fcntl.fcntl(m, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK)
    before = shmem()
    pos = 0
    while pos < SIZE:
        pos += len(os.pread(m, MiB, pos))
    show("memfd: Shmem after pread() of all of it (sealed)", f"+{(shmem() - before) / MiB:.1f} MiB")
    ro = os.open(f"/proc/self/fd/{m}", os.O_RDONLY)
    for kind, flags in (("MAP_SHARED", mmap.MAP_SHARED), ("MAP_PRIVATE", mmap.MAP_PRIVATE)):
        before = shmem()
        mm = mmap.mmap(ro, SIZE, flags, mmap.PROT_READ)
        total = sum(mm[i] for i in range(0, SIZE, mmap.PAGESIZE))
        show(
            f"memfd: Shmem after a {kind} PROT_READ mapping touched every page",
            f"+{(shmem() - before) / MiB:.1f} MiB (sum {total})",
        )
        mm.close()
    show("memfd: st_blocks*512 after all that", os.fstat(m).st_blocks * 512)
    os.close(ro)


def main() -> None:
    show("kernel", kernel())
    with writable_filesystems() as filesystems:
        for name, d in filesystems[:2]:
            f = d / "sparse"
            make_sparse(f)
            fd = os.open(f, os.O_RDONLY)
            st = os.fstat(fd)
            show(f"{name}: st_size, st_blocks*512", (st.st_size, st.st_blocks * 512))
            show(f"{name}: SEEK_DATA/SEEK_HOLE ranges", ranges(fd, st.st_size))
            # The copy as shadowd makes it today: sendfile of every byte.
            before = shmem()
            started = time.monotonic()
            m = os.memfd_create("probe")
            done = 0
            while done < SIZE:
                done += os.sendfile(m, fd, done, SIZE - done)
            took = time.monotonic() - started
            show(
                f"{name}: sendfile copy into a memfd",
                f"{took * 1000:.0f} ms, st_blocks*512 {os.fstat(m).st_blocks * 512}, "
                f"Shmem +{(shmem() - before) / MiB:.0f} MiB",
            )
            os.close(m)
            # The copy of the data ranges only.
            before = shmem()
            started = time.monotonic()
            m = os.memfd_create("probe", os.MFD_ALLOW_SEALING)
            os.ftruncate(m, SIZE)
            for start, end in ranges(fd, SIZE):
                pos = start
                while pos < end:
                    pos += os.pwrite(m, os.pread(fd, min(end - pos, MiB), pos), pos)
            took = time.monotonic() - started
            same = os.pread(m, 4096, 0) == b"h" * 4096 and os.pread(m, 10, 150 * MiB) == b"\0" * 10
            show(
                f"{name}: ftruncate + data ranges only into a memfd",
                f"{took * 1000:.1f} ms, st_blocks*512 {os.fstat(m).st_blocks * 512}, "
                f"Shmem +{(shmem() - before) / MiB:.1f} MiB, same bytes: {same}",
            )
            show(f"{name}: SEEK_DATA/SEEK_HOLE on that memfd", ranges(m, SIZE))
            if name == "tmpfs":
                probe_reading_holes(m)
            os.close(m)
            os.close(fd)


if __name__ == "__main__":
    main()
