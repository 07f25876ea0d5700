# The order in which a uid's misses that did not wait are filled (filling.py):
# a lone open's miss (a file a program is opening now) before the items of a
# batch that does not wait (files its client copied itself and only tells
# of), with the real server classes, real files, real fds and real copies in
# worker threads. Order is read from what was done, never from timing: one
# copy slot is kept by the test, so the fills run one at a time and enter the
# cache (its LRU order) in the order they were started.
from __future__ import annotations

import contextlib
import os
import threading
import types
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from shadowd import copier
from shadowd.access import Peer, UidShare
from shadowd.cache import CacheLimits, HostKey
from shadowd.copier import Flight, Quota
from shadowd.errors import RequestError
from shadowd.fds import FdHolder
from shadowd.filling import FILL_QUEUE, TOLD_GROUP_BYTES, TOLD_GROUP_FILES
from shadowd.opens import FILLING, NOT_FILLING, THROTTLED, Miss, Served
from shadowd.peer_limits import PeerLimits
from shadowd.protocol import ErrorCode, Report
from shadowd.server import Server, ServerConfig

from .conftest import make_file, read_fd, until_unpinned


@contextlib.asynccontextmanager
async def serving(config: ServerConfig | None = None) -> AsyncIterator[Server]:
    """A server's opens as serve() sets them up (watches, mount table, a nursery),
    without a socket; its racy window 0 (unless *config* says), so that new files
    are cached."""
    server = Server(config or ServerConfig(socket_path="", cache=CacheLimits(racy_window_ns=0)))
    opens = server.opens
    opens.watches.open()
    server.mounts.open()
    server.copier.watches = opens.watches
    try:
        async with trio.open_nursery() as nursery:
            opens.nursery = nursery
            yield server
            nursery.cancel_scope.cancel()
    finally:
        opens.nursery = None
        server.cache.clear()
        opens.watches.close()
        server.mounts.close()


def files(tmp_path: Path, prefix: str, n: int) -> list[Path]:
    return [make_file(tmp_path / f"{prefix}{i}", os.urandom(5000 + i)) for i in range(n)]


def key_of(path: Path) -> HostKey:
    st = path.stat()
    return HostKey(st.st_dev, st.st_ino)


def tell(server: Server, share: UidShare, paths: list[Path]) -> list[bool]:
    """One batch that does not wait, answered as the dispatcher answers it: whether
    each item is filling."""
    holders = [FdHolder(os.open(p, os.O_RDONLY | os.O_CLOEXEC)) for p in paths]
    try:
        results, later = server.dispatcher.batches.now(
            holders,
            [str(p) for p in paths],
            share,
            Peer(pid=os.getpid(), uid=share.uid, gid=os.getgid()),
            1,
            wait=False,
        )
    finally:
        for h in holders:
            h.close()
    assert not later
    assert all(isinstance(r, Miss) for r in results), results
    return [r.filling for r in results if isinstance(r, Miss)]


def ask(server: Server, share: UidShare, path: Path) -> object:
    """A lone open that does not wait, as the dispatcher makes it."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return server.opens.serve_now(fd, str(path), share, wait=False)
    finally:
        os.close(fd)


async def cached(server: Server, n: int) -> list[HostKey]:
    """The cache's keys, least recently used first, once it holds *n* entries."""
    while len(server.cache) < n:
        await trio.sleep(0.01)  # the copies run in worker threads
    await trio.testing.wait_all_tasks_blocked()
    return [k for k in server.cache.lru_keys() if isinstance(k, HostKey)]


