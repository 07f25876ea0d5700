# Memory: many processes holding and mapping one file, through shadowd (one
# copy for all) against private copies (one each), as the shmem the holders
# map: the sum of their proportional shares (Pss_Shmem), read once every
# holder has faulted its pages in. Not the host's Shmem growth, which other
# processes freeing or making shared memory meanwhile move either way (it read
# 0 for three private copies during a test run beside other suites).
#
# Must never: measure before every holder has faulted its pages in, or leave
# a holder running.
from __future__ import annotations

import mmap
import os
from multiprocessing.connection import Connection as Pipe

import attrs

from .common import Forks, MiB, Progress, status_quo


@attrs.frozen
class Memory:
    procs: int
    size: int
    shadowd_bytes: int
    private_bytes: int


def _holder(mode: str, socket_path: str, path: str, pipe: Pipe) -> None:
    """One process of the memory test: hold an fd of *path*, map and read it."""
    from shadowd_client import Client

    if mode == "hit":
        with Client(socket_path, timeout=30) as client:
            fd = client.open(path)
    else:
        fd = status_quo(path)
    size = os.fstat(fd).st_size
    with mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ) as m:
        for off in range(0, size, 4096):
            m[off]  # fault every page in, as a loader would
        pipe.send("holding")
        pipe.recv()  # every holder holds: its share of what they map now
        pipe.send(pss_shmem())
        pipe.recv()
    os.close(fd)


def pss_shmem() -> int:
    """This process's proportional share of the shared memory it maps, in bytes."""
    with open("/proc/self/smaps_rollup", encoding="ascii") as f:
        for line in f:
            if line.startswith("Pss_Shmem:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError("no Pss_Shmem line in /proc/self/smaps_rollup")


#: The size of the file the memory test's processes hold.
MEMORY_SIZE = 16 * MiB


def memory_file(workdir: str) -> str:
    """Write the file the memory test's processes hold (at the start of the run, so
    that it is as old as the others when the daemon is asked for it)."""
    path = os.path.join(workdir, "held-16MiB")
    with open(path, "wb") as f:
        f.write(os.urandom(MEMORY_SIZE))
    return path


def measure_memory(
    forks: Forks, progress: Progress, socket_path: str, path: str, procs: int
) -> Memory:
    size = MEMORY_SIZE

    def held(mode: str) -> int:
        progress.say(f"memory, {procs} processes holding 16 MiB ({mode})")
        with forks.processes(_holder, procs, mode, socket_path, path) as pipes:
            for pipe in pipes:  # every holder has faulted its pages in
                pipe.send("share")
            shares = []
            for pipe in pipes:
                if not pipe.poll(30):
                    raise RuntimeError("a memory holder did not answer")
                shares.append(pipe.recv())
            for pipe in pipes:
                pipe.send("release")
        return sum(shares)

    return Memory(procs=procs, size=size, shadowd_bytes=held("hit"), private_bytes=held("copy"))
