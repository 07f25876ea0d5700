# The pieces behind "never stale, never torn, bounded" on their own: inotify
# watches on sources and memfds (watches.py), read leases around copies
# (leases.py), the per-uid charge of pinned memory (pins.py), and an entry
# restored at start vouched for only by its own mount (guard.py).
from __future__ import annotations

import mmap
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from shadowd import leases
from shadowd.access import Peer
from shadowd.cache import HostKey
from shadowd.copier import Flight
from shadowd.errors import RequestError
from shadowd.memfd import sealed_from_bytes
from shadowd.opens import Miss
from shadowd.pins import PIN_FLOOR, Pins, cost
from shadowd.server import Server, ServerConfig
from shadowd.source import stat_nosync
from shadowd.watches import Watches

from .conftest import until_unpinned


class _Seen:
    def __init__(self) -> None:
        self.events: list[int] = []
        self.freed: list[int] = []
        self.overflows = 0


def _watches(seen: _Seen) -> Watches:
    w = Watches(
        on_event=seen.events.append,
        on_overflow=lambda: setattr(seen, "overflows", seen.overflows + 1),
        on_freed=seen.freed.append,
    )
    w.open()
    return w


def test_a_write_and_a_writer_letting_go_of_a_mapping_are_seen(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"x" * 8192)
    seen = _Seen()
    w = _watches(seen)
    try:
        fd = os.open(f, os.O_RDONLY)
        try:
            wd = w.add(fd)
        finally:
            os.close(fd)
        w.hold(wd)
        start = w.begin()
        w.drain()
        assert seen.events == [] and not w.changed_since(wd, start)
        out = os.open(f, os.O_WRONLY)
        os.write(out, b"y")  # a write(): IN_MODIFY once it returns
        w.drain()
        assert seen.events == [wd] and w.changed_since(wd, start)
        os.close(out)  # and IN_CLOSE_WRITE as the writer lets go
        w.drain()
        assert seen.events == [wd, wd]
        seen.events.clear()
        rw = os.open(f, os.O_RDWR)
        m = mmap.mmap(rw, 8192)
        os.close(rw)
        m[0:1] = b"z"  # no event for a write through a mapping...
        w.drain()
        assert seen.events == []
        m.close()  # ...until its writer lets go of the file
        w.drain()
        assert seen.events == [wd]
        w.end(start)
    finally:
        w.close()


def test_a_removed_watch_and_a_freed_memfd_are_told(tmp_path: Path) -> None:
    seen = _Seen()
    w = _watches(seen)
    try:
        sealed = sealed_from_bytes(b"memfd bytes")
        wd = w.add_memfd(sealed.fd)
        held = os.open(f"/proc/self/fd/{sealed.fd}", os.O_RDONLY)
        sealed.release()  # the daemon lets go; a client still holds it
        w.drain()
        assert seen.freed == []
        os.close(held)  # the last holder: the inode is freed, the watch goes
        deadline = time.monotonic() + 5
        while wd not in seen.freed:
            assert time.monotonic() < deadline
            w.drain()
            time.sleep(0.01)
        # A source watch its holders release is removed, and that is said too.
        f = tmp_path / "f"
        f.write_bytes(b"x")
        fd = os.open(f, os.O_RDONLY)
        src_wd = w.add(fd)
        os.close(fd)
        w.hold(src_wd)
        w.hold(src_wd)
        w.release(src_wd)  # one holder left: kept
        f.write_bytes(b"y")
        w.drain()
        assert src_wd in seen.events
        w.release(src_wd)
        w.drain()
        assert w.watched == 0
    finally:
        w.close()


def test_a_change_to_a_watched_memfd_makes_its_hits_ask_the_inode_again() -> None:
    """A tracked memfd is intact without a stat until an IN_ATTRIB of it is read;
    then intact() asks the inode and sees the change (a holder's fchmod, utime)."""
    server = Server(ServerConfig(socket_path=""))
    guard = server.opens.guard
    guard.watches.open()
    sealed = sealed_from_bytes(b"memfd bytes")
    try:
        guard.track(sealed, None, cached=True)
        assert sealed.pin_wd >= 0 and not sealed.attr_changed and sealed.intact()
        held = os.open(f"/proc/self/fd/{sealed.fd}", os.O_RDONLY)
        try:
            os.fchmod(held, 0o644)  # what a holder of the daemon's uid may do
            assert sealed.intact()  # not read yet: the hit path declines meanwhile (FIONREAD)
            guard.watches.drain()
            assert sealed.attr_changed and not sealed.intact()
            # Put back as sealed: the stamp's ctime moved, so never intact again.
            os.fchmod(held, 0o444)
            assert not sealed.intact()
            # A memfd whose watch could not be made is asked every time.
            other = sealed_from_bytes(b"other bytes")
            try:
                assert other.pin_wd < 0 and other.intact()
                os.utime(f"/proc/self/fd/{other.fd}", ns=(1, 1))
                assert not other.intact()
            finally:
                other.release()
        finally:
            os.close(held)
    finally:
        sealed.release()
        guard.watches.close()


