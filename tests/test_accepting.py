# The acceptor (shadowd/accepting.py) on a real listening socket, in process:
# it takes one connection per turn of the event loop, so that a flood of
# connects cannot keep the daemon's other connections waiting.
from __future__ import annotations

import socket
import types
from pathlib import Path

import trio

from shadowd.accepting import Acceptor
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


async def test_a_flood_of_connections_is_taken_one_per_turn_of_the_loop(tmp_path: Path) -> None:
    """With connections queued faster than they are taken, every other task of the
    loop runs between two accepts: before, the acceptor took the whole backlog in
    one step, and a hit waited for it (121 ms behind 3,000 queued connections,
    against 0.5 ms now, measured with the daemon)."""
    path = str(tmp_path / "flood.sock")
    lsock = socket.socket(
        socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC
    )
    peers: list[socket.socket] = []
    gate = Gate()
    acceptor = _Holding(
        gate=gate,
        refusals=Refusals(),
        collector=types.SimpleNamespace(clients_total=0),  # type: ignore[arg-type]
        wire=WireLimits(),
        services=None,  # type: ignore[arg-type]
        connections=set(),
        draining=lambda: False,
    )
    acceptor.held = []
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
    # The watcher ran while the backlog was being taken, not only before and after.
    between = [n for n in seen if 0 < n < QUEUED]
    assert len(between) >= QUEUED // 2, sorted(set(seen))[:10]
