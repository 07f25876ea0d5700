# Descriptors in flight: a connection knows, from one ioctl, how many of the
# fds it sent its peer has not read; the budget keeps each uid, and all of
# them together, within bounds.
from __future__ import annotations

import os
import socket

from hypothesis import given, settings
from hypothesis import strategies as st

from shadowd.fds import close_all, fds_from_ancdata, scm_rights
from shadowd.inflight import FdBudget, Outbox, truesize, unread_bytes


def _pair() -> tuple[socket.socket, socket.socket]:
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)


def test_truesize_is_what_the_kernel_charges_whatever_the_fds() -> None:
    ours, theirs = _pair()
    fd = os.open("/dev/null", os.O_RDONLY)
    try:
        for length in (1, 40, 192, 193, 1000, 5000):
            for nfds in (0, 1, 8):
                before = unread_bytes(ours)
                ours.sendmsg([b"x" * length], scm_rights([fd] * nfds))
                assert unread_bytes(ours) - before == truesize(length)
                _, anc, _, _ = theirs.recvmsg(8192, socket.CMSG_SPACE(4 * 8))
                close_all(fds_from_ancdata(anc))
    finally:
        os.close(fd)
        ours.close()
        theirs.close()


@settings(max_examples=30, deadline=None)
@given(
    st.lists(st.tuples(st.integers(1, 3000), st.integers(0, 4)), min_size=1, max_size=40), st.data()
)
def test_an_outbox_knows_exactly_the_fds_its_peer_has_not_read(
    replies: list[tuple[int, int]], data: st.DataObject
) -> None:
    ours, theirs = _pair()
    fd = os.open("/dev/null", os.O_RDONLY)
    box = Outbox()
    try:
        for length, nfds in replies:
            ours.sendmsg([b"r" * length], scm_rights([fd] * nfds))
            box.sent(length, nfds)
        read = data.draw(st.integers(0, len(replies)))
        for _ in range(read):
            _, anc, _, _ = theirs.recvmsg(8192, socket.CMSG_SPACE(4 * 4))
            close_all(fds_from_ancdata(anc))
        total = sum(n for _, n in replies)
        freed = box.refresh(ours)
        assert freed == sum(n for _, n in replies[:read])
        assert box.fds == total - freed == sum(n for _, n in replies[read:])
    finally:
        os.close(fd)
        ours.close()
        theirs.close()


class _Uid:
    def __init__(self) -> None:
        self.fds = 0


def test_the_budget_bounds_each_uid_and_leaves_the_others_a_fair_share() -> None:
    budget = FdBudget(per_uid=100, total=150)
    hostile, other, third = _Uid(), _Uid(), _Uid()
    assert budget.allows(0, 100) and not budget.allows(0, 101)
    budget.use(hostile, 100)  # a hostile uid at its own bound
    assert not budget.allows(hostile.fds, 1)
    assert budget.allows(other.fds, 50)  # another uid still fits in all
    budget.use(other, 50)
    assert budget.used == 150 and budget.active == 2
    # Full: a uid below its fair share (150 / 2) may still have a little more;
    # the one that filled it may not.
    assert budget.allows(other.fds, 1) and not budget.allows(hostile.fds, 1)
    # However many uids there are, never past the hard limit (a margin below
    # the daemon's fd limit).
    assert budget.hard == 225
    budget.use(third, 40)
    budget.use(other, 25)
    assert budget.used == 215 and not budget.allows(0, 11) and budget.allows(0, 10)
    budget.use(hostile, -100)
    assert budget.active == 2 and budget.allows(other.fds, 25)