def test_a_memfd_watched_as_a_source_too_keeps_its_own_watch() -> None:
    """Attack 37: a memfd of ours sent back as a host file gets its source watch on
    the same inode, which one inotify fd watches once: the source's add must keep
    the memfd's IN_ATTRIB, and the source's release must leave the memfd's watch,
    which says when it is freed (before: the mask replaced, the watch removed, the
    memfd taken for freed while held, and a holder's fchmod never seen)."""
    server = Server(ServerConfig(socket_path=""))
    guard = server.opens.guard
    w = guard.watches
    w.open()
    sealed = sealed_from_bytes(b"memfd bytes")
    try:
        guard.track(sealed, 1000, cached=False)
        wd = sealed.pin_wd
        assert server.opens.pins.charged == {1000: cost(sealed.size)}
        held = os.open(f"/proc/self/fd/{sealed.fd}", os.O_RDONLY)
        try:
            src_wd = w.add(held)  # the same inode: the same watch
            assert src_wd == wd
            w.hold(src_wd)
            w.release(src_wd)  # the source's copy is done with
            w.drain()
            assert server.opens.pins.charged == {1000: cost(sealed.size)}  # still held
            os.fchmod(held, 0o644)  # a holder of the daemon's uid
            w.drain()
            assert sealed.attr_changed and not sealed.intact()
        finally:
            sealed.release()
            os.close(held)  # the last holder: now it is freed
        deadline = time.monotonic() + 5
        while server.opens.pins.charged:
            assert time.monotonic() < deadline
            w.drain()
            time.sleep(0.01)
    finally:
        w.close()


def test_a_read_lease_tells_whether_a_writer_was_there(tmp_path: Path) -> None:
    leases.ignore_sigio()
    f = tmp_path / "f"
    f.write_bytes(b"x" * 4096)
    fd = os.open(f, os.O_RDONLY)
    try:
        assert leases.take(fd) is None
        assert leases.give_back(fd) is leases.Writers.NONE
        writer = os.open(f, os.O_WRONLY)
        assert leases.take(fd) is leases.Writers.PRESENT  # open for writing right now
        os.close(writer)
        assert leases.take(fd) is None

        def open_for_writing() -> None:  # waits until the lease is let go
            os.close(os.open(f, os.O_WRONLY))

        t = threading.Thread(target=open_for_writing)
        t.start()
        # The writer's open broke the lease and waits: the kernel says so.
        ino, deadline = os.fstat(fd).st_ino, time.monotonic() + 10
        while not any(
            f":{ino} " in line and " BREAKING " in line
            for line in Path("/proc/locks").read_text().splitlines()
        ):
            assert time.monotonic() < deadline, Path("/proc/locks").read_text()
            time.sleep(0.001)
        assert leases.give_back(fd) is leases.Writers.PRESENT
        t.join(timeout=5)
        assert not t.is_alive()
    finally:
        os.close(fd)


def test_pins_charge_copies_under_way_and_memfds_held_out_of_the_cache() -> None:
    k = PIN_FLOOR  # sizes in its units: each is charged as it is
    hits: dict[str, int] = {}
    pins = Pins(per_uid=100 * k, hits=hits)
    pins.reserve(1000, 60 * k)
    with pytest.raises(RequestError) as refused:
        pins.reserve(1000, 50 * k)  # 60 under way + 50 > 100
    assert refused.value.code == "busy" and hits == {"max_pinned_bytes_per_uid": 1}
    pins.reserve(1001, 90 * k)  # another uid has its own bound
    pins.track(7, 60 * k, 1000, cached=True, reserved=60 * k)  # in the cache: not charged
    assert pins.charged.get(1000, 0) == 0 and pins.pinned == 0
    pins.left_cache(7)  # evicted while someone holds it: charged until freed
    assert pins.charged[1000] == 60 * k and pins.pinned == 60 * k
    pins.track(8, 90 * k, 1001, cached=False, reserved=90 * k)  # served uncached: charged
    assert pins.charged[1001] == 90 * k and pins.pinned == 150 * k
    pins.freed(7)
    pins.freed(8)
    assert pins.charged == {} and pins.pinned == 0
    pins.reserve(1000, 100 * k)  # the whole bound again
    pins.unreserve(1000, 100 * k)
    assert pins.charged == {}


