# Closing the descriptors clients sent that the daemon will not use (refused
# requests, misses that did not wait, sources done with), without ever
# blocking the loop: regular files of file systems the loop trusts (and
# memfds) are closed at once; the rest (a file of a hung FUSE mount, a socket
# that lingers, a device whose driver's release takes its time) in a worker
# thread, on the sender's quota, each counted in its uid's fd budget until it
# is closed. So is the last descriptor of a large
# file with no link left (attack 19): its close frees the file, which takes
# the kernel milliseconds a GiB (and on a file system mounted with discard,
# waits for the disk: 25-250 ms for a 10 GiB file on the project's VM), and
# a client may close its own descriptors before the daemon reads them; and
# that of a large file changed in the last minute, whose release may write
# it out (attack 29). Smaller such files are released on the loop only while
# their bytes, summed over every close there, stay within FREES_MUCH at once
# and FREES_MUCH more a second (LoopReleases): one datagram carries 253
# (attack 30).
# A client's socket with datagrams still queued is read to its end here, one
# slice a turn for all such sockets (attack 31), and closed on the loop once
# empty (drain_later); one whose queue is still long after a part and carries
# no fd (the kernel counts them) is closed by the thread that frees memfds,
# where its close only frees buffers (attack 33); one that holds fds past its
# uid's bound waits for a worker on that uid's quota. Such sockets are
# counted (sockets_closing): past max_sockets the acceptor takes no new
# connection until one is closed (attack 27), so the daemon's fd table never
# fills with them, and the kernel never drops a peer's fds on the loop for
# want of room (MSG_CTRUNC).
#
# Must never: close on the loop an fd whose close may wait on a client's file
# system or run a device's release (attack 28), or free or write out more
# than LoopReleases allows (attacks 19, 29, 30), or a socket with fds still
# queued; let the fds waiting for a worker go uncounted in their uid's budget;
# make a socket wait for a worker for datagrams without fds (attack 26); hold
# client sockets past max_sockets without the acceptor knowing (attack 27);
# lose an fd it was given on any path.
from __future__ import annotations

import collections
import os
import socket
import stat
import time
from collections.abc import Callable, Sequence

import attrs
import trio

from .access import UidShare
from .cache import Shareable
from .connection import Left, drain_final
from .copier import Copier, run_job
from .errors import RequestError
from .fds import FdHolder, close_all
from .inflight import FdBudget
from .memfd import SealedFile, memfd_seals
from .source import MountTrust, stat_nosync

#: Bytes (of size or of blocks) from which the last close of a file with no
#: link left, or changed in the last DIRTY_FOR_NS, is made in a worker: freeing
#: 16 MiB takes the kernel well under a millisecond, freeing 256 MiB 5-12 ms on
#: the project's VM; writing out 64 MiB at a release 2.5-20 ms, 512 MiB 250 ms.
#: Also what the loop may release of smaller such files at once, and again each
#: second (LoopReleases).
FREES_MUCH = 16 << 20


#: Seconds since a file's last change within which its pages may still be dirty:
#: the kernel writes dirty pages out once they are 30 s old (dirty_expire_centisecs),
#: its flusher looking every 5 s; twice that, for a disk that lags.
DIRTY_FOR_NS = 70 * 10**9


#: Bytes below which such a file's release is not counted: writing out a
#: rewritten file of 64 KiB at its release took 20 us here (2,024 of them 41 ms),
#: of 4 KiB 10 us, about what the loop's other work on a received fd costs; one
#: of 256 KiB 170 us, of 1 MiB 540 us.
RELEASES_QUICKLY = 64 << 10


