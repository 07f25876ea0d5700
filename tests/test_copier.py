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


async def test_a_cancelled_acquire_of_a_free_slot_never_keeps_it() -> None:
    """A job cancelled as it takes a free slot (a fill's pump stopped at shutdown, a
    worker job cancelled past the grace) either has the slot, and its caller gives it
    back, or raises Cancelled without it. Before, the slot was taken and then the
    checkpoint raised: nobody gave it back, and the uid's requests waiting for one
    waited for the grace."""
    for acquire in (Quota.acquire, Quota.acquire_last):
        quota = Quota(limit=1)
        with trio.fail_after(10), trio.CancelScope() as scope:
            scope.cancel()
            try:
                await acquire(quota)
            except trio.Cancelled:
                assert quota.used == 0, acquire
                raise
            quota.release()  # returned with the slot: the caller's to give back
        assert quota.used == 0 and quota.idle, acquire


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


async def test_a_freed_slot_goes_to_told_fills_only_when_nobody_else_of_the_uid_wants_it() -> None:
    """The fills of files a client only told of (filling.py) wait in acquire_last: a
    freed slot goes first to a job waiting in acquire, then to a turn of the opens
    waiting to retry (one woken at a time, attack 16), and only then to them, in the
    order they came; hurry() moves them up to acquire's turn (an asked fill joined)."""
    quota = Quota(limit=1)
    order: list[str] = []
    woken = 0

    async def last(name: str) -> None:
        await quota.acquire_last()
        order.append(name)

    async def first(name: str) -> None:
        await quota.acquire()
        order.append(name)

    async def retry(name: str, takes: bool) -> None:
        nonlocal woken
        await quota.wait_freed()
        woken += 1
        try:
            order.append(name if takes and quota.try_acquire() else f"{name} passed")
        finally:
            quota.pass_on()

    async def settled() -> list[str]:
        await trio.testing.wait_all_tasks_blocked()
        return order

    with trio.fail_after(10):
        assert quota.try_acquire()
        async with trio.open_nursery() as nursery:
            nursery.start_soon(last, "told 1")
            await settled()
            nursery.start_soon(last, "told 2")
            await settled()
            for name, takes in (("hit 1", False), ("hit 2", False), ("open", True)):
                nursery.start_soon(retry, name, takes)
                await settled()
            nursery.start_soon(first, "job")
            await settled()
            assert not quota.try_acquire_last() and quota.hits["max_copies_per_uid"] == 3
            quota.release()
            assert await settled() == ["job"] and woken == 0
            quota.release()  # the retries' turn, one by one, until one takes it
            assert await settled() == ["job", "hit 1 passed", "hit 2 passed", "open"]
            quota.release()
            assert (await settled())[4:] == ["told 1"] and quota.used == 1
            nursery.start_soon(last, "told 3")
            await settled()
            nursery.start_soon(retry, "hit 3", False)
            await settled()
            quota.hurry()  # told 2 and 3 now wait in acquire's turn, in their order
            nursery.start_soon(first, "job 2")
            await settled()
            for _ in range(3):
                quota.release()
                await settled()
            assert order[5:] == ["told 2", "told 3", "job 2"] and woken == 3
            quota.release()  # the retry's turn; it passes, and nobody is left
            assert (await settled())[8:] == ["hit 3 passed"]
        assert quota.used == 0 and quota.idle