def test_a_memfd_is_charged_pin_floor_at_least_whatever_its_size() -> None:
    """Attack 38: a memfd takes an inotify watch whatever its size, so a uid's bound
    is on their number too: 1-byte copies count PIN_FLOOR each (before: 1 byte, and a
    uid held as many as it liked). The figure of bytes pinned stays their size."""
    pins = Pins(per_uid=4 * PIN_FLOOR)
    for wd in range(4):
        pins.reserve(1000, 1)
        pins.track(wd, 1, 1000, cached=False, reserved=1)
    assert pins.charged == {1000: 4 * PIN_FLOOR} and pins.pinned == 4
    with pytest.raises(RequestError):
        pins.reserve(1000, 0)  # an empty file's copy too
    pins.freed(0)
    pins.reserve(1000, 0)  # room for one again
    pins.unreserve(1000, 0)
    pins.track(9, 0, None, cached=True, reserved=None)  # restored: nobody's
    pins.left_cache(9)
    assert pins.charged == {1000: 3 * PIN_FLOOR} and pins.pinned == 3


def test_pins_bound_all_uids_together_and_leave_each_a_fair_share() -> None:
    """Attack 40: past `total`, only a uid below its fair share (total over the uids
    charged) may reserve more, and nobody past `hard` (before: each uid its own bound
    and no more, whatever the number of uids)."""
    k = PIN_FLOOR
    pins = Pins(per_uid=8 * k, total=16 * k)
    assert pins.hard == 24 * k
    for uid in (1, 2):
        for _ in range(8):
            pins.reserve(uid, k)
    assert pins.used == 16 * k
    with pytest.raises(RequestError) as refused:
        pins.reserve(1, k)  # its own bound
    assert "--max-pinned-bytes-per-uid" in refused.value.message
    pins.reserve(3, 5 * k)  # below its share of 16 over 3
    with pytest.raises(RequestError) as refused:
        pins.reserve(3, k)  # 6 > 16 // 3
    assert "all uids" in refused.value.message
    pins.reserve(4, 3 * k)  # 24: the hard bound
    with pytest.raises(RequestError):
        pins.reserve(5, k)  # whatever its share
    pins.unreserve(1, 8 * k)  # a uid lets go: room again, below the total
    pins.reserve(5, k)
    assert pins.used == 17 * k and sorted(pins.charged) == [2, 3, 4, 5]


def test_a_memfd_another_uid_found_is_charged_to_all_uids_together_only() -> None:
    """Attack 41: a memfd out of the cache was charged to the uid whose request made
    it, whoever held it, so another uid that held such memfds put that uid past its
    bound. Once a request of another uid found it, no uid is charged for it; all uids
    together still are, and past `hard` no copy of anyone's starts."""
    k = PIN_FLOOR
    pins = Pins(per_uid=4 * k, total=8 * k)  # hard: 12
    pins.reserve(1, 2 * k)
    pins.track(1, 2 * k, 1, cached=True, reserved=2 * k)
    pins.found(1, 1)  # its own uid's hit: still its own
    pins.track(2, k, 1, cached=False, reserved=None)  # served uncached: uid 1's
    assert pins.charged == {1: k} and pins.used == k
    pins.found(1, 2)  # another uid's hit, in the cache
    pins.left_cache(1)
    pins.found(2, 3)  # out of the cache already: its charge moves
    pins.track(3, k, 1, cached=False, reserved=None, shared=True)  # a copy uid 2 joined
    pins.track(4, k, None, cached=True, reserved=None)  # restored: nobody's, wherever
    pins.found(4, 2)
    pins.left_cache(4)
    assert (pins.charged, pins.used, pins.shared, pins.pinned) == ({}, 4 * k, 4 * k, 5 * k)
    pins.reserve(1, 4 * k)  # uid 1 has its whole bound again
    pins.reserve(2, 4 * k)  # past the total, within its share (8 over 2) and the hard bound
    with pytest.raises(RequestError) as refused:
        pins.reserve(3, k)  # 13 > 12: the shared memfds count for all uids
    assert "all uids" in refused.value.message
    for wd in (1, 2, 3, 4):
        pins.freed(wd)
    pins.unreserve(1, 4 * k)
    pins.unreserve(2, 4 * k)
    assert (pins.charged, pins.used, pins.shared, pins.pinned) == ({}, 0, 0, 0)


