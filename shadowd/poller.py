# The readiness multiplexer of the I/O loop: one epoll set holding every
# connection that waits for its next request, drained by one trio task.
#
# A trio task per connection would pay for a wake-up, an epoll re-arm and a
# scheduler pass on every request; here one wake-up answers every connection
# that is ready, each with one datagram per round (so a pipelining client
# cannot starve the rest), and the fds a round used are closed together at its
# end, usually with one close_range.
#
# Must never: await while a round is being answered (the callback runs on the
# loop, with the cache, and must stay synchronous); keep an fd registered
# after its owner took it back; let a callback's fd outlive the round.
from __future__ import annotations

import os
import select
from collections.abc import Callable
from typing import Generic, TypeVar

import trio

from .fds import close_all, move_high

T = TypeVar("T")

#: Connections answered before the task yields to the rest of the loop
#: (accepts, finished copies, signals) even when more are ready.
ROUND_BUDGET = 64
#: Ready connections taken from the kernel per epoll_wait.
MAX_EVENTS = 64


class Poller(Generic[T]):
    """Connections parked until readable, answered in rounds by :meth:`run`.

    ``park(fd, owner)`` puts a connection in the set; :meth:`run` calls
    ``answer(owner)`` when it has a datagram (or an error) to read. ``answer``
    reads and answers at most one datagram, synchronously, and returns False
    to take the connection out of the set (to hand it to its own task, which
    parks it again when done).
    """

    def __init__(self) -> None:
        first = select.epoll()
        try:
            # Long-lived: kept above the low numbers a round's fds use, so
            # that those stay consecutive (see fds.LONG_LIVED_BASE).
            self._epoll = select.epoll.fromfd(move_high(os.dup(first.fileno())))
        finally:
            first.close()
        self._owners: dict[int, T] = {}
        #: The fds to close at the end of this round (see close_later).
        self.closing: list[int] = []

    def __len__(self) -> int:
        return len(self._owners)

    def park(self, fd: int, owner: T) -> None:
        """Watch *fd* until it is readable; then ``answer(owner)`` runs."""
        self._epoll.register(fd, select.EPOLLIN)
        self._owners[fd] = owner

    def unpark(self, fd: int) -> None:
        """Stop watching *fd* (nothing happens if it is not watched)."""
        if self._owners.pop(fd, None) is not None:
            try:
                self._epoll.unregister(fd)
            except OSError:
                pass  # closed already: the kernel dropped it from the set

    def close_later(self, fd: int) -> None:
        """Close *fd* at the end of the current round (with the round's other fds)."""
        self.closing.append(fd)

    def close(self) -> None:
        self._owners.clear()
        self._epoll.close()

    async def run(self, answer: Callable[[T], bool]) -> None:
        """Answer ready connections until cancelled.

        *answer* must not raise: an exception escaping it ends the poller, and
        with it the server.
        """
        epoll = self._epoll
        owners = self._owners
        while True:
            await trio.lowlevel.wait_readable(epoll.fileno())
            if len(owners) == 1:
                # A lone connection: the set can only be ready for it, and
                # asking the kernel which would cost an epoll_wait a request.
                self._round(answer, list(owners))
                continue
            budget = ROUND_BUDGET
            while budget > 0:
                events = epoll.poll(0, MAX_EVENTS)
                ready = [fd for fd, _mask in events]
                if not ready:
                    break
                self._round(answer, ready)
                budget -= len(events)
                if len(events) == 1:
                    # A lone request-reply client: its next request cannot be
                    # here yet, and asking would cost an epoll_wait per hit.
                    break

    def answer_unparked(self, answer: Callable[[T], bool], owner: T) -> bool:
        """``answer(owner)`` for a connection not in the set, as a round of its own.

        For a connection that has just come: what it sent already is answered
        without waiting for the poller. Returns what *answer* did.
        """
        try:
            return answer(owner)
        finally:
            if self.closing:
                close_all(self.closing)
                self.closing.clear()

    def _round(self, answer: Callable[[T], bool], fds: list[int]) -> None:
        """One datagram for each of *fds*; then the fds the answers used are closed."""
        owners = self._owners
        try:
            for fd in fds:
                owner = owners.get(fd)
                # None: taken out earlier in this round.
                if owner is not None and not answer(owner):
                    self.unpark(fd)
        finally:
            if self.closing:
                close_all(self.closing)
                self.closing.clear()
