# The acceptor (shadowd/accepting.py) on a real listening socket, in process:
# it takes connections in slices as long as the poller's rounds (one a turn of
# the event loop while they are quick), so that a flood of connects cannot
# keep the daemon's other connections waiting, nor costly rounds the backlog.
from __future__ import annotations

import socket
import types
from pathlib import Path
from typing import Any

import pytest
import trio

from shadowd import accepting as accepting_module
from shadowd.accepting import ACCEPT_MAX_TIME, Acceptor
from shadowd.access import Gate, Peer, Seat
from shadowd.protocol import WireLimits
from shadowd.refusals import Refusals

#: Connections waiting in the backlog when the acceptor starts.
QUEUED = 300


class _Holding(Acceptor):
    """An acceptor whose connections are only held (their sockets), not served."""

    held: list[socket.socket]

    async def _run_connection(
        self, sock: socket.socket, peer: Peer, seat: Seat, nursery: trio.Nursery
    ) -> None:
        self.held.append(sock)

    @classmethod
    def at(cls, gate: Gate, **how: Any) -> _Holding:
        """One at *gate*, with no server behind it: *how* sets its pace and room."""
        acceptor = cls(
            gate=gate,
            refusals=Refusals(),
            collector=types.SimpleNamespace(clients_total=0),  # type: ignore[arg-type]
            wire=WireLimits(),
            services=None,  # type: ignore[arg-type]
            connections=set(),
            draining=lambda: False,
            **how,
        )
        acceptor.held = []
        return acceptor


class _Clock:
    """The acceptor's clock: each look at it is *step* seconds after the last."""

    def __init__(self, step: float) -> None:
        self.step = step
        self.now = 0.0

    def __call__(self) -> float:
        self.now += self.step
        return self.now


async def _taken_per_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *, step: float, pace: float
) -> list[int]:
    """Let an acceptor take QUEUED connections queued before it starts, each taking
    *step* seconds on its clock, while the poller's rounds take *pace*; return how
    many it had taken at each turn of another task."""
    monkeypatch.setattr(accepting_module, "_now", _Clock(step))
    path = str(tmp_path / "flood.sock")
    lsock = socket.socket(
        socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    peers: list[socket.socket] = []
    gate = Gate()
    acceptor = _Holding.at(gate, pace=lambda: pace)
    seen: list[int] = []

    async def watch() -> None:
        while True:
            seen.append(gate.clients)
            await trio.lowlevel.checkpoint()

    try:
        lsock.bind(path)
        lsock.listen(QUEUED)
        for _ in range(QUEUED):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            peers.append(peer)
            peer.connect(path)
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(watch)
                nursery.start_soon(acceptor.run, lsock, nursery)
                while gate.clients < QUEUED:
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
    finally:
        for s in [lsock, *peers, *acceptor.held]:
            s.close()
    assert gate.clients == QUEUED
    return seen


async def test_a_flood_of_connections_is_taken_one_per_turn_while_rounds_are_quick(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With connections queued faster than they are taken and the poller's rounds
    quick, every other task of the loop runs between two accepts: before attack 13,
    the acceptor took the whole backlog in one step, and a hit waited for it (121 ms
    behind 3,000 queued connections)."""
    seen = await _taken_per_turn(tmp_path, monkeypatch, step=0.00002, pace=0.0)
    # The watcher ran while the backlog was being taken, not only before and after.
    between = [n for n in seen if 0 < n < QUEUED]
    assert len(between) >= QUEUED // 2, sorted(set(seen))[:10]


async def test_a_backlog_is_taken_as_fast_as_the_poller_rounds_go(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When the poller's rounds are long (another uid's costly datagrams), each
    slice of accepts is as long: a connection behind a backlog of N waits about N
    accepts twice over, not N rounds (before: one connection a turn, each turn a
    round; a root client waited 6.5-8.7 s behind 256 connections of another uid
    each sending two datagrams of 65,000 empty arrays)."""
    step = ACCEPT_MAX_TIME / 40  # forty accepts fill the longest slice
    seen = await _taken_per_turn(tmp_path, monkeypatch, step=step, pace=ACCEPT_MAX_TIME)
    between = sorted({n for n in seen if 0 < n < QUEUED})
    # About forty a turn (trio may run the acceptor twice before the watcher).
    assert len(between) <= 2 * QUEUED // 40, between


async def test_pauses_of_accepting_are_logged_at_most_once_a_second(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """While the Closer holds as many client sockets as it may, each accept is
    followed by a pause until one is closed, and each pause was logged: attack 33's
    peers with short queues (1,000 of a uid not admitted) wrote 936 lines in 1.7 s.
    Now at most one line a second says so (with the pauses since); all are counted."""
    monkeypatch.setattr(accepting_module, "_now", _Clock(0.00001))
    path = str(tmp_path / "paused.sock")
    lsock = socket.socket(
        socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    peers: list[socket.socket] = []
    gate = Gate()
    acceptor = _Holding.at(
        gate,
        has_room_for_sockets=lambda: False,  # at the bound after every accept
        socket_room=trio.lowlevel.checkpoint,  # and room again at once
    )
    try:
        lsock.bind(path)
        lsock.listen(QUEUED)
        for _ in range(QUEUED):
            peer = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
            peers.append(peer)
            peer.connect(path)
        with caplog.at_level("WARNING", logger="shadowd.server"), trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(acceptor.run, lsock, nursery)
                while gate.clients < QUEUED:
                    await trio.sleep(0.001)
                nursery.cancel_scope.cancel()
    finally:
        for s in [lsock, *peers, *acceptor.held]:
            s.close()
    said = [r for r in caplog.records if "not accepting" in r.getMessage()]
    assert gate.hits["max_sockets_closing"] == QUEUED
    assert len(said) == 1, len(said)  # QUEUED * 0.00001 s: well within a second
