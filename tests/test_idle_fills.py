# Fills nobody waits for are copied under SCHED_IDLE (copier.py, IDLE_BOUND),
# and never for long: the real Copier, real worker threads, real copies of
# real files, the policy read from the kernel by the copying thread itself.
# Only the copy's start is held (a wrapper of copier.copy_source that waits,
# in the worker, until its own policy is back to normal or the test's limit
# is up), so that what boosts a fill can be seen. A fill a loaded host starves
# must not keep its uid's copy slot, its worker and its fd beyond the bound,
# nor keep a request waiting on it: each test fails if that breaks.
from __future__ import annotations

import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from shadowd import copier
from shadowd.copier import Copier, Flight, Quota, run_job
from shadowd.fds import FdHolder
from shadowd.source import SourceStat

from .conftest import make_file

#: How long a held copy waits for its boost before it gives up (the test then fails).
GIVE_UP = 20.0


class HeldCopy:
    """copier.copy_source, held in its worker until the thread runs at the normal
    policy again: the policies it saw, in order, and when it first ran."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.seen: list[int] = []
        self.started = threading.Event()
        real = copier.copy_source

        def held(src: FdHolder, expected: SourceStat | None, watches: Any = None) -> Any:
            policy = os.sched_getscheduler(0)
            self.seen.append(policy)
            self.started.set()
            deadline = time.monotonic() + GIVE_UP
            while policy == os.SCHED_IDLE and time.monotonic() < deadline:
                time.sleep(0.002)
                policy = os.sched_getscheduler(0)
            self.seen.append(policy)
            return real(src, expected, watches)

        monkeypatch.setattr(copier, "copy_source", held)

    async def wait_started(self) -> None:
        while not self.started.is_set():
            await trio.sleep(0.005)


def start(
    nursery: trio.Nursery, path: Path, quota: Quota, *, background: bool
) -> tuple[Copier, Flight]:
    c = Copier(local_limiter=trio.CapacityLimiter(4), remote_limiter=trio.CapacityLimiter(1))
    assert quota.try_acquire()  # the slot the flight holds, as lookup_or_fly takes it
    src = FdHolder(os.open(path, os.O_RDONLY | os.O_CLOEXEC))
    flight = c.start(
        nursery, "key", src, None, _keep_nothing, remote=False, quota=quota, background=background
    )
    return c, flight


def _keep_nothing(_flight: Flight, _copied: copier.Copied) -> None:
    pass  # the copy is released once nobody waits for it (Flight.drop_if_unwanted)


async def ended(flight: Flight) -> None:
    await flight.done.wait()
    await trio.testing.wait_all_tasks_blocked()


@pytest.fixture
def held(monkeypatch: pytest.MonkeyPatch) -> HeldCopy:
    if not copier._idle_usable():
        pytest.skip("this host refuses SCHED_IDLE to a thread (seccomp, or no RLIMIT_NICE)")
    return HeldCopy(monkeypatch)


async def test_a_fill_nobody_waits_for_runs_under_sched_idle_at_most_its_bound(
    tmp_path: Path, held: HeldCopy
) -> None:
    """With nobody asking for it, a background fill is put back to the normal policy
    once IDLE_BOUND is up: a host busy enough to starve it cannot make it hold its
    uid's slot for longer than that before it copies as any fill did before."""
    path = make_file(tmp_path / "told", os.urandom(20000))
    quota = Quota(limit=2)
    with trio.fail_after(GIVE_UP + 30):
        async with trio.open_nursery() as nursery:
            _, flight = start(nursery, path, quota, background=True)
            started = trio.current_time()
            await ended(flight)
            took = trio.current_time() - started
        assert held.seen == [os.SCHED_IDLE, os.SCHED_OTHER]
        assert took < GIVE_UP  # boosted by the bound, not the held copy giving up
        assert flight.error is None and quota.used == 0 and quota.idle
        assert not quota.background