async def test_a_lone_opens_miss_is_filled_before_the_files_a_batch_told_of(
    tmp_path: Path,
) -> None:
    """A cold supervisor tells the daemon in one batch of the files it copied itself
    and then asks for the file its program opens now: that file's fill must start at
    the first free slot, not after every file told of before it. Another uid's miss
    meanwhile starts at once, on its own slots."""
    told = files(tmp_path, "told", 8)
    asked = make_file(tmp_path / "asked", os.urandom(7000))
    other = make_file(tmp_path / "other", os.urandom(6000))
    with trio.fail_after(30):
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert share.quota.try_acquire() and share.quota.try_acquire()  # two copies run
            assert tell(server, share, told) == [True] * len(told)
            assert ask(server, share, asked) is FILLING
            assert len(share.fills) == len(told) + 1 and share.fds == len(told) + 1
            stranger = UidShare(os.getuid() + 1, Quota(limit=2))
            assert ask(server, stranger, other) is FILLING  # started now, not queued
            assert not stranger.fills and stranger.quota.used == 1
            share.quota.release()  # one copy ends; the test keeps the other slot
            keys = await cached(server, len(told) + 2)
            keys.remove(key_of(other))
            assert keys == [key_of(asked)] + [key_of(p) for p in told]
            assert not share.fills and share.fds == 0 and share.quota.used == 1
            share.quota.release()
            await trio.testing.wait_all_tasks_blocked()
            assert share.quota.idle and not share.filling


async def test_an_open_that_waits_for_a_slot_goes_before_the_files_told_of(
    tmp_path: Path,
) -> None:
    """An open that asks to wait for the copy (protocol version 1, or wait true), made
    while the uid's slots are taken and told files are queued, gets the first slot
    freed: its reply waits on it, the told files wait for no one."""
    told = files(tmp_path, "told", 6)
    waited = make_file(tmp_path / "waited", os.urandom(9000))
    got: list[bytes] = []
    with trio.fail_after(30):
        async with serving() as server:
            opens = server.opens
            share = UidShare(os.getuid(), Quota(limit=2))
            assert share.quota.try_acquire() and share.quota.try_acquire()
            assert tell(server, share, told) == [True] * len(told)
            fd = os.open(waited, os.O_RDONLY | os.O_CLOEXEC)
            outcome = opens.serve_now(fd, str(waited), share)
            assert outcome is THROTTLED
            pending = opens.pending(fd, outcome)

            async def waiting_open() -> None:
                served = await opens.finish(pending, str(waited), share)
                assert isinstance(served, Served)
                got.append(read_fd(served.fd.fd))
                served.fd.close()

            server.opens.nursery.start_soon(waiting_open)  # type: ignore[union-attr]
            await trio.testing.wait_all_tasks_blocked()  # it waits for a slot
            share.quota.release()
            keys = await cached(server, len(told) + 1)
            assert keys == [key_of(waited)] + [key_of(p) for p in told]
            assert got == [waited.read_bytes()]
            share.quota.release()


async def test_a_lone_miss_takes_the_place_of_the_last_told_file_in_a_full_queue(
    tmp_path: Path,
) -> None:
    """The queue is bounded (FILL_QUEUE per uid, each holding an fd): once told files
    fill it, a lone open's miss is still filled, in place of the last told file
    queued (whose fd is let go), and the bound holds."""
    told = files(tmp_path, "told", FILL_QUEUE + 2)
    asked = make_file(tmp_path / "asked", os.urandom(7000))
    with trio.fail_after(60):
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert share.quota.try_acquire() and share.quota.try_acquire()
            assert tell(server, share, told) == [True] * FILL_QUEUE + [False] * 2
            assert ask(server, share, asked) is FILLING
            assert len(share.fills) == FILL_QUEUE and share.fds == FILL_QUEUE
            # Each lone miss more takes a told file's place, the newest first; once
            # the queue holds lone misses only, it takes no more, of either kind.
            more = files(tmp_path, "more", FILL_QUEUE)
            for path in more[: FILL_QUEUE - 1]:
                assert ask(server, share, path) is FILLING
            assert not share.told
            assert ask(server, share, more[-1]) is NOT_FILLING
            assert tell(server, share, told[:1]) == [False]
            assert len(share.fills) == FILL_QUEUE and share.fds == FILL_QUEUE
            share.quota.release()
            keys = await cached(server, FILL_QUEUE)
            assert keys == [key_of(asked)] + [key_of(p) for p in more[: FILL_QUEUE - 1]]
            assert share.fds == 0
            share.quota.release()


