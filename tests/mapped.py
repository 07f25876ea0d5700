# A change that stat cannot show, for the process-local tier's tests
# (tests/test_opener.py, tests/test_c_client.py): bytes written into a file on
# tmpfs through a MAP_SHARED writable mapping, which changes none of its times,
# and which the daemon learns of only by inotify when the writer lets go of the
# file (IN_CLOSE_WRITE at the last munmap; docs/security.md, attack 5).
#
# Must never: return without the bytes being in the file and its stat exactly
# as before (it raises instead: a test must not pass on a change stat shows);
# leave a mapping or a descriptor behind.
from __future__ import annotations

import mmap
import os
import time
from pathlib import Path
from typing import Any


class NotUnseen(Exception):
    """The change could not be made unseen by stat here (a setup failure, not a pass)."""


def version(path: Path) -> tuple[int, int, int, int, int]:
    """(dev, ino, size, mtime_ns, ctime_ns): what the clients' tiers key on."""
    st = os.stat(path)
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def write_through_a_mapping(path: Path, data: bytes) -> None:
    """Write *data* (whole pages, the file's size at most) over the start of *path*
    through a shared writable mapping; the descriptor is closed first, so that the
    munmap is the writer's last hold on the file. Raises NotUnseen unless the file
    then holds *data* with its stat unchanged."""
    before = version(path)
    if len(data) % mmap.PAGESIZE or not 0 < len(data) <= before[2]:
        raise NotUnseen(f"{len(data)} bytes is not whole pages within the file")
    fd = os.open(path, os.O_RDWR | os.O_CLOEXEC)
    try:
        m = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
    finally:
        os.close(fd)  # the mapping holds the file from now on
    try:
        # Each page read first, so that the write below finds it there.
        for offset in range(0, len(data), mmap.PAGESIZE):
            m[offset]
        m[: len(data)] = data
    finally:
        m.close()  # the last munmap: IN_CLOSE_WRITE
    if version(path) != before:
        raise NotUnseen(f"the mapping's write changed the stat of {path}")
    with open(path, "rb") as f:
        if f.read(len(data)) != data:
            raise NotUnseen(f"the mapping did not write {path}")


def invalidations(socket_path: str | os.PathLike[str]) -> int:
    """The daemon's count of entries it dropped for a change (its stats)."""
    from shadowd_client import Client

    with Client(socket_path, timeout=10) as c:
        stats: dict[str, Any] = c.stats()
    return int(stats["invalidations"])


def until_invalidated(socket_path: str | os.PathLike[str], before: int, timeout: float = 10) -> int:
    """Wait until the daemon counted an invalidation more than *before*; the count."""
    deadline = time.monotonic() + timeout
    while (now := invalidations(socket_path)) <= before:
        if time.monotonic() > deadline:
            raise TimeoutError(f"the daemon counted no invalidation in {timeout} s")
        time.sleep(0.005)
    return now
