# The daemon's open-fd count (shadowd/metrics.py): exact, made in a worker
# thread and never on the loop, one at a time, and served with its age, so
# that a test (or an operator) can tell a count newer than what it did.
from __future__ import annotations

import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing
from shadowd_client import AsyncClient, Client

from shadowd import metrics
from shadowd.cache import CacheLimits
from shadowd.metrics import FdCount, count_open_fds
from shadowd.server import Server, ServerConfig

from .conftest import Daemon, make_file


def test_count_open_fds_is_the_number_of_descriptors_open() -> None:
    listed = len(os.listdir("/proc/self/fd")) - 1  # minus the one listdir used
    assert count_open_fds() == listed
    extra = [os.open("/dev/null", os.O_RDONLY) for _ in range(1000)]
    try:
        assert count_open_fds() == listed + 1000
    finally:
        for fd in extra:
            os.close(fd)
    assert count_open_fds() == listed


class Gate:
    """A count that records its thread, fails on the loop's, and blocks every
    call after the first *free* until released."""

    def __init__(self, free: int) -> None:
        self.free = free
        self.calls = 0
        self.threads: list[int] = []
        self.release = threading.Event()
        self.token = trio.lowlevel.current_trio_token()
        self.blocked = trio.Event()
        self.loop_thread = threading.get_ident()

    def __call__(self) -> int:
        self.calls += 1
        self.threads.append(threading.get_ident())
        if self.threads[-1] == self.loop_thread:
            raise AssertionError("the fd count was made on the loop's thread")
        if self.calls > self.free:
            self.token.run_sync_soon(self.blocked.set)
            self.release.wait(20)  # not forever, whatever becomes of the test
        return count_open_fds()


async def test_one_count_at_a_time_and_a_count_since_a_moment() -> None:
    gate = Gate(free=0)
    fds = FdCount(count=gate)
    assert (fds.value, fds.running) == (-1, False)  # no count yet: unknown
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            fds.start(nursery)
            await gate.blocked.wait()
            before = time.monotonic()
            fds.start(nursery)  # one is running: no second
            fds.start(nursery)
            assert fds.running and gate.calls == 1 and fds.value == -1

            async def wait_since(when: float, out: list[int]) -> None:
                out.append(await fds.since(when))

            first: list[int] = []
            later: list[int] = []
            nursery.start_soon(wait_since, -1.0, first)  # the running count will do
            nursery.start_soon(wait_since, before, later)  # it began too early: one more
            await trio.testing.wait_all_tasks_blocked()
            assert gate.calls == 1
            gate.release.set()
    assert gate.calls == 2 and not fds.running
    assert first == [later[0]] and later[0] > 0 and fds.started >= before
    assert gate.loop_thread not in gate.threads


async def test_the_loop_answers_hits_and_stats_while_an_fd_count_is_blocked(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A count that never finishes holds up no one: it runs in a worker thread.

    Were the count made on the loop, the loop would stop with it: no hit,
    no stats answer until it ended (and the gate fails on the loop's thread).
    Meanwhile the stats carry the last finished count, and no second count
    starts, however often they are asked (stats_refresh 0).
    """
    gate = Gate(free=1)  # serve()'s first count, before it accepts, goes through
    server = Server(
        ServerConfig(socket_path="", stats_refresh=0.0, cache=CacheLimits(racy_window_ns=0))
    )
    server.collector.fds.count = gate
    monkeypatch.setattr(metrics, "count_open_fds", gate)  # whoever counts, counts through it
    path = tmp_path / "s.sock"
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(str(path))
    lsock.listen()
    src = os.open(make_file(tmp_path / "lib.so", b"x" * 20_000), os.O_RDONLY)
    try:
        with trio.fail_after(15):
            async with trio.open_nursery() as nursery:
                await nursery.start(server.serve, lsock)
                try:
                    await _hits_and_stats_while_blocked(server, gate, path, src)
                finally:
                    gate.release.set()  # a failing test must not wait for the gate
                    server.shutdown()
    finally:
        os.close(src)
        lsock.close()
        server.cache.clear()
    assert gate.calls >= 3
    assert gate.loop_thread not in gate.threads


async def _hits_and_stats_while_blocked(server: Server, gate: Gate, path: Path, src: int) -> None:
    fds = server.collector.fds
    assert gate.calls == 1 and fds.value > 0
    counted = fds.value
    async with AsyncClient(path, timeout=10) as c:
        answer = await c.ask(src, wait=True)  # a miss, copied and cached
        assert answer.fd is not None and not answer.hit
        os.close(answer.fd)
        s = await c.stats()  # starts the next count, which blocks
        assert s["open_fds"] == counted and s["open_fds_age_seconds"] >= 0
        await gate.blocked.wait()
        hits = server.cache.hits
        for _ in range(20):
            answer = await c.ask(src)
            assert answer.fd is not None and answer.hit
            os.close(answer.fd)
            s = await c.stats()
            assert s["open_fds"] == counted  # the last finished count
        assert server.cache.hits == hits + 20
        assert gate.calls == 2 and fds.running  # one count at a time
        released = time.monotonic()
        gate.release.set()
        await fds.since(released)  # the blocked one, then one begun after the release
        s = await c.stats()
        assert 0 <= s["open_fds_age_seconds"] <= time.monotonic() - released
        assert s["open_fds"] > 0


async def test_a_stats_answer_says_how_old_its_fd_count_is(one_daemon: Daemon) -> None:
    """A count that began after a moment is the daemon's count from then on.

    A reply made at t holds a count begun at t - age; t is after the request
    was sent, so age <= sent - since proves the count began after *since*.
    """
    daemon = one_daemon

    def count_after_connecting() -> tuple[dict[str, Any], int]:
        with Client(daemon.socket_path, timeout=10) as c:
            c.stats()  # connected: its descriptor is open in the daemon from here on
            since = time.monotonic()
            while time.monotonic() < since + 20:
                sent = time.monotonic()
                s = c.stats()
                if 0 <= s["open_fds_age_seconds"] <= sent - since:
                    return s, daemon.open_fds()
                time.sleep(0.05)
        raise AssertionError(f"no count newer than the connection: {s}")

    with trio.fail_after(30):
        s, listed = await trio.to_thread.run_sync(count_after_connecting)
    assert s["open_fds"] == listed


async def test_a_stats_request_after_a_quiet_while_gets_a_count_made_for_it(
    one_daemon: Daemon,
) -> None:
    """Asked once in a while, the daemon answers with a count begun for the request
    (waited for in the connection's task), not the one the previous request started."""
    daemon = one_daemon

    def ask_after_a_while() -> tuple[dict[str, Any], float, int]:
        with Client(daemon.socket_path, timeout=10) as c:
            c.stats()
            time.sleep(1.2)  # longer than stats_refresh (1 s): the last count is old
            sent = time.monotonic()
            s = c.stats()
            return s, time.monotonic() - sent, daemon.open_fds()

    with trio.fail_after(30):
        s, took, listed = await trio.to_thread.run_sync(ask_after_a_while)
    assert 0 <= s["open_fds_age_seconds"] <= took  # begun after the request was sent
    assert s["open_fds"] == listed
