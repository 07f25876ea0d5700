# The gate on real socket pairs: each admitted connection's seat, the
# connection limits, and the seats given back at a limit for peers that hung
# up: only those whose connections can only end, each counted out once, never
# more often than the sweeps' budget allows.
from __future__ import annotations

import os
import socket
from collections.abc import Iterator

import pytest

from shadowd.access import SWEEP_SEATS, Gate, Peer, Seat, SweepBudget
from shadowd.errors import RequestError
from shadowd.peer_limits import PeerLimits

PEER = Peer(pid=os.getpid(), uid=1000, gid=1000)
OTHER = Peer(pid=os.getpid(), uid=1001, gid=1001)


class Pairs:
    """Connected SOCK_SEQPACKET pairs: ours for the gate, theirs to hang up."""

    def __init__(self) -> None:
        self.made: list[tuple[socket.socket, socket.socket]] = []

    def seat(self, gate: Gate, peer: Peer = PEER) -> tuple[Seat, socket.socket, socket.socket]:
        """A connection of *peer* seated at *gate*: its seat, our end, the peer's end."""
        ours, theirs = socket.socketpair(
            socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC
        )
        self.made.append((ours, theirs))
        return gate.admit(peer, ours), ours, theirs


@pytest.fixture
def pairs() -> Iterator[Pairs]:
    made = Pairs()
    yield made
    for ours, theirs in made.made:
        ours.close()
        theirs.close()


def test_a_seat_whose_peer_hung_up_is_given_back_at_the_limit_and_counted_out_once(
    pairs: Pairs,
) -> None:
    gate = Gate(limits=PeerLimits(max_clients_per_uid=2))
    first, _, theirs = pairs.seat(gate)
    second, _, _ = pairs.seat(gate)
    theirs.close()
    third, _, _ = pairs.seat(gate)  # first's peer hung up: its seat was given back
    share = third.share
    assert (first.counted, second.counted, third.counted) == (False, True, True)
    assert (share.connections, gate.clients, len(share.seats)) == (2, 2, 3)
    gate.leave(first)  # its connection ends later: counted out once, not twice
    assert (share.connections, gate.clients, len(share.seats)) == (2, 2, 2)
    with pytest.raises(RequestError, match="uid 1000 has 2 connections already"):
        pairs.seat(gate)  # the two left are live
    assert gate.hits == {"max_clients_per_uid": 1}
    gate.leave(second)
    gate.leave(third)
    gate.leave(third)  # a second leave changes nothing
    assert (share.connections, gate.clients, gate.uids) == (0, 0, 0)


def test_at_max_clients_a_seat_of_any_uid_whose_peer_hung_up_is_given_back(
    pairs: Pairs,
) -> None:
    gate = Gate(limits=PeerLimits(max_clients=2))
    gone, _, theirs = pairs.seat(gate, OTHER)
    live, _, _ = pairs.seat(gate)
    theirs.close()
    new, _, _ = pairs.seat(gate)
    assert not gone.counted and gate.clients == 2
    assert (gone.share.connections, new.share.connections) == (0, 2)
    # Its uid keeps its share (and quota) until that connection leaves.
    assert gate.uids == 2
    gate.leave(gone)
    assert gate.uids == 1
    with pytest.raises(RequestError, match="the daemon serves 2 clients already"):
        pairs.seat(gate, OTHER)
    gate.leave(live)
    gate.leave(new)
    assert (gate.clients, gate.uids) == (0, 0)


def test_a_peer_that_left_requests_unread_keeps_its_seat_until_they_are_read(
    pairs: Pairs,
) -> None:
    """Answering them may start work for it: its connection could outlive the peer."""
    gate = Gate(limits=PeerLimits(max_clients_per_uid=2))
    first, ours, theirs = pairs.seat(gate)
    pairs.seat(gate)
    theirs.send(b"a request")
    theirs.close()
    with pytest.raises(RequestError, match="2 connections already"):
        pairs.seat(gate)
    assert first.counted
    assert ours.recv(100) == b"a request"  # its connection read it
    pairs.seat(gate)
    assert not first.counted and gate.clients == 2


def test_a_connection_that_holds_or_answers_something_keeps_its_seat(pairs: Pairs) -> None:
    """What its task says (Connection.waits_holding_nothing) decides, once it runs."""
    gate = Gate(limits=PeerLimits(max_clients_per_uid=1))
    first, _, theirs = pairs.seat(gate)
    theirs.close()
    answering = True
    first.idle = lambda: not answering
    with pytest.raises(RequestError, match="1 connections already"):
        pairs.seat(gate)
    answering = False
    pairs.seat(gate)
    assert not first.counted


def test_sweeps_poll_no_more_seats_than_their_budget(pairs: Pairs) -> None:
    """A uid flooding the daemon at its limit does not cost a sweep at every accept."""
    now = [0.0]
    gate = Gate(limits=PeerLimits(max_clients_per_uid=2), clock=lambda: now[0])
    first, _, theirs = pairs.seat(gate)
    pairs.seat(gate)
    refused = 0
    while refused < SWEEP_SEATS // 2:  # each sweep polls the two seats
        with pytest.raises(RequestError):
            pairs.seat(gate)
        for end in pairs.made.pop():
            end.close()
        refused += 1
    theirs.close()
    with pytest.raises(RequestError):
        pairs.seat(gate)  # the budget is spent: no sweep, the seat still counts
    assert first.counted
    now[0] += 1.0
    pairs.seat(gate)
    assert not first.counted


def test_a_sweep_budget_refills_at_its_size_a_second_up_to_its_size() -> None:
    budget = SweepBudget(10, at=0.0)
    assert budget.take(10, 0.0) and not budget.take(1, 0.0)
    assert budget.take(5, 0.5) and not budget.take(1, 0.5)
    assert not budget.take(11, 100.0) and budget.take(10, 100.0)


def test_a_uid_whose_last_connection_left_with_work_under_way_is_forgotten_once_it_ends(
    pairs: Pairs,
) -> None:
    """Its share stays while its job runs (no fresh quota by reconnecting), and goes
    when the job ends, though no connection of it leaves after that."""
    gate = Gate()
    seat, _, _ = pairs.seat(gate)
    share = seat.share
    assert share.quota.try_acquire()  # a copy of its runs
    gate.leave(seat)
    assert gate.uids == 1
    again, _, _ = pairs.seat(gate)
    assert again.share is share  # the same quota, one slot in use
    gate.leave(again)
    share.quota.release()  # the copy ended
    assert gate.uids == 0
    other, _, _ = pairs.seat(gate, OTHER)
    assert gate.uids == 1
    gate.leave(other)
    assert gate.uids == 0


def test_peers_turned_away_of_uids_without_a_share_share_one(pairs: Pairs) -> None:
    """Attack 24: what closing a turned-away peer's socket costs goes on its uid's
    share when it has one (an admitted uid at a limit), else on one share for all
    such peers, whatever their number of uids: the gate keeps no share per uid it
    does not admit (before, one each, kept until the next admitted accept)."""
    gate = Gate(limits=PeerLimits(max_copies_per_uid=2))
    seat, _, _ = pairs.seat(gate)
    assert gate.share_of(PEER.uid) is seat.share
    shares = {id(gate.share_of(uid)) for uid in range(100_000, 110_000)}
    assert len(shares) == 1
    assert gate.uids == 1  # PEER's alone
    assert gate.share_of(100_000).quota.limit == 2
    assert gate.share_of(100_000) is not seat.share
