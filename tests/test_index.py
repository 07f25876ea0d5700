# Hits without a round trip: the index of the cache. A peer of the daemon's
# uid (or root) maps it read-only and reopens the daemon's memfds itself; any
# doubt (a slot changing, a descriptor number reused, a memfd a holder
# changed) sends it back to the socket. Other uids get no index. The daemon
# counts the hits clients report. Every test of a view runs with its C path
# (shadowd/_hotcalls.c, index_open) and its Python path, and a refusal must
# leave this process's descriptors as they were.
from __future__ import annotations

import fcntl
import json
import mmap
import os
import random
import socket
import struct
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace
from typing import Any, cast
from unittest import mock

import attrs
import pytest
import shadowd_client.index as index_module
import trio
from shadowd_client import Client, Opener
from shadowd_client.index import IndexView

from shadowd.cache import HostKey
from shadowd.index import (
    HEADER,
    KEY_OFFSET,
    LAYOUT_VERSION,
    LIVE,
    REMOVED,
    SLOT,
    Slot,
    read_slot,
    slot_of,
)
from shadowd.memfd import REQUIRED_SEALS, sealed_from_bytes
from shadowd.metrics import count_open_fds

from . import churn
from .conftest import (
    NOBODY,
    Daemon,
    make_file,
    read_fd,
    repo_env,
    requires_root,
    run_as,
    settle,
)
from .indexed import (
    IndexedCache,
    OpenWatch,
    cached_view,
    fifo_to_plant,
    live_slot_fds,
    planting_cases,
    planting_daemon,
    range_number_of,
    standing_in,
    without_hanging,
)

RACY = "0.05"


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


#: The two ways a view serves a hit: "c" only where the extension is built
#: and in use (tests/test_hotcalls.py says whether it is where it can be).
PATHS = ["python"] + (["c"] if index_module.C_CALLS is not None else [])
needs_c = pytest.mark.skipif("c" not in PATHS, reason="the C extension is not in use")


