# The readiness multiplexer of the I/O loop: one epoll set holding every
# connection that waits for its next request, drained by one trio task, in an
# order fair between uids.
#
# A trio task per connection would pay for a wake-up, an epoll re-arm and a
# scheduler pass on every request; here one wake-up answers every connection
# that is ready, each with one datagram per turn, and the fds a round used are
# closed together at its end, usually with one close_range.
#
# The loop's time is shared per uid, not per connection: every ready
# connection is queued under its uid's flow (one per UidShare), and the next
# datagram answered is always one of the flow that has used the least loop
# time so far (start-time fair queueing on the measured cost of each answer;
# a flow that was idle starts level with the busiest, so idling banks no
# credit). A uid with a thousand connections, or with datagrams that cost
# milliseconds each to unpack, then delays another uid's request by about one
# of its answers, not by all of them. A round stops after ROUND_TIME seconds
# (or ROUND_BUDGET answers), so that a request that comes during it waits
# for what is left of that round, not for the whole backlog; what is still
# queued stays queued, in order, for the next round.
#
# Must never: await while a round is being answered (the callback runs on the
# loop, with the cache, and must stay synchronous); keep an fd registered
# after its owner took it back; let a callback's fd outlive the round; make a
# lone connection's request pay an epoll_wait, or allocate, for the fairness.
from __future__ import annotations

import heapq
import itertools
import os
import select
import time
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from .fds import close_all, move_high

T = TypeVar("T")

#: Answers in one round at most, before the task yields to the rest of the
#: loop (accepts, finished copies, signals) even when more are ready.
ROUND_BUDGET = 64
#: Seconds of answering in one round at most (the answer under way finishes).
ROUND_TIME = 0.001
#: Ready connections taken from the kernel per epoll_wait (a round asks
#: again until it has them all).
MAX_EVENTS = 64
#: Seconds of a round per connection its look at the ready ones found, past
#: LOOK_MANY of them.
LOOK_COST = 0.000001
LOOK_MANY = int(ROUND_TIME / LOOK_COST)
#: Seconds of answers a uid may have ahead of the poller's clock answered at
#: once, as a new connection's first datagrams (see Poller.answer_first).
AHEAD = 0.001

_now = time.perf_counter


class Flow:
    """One uid's place in the poller's order: its ready connections and the loop
    time its answers have used (the same for every connection of the uid).
    Flows order by that time (then by age), as the poller's heap needs."""

    __slots__ = ("active", "parked", "ready", "seq", "vtime")

    def __init__(self) -> None:
        #: Its connections the kernel said are readable, in the order it said so.
        self.ready: deque[_Parked] = deque()
        #: Loop seconds its answers used, on the poller's virtual clock.
        self.vtime = 0.0
        #: Whether it is in the poller's heap of flows with ready connections.
        self.active = False
        #: Its connections in the poller's set.
        self.parked = 0
        self.seq = next(_flows_made)

    def __lt__(self, other: Flow) -> bool:
        return self.vtime < other.vtime or (self.vtime == other.vtime and self.seq < other.seq)


_flows_made = itertools.count()


class _Parked:
    """A connection in the epoll set: who owns it, its flow, whether it is queued,
    and whether it is still in the set."""

    __slots__ = ("fd", "flow", "live", "owner", "queued")

    def __init__(self, fd: int, owner: object, flow: Flow) -> None:
        self.fd = fd
        self.owner = owner
        self.flow = flow
        self.queued = False
        self.live = True