async def test_a_copy_a_request_of_another_uid_joined_is_charged_to_no_uid(
    tmp_path: Path,
) -> None:
    """Attack 41 for a copy two uids' requests share (single flight): its memfd is
    served to both, so once out of the cache it is charged to all uids together, not
    to the uid that started it; a request of the same uid that joins changes nothing."""
    f = tmp_path / "young"
    f.write_bytes(os.urandom(100_000))  # too young to cache: served, charged
    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    server = Server(ServerConfig(socket_path=""))
    pins = server.opens.pins
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                server.opens.nursery = nursery
                server.opens.watches.open()
                for uids, charged in (((1000, 1000), {1000: 100_000}), ((1000, 1001), {})):
                    peers = [Peer(pid=os.getpid(), uid=uid, gid=uid) for uid in uids]
                    shares = [server.gate.admit(p, None).share for p in peers]  # type: ignore[arg-type]
                    flight = server.opens.serve_now(fd, None, shares[0])
                    assert isinstance(flight, Flight)
                    assert server.opens.serve_now(fd, None, shares[1]) is flight  # joined
                    served = [(await flight.wait())[0] for _ in shares]
                    assert (pins.charged, pins.used) == (charged, 100_000), uids
                    for held in served:
                        os.close(held)
                    await until_unpinned(server)  # freed: the kernel says so
                    os.utime(fd)  # a new version, copied again
                nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
        server.cache.clear()
        server.opens.watches.close()


async def test_an_entry_restored_at_start_is_served_only_through_its_own_mount(
    tmp_path: Path,
) -> None:
    f = tmp_path / "lib.so"
    f.write_bytes(os.urandom(5000))
    fd = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    st = stat_nosync(fd)
    assert st is not None
    if not st.mnt:
        os.close(fd)
        pytest.skip("no unique mount IDs here: restored entries are never kept")
    server = Server(ServerConfig(socket_path=""))
    peer = Peer(pid=os.getpid(), uid=os.geteuid(), gid=os.getegid())
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                server.opens.nursery = nursery
                server.opens.watches.open()
                share = server.gate.admit(peer, None).share  # type: ignore[arg-type]
                for mnt, served in ((st.mnt + 1, False), (st.mnt, True)):
                    sealed = sealed_from_bytes(f.read_bytes())
                    server.cache.insert(
                        HostKey(st.dev, st.ino), st.version, sealed, ctime_ns=1, mnt=mnt
                    )  # as the fd store restores it: no watch yet
                    sealed.release()
                    out = server.opens.serve_now(fd, None, share, wait=False)
                    assert (type(out) is tuple) is served, (mnt, out)
                    if served:
                        (entry,) = server.cache.index.values()
                        assert entry.wd >= 0  # watched from now on
                    else:
                        assert isinstance(out, Miss)
                        assert HostKey(st.dev, st.ino) not in server.cache.index
                nursery.cancel_scope.cancel()
    finally:
        os.close(fd)
        server.cache.clear()
        server.opens.watches.close()


def test_a_copy_watches_the_memfd_it_made_in_its_worker(tmp_path: Path) -> None:
    """copy_source adds the watch on its memfd itself (in the copy's worker thread,
    where its 30 us of /proc lookup costs the loop nothing): the watch is that
    memfd's (its freeing is told), and the loop's track takes it as it is."""
    from shadowd.copier import copy_source
    from shadowd.fds import FdHolder

    f = tmp_path / "lib.so"
    f.write_bytes(os.urandom(10_000))
    seen = _Seen()
    w = _watches(seen)
    try:
        box: list[Any] = []
        worker = threading.Thread(
            target=lambda: box.append(
                copy_source(FdHolder(os.open(f, os.O_RDONLY | os.O_CLOEXEC)), None, w)
            )
        )
        worker.start()
        worker.join()
        (copied,) = box
        assert copied.memfd_wd >= 0 and copied.memfd_wd != copied.wd
        held = os.open(f"/proc/self/fd/{copied.sealed.fd}", os.O_RDONLY)
        assert os.read(held, 20_000) == f.read_bytes()
        copied.sealed.release()
        w.drain()
        assert seen.freed == []  # still held here
        os.close(held)
        deadline = time.monotonic() + 5
        while copied.memfd_wd not in seen.freed:
            assert time.monotonic() < deadline, "the memfd's watch never said it was freed"
            w.drain()
            time.sleep(0.01)
    finally:
        w.close()
