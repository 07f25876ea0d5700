# Worker threads: the copies run at a lower CPU priority than the event loop,
# so that one uid's copies cannot take the CPU from everyone's hits.
from __future__ import annotations

import os
import threading

import trio

from shadowd.copier import WORKER_NICE, run_job


async def test_worker_threads_run_below_the_loops_priority() -> None:
    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    loop = priority()
    with trio.fail_after(10):
        seen = await run_job(priority, lambda _: None, trio.CapacityLimiter(1))
    assert seen >= max(loop, WORKER_NICE)
    assert priority() == loop  # the loop's own thread is untouched