@attrs.define
class LoopReleases:
    """How many bytes of files whose release may free or write them out the loop
    may still release: FREES_MUCH at once, FREES_MUCH more a second (files under
    RELEASES_QUICKLY are not counted).

    A release frees a file with no link left (attack 19) and may write out one
    changed in the last DIRTY_FOR_NS (attack 29: ext4, XFS and btrfs write a file
    out at a release after it was truncated, so that replacing a file by
    truncating and rewriting it does not lose it in a crash). A file of
    FREES_MUCH or more always goes to a worker; smaller ones are cheap one by
    one, but a datagram carries 253 and a peer turned away 8 datagrams: 253
    rewritten 8 MiB files released one after another took a second here
    (attack 30). Whether another descriptor of the file is still open is not
    known: as if none were.
    """

    #: Bytes it may release now.
    room: float = FREES_MUCH
    #: When room was last worked out (monotonic seconds).
    at: float = attrs.field(factory=time.monotonic)

    def slow(self, fd: int) -> bool:
        """Whether *fd*'s release is for a worker: its file may be freed or written
        out there, and is FREES_MUCH or more (size or blocks: fallocate may reserve
        blocks past the size), or more than the loop may release now. One fstat;
        what it lets the loop release is taken from its room."""
        try:
            st = os.fstat(fd)
        except OSError:
            return False  # not ours to judge: closed as before
        cost = max(st.st_size, st.st_blocks * 512)
        if cost < RELEASES_QUICKLY or (
            st.st_nlink and time.time_ns() - st.st_ctime_ns >= DIRTY_FOR_NS
        ):
            return False  # little or nothing to free or write out
        return not self.allows(cost)

    def allows(self, cost: int) -> bool:
        """Whether the loop may release a file of *cost* bytes now (taken from its
        room): never one of FREES_MUCH or more."""
        now = time.monotonic()
        room = min(FREES_MUCH, self.room + (now - self.at) * FREES_MUCH)
        self.at = now
        if cost >= FREES_MUCH or cost > room:
            self.room = room
            return False
        self.room = room - cost
        return True