@pytest.fixture(params=PATHS)
def index_path(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Views made during the test take this path (a view takes it when it is made)."""
    if request.param == "python":
        monkeypatch.setattr(index_module, "C_CALLS", None)
        monkeypatch.setattr(index_module, "C_HOLDS", None)
    return str(request.param)


def _ourselves() -> tuple[int, int]:
    """What SO_PEERCRED would say of a daemon that is this very process: a rig's."""
    return os.getpid(), os.geteuid()


class _Rig(IndexedCache):
    """An in-process index over a cache of real files, and a view of it."""

    def __init__(
        self, tmp_path: Path, n: int = 4, *, ranged: bool = False, ours: bool = True
    ) -> None:
        """*ours*: the view is told SO_PEERCRED names this process (a daemon of our uid);
        else nothing (every number through O_PATH)."""
        super().__init__(tmp_path, n, ranged=ranged)
        self.peer = _ourselves() if ours else None
        fd = self.index.reader_fd()
        try:
            self.view = IndexView(fd, os.getpid(), self.index.slots, peer=self.peer)
        finally:
            os.close(fd)

    def close(self) -> None:
        self.view.close()
        super().close()


@pytest.fixture
def rig(tmp_path: Path, index_path: str) -> Any:
    r = _Rig(tmp_path)
    assert r.view.in_c == (index_path == "c")
    assert (r.view._c_holds is not None) == (index_path == "c")
    yield r
    r.close()


def _serves_each_file_sealed_read_only_with_its_own_offset(rig: _Rig) -> None:
    """Every file of *rig* through its view: its bytes, the four seals, read-only and
    close-on-exec with no other flag, and an open file description of its own."""
    for f, st in rig.files:
        fd = rig.view.open(st)
        assert fd is not None
        try:
            assert read_fd(fd) == f.read_bytes()
            assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
            flags = fcntl.fcntl(fd, fcntl.F_GETFL)
            assert flags & (os.O_ACCMODE | os.O_NONBLOCK | os.O_APPEND) == os.O_RDONLY
            assert fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            other = rig.view.open(st)
            assert other is not None
            os.lseek(fd, 10, os.SEEK_SET)
            assert os.lseek(other, 0, os.SEEK_CUR) == 0  # its own open file description
            os.close(other)
        finally:
            os.close(fd)


def test_a_view_serves_each_indexed_file_sealed_read_only_with_its_own_offset(rig: _Rig) -> None:
    _serves_each_file_sealed_read_only_with_its_own_offset(rig)


@pytest.fixture
def ranged_rig(tmp_path: Path, index_path: str) -> Any:
    """A rig whose index keeps its memfds in a descriptor range (shadowd/fdrange.py)."""
    r = _Rig(tmp_path, ranged=True)
    assert r.view.in_c == (index_path == "c")
    yield r
    r.close()


def test_in_the_daemons_range_a_memfd_is_opened_at_once_and_served_as_anywhere(
    ranged_rig: _Rig,
) -> None:
    """The range the header publishes holds every indexed memfd; what is served from it
    is the same kind of fd as through O_PATH: sealed, read-only, its own offset, no
    other flag."""
    rig = ranged_rig
    fd_range = rig.index.fd_range
    assert fd_range is not None
    assert rig.view.range == range(fd_range.base, fd_range.base + fd_range.size)
    for i in range(len(rig.files)):
        assert rig.entry(i).file.fd in fd_range
    _serves_each_file_sealed_read_only_with_its_own_offset(rig)


def test_in_the_range_another_memfd_at_n_is_opened_then_refused_with_no_fd_left(
    ranged_rig: _Rig, tmp_path: Path
) -> None:
    """A number of the range holds a memfd at every instant, so the view opens it at once
    (its file sees an open: IN_OPEN) and then checks it: a memfd of the same bytes, size
    and mode but another inode, or the range's stand-in, is refused, nothing kept. Outside
    a range, or in the range of a daemon not known to be of our uid, the same memfd at N
    is only looked at through O_PATH (no IN_OPEN)."""
    (tmp_path / "plain-rig").mkdir()
    plain = _Rig(tmp_path / "plain-rig")  # no range: the O_PATH step
    (tmp_path / "untrusted-rig").mkdir()
    untrusted = _Rig(tmp_path / "untrusted-rig", ranged=True, ours=False)  # the same
    assert untrusted.view.in_c == ranged_rig.view.in_c and not untrusted.view.range
    look_alike = sealed_from_bytes(ranged_rig.files[0][0].read_bytes())
    watch = OpenWatch()
    try:
        watch.add(f"/proc/self/fd/{look_alike.fd}")
        fd_range = ranged_rig.index.fd_range
        assert fd_range is not None
        standin = fd_range.base + fd_range.size - 1  # (the rig's 4 files take the lowest)
        for rig, opened in ((ranged_rig, True), (plain, False), (untrusted, False)):
            _, st = rig.files[0]
            memfd = rig.entry(0).file.fd
            for other in (look_alike.fd, standin) if opened else (look_alike.fd,):
                with standing_in(memfd, other):
                    assert _refused(rig.view, st), other
                if other == look_alike.fd:
                    assert (watch.events() > 0) == opened
            fd = rig.view.open(st)  # and the right one again
            assert fd is not None
            os.close(fd)
    finally:
        watch.close()
        look_alike.release()
        plain.close()
        untrusted.close()


def test_another_version_a_removed_entry_and_a_changed_slot_are_not_served(rig: _Rig) -> None:
    _, st = rig.files[0]
    newer = os.stat_result((*st[:8], st.st_mtime + 1, st.st_ctime))  # another mtime
    assert rig.view.open(newer) is None
    rig.cache.remove(HostKey(st.st_dev, st.st_ino))  # the slot goes before the memfd
    assert rig.view.open(st) is None
    # A slot that changes between the reads (its seq) is never trusted.
    f1, st1 = rig.files[1]
    start = slot_of(st1.st_dev, st1.st_ino, rig.index.slots, rig.index.key)
    probes = [(start + i) % rig.index.slots for i in range(16)]
    n = next(k for k in probes if read_slot(rig.index._map, k).ino == st1.st_ino)
    seq = read_slot(rig.index._map, n).seq
    rig.index._map[HEADER + n * SLOT : HEADER + n * SLOT + 4] = (seq + 1).to_bytes(4, "little")
    assert rig.view.open(st1) is None  # odd: being written
    rig.index._map[HEADER + n * SLOT : HEADER + n * SLOT + 4] = (seq + 2).to_bytes(4, "little")
    fd = rig.view.open(st1)  # written again: trusted again
    assert fd is not None and read_fd(fd) == f1.read_bytes()
    os.close(fd)


def test_a_reused_descriptor_number_is_detected_every_time(rig: _Rig, tmp_path: Path) -> None:
    """The daemon's fd N closed and N reused by something else: never served, no side effect."""
    others: list[int] = []
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plain = make_file(tmp_path / "plain", b"x" * 3001)
    look_alike = sealed_from_bytes(rig.files[1][0].read_bytes())  # same bytes, size, mode
    try:
        others = [
            os.open(fifo, os.O_RDONLY | os.O_NONBLOCK),  # opening it for real would block
            os.open(plain, os.O_RDONLY),
            look_alike.fd,
            os.open("/dev/null", os.O_RDONLY),
        ]
        for i, other in enumerate(others[:4]):
            _, st = rig.files[i]
            with standing_in(rig.entry(i).file.fd, other):
                assert rig.view.open(st) is None, i
            fd = rig.view.open(st)  # and the right one again
            assert fd is not None
            os.close(fd)
    finally:
        for fd in (others[0], others[1], others[3]) if others else ():
            os.close(fd)
        look_alike.release()


def test_a_memfd_a_holder_changed_is_not_served_from_the_index(rig: _Rig) -> None:
    _, st = rig.files[2]
    held = rig.view.open(st)
    assert held is not None
    os.utime(held, ns=(1, 1))  # a holder of the memfd's uid changes its times
    os.close(held)
    assert rig.view.open(st) is None  # its stamp moved: the socket decides


def _kept(rig: _Rig, i: int) -> tuple[int, tuple[int, int, int, int, int, int, int, int]]:
    """A reopen of file *i*'s memfd as the process-local tier keeps it, and what the
    tier asks the view about it."""
    _, st = rig.files[i]
    fd = rig.view.open(st)
    assert fd is not None
    m = os.fstat(fd)
    return fd, (
        st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns,
        m.st_dev, m.st_ino, m.st_ctime_ns,
    )  # fmt: skip


def test_holds_says_whether_the_slot_still_names_the_memfd_a_client_keeps(
    rig: _Rig, tmp_path: Path
) -> None:
    """The process-local tier's check: the file's slot, live, of its version, naming
    that very memfd (device, inode, ctime); a slot being written is not the file's."""
    fd, held = _kept(rig, 1)
    try:
        assert rig.view.holds(held)
        for i in range(8):  # each field wrong on its own
            for delta in (1, -1):
                wrong = list(held)
                wrong[i] += delta
                assert not rig.view.holds(tuple(wrong)), (i, delta)  # type: ignore[arg-type]
        n = rig.slot_number(rig.files[1][1])
        good = read_slot(rig.index._map, n)
        _set_seq(rig, n, good.seq + 1)  # being written
        assert not rig.view.holds(held)
        _set_seq(rig, n, good.seq + 2)
        assert rig.view.holds(held)
        # The daemon replaced it: the same version (stat showed no change) in a new memfd.
        _, st = rig.files[1]
        key = HostKey(st.st_dev, st.st_ino)
        version = (st.st_size, st.st_mtime_ns, st.st_ctime_ns)
        rig.cache.remove(key)
        assert not rig.view.holds(held)  # dropped: the slot is removed
        sealed = sealed_from_bytes(b"x" * st.st_size)
        try:
            rig.cache.insert(key, version, sealed, ctime_ns=1, wd=1)
        finally:
            sealed.release()
        assert not rig.view.holds(held)  # another memfd of the same version
        fresh, again = _kept(rig, 1)
        os.close(fresh)
        assert again[6] != held[6] and rig.view.holds(again)
    finally:
        os.close(fd)
    assert not rig.view.holds((1, 2, 3, 4, 5, rig.view.memfd_dev, 6, 7))  # not indexed


def test_a_view_of_a_daemon_that_is_gone_is_not_alive(rig: _Rig) -> None:
    """alive(): the daemon's own descriptor of the index is still in its /proc/PID/fd.
    Here the "daemon" is this process: its index's descriptor closed is a daemon gone."""
    assert rig.view.alive()
    seen = rig.view.alive_at
    assert rig.view.alive() and rig.view.alive_at >= seen
    saved = os.dup(rig.index.holder.fd)
    os.close(rig.index.holder.fd)
    try:
        assert not rig.view.alive()
        os.dup2(saved, rig.index.holder.fd)
        assert not rig.view.alive()  # a process that exited never comes back
    finally:
        os.dup2(saved, rig.index.holder.fd)
        os.close(saved)


def test_a_view_nobody_closes_gives_its_descriptors_back_once_collected(rig: _Rig) -> None:
    """A view dropped without close() (its caller forgot it): once collected, this
    process has exactly the descriptors it had before the view was made. Closed, a view
    serves and holds nothing, its descriptor numbers are -1 (a use fails with EBADF,
    never reaches a number reused since), and a second close does nothing."""
    import gc
    import weakref

    _, st = rig.files[0]

    def made() -> IndexView:
        fd = rig.index.reader_fd()
        try:
            return IndexView(fd, os.getpid(), rig.index.slots, peer=rig.peer)
        finally:
            os.close(fd)

    before = count_open_fds()
    view = made()
    served = view.open(st)
    assert served is not None
    os.close(served)
    # The daemon's /proc/PID/fd, our own, and the mapping's (Python's mmap keeps a dup).
    assert count_open_fds() == before + 3
    gone = weakref.ref(view)
    del view
    gc.collect()
    assert gone() is None
    assert count_open_fds() == before

    kept, held = _kept(rig, 0)
    os.close(kept)
    view = made()
    assert view.holds(held)
    view.close()
    assert count_open_fds() == before
    view.close()  # nothing more to close
    assert count_open_fds() == before
    assert view.closed and view.open(st) is None and not view.holds(held) and not view.alive()
    assert (view._daemon_fds.fd, view._own_fds.fd) == (-1, -1)


def test_nobody_can_write_or_grow_the_index(rig: _Rig) -> None:
    fd = rig.index.reader_fd()
    try:
        with pytest.raises(PermissionError):
            mmap.mmap(fd, HEADER, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)  # root may open it for writing...
        try:
            with pytest.raises(PermissionError):
                os.write(rw, b"x")  # ...but not write,
            with pytest.raises(PermissionError):
                os.ftruncate(rw, 1 << 20)  # grow
            with pytest.raises(PermissionError):
                os.ftruncate(rw, 10)  # or shrink it
            with pytest.raises(PermissionError):
                mmap.mmap(rw, HEADER, mmap.MAP_SHARED, mmap.PROT_WRITE)  # or map it writable
        finally:
            os.close(rw)
    finally:
        os.close(fd)


async def test_ten_thousand_index_hits_while_files_change_serve_no_wrong_byte(
    start_daemon: Any, tmp_path: Path, index_path: str
) -> None:
    """Another client replaces files (new inodes) while a small cache evicts and refills.

    Its changes keep pace with the reader's index hits (tests/churn.py), so the mix is
    the same on a loaded host as on an idle one, and no clock decides what is counted.
    No racy window: no two versions share a key, and the daemon is to cache each
    version once it is asked, not once the wall clock says (a reader that is fast
    beside it would find every file young)."""
    d: Daemon = await start_daemon("--racy-window", "0", "--max-entries", "3")
    names = churn.library(tmp_path)
    rewriter = churn.Rewriter(names, *churn.fifos(tmp_path))
    stop = threading.Event()

    def reader() -> tuple[int, int, int, int]:
        # A timeout no loaded host reaches: a report 250 ms late (the default)
        # would be dropped, with its index hits, and opens the breaker.
        opener = Opener(d.socket_path, local_below=0, held_files=0, timeout=10)
        pacer = churn.Pacer.open(rewriter.asks, rewriter.dones)
        served = wrong = colds = 0
        rng = random.Random(2)
        try:
            while opener.index_opens < 10_000 and not stop.is_set():
                k = churn.pick(rng, names, opener.index_opens, colds)
                colds += k >= churn.HOT
                name = names[k]
                src = os.open(name, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    st = os.fstat(src)
                    fd = opener.open_fd(src, label=str(name))
                finally:
                    os.close(src)
                data = read_fd(fd)
                os.close(fd)
                served += 1
                if data != churn.version_bytes(st.st_size, st.st_mtime_ns):
                    wrong += 1
                if opener.index_opens >= churn.HITS_PER_CHANGE * (pacer.asked + 1):
                    pacer.step()
            return served, wrong, opener.index_opens, pacer.asked
        finally:
            try:
                pacer.close()
            finally:
                opener.close()

    rewriter.start()
    try:
        # A bound for a hang only: a few seconds idle, tens at a load of 10.
        with trio.fail_after(120):
            served, wrong, index_hits, asked = await trio.to_thread.run_sync(
                reader, abandon_on_cancel=True
            )
    finally:
        stop.set()  # the reader of a test that timed out ends at its next open
        rewriter.join()
    changes = rewriter.changes
    assert wrong == 0, (served, wrong, index_hits, changes)
    assert index_hits == 10_000, (served, index_hits, changes)
    assert changes == asked == 10_000 // churn.HITS_PER_CHANGE, (changes, asked)
    with Client(d.socket_path, timeout=10) as c:
        s = c.stats()
    assert s["index_hits"] >= index_hits - 256  # reported within a batch
    assert s["evictions"] > 0 and s["invalidations"] > 0 and s["index_slots"] > 0, s
    assert s["index_fd_range"] == 3, s  # one number per entry (--max-entries 3)
    # The last rewrites may have taken every entry out: fill the cache again,
    # so that the range's check below has live slots to look at.
    with Client(d.socket_path, timeout=10) as c:
        for name in names[:3]:
            os.close(c.open(name))
        deadline = time.monotonic() + 10
        while c.stats()["index_entries"] < 3:
            assert time.monotonic() < deadline, c.stats()
            await trio.sleep(0.02)
    _range_holds_memfds_only(d)


def _range_holds_memfds_only(d: Daemon) -> None:
    """The daemon's descriptor range, as its index publishes it: every number a memfd
    (after all the churn of evictions and rewrites), every live slot's memfd in it."""
    with Client(d.socket_path, timeout=10) as c:
        view = c.index()
    assert view is not None
    try:
        assert len(view.range) == 3 and view.range.start >= 256  # --max-entries 3
        for n in view.range:
            assert os.readlink(f"/proc/{d.pid}/fd/{n}").startswith("/memfd:"), n
        live = [read_slot(view._map, k) for k in range(view.slots)]
        fds = [slot.fd for slot in live if slot.state == LIVE]
        assert fds and all(fd in view.range for fd in fds), fds
    finally:
        view.close()


@requires_root
async def test_the_index_serves_the_daemons_own_uid_and_root_only(
    start_daemon: Any, shared_dir: Path, index_path: str
) -> None:
    d: Daemon = await start_daemon("--racy-window", RACY, "--socket-mode", "0666")
    f = make_file(shared_dir / "lib.so", os.urandom(40_000))
    settle(f)

    def warm() -> int:
        with Client(d.socket_path, timeout=10) as c:
            for _ in range(2):
                os.close(c.open(f))  # cached (the first open waits for the copy)
            view = c.index()
            assert view is not None
            fd = view.open(f.stat())
            assert fd is not None and read_fd(fd) == f.read_bytes()
            os.close(fd)
            view.close()
            c.report([(f.stat().st_dev, f.stat().st_ino, 5)])
            return int(c.stats()["index_hits"])

    with trio.fail_after(60):
        assert await in_thread(warm) == 5
        code = f"""
from shadowd_client import Client
with Client({str(d.socket_path)!r}, timeout=10) as c:
    view = c.index()
    fd = c.open({str(f)!r})  # the socket still serves it
    out([view is None, len(os.pread(fd, 1 << 20, 0))])
"""
        got = await in_thread(lambda: run_as(NOBODY, code))
    assert got == [True, 40_000]


async def test_client_report_splits_by_the_daemons_max_request(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Client.report of 300 files to a daemon run with --max-request 1024: as the
    first request of a new connection (the hello's answer, and with it the daemon's
    limit, not read yet) and on a greeted one, it goes in requests the daemon takes,
    and every hit is counted. Before, it split by the protocol's 4096 files: one
    request of 8 KiB, refused (request-too-large) and its connection closed."""
    d: Daemon = await start_daemon("--racy-window", RACY, "--max-request", "1024")
    f = make_file(tmp_path / "lib.so", os.urandom(40_000))
    settle(f)
    st = f.stat()
    hits = [(st.st_dev, st.st_ino, 1)] + [(st.st_dev, st.st_ino + 1 + i, 2) for i in range(299)]

    def work() -> tuple[int, int, int]:
        with Client(d.socket_path, timeout=10) as c:
            base = int(c.stats()["index_hits"])
        with Client(d.socket_path, timeout=10) as c:
            c.report(hits)  # its first request: the limit is not known yet
            first = int(c.stats()["index_hits"]) - base
            c.report(hits)  # the hello's answer read: the daemon's own limit
            second = int(c.stats()["index_hits"]) - base - first
            return first, second, c.connections

    with trio.fail_after(60):
        first, second, connections = await in_thread(work)
    assert first == second == 1 + 299 * 2
    assert connections == 1  # none refused (a refusal closes the connection)


@requires_root
async def test_root_takes_the_index_of_a_daemon_of_another_uid_through_o_path_only(
    start_daemon: Any, shared_dir: Path, index_path: str
) -> None:
    """Root may read any process's descriptors, so a daemon of another uid gives it its
    index; its hits are served, but its range is not taken at its word (the connection's
    SO_PEERCRED names another uid): every number is looked at through O_PATH first."""
    run = shared_dir / "run"
    run.mkdir()
    os.chown(run, NOBODY, NOBODY)  # where it may make its socket
    d: Daemon = await start_daemon("--racy-window", RACY, user=(NOBODY, NOBODY), directory=run)
    f = make_file(shared_dir / "lib.so", os.urandom(20_000))
    settle(f)

    def hits() -> tuple[bool, bool, int, bool]:
        with cached_view(d.socket_path, f) as view:
            fd = view.open(f.stat())
            assert fd is not None and read_fd(fd) == f.read_bytes()
            os.close(fd)
            (n,) = live_slot_fds(view, f)
            return view.direct, view.in_c, len(view.range), n in view.header_range

    with trio.fail_after(60):
        direct, in_c, opened_at_once, in_its_range = await in_thread(hits)
    assert in_c == (index_path == "c")
    assert not direct and opened_at_once == 0 and in_its_range


@requires_root
@planting_cases
async def test_a_fifo_at_a_number_of_the_range_is_opened_only_from_a_daemon_of_our_uid(
    uid: int, manager: bool, shared_dir: Path, index_path: str
) -> None:
    """A daemon (a stand-in, in a process of its own) holds at a number of its range,
    where file 0's slot points, an O_PATH descriptor of a FIFO that its user may name
    but not open (root's, 0600). Root takes its index:

    - of another uid (the connection's SO_PEERCRED), the range is not taken at its
      word: the FIFO is never opened (no IN_OPEN, nothing waits for a writer), file 0
      is refused, file 1 served through O_PATH;
    - of our uid, on a socket another process listened on (a service manager's:
      SO_PEERCRED names that process, not the daemon): the same;
    - of our own uid, listening itself (a daemon bug could put a FIFO there), the
      number is opened at once (IN_OPEN: a real open), yet nonblocking: it does not
      wait for a writer, and it is refused. File 1 is served, nothing is left open."""
    fifo, work = fifo_to_plant(shared_dir, uid)

    def take(said: dict[str, Any]) -> tuple[bool, list[bool], int]:
        files = [Path(x) for x in said["files"]]
        with Client(said["socket"], timeout=10) as c:
            view = c.index()
            assert view is not None
            assert view.in_c == (index_path == "c")
            before = count_open_fds()
            try:
                served = []
                for f in files:
                    fd = view.open(f.stat())
                    served.append(fd is not None and read_fd(fd) == f.read_bytes())
                    if fd is not None:
                        os.close(fd)
                return view.direct, served, count_open_fds() - before
            finally:
                view.close()

    with OpenWatch() as watch:
        with trio.fail_after(60):
            with planting_daemon(uid, work, fifo, manager=manager) as said:
                watch.add(fifo)
                direct, served, left = await without_hanging(fifo, lambda: take(said))
        opens = watch.events()
    assert served == [False, True] and left == 0, (served, left)
    if uid == os.geteuid() and not manager:
        assert direct and opens > 0  # the range's open is a real one, and did not wait
    else:
        assert not direct and opens == 0  # never opened for real


# Run as pid 1 of a new pid namespace with its own /proc: a process here gets
# the daemon's pid number and holds a FIFO (with a writer: nothing blocks) at
# the number a live slot names; then this namespace's root asks for the index
# and opens the cached file through it.
_IMPOSTOR = """
import ctypes, os, sys, json
import shadowd_client.index as index_module
from shadowd_client import Client
sock, path, fifo, dpid, n, path_kind = sys.argv[1:7]
dpid, n = int(dpid), int(n)
if path_kind == "python":
    index_module.C_CALLS = None
os.mkfifo(fifo)
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(dpid - 1))
ready_r, ready_w = os.pipe()
hold_r, hold_w = os.pipe()
pid = os.fork()
if pid == 0:
    os.dup2(os.open(fifo, os.O_RDWR), n)
    os.write(ready_w, b"x")
    os.read(hold_r, 1)  # killed when pid 1 exits
    os._exit(0)
os.read(ready_r, 1)
libc = ctypes.CDLL(None, use_errno=True)
watch = libc.inotify_init1(os.O_NONBLOCK)
assert libc.inotify_add_watch(watch, fifo.encode(), 0x20) >= 0  # IN_OPEN
with Client(sock, timeout=10) as c:
    view = c.index()
    got = None
    if view is not None:
        src = os.open(path, os.O_RDONLY)
        got = view.open(os.fstat(src))
try:
    opens = len(os.read(watch, 4096))
except BlockingIOError:
    opens = 0
print(json.dumps([pid, view is not None, got, opens]))
"""


@requires_root
async def test_a_process_of_another_pid_namespace_at_the_daemons_pid_is_never_opened(
    daemon: Daemon, shared_dir: Path, index_path: str
) -> None:
    """The index names the daemon by its pid, in the daemon's pid namespace. A client
    in another one (a container's supervisor with the host's socket) reads
    /proc/PID of its own namespace, where PID may be another process: a number of the
    daemon's range there may be anything (a FIFO, a device), and must not be opened
    for real (no IN_OPEN). Such a view is refused: /proc/PID there is not the daemon."""
    f = make_file(shared_dir / "lib.so", os.urandom(5000))
    settle(f)
    with trio.fail_after(60):
        n = await in_thread(range_number_of, daemon.socket_path, f)
        done = await in_thread(
            lambda: subprocess.run(
                [
                    *("unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"),
                    *(_IMPOSTOR, str(daemon.socket_path), str(f), str(shared_dir / "fifo")),
                    *(str(daemon.pid), str(n), index_path),
                ],
                capture_output=True,
                text=True,
                timeout=30,
                env=repo_env(),
                check=False,
            )
        )
    assert done.returncode == 0, done.stderr
    impostor, had_view, got, opens = json.loads(done.stdout.splitlines()[-1])
    assert impostor == daemon.pid  # the daemon's pid names another process there
    assert got is None and opens == 0, (had_view, got, opens)
    assert not had_view


def test_private_and_unwatched_entries_are_never_indexed(rig: _Rig, tmp_path: Path) -> None:
    from shadowd.cache import PrivateKey

    sealed = sealed_from_bytes(b"private bytes")
    try:
        _, private = rig.cache.insert(PrivateKey(0, "ns", 1), (13, 1, 1), sealed, private=True)
        assert private is not None and not rig.index.put(private)
        f = make_file(tmp_path / "unwatched", b"u" * 100)
        st = f.stat()
        _, unwatched = rig.cache.insert(
            HostKey(st.st_dev, st.st_ino), (100, st.st_mtime_ns, st.st_ctime_ns), sealed, ctime_ns=1
        )  # restored at start: no watch yet
        assert unwatched is not None and not rig.index.put(unwatched)
        assert rig.view.open(st) is None
        assert rig.index.entries == len(rig.files)
    finally:
        sealed.release()


async def test_after_a_restart_the_opener_takes_the_new_daemons_index(
    start_daemon: Any, tmp_path: Path, index_path: str
) -> None:
    d: Daemon = await start_daemon("--racy-window", RACY, socket_name="r.sock")
    f = make_file(tmp_path / "lib.so", os.urandom(50_000))
    settle(f)
    opener = Opener(d.socket_path, local_below=0, held_files=0, retry_after=0.1)

    def until_index_hit() -> None:
        before, deadline = opener.index_opens, time.monotonic() + 10
        while opener.index_opens == before:
            assert time.monotonic() < deadline
            fd = opener.open(f)
            assert read_fd(fd) == f.read_bytes()
            os.close(fd)
            time.sleep(0.02)

    try:
        with trio.fail_after(60):
            await in_thread(until_index_hit)
            assert await d.terminate() == 0
            await start_daemon("--racy-window", RACY, socket_name="r.sock")
            # (Opens copied here while the breaker's window (0.1 s) lasts: not hits.)
            await in_thread(until_index_hit)  # the new daemon's index, its own slots
    finally:
        opener.close()


# -- every check, on both paths ------------------------------------------------


def _write_slot(rig: _Rig, n: int, slot: Slot) -> None:
    """Write *slot*'s fields at *n* as the daemon does (seq odd, fields, seq even)."""
    fields = attrs.astuple(slot)[1:]  # all but seq
    rig.index._write(n, *fields)


def _set_seq(rig: _Rig, n: int, seq: int) -> None:
    rig.index._map[HEADER + n * SLOT : HEADER + n * SLOT + 4] = seq.to_bytes(4, "little")


def _refused(view: IndexView, st: os.stat_result) -> bool:
    """Whether *view* gives None for *st* with no descriptor left behind."""
    before = count_open_fds()
    fd = view.open(st)
    if fd is not None:
        os.close(fd)
        return False
    assert count_open_fds() == before
    return True


def test_a_memfd_changed_after_it_was_indexed_is_refused_with_no_fd_left(rig: _Rig) -> None:
    """Its ctime moved (a holder changed its times, then its mode): the slot's stamp is stale."""
    for i, change in enumerate(
        [lambda fd: os.utime(fd, ns=(5, 5)), lambda fd: os.fchmod(fd, 0o400)]
    ):
        _, st = rig.files[i]
        held = rig.view.open(st)
        assert held is not None
        change(held)
        os.close(held)
        assert _refused(rig.view, st), i
        assert _refused(rig.view, st), i  # and every time after


def test_a_reused_descriptor_number_is_refused_with_no_fd_left(rig: _Rig, tmp_path: Path) -> None:
    """N closed by the daemon and reused: a FIFO (an open would block), /dev/null, a plain
    file, a directory, a socket, an unsealed memfd of the same bytes: None, nothing kept."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plain = make_file(tmp_path / "plain", rig.files[0][0].read_bytes())  # same size
    unsealed = os.memfd_create("look-alike", os.MFD_CLOEXEC)
    os.write(unsealed, rig.files[0][0].read_bytes())
    socket_pair = socket.socketpair()
    left = socket_pair[0]
    others = [
        os.open(fifo, os.O_RDONLY | os.O_NONBLOCK),
        os.open("/dev/null", os.O_RDONLY),
        os.open(plain, os.O_RDONLY),
        os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        left.fileno(),
        unsealed,
    ]
    _, st = rig.files[0]
    memfd = rig.entry(0).file.fd
    saved = os.dup(memfd)
    try:
        for other in others:
            os.dup2(other, memfd)
            assert _refused(rig.view, st), other
            # Nothing was opened for real: the FIFO saw no reader come and go.
            os.dup2(saved, memfd)
            fd = rig.view.open(st)
            assert fd is not None
            os.close(fd)
        os.close(memfd)  # N closed and not reused
        assert _refused(rig.view, st)
    finally:
        os.dup2(saved, memfd)
        os.close(saved)
        for fd in others[:4] + others[5:]:
            os.close(fd)
        for sock in socket_pair:
            sock.close()


def test_what_is_at_n_now_is_never_opened_for_real(rig: _Rig, tmp_path: Path) -> None:
    """A reused N is looked at through O_PATH only: its file sees no open (inotify's
    IN_OPEN, which an O_PATH open does not raise), whatever the answer."""
    plain = make_file(tmp_path / "plain", rig.files[0][0].read_bytes())
    watch = OpenWatch()
    _, st = rig.files[0]
    memfd = rig.entry(0).file.fd
    saved = os.dup(memfd)
    try:
        for path in (plain, Path("/dev/null")):
            watch.add(path)
            os.close(os.open(path, os.O_RDONLY))  # a real open is seen: the control
            assert watch.events() > 0
            target = os.open(path, os.O_PATH)
            try:
                os.dup2(target, memfd)
            finally:
                os.close(target)
            assert watch.events() == 0  # and an O_PATH open is not
            assert _refused(rig.view, st), path
            assert watch.events() == 0  # nothing at N was opened for real
    finally:
        os.dup2(saved, memfd)
        os.close(saved)
        watch.close()


def test_a_slot_of_another_version_or_being_written_is_refused_with_no_fd_left(
    rig: _Rig, tmp_path: Path
) -> None:
    f, st = rig.files[1]
    n = rig.slot_number(st)
    good = read_slot(rig.index._map, n)
    # The file changed since it was cached: the caller's fstat is another version.
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1))
    assert _refused(rig.view, f.stat())
    for field, value in [("size", good.size + 1), ("mtime_ns", 7), ("ctime_ns", 7)]:
        _write_slot(rig, n, attrs.evolve(good, **{field: value}))
        assert _refused(rig.view, st), field
    _write_slot(rig, n, good)
    for seq in (good.seq + 1, good.seq + 3):  # odd: being written
        _set_seq(rig, n, seq)
        assert _refused(rig.view, st), seq
    _set_seq(rig, n, good.seq + 4)
    fd = rig.view.open(st)  # written again: served again
    assert fd is not None and read_fd(fd) == f.read_bytes()
    os.close(fd)


def test_a_slot_that_lies_about_its_memfd_is_refused_with_no_fd_left(rig: _Rig) -> None:
    """Each field the reopen checks, wrong on its own in a slot otherwise right."""
    f, st = rig.files[2]
    n = rig.slot_number(st)
    good = read_slot(rig.index._map, n)
    other_memfd = rig.entry(3).file.fd  # sealed, the daemon's, another inode
    unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
    os.write(unsealed, f.read_bytes())
    half = os.memfd_create("half-sealed", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(half, f.read_bytes())
    fcntl.fcntl(half, fcntl.F_ADD_SEALS, REQUIRED_SEALS & ~fcntl.F_SEAL_SEAL)
    try:
        lies: list[tuple[str, Slot]] = [
            ("state removed", attrs.evolve(good, state=REMOVED)),
            ("state unknown", attrs.evolve(good, state=LIVE + 7)),
            ("fd -1", attrs.evolve(good, fd=-1)),
            ("fd not open", attrs.evolve(good, fd=1_000_000)),
            ("fd another memfd", attrs.evolve(good, fd=other_memfd)),
            ("mode", attrs.evolve(good, mode=good.mode ^ 0o200)),
            ("memfd ino", attrs.evolve(good, memfd_ino=good.memfd_ino + 1)),
            ("memfd ctime", attrs.evolve(good, memfd_ctime_ns=good.memfd_ctime_ns + 1)),
        ]
        # A memfd that is all the slot says but sealed: only the seals tell.
        for name, fd in (("unsealed", unsealed), ("missing F_SEAL_SEAL", half)):
            mst = os.fstat(fd)
            lies.append(
                (
                    name,
                    attrs.evolve(
                        good,
                        fd=fd,
                        mode=mst.st_mode,
                        memfd_ino=mst.st_ino,
                        memfd_ctime_ns=mst.st_ctime_ns,
                    ),
                )
            )
        for name, lie in lies:
            _write_slot(rig, n, lie)
            assert _refused(rig.view, st), name
        _write_slot(rig, n, good)
        fd = rig.view.open(st)
        assert fd is not None and read_fd(fd) == f.read_bytes()
        os.close(fd)
    finally:
        os.close(unsealed)
        os.close(half)


def test_an_index_that_could_shrink_is_not_mapped(rig: _Rig, tmp_path: Path) -> None:
    """The index is mapped only when it is a memfd sealed against shrinking: a
    daemon (or whoever answers on its socket) that gave an unsealed one and cut it
    short would kill the reader with SIGBUS at its next lookup, and a file that is
    no memfd (one on a FUSE mount) would make each read of the mapping wait on that
    mount's server. The same bytes as the rig's index, in a memfd that is otherwise
    all a view checks (its size, header, and the daemon's own descriptor of it, here
    this process's): refused, where it was mapped before."""
    fd = rig.index.reader_fd()
    try:
        size = os.fstat(fd).st_size
        data = os.pread(fd, size, 0)
    finally:
        os.close(fd)
    for seals in (0, REQUIRED_SEALS & ~fcntl.F_SEAL_SHRINK):
        copy = os.memfd_create("unsealed-index", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.write(copy, data)
            os.pwrite(copy, struct.pack("<I", copy), 56)  # the header's index_fd
            if seals:
                fcntl.fcntl(copy, fcntl.F_ADD_SEALS, seals)
            with pytest.raises(index_module.BadIndex, match="shrink"):
                IndexView(copy, os.getpid(), rig.index.slots, peer=_ourselves()).close()
        finally:
            os.close(copy)
    plain = tmp_path / "index-on-disk"
    plain.write_bytes(data)
    fd = os.open(plain, os.O_RDWR)
    try:
        os.pwrite(fd, struct.pack("<I", fd), 56)
        with pytest.raises(index_module.BadIndex, match="shrink"):
            IndexView(fd, os.getpid(), rig.index.slots, peer=_ourselves()).close()
    finally:
        os.close(fd)


def test_an_index_cut_short_between_its_size_and_its_seal_is_refused(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """The size a view maps is read once the index is sealed against shrinking, as the
    C client's index_map reads it: read first, the sender could cut the memfd short and
    only then seal it (an unsealed memfd can be truncated and sealed at any time), and
    the view mapped a size the file no longer had. What the sender does between the two
    reads is made to happen there, on a real memfd (os.fstat wrapped to truncate and
    seal it right after the real fstat): refused as an index that could shrink. Before,
    the fstat came first, the seal then passed, and mmap's own size check raised
    ValueError, which Client.index let through to the caller (an Opener's open)."""
    fd = os.memfd_create("shrinking-index", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    real_fstat = os.fstat

    def fstat_then_shrink(f: Any) -> os.stat_result:
        st = real_fstat(f)
        if f == fd:  # the sender, between our size and our seal check
            os.ftruncate(fd, 0)
            fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SHRINK)
        return st

    try:
        os.ftruncate(fd, HEADER + SLOT)
        monkeypatch.setattr(os, "fstat", fstat_then_shrink)
        with pytest.raises(index_module.BadIndex):
            IndexView(fd, os.getpid(), 1, peer=_ourselves()).close()
    finally:
        monkeypatch.undo()
        os.close(fd)


def _view_with_memfd_dev(rig: _Rig, memfd_dev: int) -> IndexView:
    """A view of an index whose header says the daemon's memfds are on *memfd_dev*,
    made as if that were this kernel's memfd device too (the view's own check of the
    header's device is tested alone; here, the checks of each slot after it)."""
    struct.pack_into("<Q", rig.index._map, 24, memfd_dev)  # the header's u64 after 4 u32s
    fd = rig.index.reader_fd()
    try:
        with mock.patch.object(index_module, "own_memfd_dev", lambda: memfd_dev):
            view = IndexView(fd, os.getpid(), rig.index.slots, peer=_ourselves())
    finally:
        os.close(fd)
    assert view.memfd_dev == memfd_dev
    return view


def _fake_stat(slot: Slot) -> os.stat_result:
    """What a caller's fstat would say of the file *slot* is for (the view reads these)."""
    fields = {
        "st_dev": slot.dev,
        "st_ino": slot.ino,
        "st_size": slot.size,
        "st_mtime_ns": slot.mtime_ns,
        "st_ctime_ns": slot.ctime_ns,
    }
    return cast(os.stat_result, SimpleNamespace(**fields))


def _refused_with_header(
    rig: _Rig, fmt: str, offset: int, values: tuple[int, ...], match: str
) -> None:
    """A view of the rig's index with its header's field at *offset* (a *fmt*) set to
    each of *values* in turn is refused (BadIndex matching *match*), nothing left open;
    the field is put back after."""
    real = struct.unpack_from(fmt, rig.index._map, offset)[0]
    before = count_open_fds()
    try:
        for value in values:
            struct.pack_into(fmt, rig.index._map, offset, value)
            fd = rig.index.reader_fd()
            try:
                with pytest.raises(index_module.BadIndex, match=match):
                    IndexView(fd, os.getpid(), rig.index.slots, peer=_ourselves()).close()
            finally:
                os.close(fd)
        assert count_open_fds() == before
    finally:
        struct.pack_into(fmt, rig.index._map, offset, real)


def test_an_index_whose_memfd_device_is_not_the_kernels_is_refused(rig: _Rig) -> None:
    """The header's memfd_dev is the sender's word: a view compares it with the device of
    a memfd of its own, and refuses an index that names any other (a hostile daemon's
    FUSE mount, docs/security.md attack 45), with no descriptor left. Before, the view
    was made and checked each slot's memfd against the header's device."""
    real = rig.index.memfd_dev
    assert index_module.own_memfd_dev() == real == os.fstat(rig.entry(0).file.fd).st_dev
    _refused_with_header(rig, "<Q", 24, (real + 1, real - 1, 0), "memfd device")
    view = _view_with_memfd_dev(rig, real + 1)  # past that check: every slot refused
    try:
        for _, st in rig.files:
            assert _refused(view, st)
    finally:
        view.close()
        struct.pack_into("<Q", rig.index._map, 24, real)


def test_an_index_of_a_layout_this_client_does_not_know_is_refused(rig: _Rig) -> None:
    """The header's layout version is the one this client reads, or the index is
    refused (BadIndex, nothing left open): a reader of layout 1 places files unkeyed,
    and would look for each in the wrong probe run of a layout 2 index."""
    _refused_with_header(rig, "<I", 8, (LAYOUT_VERSION - 1, LAYOUT_VERSION + 1), "layout")


def test_where_a_file_is_placed_depends_on_the_index_key(tmp_path: Path) -> None:
    """slot_of is keyed: the same (dev, ino) starts its probe elsewhere under another
    key (about one in 64 keys agrees, here for 64 slots), and two indexes draw their own
    keys; each index's readers find every file under its key."""
    st = make_file(tmp_path / "f", b"x").stat()
    homes = {slot_of(st.st_dev, st.st_ino, 64, key) for key in range(1000)}
    assert len(homes) == 64  # every slot is some key's
    assert len({slot_of(st.st_dev, ino, 1 << 20, 7) for ino in range(1000)}) > 990
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    caches = [IndexedCache(tmp_path / "a")]
    try:
        caches.append(IndexedCache(tmp_path / "b"))
        assert caches[0].index.key != caches[1].index.key
        for cache in caches:
            assert struct.unpack_from("<Q", cache.index._map, KEY_OFFSET)[0] == cache.index.key
            assert str(cache.index.key) not in repr(cache.index)
            for _, fst in cache.files:
                cache.slot_number(fst)  # found in its probe run under its own key
    finally:
        for cache in caches:
            cache.close()


async def test_an_older_client_takes_no_index_of_this_layout_and_keeps_the_socket(
    start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A client that knows layout 1 only (the layout it reads patched back), against
    today's daemon: Client.index() gives none and every open is served through the
    socket, right bytes; unpatched, the same opens are index hits."""
    d: Daemon = await start_daemon("--racy-window", RACY)
    f = make_file(tmp_path / "lib.so", os.urandom(20_000))
    settle(f)

    def opens() -> tuple[bool, int, int]:
        with Client(d.socket_path, timeout=10) as c:
            for _ in range(2):
                os.close(c.open(f))  # cached
            view = c.index()
            if view is not None:
                view.close()
        opener = Opener(d.socket_path, local_below=0, held_files=0, timeout=10)
        try:
            right = 0
            for _ in range(3):
                fd = opener.open(f)
                right += read_fd(fd) == f.read_bytes()
                os.close(fd)
            return view is not None, right, opener.index_opens
        finally:
            opener.close()

    with trio.fail_after(60):
        monkeypatch.setattr(index_module, "LAYOUT_VERSION", 1)
        old = await in_thread(opens)
        monkeypatch.undo()
        today = await in_thread(opens)
    assert old == (False, 3, 0), old
    assert today[0] and today[1] == 3 and today[2] >= 1, today


def test_a_slot_that_matches_all_but_one_of_the_descriptors_stat_is_refused(
    rig: _Rig, tmp_path: Path
) -> None:
    """Not a regular file, or another size, with every other field right (the slot's
    file is a made-up one whose fstat the caller "took"): refused, no fd left."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fifo_fd = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    memfd = rig.entry(0).file.fd
    try:
        cases = []
        for fd, size in ((fifo_fd, 0), (memfd, os.fstat(memfd).st_size + 1)):
            st = os.fstat(fd)
            slot = Slot(
                0, LIVE, st.st_dev + 1000, 4242, size, 1, 2, fd, st.st_mode, st.st_ino,
                st.st_ctime_ns,
            )  # fmt: skip
            cases.append((st.st_dev, slot))
        # The size as the memfd's own: the control, served.
        mst = os.fstat(memfd)
        right = attrs.evolve(cases[1][1], size=mst.st_size)
        cases.append((mst.st_dev, right))
        answers = []
        taken = set(rig.index._where.values())
        for dev, made_up in cases:
            # A made-up inode whose first slot no real file holds: found there.
            ino = next(
                i
                for i in range(4242, 5242)
                if slot_of(made_up.dev, i, rig.index.slots, rig.index.key) not in taken
            )
            slot = attrs.evolve(made_up, ino=ino)
            n = slot_of(slot.dev, slot.ino, rig.index.slots, rig.index.key)
            view = _view_with_memfd_dev(rig, dev)
            try:
                _write_slot(rig, n, slot)
                answers.append(_refused(view, _fake_stat(slot)))
                _write_slot(rig, n, Slot(0, REMOVED, 0, 0, 0, 0, 0, -1, 0, 0, 0))
            finally:
                view.close()
        assert answers == [True, True, False]  # a FIFO, another size; the memfd itself
    finally:
        os.close(fifo_fd)
        struct.pack_into("<Q", rig.index._map, 24, rig.index.memfd_dev)


def test_a_slot_rewritten_during_the_reopen_is_refused(rig: _Rig) -> None:
    """Its seq read again after the reopen: a slot the daemon rewrote meanwhile is never
    trusted; nothing is left open. Here each rewrite is seen whole (seq from even to the
    next even, the fields as they were), so only the second read of seq can tell."""
    f, st = rig.files[0]
    n = rig.slot_number(st)
    good = read_slot(rig.index._map, n)
    stop = threading.Event()

    def rewrite() -> None:
        seq = good.seq
        while not stop.is_set():
            seq = (seq + 2) & 0xFFFF_FFFE or 2
            _set_seq(rig, n, seq)

    before = count_open_fds()
    thread = threading.Thread(target=rewrite, daemon=True)
    refused = served = 0
    thread.start()
    try:
        deadline = time.monotonic() + 20
        while refused < 20 and time.monotonic() < deadline:
            fd = rig.view.open(st)
            if fd is None:
                refused += 1
            else:
                served += 1
                assert read_fd(fd) == f.read_bytes()
                os.close(fd)
    finally:
        stop.set()
        thread.join(timeout=10)
    assert refused >= 20, (refused, served)  # the rewrites were seen
    assert count_open_fds() == before


def test_the_probe_goes_past_other_and_changing_slots_and_stops_at_a_never_used_one(
    rig: _Rig,
) -> None:
    f, st = rig.files[0]
    n = rig.slot_number(st)
    good = read_slot(rig.index._map, n)
    mask = rig.index.slots - 1
    home = slot_of(st.st_dev, st.st_ino, rig.index.slots, rig.index.key)
    taken = set(rig.index._where.values()) - {n}
    # Two free slots in a row from home on: the file's slot goes to the second.
    k = next(k for k in range(14) if {(home + k) & mask, (home + k + 1) & mask}.isdisjoint(taken))
    first, second = (home + k) & mask, (home + k + 1) & mask
    blank = Slot(0, 0, 0, 0, 0, 0, 0, -1, 0, 0, 0)
    if n not in (first, second):
        _write_slot(rig, n, attrs.evolve(blank, state=REMOVED))
    _write_slot(rig, second, good)
    for i in range(k):  # the slots before: other files', or removed ones, passed over
        if read_slot(rig.index._map, (home + i) & mask).seq == 0:
            _write_slot(rig, (home + i) & mask, attrs.evolve(blank, state=REMOVED))
    before_first = [
        ("another file's", attrs.evolve(good, ino=good.ino + 1)),
        ("another device's", attrs.evolve(good, dev=good.dev + 1)),
        ("removed", attrs.evolve(blank, state=REMOVED)),
    ]
    for name, slot in before_first:
        _write_slot(rig, first, slot)
        fd = rig.view.open(st)
        assert fd is not None, name
        assert read_fd(fd) == f.read_bytes()
        os.close(fd)
    _set_seq(rig, first, read_slot(rig.index._map, first).seq + 1)  # being written: passed
    fd = rig.view.open(st)
    assert fd is not None
    os.close(fd)
    _set_seq(rig, first, 0)  # never used: the file cannot be further on
    assert _refused(rig.view, st)


def test_open_fd_takes_the_fstat_itself(rig: _Rig, tmp_path: Path) -> None:
    for f, _ in rig.files:
        src = os.open(f, os.O_RDONLY)
        try:
            fd = rig.view.open_fd(src)
            assert fd is not None and read_fd(fd) == f.read_bytes()
            os.close(fd)
        finally:
            os.close(src)
    other = make_file(tmp_path / "not-indexed", b"n" * 10)
    src = os.open(other, os.O_RDONLY)
    try:
        before = count_open_fds()
        assert rig.view.open_fd(src) is None
        assert count_open_fds() == before
    finally:
        os.close(src)
    with pytest.raises(OSError):
        rig.view.open_fd(1_000_000)  # not open: fstat fails, as os.fstat does


@needs_c
@pytest.mark.parametrize(
    ("ranged", "ours"),
    [(False, True), (True, True), (True, False)],
    ids=["no-range", "range-of-our-uid", "range-not-trusted"],
)
def test_the_c_and_python_paths_agree_on_every_slot(
    tmp_path: Path, ranged: bool, ours: bool
) -> None:
    """Each field of a slot changed in turn: the same answer from both paths, with no
    range, a range opened at once, and a range not taken at its word."""
    rig = _Rig(tmp_path, ranged=ranged, ours=ours)
    assert bool(rig.view.range) == (ranged and ours)
    c_view = rig.view
    fd = rig.index.reader_fd()
    try:
        saved, saved_holds = index_module.C_CALLS, index_module.C_HOLDS
        index_module.C_CALLS = index_module.C_HOLDS = None
        try:
            py_view = IndexView(fd, os.getpid(), rig.index.slots, peer=rig.peer)
        finally:
            index_module.C_CALLS, index_module.C_HOLDS = saved, saved_holds
    finally:
        os.close(fd)
    assert c_view.in_c and not py_view.in_c
    assert c_view._c_holds is not None and py_view._c_holds is None
    try:
        f, st = rig.files[0]
        n = rig.slot_number(st)
        good = read_slot(rig.index._map, n)
        kept, held = _kept(rig, 0)
        os.close(kept)
        agreed = served = held_too = 0
        for field in attrs.fields(Slot)[1:]:
            value = getattr(good, field.name)
            for changed in {value, value + 1, value - 1, 0, -1, 1 << 31}:
                try:
                    _write_slot(rig, n, attrs.evolve(good, **{field.name: changed}))
                except struct.error:
                    continue  # does not fit the field
                answers = []
                for view in (py_view, c_view):
                    before = count_open_fds()
                    got = view.open(st)
                    if got is None:
                        assert count_open_fds() == before
                    else:
                        assert read_fd(got) == f.read_bytes()
                        os.close(got)
                    answers.append(got is None)
                assert answers[0] == answers[1], (field.name, changed)
                holds = [view.holds(held) for view in (py_view, c_view)]
                assert holds[0] == holds[1], (field.name, changed)
                agreed += 1
                served += not answers[0]
                held_too += holds[0]
        assert agreed > 30 and served > 0 and held_too > 0
    finally:
        py_view.close()
        rig.close()


def test_the_client_takes_the_python_path_where_the_extension_is_missing_or_older() -> None:
    """No extension, or one built before index_open (or for another layout: one of
    layout 1 places files unkeyed), or before its calls took the view's `direct` flag
    (INDEX_CALLS 2): Python."""
    code = """
import sys, types
if sys.argv[1] == "missing":
    sys.modules["shadowd._hotcalls"] = None  # an import of it fails, as when it is not built
else:
    sys.modules["shadowd._hotcalls"] = types.ModuleType("shadowd._hotcalls")  # no index_open
    from shadowd import _hotcalls
    for name in ("statx_nosync", "recv", "send", "reopen", "send_reopened", "answer_hit"):
        setattr(_hotcalls, name, lambda *args: None)
    if sys.argv[1] == "before-direct":  # index_open of 7 arguments, no INDEX_CALLS
        _hotcalls.index_open = _hotcalls.index_open_fd = lambda *args: None
        _hotcalls.INDEX_LAYOUT = (1, 4096, 128)
    if sys.argv[1] in ("before-holds", "layout-1"):  # today's calls, built before index_holds
        _hotcalls.index_open = _hotcalls.index_open_fd = lambda *args: None
        _hotcalls.INDEX_LAYOUT = (1 if sys.argv[1] == "layout-1" else 2, 4096, 128)
        _hotcalls.INDEX_CALLS = 2
    if sys.argv[1] == "layout-1":  # and with index_holds, all for the unkeyed layout
        _hotcalls.index_holds = lambda *args: False
import shadowd_client.index as m
print(m.C_CALLS is None, m.C_HOLDS is None)
"""
    for how in ("missing", "older", "before-direct", "before-holds", "layout-1"):
        out = subprocess.run(
            [sys.executable, "-c", code, how],
            capture_output=True,
            text=True,
            check=True,
            timeout=60,
            env=repo_env(dict(os.environ, SHADOWD_NO_C="")),  # this tree's shadowd_client
        )
        # An extension of today's calls but without index_holds: C hits, Python holds.
        want = ["False", "True"] if how == "before-holds" else ["True", "True"]
        assert out.stdout.split() == want, (how, out.stdout, out.stderr)


def test_a_view_in_a_forked_child_reopens_through_the_childs_own_descriptors(
    rig: _Rig,
) -> None:
    """The child inherits the parent's /proc/self/fd handle; were it used, the reopen of
    the child's O_PATH fd N would open the parent's fd N: here a sealed decoy."""
    f, st = rig.files[0]
    want = f.read_bytes()
    decoy = sealed_from_bytes(b"WRONG" * 700)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its first new fd is the number the parent fills below
        verdict = b"bad"
        try:
            os.read(go_r, 1)
            fd = rig.view.open(st)
            got = b"" if fd is None else os.pread(fd, len(want) + 1, 0)
            verdict = b"ok" if got == want else b"none" if fd is None else b"wrong"
        finally:
            os.write(res_w, verdict)
            os._exit(0)
    try:
        n = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)  # the lowest free number
        os.dup2(decoy.fd, n)  # the decoy, where the child's O_PATH fd will be
        os.write(go_w, b"g")
        verdict = os.read(res_r, 16)
        os.close(n)
    finally:
        os.waitpid(pid, 0)
        for fd in (go_r, go_w, res_r, res_w):
            os.close(fd)
        decoy.release()
    assert verdict == b"ok"
