# Throughput: whole seconds of back-to-back opens from several client
# processes at once (hits, status-quo copies, batch opens, the transport
# floor, and the same with the C client), and the daemon's CPU time per hit.
#
# Must never: count an open that did not complete, or start the processes of
# one series at different times (they wait for "go" together).
from __future__ import annotations

import os
import time
from multiprocessing.connection import Connection as Pipe

import attrs

from .cclient import run_c_clients
from .common import Forks, MiB, Progress, cpu_seconds, status_quo

THROUGHPUT_SIZE = 2 * MiB
#: Files per request in the batch-open throughput run (an exec's DSOs).
BATCH = 8


@attrs.frozen
class Throughput:
    procs: int
    hits_per_s: float
    copies_per_s: float
    #: Hits per second when each request is a batch open of BATCH files.
    batch_hits_per_s: float = 0.0
    #: Opens per second the transport floor answers, with the same client.
    floor_per_s: float = 0.0
    #: The same with the C client (client/c) in each process: hits, and
    #: status-quo copies made in C; None when it could not be built here.
    c_hits_per_s: float | None = None
    c_copies_per_s: float | None = None

    @property
    def ratio(self) -> float:
        return self.hits_per_s / self.copies_per_s if self.copies_per_s else float("inf")

    @property
    def c_ratio(self) -> float | None:
        if self.c_hits_per_s is None or not self.c_copies_per_s:
            return None
        return self.c_hits_per_s / self.c_copies_per_s


def _worker(mode: str, socket_path: str, path: str, seconds: float, pipe: Pipe) -> None:
    """One client process of the throughput test: as many opens as it can."""
    from shadowd_client import Client

    client = Client(socket_path, timeout=30) if mode != "copy" else None
    if client is not None:
        os.close(client.open(path))
    batch = [path] * BATCH
    pipe.send("ready")
    pipe.recv()  # start together
    count = 0
    deadline = time.perf_counter() + seconds
    while time.perf_counter() < deadline:
        if client is None:
            os.close(status_quo(path))
            count += 1
        elif mode == "batch":
            for fd in client.open_many(batch):
                os.close(fd)
            count += BATCH
        else:
            os.close(client.open(path))
            count += 1
    pipe.send(count)
    if client is not None:
        client.close()


def measure_throughput(
    forks: Forks,
    progress: Progress,
    *,
    socket_path: str,
    floor_path: str,
    path: str,
    daemon_pid: int,
    c_client: str | None,
    procs: tuple[int, ...],
    seconds: float,
) -> tuple[list[Throughput], float | None, float | None]:
    """Per process count, the rates; and the daemon's CPU us per hit, Python and C clients."""
    out = []
    cpu_per_hit: float | None = None
    c_cpu_per_hit: float | None = None
    for n in procs:
        progress.say(f"throughput, {n} client process{'es' if n > 1 else ''}")
        cpu0 = cpu_seconds(daemon_pid)
        hits = sum(forks.run(_worker, n, "hit", socket_path, path, seconds))
        cpu1 = cpu_seconds(daemon_pid)
        copies = sum(forks.run(_worker, n, "copy", socket_path, path, seconds))
        batched = sum(forks.run(_worker, n, "batch", socket_path, path, seconds))
        floor = sum(forks.run(_worker, n, "hit", floor_path, path, seconds))
        c_hits = c_copies = None
        if c_client is not None:
            cpu2 = cpu_seconds(daemon_pid)
            c_hits = run_c_clients(c_client, n, ["-s", socket_path, path], seconds)
            cpu3 = cpu_seconds(daemon_pid)
            c_copies = run_c_clients(c_client, n, ["-c", path], seconds)
            if n == max(procs) and c_hits:
                c_cpu_per_hit = (cpu3 - cpu2) / c_hits * 1e6
        out.append(
            Throughput(
                n,
                hits / seconds,
                copies / seconds,
                batch_hits_per_s=batched / seconds,
                floor_per_s=floor / seconds,
                c_hits_per_s=None if c_hits is None else c_hits / seconds,
                c_copies_per_s=None if c_copies is None else c_copies / seconds,
            )
        )
        if n == max(procs) and hits:
            cpu_per_hit = (cpu1 - cpu0) / hits * 1e6
    return out, cpu_per_hit, c_cpu_per_hit