class Poller(Generic[T]):
    """Connections parked until readable, answered in rounds by :meth:`run`.

    ``park(fd, owner, flow)`` puts a connection in the set, under the *flow*
    of its uid; :meth:`run` calls ``answer(owner)`` when it has a datagram (or
    an error) to read. ``answer`` reads and answers at most one datagram,
    synchronously, and returns False to take the connection out of the set
    (to hand it to its own task, which parks it again when done).
    """

    def __init__(self) -> None:
        first = select.epoll()
        try:
            # Long-lived: kept above the low numbers a round's fds use, so
            # that those stay consecutive (see fds.LONG_LIVED_BASE).
            self._epoll = select.epoll.fromfd(move_high(os.dup(first.fileno())))
        finally:
            first.close()
        self._owners: dict[int, _Parked] = {}
        #: The parked connection while it is the only one.
        self._alone: _Parked | None = None
        #: How many flows have connections in the set.
        self._kinds = 0
        #: The flows with connections queued, a heap (the one that used least first).
        self._flows: list[Flow] = []
        #: The virtual clock: the vtime of the flow answered last (after its
        #: answer, when no other flow waits), or the greatest of all when none
        #: waits. A flow that comes back from idle starts there.
        self._vnow = 0.0
        #: The greatest vtime of any flow.
        self._vmax = 0.0
        #: The flow of connections parked without one.
        self._shared = Flow()
        #: The fds to close at the end of this round (see close_later).
        self.closing: list[int] = []
        #: The longest round (or new connection's first answers) since the
        #: acceptor last asked, in seconds (see longest_round).
        self._longest = 0.0
        #: Answers the round under way may still make.
        self._budget = ROUND_BUDGET

    def __len__(self) -> int:
        return len(self._owners)

    def park(self, fd: int, owner: T, flow: Flow | None = None) -> None:
        """Watch *fd* until it is readable; then ``answer(owner)`` runs, in *flow*'s turn."""
        self._epoll.register(fd, select.EPOLLIN)
        if flow is None:
            flow = self._shared
        parked = _Parked(fd, owner, flow)
        owners = self._owners
        owners[fd] = parked
        self._alone = parked if len(owners) == 1 else None
        flow.parked += 1
        if flow.parked == 1:
            self._kinds += 1

    def unpark(self, fd: int) -> None:
        """Stop watching *fd* (nothing happens if it is not watched)."""
        owners = self._owners
        parked = owners.pop(fd, None)
        if parked is not None:
            # A queued record stays in its flow's queue, skipped when reached.
            parked.live = False
            self._alone = next(iter(owners.values())) if len(owners) == 1 else None
            flow = parked.flow
            flow.parked -= 1
            if flow.parked == 0:
                self._kinds -= 1
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # closed already: the kernel dropped it from the set

    def close_later(self, fd: int) -> None:
        """Close *fd* at the end of the current round (with the round's other fds)."""
        self.closing.append(fd)

    def _close_round_fds(self) -> None:
        """Close the fds the answers of this round gave to close_later, together."""
        close_all(self.closing)
        self.closing.clear()

    def close(self) -> None:
        for parked in self._owners.values():
            parked.live = False
            parked.flow.parked -= 1
        self._owners.clear()
        self._kinds = 0
        self._alone = None
        self._flows.clear()
        self._epoll.close()

    async def run(self, answer: Callable[[T], bool]) -> None:
        """Answer ready connections until cancelled.

        *answer* must not raise: an exception escaping it ends the poller, and
        with it the server.
        """
        epoll = self._epoll
        while True:
            if self._flows:
                # Queued from the last round, cut short: the rest of the loop
                # runs first, then the next round goes on with them.
                await trio.lowlevel.checkpoint()
            else:
                # Nobody waits: every uid is even again (and a new connection's
                # first datagrams may be answered at once, see answer_first).
                self._vnow = self._vmax
                await trio.lowlevel.wait_readable(epoll.fileno())
                alone = self._alone
                if alone is not None:
                    # A lone connection: the set can only be ready for it, and
                    # asking the kernel which would cost an epoll_wait a request.
                    self._answer_lone(answer, alone)
                    continue
            started = _now()
            events = epoll.poll(0, MAX_EVENTS)
            if len(events) == 1 and not self._flows:
                # One ready, nothing queued: nobody to order it against.
                parked = self._owners.get(events[0][0])
                if parked is not None:
                    self._answer_one(answer, parked, started)
                continue
            deadline = started + ROUND_TIME
            self._budget = ROUND_BUDGET
            now = started
            while True:
                taken = len(events)
                if not self._flows and (self._kinds == 1 or taken == 1):
                    # Nothing queued, and one uid ready (as a rule, the only
                    # one connected): nobody to order its answers against.
                    now = self._answer_in_order(answer, events, deadline, now)
                else:
                    taken = self._take_ready(events)
                    # Connections left queued are shown again by every round's
                    # look (a fifth of a microsecond each): a round with many
                    # lasts long enough that looking takes at most a fifth of it.
                    now = _now()
                    if taken > LOOK_MANY:
                        deadline = max(deadline, now + taken * LOOK_COST)
                    now = self._serve(answer, deadline, now)
                if taken < 2 or self._flows or self._budget <= 0 or now >= deadline:
                    # A lone request-reply client (one ready): its next request
                    # cannot be here yet, and asking would cost an epoll_wait
                    # per hit. Otherwise more may have come meanwhile.
                    break
                events = epoll.poll(0, MAX_EVENTS)
            self._longest = max(self._longest, now - started)

    def longest_round(self) -> float:
        """Seconds of the longest round, of a new connection's first answers or
        of a lone connection's answer, since the last call: the acceptor takes
        connections for as long (accepting.py), so that what costs the loop a
        turn sets its pace."""
        longest, self._longest = self._longest, 0.0
        return longest

    def answer_first(self, answer: Callable[[T], bool], owner: T, flow: Flow) -> bool | None:
        """``answer(owner)`` for a connection not in the set, as a round of its own,
        if *flow* is not ahead of the others; None if it is (park the connection:
        it is answered in turn).

        For a connection that has just come: what it sent already is answered
        without waiting for the poller. Its uid may run at most AHEAD seconds
        of answers ahead of the poller's clock this way: a uid that opens many
        connections at once must not have each one's first datagrams answered
        before another uid's that came at the same time. Returns what *answer* did.
        """
        vnow = self._vnow
        vtime = flow.vtime
        if vtime > vnow + AHEAD:
            return None
        vtime = max(vtime, vnow)  # idle time banks no credit
        started = _now()
        try:
            return answer(owner)
        finally:
            cost = _now() - started
            flow.vtime = vtime = vtime + cost
            # The connections behind this one in the backlog may send as much.
            if cost > self._longest:  # noqa: PLR1730 (a call costs more)
                self._longest = cost
            self._vmax = max(self._vmax, vtime)
            if self.closing:
                self._close_round_fds()

    def _answer_lone(self, answer: Callable[[T], bool], parked: _Parked) -> None:
        """One datagram of the only parked connection: no epoll_wait, no charge.

        Its time (the round's fds closed included) still counts in
        longest_round: a lone connection's costly datagrams make the loop's
        turns as long as any round's, and the acceptor, taking one connection
        a turn, would have let a new client wait one of them for each
        connection queued ahead of it in the backlog."""
        started = _now()
        try:
            if not answer(parked.owner):  # type: ignore[arg-type]
                self.unpark(parked.fd)
        finally:
            if self.closing:
                self._close_round_fds()
            cost = _now() - started
            if cost > self._longest:  # noqa: PLR1730 (a call costs more)
                self._longest = cost

    def _answer_one(self, answer: Callable[[T], bool], parked: _Parked, started: float) -> None:
        """One datagram of *parked*, the only one ready, as a round of its own that
        began at *started*, its time counted to its flow (see _answer_in_order)."""
        try:
            if not answer(parked.owner):  # type: ignore[arg-type]
                self.unpark(parked.fd)
        finally:
            now = _now()
            if now - started > self._longest:  # noqa: PLR1730 (a call costs more)
                self._longest = now - started
            self._charge(parked.flow, now - started)
            if self.closing:
                self._close_round_fds()

    def _charge(self, flow: Flow, seconds: float) -> None:
        """Count *seconds* of the loop's time to *flow*, which then stands at the
        clock: one back from idle starts at the clock (idle time banks no credit)."""
        vtime = flow.vtime
        if vtime < self._vnow:  # noqa: PLR1730 (a call costs more)
            vtime = self._vnow
        self._vnow = flow.vtime = vtime = vtime + seconds
        if vtime > self._vmax:  # noqa: PLR1730
            self._vmax = vtime

    def _answer_in_order(
        self,
        answer: Callable[[T], bool],
        events: list[tuple[int, int]],
        deadline: float,
        now: float,
    ) -> float:
        """One datagram of each connection in *events*, in order, all of one flow
        (or one alone), until *deadline* passed or the round's budget is spent
        (what is left is queued); its time counted to that flow. *now* is the
        time; returns the time at the end."""
        owners = self._owners
        budget = self._budget
        began = now
        flow = None
        done = 0
        try:
            for fd, _mask in events:
                done += 1
                parked = owners.get(fd)
                if parked is not None:
                    flow = parked.flow
                    budget -= 1
                    if not answer(parked.owner):  # type: ignore[arg-type]
                        self.unpark(fd)
                    now = _now()
                    if now >= deadline or budget <= 0:
                        if done < len(events):
                            self._take_ready(events[done:])
                        break
        finally:
            self._budget = budget
            if flow is not None:
                # Alone, it is ahead of nobody: its new connections are
                # answered at once, as when nobody waits (answer_first).
                self._charge(flow, now - began)
            if self.closing:
                self._close_round_fds()
        return now

    def _take_ready(self, events: list[tuple[int, int]]) -> int:
        """Queue every connection the kernel says is readable under its flow, from
        *events* (what it said first) on; how many it said (queued already or not)."""
        owners = self._owners
        flows = self._flows
        poll = self._epoll.poll
        taken = 0
        while True:
            for fd, _mask in events:
                parked = owners.get(fd)
                if parked is None or parked.queued:
                    continue
                parked.queued = True
                flow = parked.flow
                flow.ready.append(parked)
                if not flow.active:
                    flow.active = True
                    if flow.vtime < self._vnow:  # noqa: PLR1730 (a call costs more)
                        flow.vtime = self._vnow  # idle time banks no credit
                    heapq.heappush(flows, flow)
            taken += len(events)
            # Ready connections stay ready (level-triggered) and come round
            # again after the rest: as many events as there are connections
            # have shown every one of them.
            if len(events) < MAX_EVENTS or taken >= len(owners):
                return taken
            events = poll(0, MAX_EVENTS)

    def _serve(self, answer: Callable[[T], bool], deadline: float, now: float) -> float:
        """Answer queued connections, one datagram each, the flow that used least
        first, until none is left, *deadline* passed or the round's budget of
        answers is spent; then close the fds the answers used. *now* is the time;
        returns the time at the end."""
        flows = self._flows
        budget = self._budget
        try:
            while len(flows) > 1 and budget > 0:
                flow = flows[0]
                ready = flow.ready
                parked = ready.popleft()
                parked.queued = False
                if parked.live:  # else taken out since it was queued
                    self._vnow = flow.vtime
                    budget -= 1
                    if not answer(parked.owner):  # type: ignore[arg-type]
                        self.unpark(parked.fd)
                    then = _now()
                    flow.vtime += then - now
                    self._vmax = max(self._vmax, flow.vtime)
                    now = then
                if ready:
                    heapq.heapreplace(flows, flow)
                else:
                    flow.active = False
                    heapq.heappop(flows)
                if now >= deadline:
                    return now
            if flows and budget > 0:
                # One flow (one uid, as a rule): its turn, with no one to
                # order it against; its time is counted once, at the end.
                flow = flows[0]
                ready = flow.ready
                began = now
                while ready:
                    parked = ready.popleft()
                    parked.queued = False
                    if parked.live:
                        budget -= 1
                        if not answer(parked.owner):  # type: ignore[arg-type]
                            self.unpark(parked.fd)
                        now = _now()
                        if now >= deadline or budget <= 0:
                            break
                # Alone, it is ahead of nobody: its new connections are
                # answered at once, as when nobody waits (answer_first).
                vtime = flow.vtime = flow.vtime + (now - began)
                self._vnow = vtime
                if vtime > self._vmax:  # noqa: PLR1730 (a call costs more)
                    self._vmax = vtime
                if not ready:
                    flow.active = False
                    flows.clear()
            return now
        finally:
            self._budget = budget
            if self.closing:
                self._close_round_fds()