async def test_a_told_file_a_lone_open_asks_for_moves_up_and_is_not_queued_twice(
    tmp_path: Path,
) -> None:
    """A file told of and then opened by the program (another of its processes) is
    queued once, in the lone opens' lane: one fd held, one copy."""
    told = files(tmp_path, "told", 4)
    with trio.fail_after(30):
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert share.quota.try_acquire() and share.quota.try_acquire()
            assert tell(server, share, told) == [True] * 4
            assert ask(server, share, told[2]) is FILLING
            assert ask(server, share, told[2]) is FILLING
            assert tell(server, share, told[2:3]) == [True]
            assert len(share.fills) == 4 and share.fds == 4
            share.quota.release()
            keys = await cached(server, 4)
            assert keys == [key_of(told[i]) for i in (2, 0, 1, 3)]
            assert server.copier.copies == 4
            share.quota.release()


@contextlib.contextmanager
def copies_held(
    monkeypatch: pytest.MonkeyPatch, fail: Path | None = None
) -> Iterator[threading.Event]:
    """Every copy waits in its worker until the event is set (set at the end in any
    case); the copy of *fail* is refused as a copy of a file that kept changing."""
    go = threading.Event()
    real = copier.copy_source

    def held(src: FdHolder, expected: Any, watches: Any = None, **bounds: Any) -> copier.Copied:
        go.wait(20)
        if fail is not None and expected is not None and expected.ino == fail.stat().st_ino:
            src.close()
            raise RequestError(ErrorCode.UNSTABLE, "kept changing (the test's)")
        return real(src, expected, watches, **bounds)

    monkeypatch.setattr(copier, "copy_source", held)
    try:
        yield go
    finally:
        go.set()


async def test_a_batchs_told_files_are_copied_together_each_a_flight_a_waiting_open_joins(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The files of a batch that does not wait are copied by one worker job, on one
    slot of their uid's quota (the other stays free for the program's own misses),
    and each is a flight from the start of that job: an open that waits for the last
    of them joins its copy, neither waiting for a slot nor copying it again."""
    told = files(tmp_path, "told", 6)
    asked = make_file(tmp_path / "asked", os.urandom(7000))
    with trio.fail_after(30), copies_held(monkeypatch) as go:
        async with serving() as server:
            opens = server.opens
            share = UidShare(os.getuid(), Quota(limit=2))
            assert tell(server, share, told) == [True] * len(told)
            await trio.testing.wait_all_tasks_blocked()  # the job waits in its worker
            # Off the queue, each still holds its descriptor, counted until the job ends.
            assert share.quota.used == 1 and not share.fills and share.fds == len(told)
            assert server.copier.in_flight == len(told)
            assert ask(server, share, asked) is FILLING  # on the other slot, at once
            assert share.quota.used == 2 and not share.fills
            fd = os.open(told[-1], os.O_RDONLY | os.O_CLOEXEC)
            outcome = opens.serve_now(fd, str(told[-1]), share)
            assert isinstance(outcome, Flight)
            pending = opens.pending(fd, outcome)
            go.set()
            served = await opens.finish(pending, str(told[-1]), share)
            assert isinstance(served, Served) and not served.hit and served.cached
            assert read_fd(served.fd.fd) == told[-1].read_bytes()
            served.fd.close()
            keys = await cached(server, len(told) + 1)
            keys.remove(key_of(asked))
            assert keys == [key_of(p) for p in told]
            assert server.copier.copies == len(told) + 1
            assert share.quota.idle and not share.filling


async def test_a_told_file_whose_copy_fails_fails_alone_in_its_group(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One file of a group that cannot be copied is not cached, and gives back what
    it held (its bytes reserved for the copy, its fd); the others of its job are
    cached as if it had not been there."""
    told = files(tmp_path, "told", 5)
    with trio.fail_after(30), copies_held(monkeypatch, fail=told[2]) as go:
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert tell(server, share, told) == [True] * len(told)
            await trio.testing.wait_all_tasks_blocked()
            assert server.copier.in_flight == len(told)
            go.set()
            while server.copier.in_flight:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            keys = [k for k in server.cache.lru_keys() if isinstance(k, HostKey)]
            assert keys == [key_of(p) for i, p in enumerate(told) if i != 2]
            assert server.copier.copy_failures == 1 and server.copier.copies == len(told) - 1
            assert server.pins.charged.get(share.uid, 0) == 0
            assert share.quota.idle and share.fds == 0


