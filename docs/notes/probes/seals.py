# F_GET_SEALS on regular files that are not memfds: a tmpfs file, ext4,
# FUSE (and whether the request ever reaches the FUSE server), overlayfs
# over tmpfs; and a memfd for comparison.
from __future__ import annotations

import fcntl
import os
import time
from pathlib import Path

from _fs import attempt, fuse, kernel, show, writable_filesystems

NAMES = {
    fcntl.F_SEAL_SEAL: "SEAL",
    fcntl.F_SEAL_SHRINK: "SHRINK",
    fcntl.F_SEAL_GROW: "GROW",
    fcntl.F_SEAL_WRITE: "WRITE",
    getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x10): "FUTURE_WRITE",
    0x20: "EXEC",
}


def seals(fd: int) -> str:
    value = fcntl.fcntl(fd, fcntl.F_GET_SEALS)
    return f"{value:#x} ({'|'.join(n for bit, n in NAMES.items() if value & bit) or 'none'})"


def add_write_seal(f: Path) -> None:
    fd = os.open(f, os.O_RDWR)
    try:
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_WRITE)
    finally:
        os.close(fd)


def main() -> None:
    show("kernel", kernel())
    fd = os.memfd_create("probe", os.MFD_ALLOW_SEALING)
    show("memfd (MFD_ALLOW_SEALING)", attempt(seals, fd))
    os.close(fd)
    fd = os.memfd_create("probe", 0)
    show("memfd (no MFD_ALLOW_SEALING)", attempt(seals, fd))
    os.close(fd)
    with writable_filesystems() as filesystems:
        for name, d in filesystems:
            f = d / "f"
            f.write_bytes(b"x" * 100)
            fd = os.open(f, os.O_RDONLY)
            show(f"{name}: regular file", attempt(seals, fd))
            show(
                f"{name}: F_ADD_SEALS(WRITE) on it (O_RDWR)",
                attempt(add_write_seal, f),
            )
            os.close(fd)
        base = filesystems[0][1].parent
        with fuse(base) as (mnt, fs):
            fd = os.open(mnt / "f", os.O_RDONLY)
            time.sleep(0.1)
            before = len(fs.seen)
            show("fuse: regular file", attempt(seals, fd))
            time.sleep(0.1)
            show("fuse: requests the server got during F_GET_SEALS", fs.seen[before:])
            os.close(fd)


if __name__ == "__main__":
    main()