@attrs.define(eq=False)
class Closer:
    """Closes fds a client sent: on the loop when that is quick, else in a worker."""

    mounts: MountTrust
    copier: Copier
    #: The fd budget (inflight.py): fds waiting to be closed count in it.
    budget: FdBudget | None = None
    #: The server's nursery while it serves: closes in workers run in it.
    nursery: trio.Nursery | None = None
    #: Client sockets it may hold at once (being read on, or waiting for a
    #: worker's close) before the acceptor stops taking connections (attack 27).
    max_sockets: int = 4096
    #: Client sockets it holds now (close_socket), not closed yet.
    sockets_closing: int = 0
    #: Set when sockets_closing goes below max_sockets (see socket_room).
    _room: trio.Event = attrs.field(factory=trio.Event, init=False)
    #: What the loop may still free or write out at a release (attack 30).
    releases: LoopReleases = attrs.field(factory=LoopReleases)
    #: The sockets read on (drain_later), in turn, by one task (_drain_all).
    _draining: collections.deque[tuple[socket.socket, UidShare]] = attrs.field(
        factory=collections.deque, init=False
    )
    #: Whether that task runs.
    _drainer: bool = attrs.field(default=False, init=False)
    #: The worker that frees large memfds the cache let go of (release_file), and
    #: closes sockets whose queue carries no fd (_purge).
    _frees: trio.CapacityLimiter = attrs.field(factory=lambda: trio.CapacityLimiter(1), init=False)

    def discard(self, fds: Sequence[int], share: UidShare) -> None:
        """Close fds a client sent that we will not use, never blocking the loop.

        Only regular files of filesystems the loop may touch (and memfds) are
        closed here; the rest (a file of a hung FUSE mount, a socket that
        lingers, a device) are closed in a worker thread, on the sender's quota.
        """
        later: list[int] = []
        now: list[int] = []
        for fd in fds:
            (now if self._closes_quickly(fd) else later).append(fd)
        close_all(now)
        for fd in later:
            if self.nursery is None:
                FdHolder(fd).close()  # not serving any more: nobody is left to wait
            else:
                self.close_later(FdHolder(fd), share)

    def discard_local(self, fd: int, share: UidShare, close: Callable[[int], None]) -> None:
        """Close *fd*, of a file system the loop trusts (as its stat said), with
        *close* (the poller's close_later), or in a worker when its close may free or
        write out a large file (attacks 19 and 29): one fstat, not discard's three
        system calls."""
        if self.nursery is not None and self.releases.slow(fd):
            self.close_later(FdHolder(fd), share)
        else:
            close(fd)

    def close_later(
        self, src: FdHolder, share: UidShare, on_closed: Callable[[], None] | None = None
    ) -> None:
        """Close *src* in a worker, counted in its uid's fd budget until it is closed:
        a uid whose file system hangs cannot pile up fds in the daemon's table.
        *on_closed* runs on the loop once it is closed."""
        assert self.nursery is not None
        budget = self.budget
        if budget is None or src.closed:
            self.copier.close_later(self.nursery, src, share.quota, on_closed)
            return
        budget.use(share, 1)

        def closed() -> None:
            budget.use(share, -1)
            if on_closed is not None:
                on_closed()

        self.copier.close_later(self.nursery, src, share.quota, on_closed=closed)

    def close_socket(self, sock: socket.socket, share: UidShare, left: Left) -> None:
        """Close a client's socket that drain_final left with *left* queued: at once
        when nothing is (EMPTY); read on, then closed (MORE: drain_later, which
        hands a queue still long after a part read and carrying no fd, as the kernel
        counts them, to the worker that frees memfds: _purge, attack 33); by a
        worker on *share*'s quota when it holds fds past the uid's bound (HELD).

        The last two are held meanwhile, counted in sockets_closing (the acceptor
        takes no connection while that is at max_sockets, attack 27): each is one
        descriptor of the daemon's for as long as the uid's closes wait, and a peer
        needs only one descriptor in flight to make one.
        """
        if left is Left.EMPTY:
            sock.close()  # nothing of the peer's left in it to release
        elif self.nursery is None:
            self.discard([sock.detach()], share)  # not serving any more
        elif left is Left.MORE:
            self._took_socket()
            self.drain_later(sock, share)
        else:
            self._took_socket()
            self._close_held(sock, share)

    def _close_held(self, sock: socket.socket, share: UidShare) -> None:
        """A counted socket with fds past its uid's bound: a worker's close."""
        self.close_later(FdHolder(sock.detach()), share, on_closed=self._socket_closed)

    def _took_socket(self) -> None:
        self.sockets_closing += 1
        if self.sockets_closing >= self.max_sockets and self._room.is_set():
            self._room = trio.Event()

    def _socket_closed(self) -> None:
        self.sockets_closing -= 1
        if self.sockets_closing < self.max_sockets:
            self._room.set()

    def has_room_for_sockets(self) -> bool:
        """Whether it holds fewer client sockets than max_sockets."""
        return self.sockets_closing < self.max_sockets

    async def socket_room(self) -> None:
        """Wait until it holds fewer client sockets than max_sockets."""
        while self.sockets_closing >= self.max_sockets:
            if self._room.is_set():
                self._room = trio.Event()
            await self._room.wait()

    def drain_later(self, sock: socket.socket, share: UidShare) -> None:
        """Read on what a client's socket still has queued (drain_final said Left.MORE),
        in turn with the other such sockets, then close it: on the loop once it is
        empty, by a worker on *share*'s quota if it holds fds past the uid's bound.
        For close_socket, which counts it in sockets_closing until it is closed.

        Datagrams without fds release nothing when read, so they never wait for a
        worker: a peer queues as many as its send buffer holds, for nothing, and
        a worker's close behind closes that wait (attack 21) would keep each
        such socket in the daemon's fd table meanwhile (attack 26). Counted in
        the uid's fd budget until it is closed or handed on.
        """
        assert self.nursery is not None
        if self.budget is not None:
            self.budget.use(share, 1)
        self._draining.append((sock, share))
        if not self._drainer:
            self._drainer = True
            self.nursery.start_soon(self._drain_all)

    async def _drain_all(self) -> None:
        """Read on the sockets of drain_later, DRAIN_PART datagrams of each in turn and
        DRAIN_SLICE in all a turn of the loop: however many sockets are read on, a
        turn reads no more (a task of each, reading DRAIN_SLICE a turn, made a turn
        as long as their number, attack 31)."""
        draining = self._draining
        try:
            while draining:
                await trio.lowlevel.checkpoint()  # everyone else's turn between slices
                for _ in range(DRAIN_SLICE // DRAIN_PART):
                    if not draining:
                        break
                    sock, share = draining.popleft()
                    left = Left.HELD
                    try:
                        left = self._drain_part(sock, share)
                    finally:
                        if left is not Left.MORE:
                            self._drained(sock, share, left)
                        elif queued_fds(sock) == 0:
                            # A long queue, none of it carrying fds: freed, not read.
                            if self.budget is not None:
                                self.budget.use(share, -1)
                            self._purge(sock)
                        else:
                            draining.append((sock, share))
        finally:
            self._drainer = False
            while draining:
                self._drained(*draining.popleft(), Left.HELD)

    def _drain_part(self, sock: socket.socket, share: UidShare) -> Left:
        budget = self.budget
        fds, left = drain_final(
            sock, DRAIN_PART, lambda n: budget is None or budget.allows(share.fds, n)
        )
        if fds:
            self.discard(fds, share)
        return left

    def _drained(self, sock: socket.socket, share: UidShare, left: Left) -> None:
        """*sock* is read on no more, with *left* queued: closed, or handed to a worker."""
        if self.budget is not None:
            self.budget.use(share, -1)
        if left is Left.EMPTY:
            sock.close()
            self._socket_closed()
        elif self.nursery is None:
            self._socket_closed()
            self.discard([sock.detach()], share)
        else:
            self._close_held(sock, share)  # still counted, until the worker closed it

    def release_file(self, file: Shareable) -> None:
        """Let go of the cache's reference to a dropped entry's *file* (Cache.release_file).
        When that is the daemon's last of a memfd whose pages are more than the loop
        may free now (LoopReleases), it is closed by a worker (_frees: one at a time,
        on no uid's quota: it never waits but for the CPU). Freeing 250 MiB took the
        kernel 30-115 ms here, and a client that publishes memfds one after another
        has the cache evict one at each (attack 32)."""
        if (
            self.nursery is None
            or not isinstance(file, SealedFile)
            or file.refs > 1
            or file.size < RELEASES_QUICKLY
            or self.releases.allows(file.size)
        ):
            file.release()
        else:
            file.release(self._free_later)

    def _free_later(self, fd: int) -> None:
        assert self.nursery is not None
        self.nursery.start_soon(self._free, FdHolder(fd), None)

    def _purge(self, sock: socket.socket) -> None:
        """Close a counted socket whose queue carries no fd in the thread that frees
        memfds: its close frees the datagrams' buffers and releases nothing else, so
        it never waits but for the CPU (about 0.5 us a datagram), and no uid's quota
        is needed. Reading them on the loop instead cost it 5-9 us each, while the
        socket stayed counted in sockets_closing (attack 33)."""
        assert self.nursery is not None
        self.nursery.start_soon(self._free, FdHolder(sock.detach()), self._socket_closed)

    async def _free(self, holder: FdHolder, on_closed: Callable[[], None] | None) -> None:
        try:
            await run_job(holder.close, _ignore, self._frees, unstarted=holder.close)
        finally:
            holder.close()  # (cancelled at shutdown before it ran: here after all)
            if on_closed is not None:
                on_closed()

    def _closes_quickly(self, fd: int) -> bool:
        if memfd_seals(fd) is None:
            try:
                st = stat_nosync(fd)
            except RequestError:
                return False
            if st is None or not self.mounts.is_local(st.dev, st.mnt):
                return False
            if not stat.S_ISREG(st.mode):
                # A device's release runs its driver (a tun device is unregistered
                # at its last close: 15-30 ms; a serial port may drain its output
                # for 30 s), whatever file system its node is on (attack 28); a
                # directory, FIFO or socket of a local file system is no regular
                # file either, and is rare enough to go the same way.
                return False
        # A memfd, or a regular file of a file system that never hangs: fstat is safe.
        return not self.releases.slow(fd)


def _ignore(_result: object) -> None:
    pass


def queued_fds(sock: socket.socket) -> int | None:
    """How many fds the datagrams queued on *sock* carry, as the kernel counts them
    for a datagram socket (scm_fds in /proc/self/fdinfo); None where it does not say."""
    try:
        fd = os.open(f"/proc/self/fdinfo/{sock.fileno()}", os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        info = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)
    at = info.find(b"\nscm_fds:")
    if at < 0:
        return None
    try:
        return int(info[at + 9 :].split(None, 1)[0])
    except (ValueError, IndexError):
        return None


#: Datagrams the sockets read on after their end (Closer.drain_later) are read
#: in all per turn of the loop (about a microsecond each), whatever their number;
#: DRAIN_PART of one socket at a time.
DRAIN_SLICE = 256
DRAIN_PART = 32