async def test_a_told_item_of_another_uid_that_hits_moves_no_charge(tmp_path: Path) -> None:
    """Attack 41's rule moves a memfd's charge to all uids once another uid's request
    finds it, because that uid may hold it. A told item (`serve: false`: its client
    copied the file itself) that hits is served nothing and holds nothing: the memfd
    stays charged to the uid whose request made it and which holds it."""
    f = make_file(tmp_path / "lib.so", os.urandom(100_000))
    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    try:
        with trio.fail_after(10):
            async with serving() as server:
                pins = server.opens.pins
                maker, teller = (
                    server.gate.admit(Peer(pid=os.getpid(), uid=uid, gid=uid), None).share  # type: ignore[arg-type]
                    for uid in (1000, 1001)
                )
                flight = server.opens.serve_now(fd, None, maker)
                assert isinstance(flight, Flight)
                held = (await flight.wait())[0]  # the maker's copy, held
                await trio.testing.wait_all_tasks_blocked()  # and cached
                told = server.opens.serve_now(fd, None, teller, wait=False, told=True, serve=False)
                assert isinstance(told, tuple)  # a hit, served to nobody
                server.cache.clear()  # out of the cache, still held by the maker
                assert (pins.charged, pins.shared) == ({1000: 100_000}, 0)
                os.close(held)
                await until_unpinned(server)  # freed: the kernel says so
    finally:
        os.close(fd)


async def test_index_hits_of_another_uid_reported_move_the_charge_as_a_hit_does(
    tmp_path: Path,
) -> None:
    """A reader of the index (root, or the daemon's uid) takes a memfd another uid's
    request made without any request the daemon answers; its report of the hits is
    the daemon's only word of it, and counts as the find a socket hit is (attack 41):
    from then on no uid is charged for the memfd, all uids together are."""
    f = make_file(tmp_path / "lib.so", os.urandom(100_000))
    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    st = os.fstat(fd)
    try:
        with trio.fail_after(10):
            async with serving() as server:
                pins = server.opens.pins
                maker = server.gate.admit(Peer(pid=os.getpid(), uid=1000, gid=1000), None).share  # type: ignore[arg-type]
                flight = server.opens.serve_now(fd, None, maker)
                assert isinstance(flight, Flight)
                held = (await flight.wait())[0]  # the maker's copy, held
                await trio.testing.wait_all_tasks_blocked()  # and cached
                # The reader: the only part of a connection a report reads is its peer.
                reader = types.SimpleNamespace(peer=Peer(pid=os.getpid(), uid=0, gid=0))
                server.dispatcher.count_report(
                    reader,  # type: ignore[arg-type]
                    Report(id=1, hits=((st.st_dev, st.st_ino, 3),)),
                )
                server.cache.clear()  # out of the cache, held (by the maker, or the reader)
                assert (pins.charged, pins.shared) == ({}, 100_000)
                os.close(held)
                await until_unpinned(server)  # freed: the kernel says so
    finally:
        os.close(fd)


async def test_a_told_file_grown_since_it_was_told_of_keeps_its_group_within_its_bytes(
    tmp_path: Path,
) -> None:
    """A group of told files is chosen by the sizes they were told of, and a request
    of any uid that joins one of its flights waits for the copies before it: a file
    that grew since (its owner's to grow) must not make the job copy more than
    TOLD_GROUP_BYTES. It is not copied in the group (it was only a fill); the others
    are cached, and what it held is given back."""
    grown = make_file(tmp_path / "grown", os.urandom(5000))
    other = make_file(tmp_path / "other", os.urandom(5001))
    with trio.fail_after(30):
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert tell(server, share, [grown, other]) == [True, True]
            # Before the uid's pump runs (nothing has awaited yet): the owner grows it.
            with open(grown, "ab") as f:
                f.write(os.urandom(4 * TOLD_GROUP_BYTES))
            await trio.testing.wait_all_tasks_blocked()
            while server.copier.in_flight:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert server.copier.bytes_copied <= TOLD_GROUP_BYTES
            keys = [k for k in server.cache.lru_keys() if isinstance(k, HostKey)]
            assert keys == [key_of(other)]
            assert server.copier.copy_failures == 1 and server.copier.copies == 1
            assert server.pins.charged.get(share.uid, 0) == 0
            assert share.quota.idle and share.fds == 0


