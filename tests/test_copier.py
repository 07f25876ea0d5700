# Worker threads: the copies run at a lower CPU priority than the event loop,
# so that one uid's copies cannot take the CPU from everyone's hits.
from __future__ import annotations

import os
import threading
from typing import Any

import trio
import trio.testing

from shadowd.copier import WORKER_NICE, Quota, run_job


async def test_worker_threads_run_below_the_loops_priority() -> None:
    def priority() -> int:
        return os.getpriority(os.PRIO_PROCESS, threading.get_native_id())

    loop = priority()
    with trio.fail_after(10):
        seen = await run_job(priority, lambda _: None, trio.CapacityLimiter(1))
    assert seen >= max(loop, WORKER_NICE)
    assert priority() == loop  # the loop's own thread is untouched


async def test_a_released_quota_slot_goes_to_the_first_waiter_and_wakes_no_one_else() -> None:
    """Thousands of fds to close in workers wait on one uid's quota: each release must
    hand its slot to one waiter, in order, not wake them all to retry."""
    quota = Quota(limit=2)
    order: list[int] = []
    woken = 0

    async def job(i: int) -> None:
        nonlocal woken
        await quota.acquire()
        woken += 1
        order.append(i)

    with trio.fail_after(10):
        await quota.acquire()
        await quota.acquire()
        async with trio.open_nursery() as nursery:
            for i in range(500):
                nursery.start_soon(job, i)
                await trio.testing.wait_all_tasks_blocked()  # parked, in this order
            assert woken == 0 and quota.used == 2 and quota.hits["max_copies_per_uid"] == 500
            quota.release()
            await trio.testing.wait_all_tasks_blocked()
            assert order == [0] and quota.used == 2  # the slot passed on, still in use
            for n in range(1, 500):
                quota.release()  # the job ended: its slot to the next, and no one else
                await trio.testing.wait_all_tasks_blocked()
                assert len(order) == n + 1 and woken == n + 1
        assert order == list(range(500)) and quota.used == 2
        quota.release()
        quota.release()
        assert quota.used == 0 and quota.idle


async def test_a_waiter_cancelled_in_the_quota_queue_takes_no_slot() -> None:
    quota = Quota(limit=1)
    got: list[str] = []
    scope_a = trio.CancelScope()

    async def job(name: str, scope: trio.CancelScope) -> None:
        with scope:
            await quota.acquire()
            got.append(name)

    with trio.fail_after(10):
        await quota.acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(job, "a", scope_a)
            await trio.testing.wait_all_tasks_blocked()
            nursery.start_soon(job, "b", trio.CancelScope())
            await trio.testing.wait_all_tasks_blocked()
            scope_a.cancel()  # a leaves the queue while parked
            await trio.testing.wait_all_tasks_blocked()
            quota.release()
        assert got == ["b"] and quota.used == 1
        quota.release()
        assert quota.used == 0 and quota.idle


async def test_requests_waiting_to_retry_are_woken_one_at_a_time_not_all_at_each_release() -> None:
    """Opens that wait for their uid's quota (opens.py, _when_allowed) try again one
    by one: a freed slot wakes one, which passes the turn on when its try did not take
    the slot. Woken all at once, thousands of them cost the loop a try each per release."""
    from shadowd.access import UidShare
    from shadowd.opens import THROTTLED
    from shadowd.server import Server, ServerConfig

    opens = Server(ServerConfig(socket_path="")).opens
    share = UidShare(1000, Quota(limit=2))
    quota = share.quota
    waiters = 300
    tries = 0
    served: list[str] = []
    # Every third waiter's file has been filled meanwhile: its try is a hit and
    # takes no slot. The others start a copy, which holds a slot until released.
    hits = {i for i in range(waiters) if i % 3 == 0}

    def attempt(i: int) -> Any:
        nonlocal tries
        tries += 1
        if i in hits and tries > waiters:
            return "hit"
        return "copy" if quota.try_acquire() else THROTTLED

    async def request(i: int) -> None:
        served.append(await opens._when_allowed(share, lambda: attempt(i)))

    with trio.fail_after(10):
        assert quota.try_acquire() and quota.try_acquire()
        async with trio.open_nursery() as nursery:
            for i in range(waiters):
                nursery.start_soon(request, i)
            await trio.testing.wait_all_tasks_blocked()
            assert tries == waiters and not served  # each tried once, and waits
            for _ in range(200):
                quota.release()  # a copy ended
                await trio.testing.wait_all_tasks_blocked()
                # The one woken took the slot, or was a hit and passed its turn
                # on: never a try per waiter.
                assert quota.used == 2
                assert tries == waiters + len(served)
            assert served.count("copy") == 200
            for _ in range(2):
                quota.release()  # the last two copies: the hits left are woken in turn
                await trio.testing.wait_all_tasks_blocked()
        assert len(served) == waiters and tries == 2 * waiters
        assert quota.used == 0 and quota.idle