async def test_a_request_that_joins_a_fill_boosts_it_at_once(
    tmp_path: Path, held: HeldCopy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A request that waits for a version being filled in the background (opens.py
    joins the flight) must not wait on a copy under SCHED_IDLE: the join boosts it,
    long before the bound."""
    monkeypatch.setattr(copier, "IDLE_BOUND", 3600.0)
    path = make_file(tmp_path / "told", os.urandom(20000))
    quota = Quota(limit=2)
    with trio.fail_after(GIVE_UP + 30):
        async with trio.open_nursery() as nursery:
            _, flight = start(nursery, path, quota, background=True)
            await held.wait_started()
            assert held.seen == [os.SCHED_IDLE]
            flight.join()
            fd, _sealed = await flight.wait()
            os.close(fd)
            nursery.cancel_scope.cancel()  # the bound's task sleeps for an hour
        assert held.seen == [os.SCHED_IDLE, os.SCHED_OTHER]
        assert quota.used == 0 and not quota.background


async def test_a_request_waiting_for_its_uids_slot_boosts_the_fills_that_hold_it(
    tmp_path: Path, held: HeldCopy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The uid's only copy slot is held by a fill under SCHED_IDLE: a request that
    waits for a slot boosts it, and gets the slot when it ends. Nothing else would
    boost it here (the bound is an hour)."""
    monkeypatch.setattr(copier, "IDLE_BOUND", 3600.0)
    path = make_file(tmp_path / "told", os.urandom(20000))
    quota = Quota(limit=1)
    got: list[str] = []

    async def request() -> None:
        await quota.acquire()
        got.append("slot")
        quota.release()

    with trio.fail_after(GIVE_UP + 30):
        async with trio.open_nursery() as nursery:
            _, flight = start(nursery, path, quota, background=True)
            await held.wait_started()
            assert held.seen == [os.SCHED_IDLE] and quota.background
            nursery.start_soon(request)
            await ended(flight)
            assert got == ["slot"]
            nursery.cancel_scope.cancel()
        assert held.seen == [os.SCHED_IDLE, os.SCHED_OTHER]
        assert quota.used == 0 and quota.idle and not quota.background


async def test_a_fill_waiting_for_a_slot_boosts_nothing(
    tmp_path: Path, held: HeldCopy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The pump's fills (filling.py) wait for a slot with boost=False: a fill is no
    more urgent than the fills that hold the slots."""
    monkeypatch.setattr(copier, "IDLE_BOUND", 3600.0)
    path = make_file(tmp_path / "told", os.urandom(20000))
    quota = Quota(limit=1)
    with trio.fail_after(GIVE_UP + 30):
        async with trio.open_nursery() as nursery:
            _, flight = start(nursery, path, quota, background=True)
            await held.wait_started()
            nursery.start_soon(lambda: quota.acquire(boost=False))
            await trio.testing.wait_all_tasks_blocked()
            await trio.sleep(0.1)
            assert held.seen == [os.SCHED_IDLE] and quota.background
            quota.boost_background()  # done with it: let it end
            await ended(flight)
            quota.release()  # the slot the waiting fill got
            nursery.cancel_scope.cancel()
        assert held.seen == [os.SCHED_IDLE, os.SCHED_OTHER]


async def test_a_copy_someone_waits_for_never_runs_under_sched_idle(
    tmp_path: Path, held: HeldCopy
) -> None:
    """A flight a request started (it waits) copies at the normal policy, and a worker
    that ran a fill goes back to trio's thread cache at the normal policy with its nice
    value kept: the next job it runs is not idle."""
    path = make_file(tmp_path / "asked", os.urandom(20000))
    quota = Quota(limit=2)
    with trio.fail_after(GIVE_UP + 30):
        async with trio.open_nursery() as nursery:
            _, flight = start(nursery, path, quota, background=False)
            await ended(flight)
        assert held.seen == [os.SCHED_OTHER, os.SCHED_OTHER]

        def policy() -> tuple[int, int]:
            tid = threading.get_native_id()
            return os.sched_getscheduler(0), os.getpriority(os.PRIO_PROCESS, tid)

        limiter = trio.CapacityLimiter(1)
        background = copier.Background()
        during = await run_job(policy, lambda _: None, limiter, background=background)
        after = await run_job(policy, lambda _: None, limiter)
        assert during[0] == os.SCHED_IDLE
        assert after == (os.SCHED_OTHER, during[1])
        assert after[1] >= copier.WORKER_NICE


async def test_the_fills_that_run_under_sched_idle_are_those_nobody_waits_for(
    tmp_path: Path, held: HeldCopy, monkeypatch: pytest.MonkeyPatch
) -> None:
    """opens.py and filling.py: a lone open that does not wait, a batch's told files
    and the fills queued for a slot start background flights; an open that waits for
    its copy does not."""
    from shadowd.access import UidShare
    from shadowd.opens import FILLING
    from shadowd.source import stat_sync

    from .test_filling import ask, key_of, serving, tell

    monkeypatch.setattr(copier, "IDLE_BOUND", 3600.0)
    asked, told, queued, waited = (make_file(tmp_path / n, os.urandom(9000)) for n in "abcd")

    def flight_of(server: Any, path: Path) -> Flight | None:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            version = stat_sync(fd).version
        finally:
            os.close(fd)
        found: Flight | None = server.copier.flight((key_of(path), version))
        return found

    with trio.fail_after(GIVE_UP + 30):
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert ask(server, share, asked) is FILLING
            assert tell(server, share, [told]) == [True]
            assert tell(server, share, [queued]) == [True] and share.fills  # no slot left
            started = [flight_of(server, p) for p in (asked, told)]
            assert all(f is not None and f.background is not None for f in started)
            while held.seen.count(os.SCHED_IDLE) < 2:
                await trio.sleep(0.005)  # both held, under SCHED_IDLE
            share.quota.boost_background()  # both copy now, and end
            while (queued_flight := flight_of(server, queued)) is None:
                await trio.sleep(0.005)  # the pump starts it once a slot is free
            assert queued_flight.background is not None
            while held.seen.count(os.SCHED_IDLE) < 3:
                await trio.sleep(0.005)
            while server.copier.in_flight > 1:
                await trio.sleep(0.005)
            fd = os.open(waited, os.O_RDONLY | os.O_CLOEXEC)
            try:
                outcome = server.opens.serve_now(fd, str(waited), share)
            finally:
                os.close(fd)
            assert isinstance(outcome, Flight) and outcome.background is None
            got, _sealed = await outcome.wait()
            os.close(got)
            share.quota.boost_background()
            await queued_flight.done.wait()
        assert held.seen.count(os.SCHED_IDLE) == 3