async def grown_before_its_copy(
    server: Server, share: UidShare, path: Path, growth: int
) -> RequestError:
    """The refusal of an open that waits for its copy, whose file its owner grows by
    *growth* bytes once the copy is a flight, before it starts (nothing has awaited
    yet): the size it was asked with is reserved and checked, the retry copies what
    the file is now. A copy served fails the test, naming its size."""
    opens = server.opens
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    outcome = opens.serve_now(fd, str(path), share)
    assert isinstance(outcome, Flight)
    pending = opens.pending(fd, outcome)
    with open(path, "ab") as f:
        f.write(os.urandom(growth))
    with pytest.raises(RequestError) as caught:
        served = await opens.finish(pending, str(path), share)
        size = os.fstat(served.fd.fd).st_size
        served.fd.close()
        raise AssertionError(f"served a copy of {size} bytes")
    return caught.value


@pytest.mark.parametrize(
    ("limits", "growth", "code"),
    [
        pytest.param(
            {"cache": CacheLimits(racy_window_ns=0, max_file_size=1 << 16)},
            1 << 20,
            ErrorCode.FILE_TOO_LARGE,
            id="max-file-size",
        ),
        pytest.param(
            {
                "cache": CacheLimits(racy_window_ns=0),
                "peers": PeerLimits(max_pinned_bytes_per_uid=1 << 17),
            },
            1 << 20,
            ErrorCode.BUSY,
            id="max-pinned-bytes-per-uid",
        ),
    ],
)
async def test_a_file_grown_before_its_copy_past_what_it_may_be_is_not_served(
    tmp_path: Path, limits: dict[str, Any], growth: int, code: ErrorCode
) -> None:
    """An open that waits for its copy asked with the file's size then, which was
    checked against --max-file-size and reserved in its uid's pinned bound (pins.py);
    a copy that finds the file changed copies it again at its new size. Past
    --max-file-size it is refused as such a file is at once (file-too-large, in the
    worker: nothing copied); within it, the uid's bound must hold the new size before
    the copy is cached or served, else refused busy as a copy of that size is at once.
    Either way nothing it held stays charged."""
    path = make_file(tmp_path / "grows", os.urandom(5000))
    with trio.fail_after(30):
        async with serving(ServerConfig(socket_path="", **limits)) as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert server.pins.charged == {}
            refusal = await grown_before_its_copy(server, share, path, growth)
            assert refusal.code is code
            await trio.testing.wait_all_tasks_blocked()
            assert len(server.cache) == 0 and server.copier.copies == 0
            assert server.pins.charged.get(share.uid, 0) == 0 and server.pins.pinned == 0
            assert share.quota.idle


async def test_told_groups_hold_one_slot_of_two_and_an_own_miss_starts_at_once(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Told files enough for three groups, each held in its copy: they take one of
    the uid's two slots, never both (the groups run one after another), so the
    program's own miss meanwhile starts its copy at once on the other, where it
    waited for a whole group of told copies (up to TOLD_GROUP_BYTES)."""
    told = files(tmp_path, "told", 40)
    asked = make_file(tmp_path / "asked", os.urandom(7000))
    with trio.fail_after(30), copies_held(monkeypatch) as go:
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert tell(server, share, told) == [True] * len(told)
            await trio.testing.wait_all_tasks_blocked()  # a group waits in its worker
            assert (share.quota.used, server.copier.in_flight) == (1, TOLD_GROUP_FILES)
            assert ask(server, share, asked) is FILLING
            assert share.quota.used == 2 and key_of(asked) not in {k for k, _ in share.fills}
            go.set()
            keys = await cached(server, len(told) + 1)
            assert set(keys) == {key_of(p) for p in [*told, asked]}
            assert server.copier.copies == len(told) + 1
            await trio.testing.wait_all_tasks_blocked()
            assert share.quota.idle and not share.filling and share.fds == 0


async def test_with_a_single_copy_slot_told_groups_still_take_it_in_turn(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """--max-copies-per-uid 1: told work may not keep a slot back from the program's
    misses when there is only one, so it takes that one, a group at a time; the
    program's miss queued meanwhile goes first once the group ends."""
    told = files(tmp_path, "told", 2 * TOLD_GROUP_FILES + 3)
    asked = make_file(tmp_path / "asked", os.urandom(7000))
    with trio.fail_after(30), copies_held(monkeypatch) as go:
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=1))
            assert tell(server, share, told) == [True] * len(told)
            await trio.testing.wait_all_tasks_blocked()
            assert (share.quota.used, server.copier.in_flight) == (1, TOLD_GROUP_FILES)
            assert ask(server, share, asked) is FILLING  # queued, first in line
            go.set()
            keys = await cached(server, len(told) + 1)
            assert keys == [key_of(p) for p in told[:TOLD_GROUP_FILES]] + [key_of(asked)] + [
                key_of(p) for p in told[TOLD_GROUP_FILES:]
            ]
            await trio.testing.wait_all_tasks_blocked()
            assert share.quota.idle and not share.filling and share.fds == 0


async def test_a_told_group_counts_its_descriptors_in_the_fd_budget_until_it_ends(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Each told file holds a descriptor (its source, then its copy's memfd) from the
    moment it is queued until its group's job ends: counted in its uid's fd budget and
    in the daemon's, as when it was queued, and given back when the copies are applied,
    when one fails, and when the job is cancelled at shutdown."""
    told = files(tmp_path, "told", 6)
    with trio.fail_after(30), copies_held(monkeypatch, fail=told[3]) as go:
        async with serving() as server:
            budget = server.budget
            share = UidShare(os.getuid(), Quota(limit=2))
            assert tell(server, share, told) == [True] * len(told)
            assert (share.fds, budget.used) == (len(told), len(told))  # queued
            await trio.testing.wait_all_tasks_blocked()  # the group waits in its worker
            assert not share.fills and server.copier.in_flight == len(told)
            assert (share.fds, budget.used) == (len(told), len(told))
            go.set()
            while server.copier.in_flight:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            assert server.copier.copy_failures == 1
            assert (share.fds, budget.used, budget.active) == (0, 0, 0)
    more = files(tmp_path, "more", 5)
    with trio.fail_after(30), copies_held(monkeypatch):
        async with serving() as server:
            budget = server.budget
            share = UidShare(os.getuid(), Quota(limit=2))
            assert tell(server, share, more) == [True] * len(more)
            await trio.testing.wait_all_tasks_blocked()
            assert server.copier.in_flight == len(more) and share.fds == len(more)
            # Leaving serving() cancels the nursery (the daemon stops): the job is
            # abandoned in its worker, which lets go of its fds when it ends.
        assert (share.fds, budget.used) == (0, 0) and share.quota.idle


async def test_a_group_never_holds_two_versions_of_one_file(tmp_path: Path) -> None:
    """A file told of, changed and told of again is queued twice (two versions). The
    copy of the first finds the file changed and copies what it is now, the second
    version: in one group the second's copy made the same bytes again. The second
    waits for the next group, which finds that version cached: one copy."""
    path = make_file(tmp_path / "lib.so", os.urandom(50_000))
    others = files(tmp_path, "other", 3)
    with trio.fail_after(30):
        async with serving() as server:
            share = UidShare(os.getuid(), Quota(limit=2))
            assert share.quota.try_acquire() and share.quota.try_acquire()
            assert tell(server, share, [path, others[0]]) == [True, True]
            first = path.stat()
            with open(path, "r+b") as f:  # same size, new bytes, a new version
                f.write(os.urandom(50_000))
            os.utime(path, ns=(first.st_atime_ns, first.st_mtime_ns + 1_000_000))
            assert tell(server, share, [path, *others[1:]]) == [True] * 3
            assert len(share.fills) == 5
            share.quota.release()  # the told files' turn, on this slot alone
            await cached(server, 4)
            while server.copier.in_flight or share.fills:
                await trio.sleep(0.01)
            await trio.testing.wait_all_tasks_blocked()
            entry = server.cache.peek(key_of(path))
            assert entry is not None
            fd = entry.file.share()
            try:
                assert read_fd(fd) == path.read_bytes()
            finally:
                os.close(fd)
            assert server.copier.copies == 4, "the new version was copied twice"
            assert server.copier.bytes_copied == 50_000 + sum(p.stat().st_size for p in others)
            share.quota.release()
