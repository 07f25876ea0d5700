# The supervisor's open path in Python (shadowd_client.Opener), end to end
# against the daemon as a real subprocess: a miss is copied here while the
# daemon fills its cache, a hit is kept in the process-local tier and reopened
# from it, a changed file is never served from it (nor, once the daemon dropped
# it, a file changed where stat cannot show it), a stopped daemon costs one
# short timeout per backoff window, and preload fills the tier in one batch.
from __future__ import annotations

import fcntl
import functools
import json
import os
import select
import signal
import socket
import threading
import time
from pathlib import Path
from typing import Any

import msgpack
import trio
from shadowd_client import Client, Opener

from shadowd.fds import close_all, fds_from_ancdata
from shadowd.memfd import REQUIRED_SEALS
from shadowd.protocol import (
    ErrorCode,
    ErrorReply,
    Hello,
    HelloReply,
    ServerConnection,
    StatsReply,
    StatsRequest,
)

from .conftest import Daemon, make_file, read_fd, requires_root, settle, spawn_as, test_uid
from .mapped import invalidations, until_invalidated, write_through_a_mapping
from .mounts import tmpfs

RACY = "0.05"


async def in_thread(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args)


def _stat(d: Daemon, name: str) -> int:
    """One figure of the daemon's stats, asked on a connection of our own."""
    with Client(d.socket_path, timeout=10) as c:
        return int(c.stats()[name])


def _cached(d: Daemon, files: list[Path]) -> int:
    """Have the daemon cache *files* (then they are in its index); its index hits so far."""
    with Client(d.socket_path, timeout=10) as c:
        for f in files:
            os.close(c.open(f))
    return _stat(d, "index_hits")


def _until_hit(opener: Opener, path: Path) -> None:
    """Open *path* until the daemon serves it (the first opens are misses it fills)."""
    deadline = time.monotonic() + 10
    before = opener.daemon_opens
    while opener.daemon_opens == before:
        assert time.monotonic() < deadline, "the daemon never served it"
        fd = opener.open(path)
        assert read_fd(fd) == path.read_bytes()
        os.close(fd)
        time.sleep(0.01)


async def test_a_miss_is_copied_here_then_a_hit_is_kept_and_reopened_here(
    start_daemon: Any, tmp_path: Path
) -> None:
    d: Daemon = await start_daemon("--racy-window", RACY)

    def work() -> None:
        with (
            Client(d.socket_path, timeout=10) as c,
            Opener(d.socket_path, local_below=0, use_index=False) as opener,
        ):
            misses = c.stats()["misses"]
            f = make_file(tmp_path / "lib.so", os.urandom(300_000), 0o755)
            settle(f)
            fd = opener.open(f)  # a miss: copied here, the daemon fills meanwhile
            # Younger than the 1 s the Opener assumes until a hello says the
            # daemon's window (50 ms): it heard the hello first, then asked.
            assert time.time_ns() - f.stat().st_ctime_ns < 1_000_000_000
            assert read_fd(fd) == f.read_bytes()
            os.close(fd)
            assert (opener.local_opens, opener.daemon_opens) == (1, 0)
            assert c.stats()["misses"] == misses + 1  # asked, not copied by the age rule
            _until_hit(opener, f)
            hits = c.stats()["hits"]
            for _ in range(3):  # the tier: no request reaches the daemon
                fd = opener.open(f)
                assert read_fd(fd) == f.read_bytes()
                assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
                assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
                assert os.fstat(fd).st_mode & 0o777 == 0o555  # executable, as the source
                other = opener.open(f)
                os.lseek(fd, 100, os.SEEK_SET)  # its own offset
                assert os.lseek(other, 0, os.SEEK_CUR) == 0
                os.close(other)
                os.close(fd)
            assert opener.held_opens == 6
            assert c.stats()["hits"] == hits

    with trio.fail_after(60):
        await in_thread(work)


async def test_a_rewrite_in_place_with_the_old_mtime_is_never_served_from_the_tier(
    start_daemon: Any, tmp_path: Path
) -> None:
    d: Daemon = await start_daemon("--racy-window", RACY)
    f = make_file(tmp_path / "conf", b"old contents: " + os.urandom(300_000))
    settle(f)

    def work() -> None:
        with Opener(d.socket_path, local_below=0, use_index=False) as opener:
            _until_hit(opener, f)
            fd = opener.open(f)
            os.close(fd)
            assert opener.held_opens == 1
            st = f.stat()
            new = b"new contents: " + os.urandom(300_000)
            with open(f, "r+b") as w:  # same size, in place
                w.write(new)
            os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime put back
            assert f.stat().st_size == st.st_size and f.stat().st_mtime_ns == st.st_mtime_ns
            fd = opener.open(f)
            assert read_fd(fd) == new
            os.close(fd)
            assert opener.held_opens == 1  # not from the tier

    with trio.fail_after(60):
        await in_thread(work)


async def test_a_stopped_daemon_costs_one_short_timeout_not_seconds_per_open(
    start_daemon: Any, tmp_path: Path
) -> None:
    d: Daemon = await start_daemon("--racy-window", RACY)
    f = make_file(tmp_path / "lib.so", os.urandom(300_000))
    settle(f)
    os.kill(d.pid, signal.SIGSTOP)
    try:

        def work() -> tuple[float, float, int]:
            started = time.monotonic()
            with Opener(d.socket_path, local_below=0) as opener:
                for _ in range(100):
                    fd = opener.open(f)
                    assert read_fd(fd) == f.read_bytes()
                    os.close(fd)
                return opener.waited, time.monotonic() - started, opener.local_opens

        with trio.fail_after(60):
            waited, elapsed, local = await in_thread(work)
    finally:
        os.kill(d.pid, signal.SIGCONT)
    assert local == 100
    assert waited < 1.0, f"waited {waited:.2f}s on the stopped daemon ({elapsed:.2f}s in all)"


async def test_after_a_dropped_connection_the_opener_routes_by_the_daemons_last_limits(
    start_daemon: Any, tmp_path: Path
) -> None:
    """A reply too late drops the connection (the breaker opens for its window). After
    the window, the first open still routes by what the daemon's hello said, not by the
    defaults: a file above its --max-file-size is copied here without asking (before:
    asked, on a new connection, and refused file-too-large)."""
    d: Daemon = await start_daemon("--racy-window", RACY, "--max-file-size", "100000")
    small = make_file(tmp_path / "small.so", os.urandom(50_000))
    large = make_file(tmp_path / "large.so", os.urandom(150_000))
    # Older than the 1 s window the Opener assumes before a hello (it would say
    # hello first to learn the daemon's own).
    await trio.sleep(1.05)

    def refused() -> int:
        with Client(d.socket_path, timeout=10) as c:
            return int(c.stats()["refused_by_code"].get("file-too-large", 0))

    def opened(opener: Opener, f: Path) -> None:
        fd = opener.open(f)
        assert read_fd(fd) == f.read_bytes()
        os.close(fd)

    with trio.fail_after(60):
        opener = Opener(d.socket_path, local_below=0, use_index=False, timeout=0.25)
        opener.retry_after = 0.05
        try:
            await in_thread(opened, opener, small)  # a hello: the daemon's limits
            await in_thread(opened, opener, large)  # copied here unasked
            assert (opener.daemon_opens, opener.local_opens) == (0, 2)  # (a miss, then this)
            os.kill(d.pid, signal.SIGSTOP)
            try:
                await in_thread(opened, opener, small)  # no answer in time: dropped
            finally:
                os.kill(d.pid, signal.SIGCONT)
            await trio.sleep(0.1)  # past the breaker's window
            before = await in_thread(refused)
            await in_thread(opened, opener, large)
            after = await in_thread(refused)
        finally:
            opener.close()
    assert opener.local_opens == 4
    assert after == before, "the daemon was asked for a file its hello said it refuses"


async def test_preload_fills_the_tier_in_one_round_trip(start_daemon: Any, tmp_path: Path) -> None:
    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"lib{i}.so", os.urandom(300_000 + i)) for i in range(5)]
    small = make_file(tmp_path / "small", b"below local_below: never asked")
    settle(*files, small)

    def work() -> None:
        with Opener(d.socket_path, use_index=False) as opener:
            assert opener.preload([*files, small, tmp_path / "missing"]) == 0  # cold: misses
            deadline = time.monotonic() + 10
            while opener.preload(files) < len(files):  # filled meanwhile
                assert time.monotonic() < deadline
                time.sleep(0.02)
            with Client(d.socket_path, timeout=10) as c:
                hits = c.stats()["hits"]
                for f in files:
                    fd = opener.open(f)
                    assert read_fd(fd) == f.read_bytes()
                    os.close(fd)
                assert opener.held_opens == len(files) and c.stats()["hits"] == hits

    with trio.fail_after(60):
        await in_thread(work)


PAGE = 4096
MAPPED_SIZE = 4 * PAGE


def _held(opener: Opener, f: Path, data: bytes) -> None:
    """Preload *f* until the tier holds it (the daemon has it cached), then open it
    once from the tier: *data*."""
    deadline = time.monotonic() + 10
    while opener.preload([f]) < 1:
        assert time.monotonic() < deadline, "the daemon never cached it"
        time.sleep(0.01)
    held = opener.held_opens
    fd = opener.open(f)
    assert read_fd(fd) == data
    os.close(fd)
    assert opener.held_opens == held + 1  # from the tier


async def test_an_opener_nobody_closes_gives_its_tiers_descriptors_back_once_collected(
    start_daemon: Any, tmp_path: Path
) -> None:
    """An Opener dropped without close() (its caller forgot it): once collected, this
    process has exactly the descriptors it had before the Opener was made. Its
    process-local tier held one memfd per kept file as a bare number that nothing but
    close() released: they stayed open for the life of the process. Closed, the tier's
    holders are -1 (a use fails, never reaches a number reused since)."""
    import gc
    import weakref

    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"lib{i}.so", os.urandom(300_000 + i)) for i in range(3)]
    settle(*files)

    def fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    def filled() -> tuple[weakref.ref[Opener], list[Any]]:
        opener = Opener(d.socket_path, use_index=False, timeout=10)
        deadline = time.monotonic() + 10
        while opener.preload(files) < len(files):  # the daemon fills its cache meanwhile
            assert time.monotonic() < deadline, "the daemon never cached them"
            time.sleep(0.01)
        held = [h.fd for h in opener._held._held.values()]
        assert len(held) == len(files) and all(h.fd >= 0 for h in held)
        return weakref.ref(opener), held

    def work() -> None:
        before = fds()
        gone, held = filled()
        gc.collect()
        assert gone() is None
        assert fds() == before, "the tier's memfds outlived their Opener"
        assert [h.fd for h in held] == [-1] * len(files)
        # And close() gives the same back, once (a second close does nothing).
        opener = Opener(d.socket_path, use_index=False, timeout=10)
        _held(opener, files[0], files[0].read_bytes())
        opener.close()
        assert fds() == before
        opener.close()
        assert fds() == before

    with trio.fail_after(60):
        await in_thread(work)


async def test_index_hits_a_report_could_not_carry_are_kept_until_one_does(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The connection dropped (a reply too late) while the daemon is stopped: the report
    due then cannot reach it (its new connection's hello is not answered), and its hits
    are kept, not lost, and go with a later report to the same daemon once it answers.
    Before, they were taken out of the count before the report was sent, and lost with
    it: the daemon never counted them. Every index hit ends up in the daemon's
    index_hits, none twice."""
    d: Daemon = await start_daemon("--racy-window", RACY)
    f = make_file(tmp_path / "lib.so", os.urandom(300_000))
    g = make_file(tmp_path / "other.so", os.urandom(300_000))
    settle(f, g)

    index_hits = functools.partial(_stat, d, "index_hits")

    def hits(opener: Opener, n: int) -> None:
        for _ in range(n):
            fd = opener.open(f)
            os.close(fd)

    def work() -> tuple[int, tuple[int, int], int]:
        base = _cached(d, [f])  # in the daemon's index; its index hits so far
        opener = Opener(d.socket_path, local_below=0, held_files=0, timeout=0.25, retry_after=0.05)
        try:
            hits(opener, 100)
            assert opener.index_opens == 100
            os.kill(d.pid, signal.SIGSTOP)
            try:
                fd = opener.open(g)  # not in the index: asked, no answer in time: dropped
                os.close(fd)
                time.sleep(0.1)  # past the breaker's window
                hits(opener, 300)  # a report due (256 hits): no daemon answers it
            finally:
                os.kill(d.pid, signal.SIGCONT)
            stopped = opener.index_opens, opener.local_opens
            time.sleep(0.3)  # past the breaker's window again
            hits(opener, 300)  # a report due: to the same daemon, on a new connection
        finally:
            opener.close()  # the last report
        return base, stopped, opener.index_opens

    with trio.fail_after(60):
        base, stopped, served = await in_thread(work)
        # Hits while the daemon was stopped, and the report due among them tried (its
        # hello not answered, the breaker opened: the opens after it were copied).
        assert stopped[0] >= 256 and stopped[1] > 1, stopped
        deadline = time.monotonic() + 10
        while (told := await in_thread(index_hits) - base) < served:
            assert time.monotonic() < deadline, f"the daemon counted {told} of {served} hits"
            await trio.sleep(0.02)
    assert told == served


async def test_close_sends_the_last_report_without_waiting_for_its_answer(
    start_daemon: Any, tmp_path: Path
) -> None:
    """An Opener's close costs no round trip for its statistics: with the daemon
    stopped and a reply timeout of 20 s, close returns at once after sending the last
    report, and the daemon, continued, counts every hit of it."""
    d: Daemon = await start_daemon("--racy-window", RACY)
    f = make_file(tmp_path / "lib.so", os.urandom(300_000))
    settle(f)

    index_hits = functools.partial(_stat, d, "index_hits")

    def work() -> tuple[int, float, int]:
        base = _cached(d, [f])  # in the daemon's index; its index hits so far
        opener = Opener(d.socket_path, local_below=0, held_files=0, timeout=20)
        for _ in range(7):  # fewer than a report's 256: none sent yet
            os.close(opener.open(f))
        os.kill(d.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            opener.close()
            took = time.monotonic() - started
        finally:
            os.kill(d.pid, signal.SIGCONT)
        return base, took, opener.index_opens

    with trio.fail_after(60):
        base, took, served = await in_thread(work)
        deadline = time.monotonic() + 10
        while (told := await in_thread(index_hits) - base) < served:
            assert time.monotonic() < deadline, f"the daemon counted {told} of {served} hits"
            await trio.sleep(0.02)
    assert served == 7 and told == 7
    assert took < 10, took  # before: the 20 s timeout, waiting for the stopped daemon


async def test_a_last_report_in_several_requests_to_a_stopped_daemon_loses_none(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The last report of an Opener's close takes three requests under a 1 KiB
    --max-request (35 files each), and the daemon is stopped. Every request is sent
    before any answer is waited for; the wait (one reply timeout) ends, the Opener
    closes, and the daemon, continued, counts every hit: the requests behind the answer
    that fails (its client gone) are counted at the connection's end. Before, the
    close sent the first, waited for its answer in vain, and never sent the others."""
    d: Daemon = await start_daemon("--racy-window", RACY, "--max-request", "1024")
    files = [make_file(tmp_path / f"f{i}", os.urandom(100 + i)) for i in range(100)]
    settle(*files)

    index_hits = functools.partial(_stat, d, "index_hits")

    def work() -> tuple[int, int]:
        base = _cached(d, files)  # in the daemon's index; its index hits so far
        opener = Opener(d.socket_path, local_below=0, held_files=0, timeout=0.5)
        for f in files:  # fewer than a report's 256 hits: none sent yet
            os.close(opener.open(f))
        os.kill(d.pid, signal.SIGSTOP)
        try:
            opener.close()
        finally:
            os.kill(d.pid, signal.SIGCONT)
        return base, opener.index_opens

    with trio.fail_after(60):
        base, served = await in_thread(work)
        deadline = time.monotonic() + 5
        while (told := await in_thread(index_hits) - base) < served:
            if time.monotonic() > deadline:
                break
            await trio.sleep(0.02)
    assert served == 100 and told == served, (served, told)


async def test_hits_past_the_report_table_of_256_files_are_kept_as_hits_of_no_file(
    start_daemon: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """The Opener keeps the hits of at most 256 files apart (REPORT_FILES) until a report
    carries them. A report of 256 files (in requests of 35 under a 1 KiB --max-request)
    waits for a stopped daemon's answer to its first request, in vain; meanwhile 255
    index hits of other files fill the table again. What the report did not send is
    merged back: the table keeps 256 files and the hits of the rest are kept as file
    (0, 0). Once the daemon answers again, it is told every hit: its index_hits ends
    equal to the Opener's index opens, those of no file included."""
    from shadowd_client import opener as opener_module
    from shadowd_client.opener import REPORT_FILES

    # A report is due at the 256th hit, and at none before: not also a second after
    # the last (the Opener's made, the report that waits begun), which a slow moment
    # among the hits below reached now and then. A report due then, with the daemon
    # stopped, waited too: the hits after it were copies (the breaker open), never
    # index opens.
    monkeypatch.setattr(opener_module, "REPORT_EVERY_SECONDS", 3600.0)
    d: Daemon = await start_daemon("--racy-window", RACY, "--max-request", "1024")
    files = [make_file(tmp_path / f"f{i}", os.urandom(100 + i)) for i in range(511)]
    settle(*files)
    per = (1024 - 32) // 28  # files in one report request (Session.max_report)

    index_hits = functools.partial(_stat, d, "index_hits")

    def hits(opener: Opener, some: list[Path]) -> None:
        for f in some:
            os.close(opener.open(f))

    def work() -> tuple[int, int, int, int]:
        base = _cached(d, files)  # in the daemon's index; its index hits so far
        opener = Opener(d.socket_path, local_below=0, held_files=0, timeout=5, retry_after=0.05)
        try:
            hits(opener, files[:1])  # its connection and the index, from the daemon
            assert opener.index_opens == 1
            os.kill(d.pid, signal.SIGSTOP)
            try:
                # The 256th hit's report waits for the stopped daemon (5 s: the 255
                # hits below, a few milliseconds, come while it waits).
                first = threading.Thread(target=hits, args=(opener, files[1:256]))
                first.start()
                deadline = time.monotonic() + 10
                while opener.index_opens < 256 or opener._unreported:  # sent, then taken
                    assert time.monotonic() < deadline, opener.index_opens
                    time.sleep(0.001)
                hits(opener, files[256:])  # 255 more files while it waits
                assert opener.index_opens == 511
                first.join(30)
                assert not first.is_alive()
                table, spilled = len(opener._unreported), opener._spilled
            finally:
                os.kill(d.pid, signal.SIGCONT)
            time.sleep(0.2)  # past the breaker's window
        finally:
            opener.close()  # the last report: every hit kept
        return base, opener.index_opens, table, spilled

    with trio.fail_after(90):
        base, served, table, spilled = await in_thread(work)
        deadline = time.monotonic() + 10
        while (told := await in_thread(index_hits) - base) < served:
            assert time.monotonic() < deadline, f"the daemon counted {told} of {served} hits"
            await trio.sleep(0.02)
    assert table == REPORT_FILES and spilled == (256 - per) + 255 - REPORT_FILES, (table, spilled)
    assert served == 511 and told == served, (served, told)


async def test_a_report_is_split_to_fit_the_daemons_max_request(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Hits of 256 files (the Opener's table) and more (counted together) do not fit
    one request of a daemon whose --max-request is 1 KiB: the report goes in several,
    and the daemon counts every hit. Before, the one request was refused and the hits
    were lost."""
    d: Daemon = await start_daemon("--racy-window", RACY, "--max-request", "1024")
    files = []
    for i in range(300):
        files.append(make_file(tmp_path / f"f{i}", os.urandom(100 + i)))
    settle(*files)

    index_hits = functools.partial(_stat, d, "index_hits")

    def work() -> tuple[int, int]:
        base = _cached(d, files)  # in the daemon's index; its index hits so far
        with Opener(d.socket_path, local_below=0, held_files=0, timeout=10) as opener:
            for f in files:
                os.close(opener.open(f))
            served = opener.index_opens
        return base, served

    with trio.fail_after(60):
        base, served = await in_thread(work)
        deadline = time.monotonic() + 10
        while (told := await in_thread(index_hits) - base) < served:
            assert time.monotonic() < deadline, f"the daemon counted {told} of {served} hits"
            await trio.sleep(0.02)
    assert served == 300 and told == 300


async def test_a_split_report_whose_first_answer_is_late_keeps_the_rest(
    start_daemon: Any, tmp_path: Path
) -> None:
    """A report of 200 files goes in several requests to a daemon whose --max-request
    is 1 KiB; the daemon is stopped, so the first request's answer comes too late
    (the breaker opens). The requests after it were never sent: their hits are kept
    and go with a later report to the same daemon, which counts every hit. Before,
    they were taken out of the count and dropped with the late answer: the daemon,
    alive all along, never counted them."""
    d: Daemon = await start_daemon("--racy-window", RACY, "--max-request", "1024")
    files = [make_file(tmp_path / f"f{i}", os.urandom(100 + i)) for i in range(200)]
    settle(*files)

    index_hits = functools.partial(_stat, d, "index_hits")

    def work() -> tuple[int, int, int]:
        base = _cached(d, files)  # in the daemon's index; its index hits so far
        opener = Opener(d.socket_path, local_below=0, held_files=0, timeout=0.25, retry_after=0.05)
        try:
            for f in files:  # 200 hits: fewer than a report's 256
                os.close(opener.open(f))
            os.kill(d.pid, signal.SIGSTOP)
            try:
                time.sleep(1.05)  # a report is due at the next hit (a second since the last)
                os.close(opener.open(files[0]))  # the report's first answer: too late
            finally:
                os.kill(d.pid, signal.SIGCONT)
            late = opener.index_opens
            time.sleep(0.2)  # past the breaker's window
            os.close(opener.open(files[1]))  # a new connection to the same daemon
        finally:
            opener.close()  # the last report
        return base, late, opener.index_opens

    with trio.fail_after(60):
        base, late, served = await in_thread(work)
        deadline = time.monotonic() + 10
        while (told := await in_thread(index_hits) - base) < served:
            if time.monotonic() > deadline:
                break
            await trio.sleep(0.02)
    assert (late, served) == (201, 202)
    assert told == served, f"the daemon counted {told} of {served} hits"


@requires_root
async def test_the_tier_of_an_index_peer_serves_a_change_stat_cannot_show_at_once(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Written through a shared mapping on tmpfs (no time changes): once the daemon
    counted the invalidation, the next open is not served from the tier. The tier's
    bound is an hour here: only the daemon's index can have said so."""
    d: Daemon = await start_daemon("--racy-window", "0")

    def work(fs: Path) -> None:
        old, new = b"a" * MAPPED_SIZE, b"b" * PAGE + b"a" * (MAPPED_SIZE - PAGE)
        f = make_file(fs / "lib.so", old)
        with Client(d.socket_path, timeout=10) as c:
            view = c.index()
            assert view is not None  # root, as the daemon: a peer that reads its index
            view.close()
        with Opener(d.socket_path, local_below=0) as opener:
            opener.held_recheck = 3600.0
            _held(opener, f, old)
            before = invalidations(d.socket_path)
            write_through_a_mapping(f, new[:PAGE])
            until_invalidated(d.socket_path, before)
            held = opener.held_opens
            fd = opener.open(f)
            got = read_fd(fd)
            os.close(fd)
            assert got == new, "the tier served the bytes the daemon had dropped"
            assert opener.held_opens == held

    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        await in_thread(work, fs)


@requires_root
async def test_a_forked_childs_tier_serves_a_change_stat_cannot_show_at_once_too(
    start_daemon: Any, shared_dir: Path
) -> None:
    """The tier an Opener's process forks with is the child's too (the same memfds):
    the child's held hits are checked against the daemon's index as the parent's are
    (the bound an hour: only the index can end it)."""
    d: Daemon = await start_daemon("--racy-window", "0")

    def work(fs: Path) -> int:
        old, new = b"a" * MAPPED_SIZE, b"b" * PAGE + b"a" * (MAPPED_SIZE - PAGE)
        f = make_file(fs / "lib.so", old)
        with Opener(d.socket_path, local_below=0) as opener:
            opener.held_recheck = 3600.0
            _held(opener, f, old)
            child_reads, parent_writes = os.pipe()
            parent_reads, child_writes = os.pipe()
            pid = os.fork()
            if pid == 0:
                code = 1
                try:
                    os.close(parent_writes)
                    os.close(parent_reads)
                    held = opener.held_opens
                    fd = opener.open(f)
                    first = read_fd(fd)
                    os.close(fd)
                    os.write(child_writes, b"1")
                    os.read(child_reads, 1)  # changed, and the daemon dropped it
                    fd = opener.open(f)
                    after = read_fd(fd)
                    os.close(fd)
                    # 0: held with the old bytes, then the new ones not from the tier
                    ok = (first, after, opener.held_opens) == (old, new, held + 1)
                    code = 0 if ok else 3
                finally:
                    os._exit(code)
            os.close(child_reads)
            os.close(child_writes)
            try:
                if os.read(parent_reads, 1) == b"1":
                    before = invalidations(d.socket_path)
                    write_through_a_mapping(f, new[:PAGE])
                    until_invalidated(d.socket_path, before)
                os.write(parent_writes, b"1")
            finally:
                os.close(parent_writes)
                os.close(parent_reads)
            _, status = os.waitpid(pid, 0)
            return os.waitstatus_to_exitcode(status)

    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        code = await in_thread(work, fs)
    assert code == 0, "the child's tier served the bytes the daemon had dropped (3)"


@requires_root
async def test_a_restarted_daemons_index_never_vouches_for_the_old_daemons_memfd(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Held from one daemon, which is killed; the file is changed through a mapping
    meanwhile (nobody sees it) and the next daemon caches the new bytes, in the same
    version by stat. Once the Opener reads the new daemon's index, that index names
    another memfd: the tier's is dropped (its bound is an hour: only the index
    decides)."""
    first: Daemon = await start_daemon("--racy-window", "0", socket_name="r.sock")
    old, new = b"a" * MAPPED_SIZE, b"b" * PAGE + b"a" * (MAPPED_SIZE - PAGE)

    def hold(fs: Path, opener: Opener) -> tuple[Path, Path]:
        f = make_file(fs / "lib.so", old)
        other = make_file(fs / "other.so", b"o" * MAPPED_SIZE)
        opener.held_recheck = 3600.0
        _held(opener, f, old)
        return f, other

    def after_restart(opener: Opener, f: Path, other: Path) -> tuple[bytes, int]:
        with Client(first.socket_path, timeout=10) as c:  # the new daemon caches f anew
            deadline = time.monotonic() + 10
            while True:
                fd = c.open(f)
                hit = c.stats()["hits"] > 0
                assert read_fd(fd) == new
                os.close(fd)
                if hit:
                    break
                assert time.monotonic() < deadline
                time.sleep(0.01)
        for _ in range(3):  # another file: the Opener reconnects, then takes the new index
            os.close(opener.open(other))
        indexed = opener.index_opens
        held = opener.held_opens
        fd = opener.open(f)
        got = read_fd(fd)
        os.close(fd)
        assert opener.held_opens == held, "served from the tier"
        return got, opener.index_opens - indexed

    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        opener = Opener(first.socket_path, local_below=0, retry_after=0.05)
        try:
            f, other = await in_thread(hold, fs, opener)
            first.kill()
            await in_thread(write_through_a_mapping, f, new[:PAGE])
            await start_daemon("--racy-window", "0", socket_name="r.sock")
            got, from_index = await in_thread(after_restart, opener, f, other)
        finally:
            opener.close()
    assert got == new, "the old daemon's memfd was served after the new index named another"
    assert from_index == 1  # the new daemon's own memfd, through its index


@requires_root
async def test_a_killed_daemons_index_vouches_for_nothing_past_the_bound(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Held from a daemon that is then killed: its index stays mapped, but no longer
    changes. A change through a mapping after that is seen by nobody; the tier serves
    the memfd at most the bound (0.3 s) after it last saw the daemon alive, then the
    open is copied here (the breaker is open)."""
    d: Daemon = await start_daemon("--racy-window", "0")
    bound = 0.3

    def work(fs: Path) -> tuple[bytes, int, int]:
        old = b"a" * MAPPED_SIZE
        f = make_file(fs / "lib.so", old)
        with Opener(d.socket_path, local_below=0) as opener:
            opener.held_recheck = bound
            _held(opener, f, old)
            d.kill()
            write_through_a_mapping(f, b"b" * PAGE)
            time.sleep(bound + 0.05)
            held, local = opener.held_opens, opener.local_opens
            fd = opener.open(f)
            got = read_fd(fd)
            os.close(fd)
            return got, opener.held_opens - held, opener.local_opens - local

    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        got, held, local = await in_thread(work, fs)
    assert got[:PAGE] == b"b" * PAGE, "the tier served what the gone daemon had"
    assert (held, local) == (0, 1)  # copied here: the daemon is gone


# In a pid namespace of its own (unshare), where the daemon's pid names another
# process: a decoy made with that pid (ns_last_pid), holding a descriptor at
# the number the index header gives for the daemon's own descriptor of it.
_DECOY_AT_THE_DAEMONS_PID = """
import json, os, sys, time
from shadowd_client import Opener
sock, path, dpid, index_fd, bound = sys.argv[1:6]
dpid, index_fd, bound = int(dpid), int(index_fd), float(bound)
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(dpid - 1))
ready_r, ready_w = os.pipe()
hold_r, hold_w = os.pipe()
decoy = os.fork()
if decoy == 0:
    os.dup2(hold_r, index_fd)
    os.write(ready_w, b"x")
    os.read(hold_r, 1)  # killed when pid 1 exits
    os._exit(0)
os.read(ready_r, 1)
data = open(path, "rb").read()
opener = Opener(sock, local_below=0)
opener.held_recheck = bound
deadline = time.monotonic() + 10
while opener.preload([path]) < 1:
    assert time.monotonic() < deadline, "the daemon never cached it"
    time.sleep(0.01)
fd = opener.open(path)
assert os.pread(fd, len(data), 0) == data and opener.held_opens == 1
os.close(fd)
print(json.dumps([decoy, opener._index is not None and opener._index.view is not None]))
sys.stdout.flush()
sys.stdin.readline()  # the daemon killed, the file changed through a mapping
time.sleep(bound + 0.05)
fd = opener.open(path)
got = os.pread(fd, 4096, 0)
os.close(fd)
print(json.dumps([got.decode(), opener.held_opens - 1, opener.local_opens]))
"""


@requires_root
async def test_a_killed_daemons_index_does_not_vouch_through_another_process_of_its_pid(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Review 22: a client in another pid namespace (a container's supervisor with
    the host's socket) reads /proc/PID of its own namespace for the daemon's pid,
    where PID is another process. With no descriptor range in the index (a daemon
    under a low fd limit keeps none) the view was made without looking whether
    /proc/PID is the daemon, and its liveness was a look at whether that process had
    *some* descriptor at the index's number: a decoy holding one kept a killed
    daemon's index vouching for the tier past the bound, for good (the old bytes
    after a change through a mapping). Now /proc/PID must hold the index itself,
    at the view's making and at each look: the tier goes by the bound, and the
    open after it is copied here."""
    # 300 descriptors: too few for the index's descriptor range (fdrange.py).
    d: Daemon = await start_daemon("--racy-window", "0", nofile=(300, 300))
    bound = 0.3

    def work(fs: Path) -> tuple[int, bool, str, int, int]:
        import subprocess
        import sys

        from .conftest import repo_env

        old = b"a" * MAPPED_SIZE
        f = make_file(fs / "lib.so", old)
        with Client(d.socket_path, timeout=10) as c:
            view = c.index()
            assert view is not None and not view.header_range  # no range: the case
            index_fd = view.index_fd
            view.close()
        with subprocess.Popen(
            [
                *("unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c"),
                *(_DECOY_AT_THE_DAEMONS_PID, str(d.socket_path), str(f), str(d.pid)),
                *(str(index_fd), str(bound)),
            ],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=repo_env(),
        ) as child:
            try:
                assert child.stdout is not None and child.stdin is not None
                line = child.stdout.readline()
                assert line, child.communicate(timeout=10)
                decoy, had_view = json.loads(line)
                d.kill()
                write_through_a_mapping(f, b"b" * PAGE)
                child.stdin.write("go\n")
                child.stdin.flush()
                line = child.stdout.readline()
                assert line, child.communicate(timeout=10)
                got, held, local = json.loads(line)
                assert child.wait(10) == 0
            finally:
                if child.poll() is None:
                    child.kill()
                    child.wait()
        return decoy, had_view, got, held, local

    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        decoy, had_view, got, held, local = await in_thread(work, fs)
    assert decoy == d.pid  # the daemon's pid names the decoy there
    assert got[:PAGE] == "b" * PAGE, "the tier served what the gone daemon had"
    assert (held, local) == (0, 1), (had_view, held, local)


async def test_without_the_index_the_tier_asks_again_past_its_bound_and_keeps_the_same_memfd(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Nothing changed: past the bound (0.2 s) the first open is the daemon's, which
    serves the memfd already held; the tier then serves it again, vouched for anew."""
    d: Daemon = await start_daemon("--racy-window", RACY)
    f = make_file(tmp_path / "lib.so", os.urandom(300_000))
    settle(f)

    def work() -> list[tuple[str, int]]:
        with Opener(d.socket_path, local_below=0, use_index=False) as opener:
            opener.held_recheck = 0.2
            _held(opener, f, f.read_bytes())
            time.sleep(0.25)
            routes = []
            for _ in range(3):
                held, daemon = opener.held_opens, opener.daemon_opens
                fd = opener.open(f)
                assert read_fd(fd) == f.read_bytes()
                ino = os.fstat(fd).st_ino
                os.close(fd)
                route = "held" if opener.held_opens > held else "daemon"
                assert opener.daemon_opens == daemon + (route == "daemon")
                routes.append((route, ino))
            return routes

    with trio.fail_after(30):
        routes = await in_thread(work)
    assert [r for r, _ in routes] == ["daemon", "held", "held"], routes
    assert len({ino for _, ino in routes}) == 1  # the same memfd throughout


HELD_ELSEWHERE = """
import time
from shadowd_client import Client, Opener
opener = Opener({sock!r}, local_below=0)
opener.held_recheck = {bound!r}
with Client({sock!r}, timeout=10) as c:
    given = c.index() is not None
deadline = time.monotonic() + 10
while opener.preload([{path!r}]) < 1 and time.monotonic() < deadline:
    time.sleep(0.01)
kept = time.monotonic()
def one():
    held = opener.held_opens
    fd = opener.open({path!r})
    size = os.fstat(fd).st_size
    data = os.pread(fd, size, 0)
    os.close(fd)
    return {{"first": data[:1].decode(), "held": opener.held_opens - held}}
out({{"index": given, **one()}})
recv()  # the file was changed, and the daemon dropped it
time.sleep(max(0.0, kept + {bound!r} - time.monotonic()))
after = one()
deadline = time.monotonic() + 10
again = one()
while not again["held"] and time.monotonic() < deadline:  # the daemon caches it anew
    time.sleep(0.01)
    again = one()
out({{"after": after, "again": again}})
"""


@requires_root
async def test_the_tier_of_another_uid_serves_a_change_stat_cannot_show_after_its_bound(
    start_daemon: Any, shared_dir: Path
) -> None:
    """As above for a peer of another uid (no index): the first open past its bound
    (0.3 s here) asks the daemon again; what the daemon caches anew is held again."""
    d: Daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    bound = 0.3

    def work(fs: Path) -> tuple[dict[str, Any], dict[str, Any]]:
        f = make_file(fs / "lib.so", b"a" * MAPPED_SIZE)
        code = HELD_ELSEWHERE.format(sock=str(d.socket_path), path=str(f), bound=bound)
        with spawn_as(test_uid(0), code) as child:
            first = child.recv()
            before = invalidations(d.socket_path)
            write_through_a_mapping(f, b"b" * PAGE)
            until_invalidated(d.socket_path, before)
            child.send("changed")
            return first, child.recv()

    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        first, later = await in_thread(work, fs)
    assert first == {"index": False, "first": "a", "held": 1}  # no index; held, the old bytes
    assert later["after"] == {"first": "b", "held": 0}, "the tier served the dropped bytes"
    assert later["again"] == {"first": "b", "held": 1}  # held again: the new memfd


def test_a_daemon_that_speaks_only_version_1_is_spoken_to_in_version_1(tmp_path: Path) -> None:
    """A stand-in daemon of protocol version 1: the client says 2, is refused, says 1."""
    path = tmp_path / "v1.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    said: list[int] = []

    def daemon() -> None:
        for _ in range(2):
            conn, _ = listener.accept()
            with conn:
                proto = ServerConnection()
                while True:
                    data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(4 * 8))
                    close_all(fds_from_ancdata(anc))
                    if not data:
                        break
                    msg = msgpack.unpackb(data)
                    if msg.get("op") == "hello":
                        said.append(msg["version"])
                        if msg["version"] != 1:
                            reply: Any = ErrorReply(
                                id=msg["id"], code=ErrorCode.UNSUPPORTED_VERSION, message="1 only"
                            )
                            conn.send(proto.send(reply)[0])
                            break
                        event = proto.receive(data)
                        assert isinstance(event, Hello)
                        conn.send(proto.send(HelloReply(id=event.id, version=1, server="v1"))[0])
                    else:
                        event = proto.receive(data)
                        assert isinstance(event, StatsRequest)
                        conn.send(proto.send(StatsReply(id=event.id, stats={"hits": 7}))[0])
                        return

    thread = threading.Thread(target=daemon, daemon=True)
    thread.start()
    try:
        with Client(path, timeout=5) as c:
            assert c.stats() == {"hits": 7}
            assert c.version == 1
    finally:
        thread.join(timeout=10)
        listener.close()
    assert said == [2, 1]


async def test_misses_that_do_not_wait_are_all_filled_past_the_copy_slots(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Batches of misses that do not wait, many more than the uid's copy slots: each is
    told "filling" and each is cached, without being asked again, and nothing is held
    once the fills are done. (Past the queue's bound a miss says it is not filling:
    tests/test_filling.py, with the copy slots held.)"""
    d: Daemon = await start_daemon("--racy-window", RACY, "--max-copies-per-uid", "2")
    many = 2 + 64 + 6
    files = [make_file(tmp_path / f"f{i}", os.urandom(20_000 + i)) for i in range(many)]
    settle(*files)

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:
            baseline = c.stats()["fds_in_flight"]
            fds = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files]
            try:
                answers = c.ask_many(fds, wait=False)
            finally:
                close_all(fds)
            assert all(not isinstance(a, Exception) and a.fd is None for a in answers)
            filling = [a.filling for a in answers]  # type: ignore[union-attr]
            assert filling.count(True) == many  # two copy slots, the queue after them
            deadline = time.monotonic() + 20
            while c.stats()["entries"] < filling.count(True):
                assert time.monotonic() < deadline, c.stats()
                time.sleep(0.02)
            assert c.stats()["fds_in_flight"] == baseline
            for f, told in zip(files, filling, strict=True):
                with open(f, "rb") as src:
                    (a,) = c.ask_many([src.fileno()], wait=False)
                assert not isinstance(a, Exception)
                if told:
                    assert a.hit and a.fd is not None and read_fd(a.fd) == f.read_bytes()
                if a.fd is not None:
                    os.close(a.fd)

    with trio.fail_after(60):
        await in_thread(work)


def _entries(d: Daemon) -> int:
    return _stat(d, "entries")


def _until_entries(d: Daemon, n: int) -> None:
    deadline = time.monotonic() + 10
    while (got := _entries(d)) < n:
        assert time.monotonic() < deadline, f"the daemon cached {got} files of {n}"
        time.sleep(0.02)


async def test_files_copied_here_are_told_to_the_daemon_and_hit_through_its_index_next(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Small files (below local_below) that the daemon's index lacks are copied here
    without asking, and told to the daemon at close: the next process's opens of them
    are hits through its index. Before, a daemon of Python supervisors never cached
    them (nothing asked for them), and every process copied them again."""
    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"mod{i}.py", os.urandom(4096 + i)) for i in range(5)]
    young = make_file(tmp_path / "young.py", os.urandom(4096))
    settle(*files)

    def work() -> tuple[Opener, Opener]:
        with Opener(d.socket_path) as first:
            os.utime(young)  # a ctime inside the racy window: it would not cache it
            for f in [*files, young]:
                fd = first.open(f)
                assert read_fd(fd) == f.read_bytes()
                os.close(fd)
            assert (first.local_opens, first.index_opens, first.told_files) == (6, 0, 0)
        assert first.told_files == 5  # at close; not the young one
        _until_entries(d, 5)
        with Opener(d.socket_path) as second:
            for f in files:
                fd = second.open(f)
                assert read_fd(fd) == f.read_bytes()
                assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
                os.close(fd)
        return first, second

    with trio.fail_after(60):
        _, second = await in_thread(work)
    assert (second.index_opens, second.local_opens) == (5, 0)
    assert await in_thread(_entries, d) == 5  # the young one was not told


async def test_told_files_go_when_a_batch_is_full_and_not_without_an_index(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The sources kept to tell the daemon of are bounded (TELL_FILES): the daemon
    hears of them while the Opener is open, a batch at a time. An Opener that reads
    no index (another uid's daemon, or use_index=False) tells nothing."""
    from shadowd_client.opener import TELL_FILES

    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"f{i}", os.urandom(512)) for i in range(TELL_FILES + 3)]
    settle(*files)

    def work() -> tuple[int, int]:
        with Opener(d.socket_path, use_index=False) as blind:
            for f in files[:10]:
                os.close(blind.open(f))
        assert blind.told_files == 0
        opener = Opener(d.socket_path)
        try:
            os.close(opener.open(files[0]))  # connected, the index mapped, one source kept
            base = len(os.listdir("/proc/self/fd"))
            for f in files[1:]:
                os.close(opener.open(f))
            # TELL_FILES told, three sources kept: not one per file opened.
            held = len(os.listdir("/proc/self/fd")) - base + 1
            told = opener.told_files
            _until_entries(d, TELL_FILES)
        finally:
            opener.close()
        return told, held

    with trio.fail_after(60):
        told, held = await in_thread(work)
    assert told == TELL_FILES
    assert held == 3
    with trio.fail_after(30):
        await in_thread(_until_entries, d, TELL_FILES + 3)


async def test_close_tells_a_stopped_daemon_without_waiting_for_its_answer(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The files told at close go in a request whose answer is not waited for: with
    the daemon stopped and a reply timeout of 20 s, close returns at once, and the
    daemon, continued, reads the batch from the closed connection and caches them."""
    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"f{i}", os.urandom(2048)) for i in range(4)]
    settle(*files)

    def work() -> float:
        opener = Opener(d.socket_path, timeout=20)
        for f in files:
            os.close(opener.open(f))
        os.kill(d.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            opener.close()
            return time.monotonic() - started
        finally:
            os.kill(d.pid, signal.SIGCONT)

    with trio.fail_after(60):
        took = await in_thread(work)
        await in_thread(_until_entries, d, 4)
    assert took < 10, took


async def test_a_full_told_batch_is_not_waited_for_and_its_answer_is_dropped_later(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The batch sent when TELL_FILES wait goes without waiting for its answer (the
    daemon looks at every item first): with the daemon stopped and a reply timeout
    of 20 s the open that sends it returns at once. The answer, read ahead of the
    next request's, is dropped: the requests after it are answered as usual (no
    protocol violation, no breaker) and the daemon caches the batch."""
    from shadowd_client.opener import TELL_FILES

    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"f{i}", os.urandom(1024)) for i in range(TELL_FILES)]
    big = [make_file(tmp_path / f"big{i}", os.urandom(300_000)) for i in range(2)]
    settle(*files, *big)

    def misses() -> int:
        with Client(d.socket_path, timeout=10) as c:
            return int(c.stats()["misses"])

    def work() -> tuple[float, int, int]:
        with Opener(d.socket_path, timeout=20) as opener:
            for f in files[:-1]:
                os.close(opener.open(f))
            os.kill(d.pid, signal.SIGSTOP)
            try:
                started = time.monotonic()
                os.close(opener.open(files[-1]))  # the batch goes
                took = time.monotonic() - started
            finally:
                os.kill(d.pid, signal.SIGCONT)
            told = opener.told_files
            before = misses()
            for f in big:  # asked (the index lacks them): each answer read after the batch's
                fd = opener.open(f)
                assert read_fd(fd) == f.read_bytes()
                os.close(fd)
            return took, told, misses() - before

    with trio.fail_after(60):
        took, told, asked = await in_thread(work)
        await in_thread(_until_entries, d, TELL_FILES)
    assert took < 10, took
    assert told == TELL_FILES
    assert asked == 2  # both asked: no breaker opened by the batch's answer


#: Files told to a stopped daemon: its socket takes far fewer batches of 64.
MANY = 8192


async def test_told_batches_a_stopped_daemon_cannot_take_open_the_breaker(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Told batches are sent without waiting for answers, so a stopped daemon's
    socket fills with them; the send that then waits out the reply timeout is the
    daemon's one timeout of the backoff window: it opens the breaker, and the next
    open that would ask the daemon copies here at once. Before, that timeout only
    dropped the connection: the next ask connected again and waited out a second."""
    timeout = 1.0
    d: Daemon = await start_daemon("--racy-window", RACY)
    directory = tmp_path / "many"
    directory.mkdir()
    first = make_file(tmp_path / "first", os.urandom(512))
    big = make_file(tmp_path / "big", os.urandom(300_000))  # above local_below: asked
    files = [make_file(directory / f"f{i}", b"x" * 100) for i in range(MANY)]
    settle(first, big, *files)

    def work() -> tuple[int, list[float], bool, float]:
        with Opener(d.socket_path, timeout=timeout, retry_after=60) as opener:
            os.close(opener.open(first))  # connected, the index mapped
            os.kill(d.pid, signal.SIGSTOP)
            try:
                slow: list[float] = []
                n = 0
                while not slow and n < MANY:  # until a told batch's send waits
                    f = files[n]
                    n += 1
                    started = time.monotonic()
                    os.close(opener.open(f))
                    took = time.monotonic() - started
                    if took >= timeout / 2:
                        slow.append(took)
                down = opener._down
                started = time.monotonic()
                fd = opener.open(big)  # the daemon is left alone: copied here
                assert read_fd(fd) == big.read_bytes()
                os.close(fd)
                asked = time.monotonic() - started
            finally:
                os.kill(d.pid, signal.SIGCONT)
        return n, slow, down, asked

    with trio.fail_after(120):
        n, slow, down, asked = await in_thread(work)
    print(f"{n} files told before a send waited {slow}; then the ask took {asked:.3f} s")
    assert slow, "no send waited"
    assert down, "the timeout of a told batch's send opened no breaker"
    assert asked < timeout / 2, asked


async def test_an_open_that_a_close_overtakes_keeps_no_source_to_tell(
    start_daemon: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """An Opener closed by one thread while another's open copies a file its index
    lacked: that open must not keep a duplicate of its source to tell of afterwards,
    which nothing would ever close (close let go of the others, and the finaliser has
    run). The close is made from within the open's local copy, where another thread's
    close may come, so that it overtakes the open every time. Before, the process
    held one descriptor more than before the Opener was made: that source's."""
    import shadowd_client.opener as opener_module

    d: Daemon = await start_daemon("--racy-window", RACY)
    first = make_file(tmp_path / "first", os.urandom(512))
    second = make_file(tmp_path / "second", os.urandom(512))
    settle(first, second)
    copy = opener_module.local_copy_fd

    def work() -> list[str]:
        with open(first, "rb") as f:  # the local copy's own descriptors, kept per process
            os.close(copy(f.fileno()))
        before = _fd_targets()
        opener = Opener(d.socket_path)
        os.close(opener.open(first))  # connected, the index mapped

        def copy_then_close(fd: int, **kwargs: Any) -> int:
            served = copy(fd, **kwargs)
            opener.close()  # another thread's, as it may come
            return served

        monkeypatch.setattr(opener_module, "local_copy_fd", copy_then_close)
        fd = opener.open(second)
        assert read_fd(fd) == second.read_bytes()
        os.close(fd)
        after = _fd_targets()
        return sorted(t for n, t in after.items() if before.get(n) != t)

    with trio.fail_after(30):
        kept = await in_thread(work)
    assert kept == [], kept


def _fd_targets() -> dict[str, str]:
    """This process's descriptors and what each names."""
    targets = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            targets[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the listing's own
    return targets


async def test_a_child_forked_while_another_thread_tells_keeps_none_of_its_sources(
    start_daemon: Any, tmp_path: Path, monkeypatch: Any
) -> None:
    """A process forked while another of its threads tells the daemon of files (their
    sources out of the Opener's list, in that thread's hands): the child has no such
    thread, so the Opener must let go of those descriptors in the child, as it does of
    the ones still listed. Before, the child kept the whole batch (64 descriptors of
    files it never opened) for its life."""
    from shadowd_client.opener import TELL_FILES

    d: Daemon = await start_daemon("--racy-window", RACY)
    first = make_file(tmp_path / "first", os.urandom(512))
    files = [make_file(tmp_path / f"f{i}", os.urandom(512)) for i in range(TELL_FILES)]
    settle(first, *files)
    telling, go_on = threading.Event(), threading.Event()

    def work() -> int:
        with Opener(d.socket_path) as opener:
            os.close(opener.open(first))  # connected, the index mapped, one source kept
            client = opener._client
            assert client is not None
            tell = client._tell_here

            def tell_slowly(*args: Any, **kwargs: Any) -> Any:
                telling.set()
                go_on.wait(20)
                return tell(*args, **kwargs)

            monkeypatch.setattr(client, "_tell_here", tell_slowly)

            def opens() -> None:
                for f in files[:-1]:  # the 64th source listed: the batch goes
                    os.close(opener.open(f))

            thread = threading.Thread(target=opens)
            thread.start()
            try:
                assert telling.wait(20)
                r, w = os.pipe()
                pid = os.fork()
                if pid == 0:
                    code = 1
                    try:
                        os.close(r)
                        names = str(tmp_path)
                        kept = sum(1 for t in _fd_targets().values() if t.startswith(names))
                        os.write(w, b"%d" % kept)
                        code = 0
                    finally:
                        os._exit(code)
                os.close(w)
                try:
                    kept = int(os.read(r, 64) or b"-1")
                finally:
                    os.close(r)
                os.waitpid(pid, 0)
            finally:
                go_on.set()
                thread.join(20)
            return kept

    with trio.fail_after(60):
        kept = await in_thread(work)
    # One: the telling thread's open still holds the source it opened (whatever a
    # thread holds at a fork is the child's too); none of the 64 told.
    assert kept == 1, f"the child kept {kept} descriptors of the files told"


async def test_a_stopped_daemon_costs_threads_opening_at_once_one_timeout_in_all(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Four threads of one Opener ask a stopped daemon at once: the first waits out the
    reply timeout; the others, queued behind it for the connection, must not each wait
    out one more when their turn comes (they passed the breaker before it opened).
    Before, the last of them waited four timeouts."""
    timeout, threads = 1.0, 4
    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"lib{i}.so", os.urandom(300_000)) for i in range(threads)]
    settle(*files)

    def work() -> list[float]:
        with Opener(d.socket_path, timeout=timeout, retry_after=60) as opener:
            opener._client.connect()  # type: ignore[union-attr]
            os.kill(d.pid, signal.SIGSTOP)
            try:
                start = threading.Barrier(threads)
                took: list[float] = []

                def one(f: Path) -> None:
                    start.wait(10)
                    started = time.monotonic()
                    fd = opener.open(f)  # asked (above local_below), then copied here
                    took.append(time.monotonic() - started)
                    assert read_fd(fd) == f.read_bytes()
                    os.close(fd)

                running = [threading.Thread(target=one, args=(f,)) for f in files]
                for t in running:
                    t.start()
                for t in running:
                    t.join(30)
                assert opener.local_opens == threads
                return sorted(took)
            finally:
                os.kill(d.pid, signal.SIGCONT)

    with trio.fail_after(60):
        took = await in_thread(work)
    assert len(took) == threads
    assert took[-1] < 1.8 * timeout, f"the opens waited {took} s"


async def test_told_files_the_daemon_holds_are_counted_and_timed_as_misses(
    start_daemon: Any, tmp_path: Path
) -> None:
    """A told batch ("serve": false) tells of files its client copied itself: each
    item stands for an open that was a miss to that client, whether or not the cache
    holds the file by the time it is told (another process asked for it meanwhile).
    Such a held item is answered without a descriptor, as a miss is, and counted and
    timed as one. Before, held items were counted as hits (3 of 3 here), raising the
    hit rate and the files' savings (top_by_hits) for copies nobody was spared."""
    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"h{i}", os.urandom(30_000 + i)) for i in range(3)]
    settle(*files)

    def counts(stats: dict[str, Any]) -> tuple[int, int, int, int]:
        lat = stats["latency"]
        return (stats["hits"], stats["misses"], sum(lat["hit"]["counts"]),
                sum(lat["miss"]["counts"]))  # fmt: skip

    def work() -> tuple[tuple[int, ...], tuple[int, ...], list[Any]]:
        with Client(d.socket_path, timeout=10) as c:
            close_all(c.open_many(files))  # cached now: three misses, no hit
            before = counts(c.stats())
            srcs = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files]
            try:
                assert c._tell_here(srcs, [str(f) for f in files]) == (3, None)
            finally:
                close_all(srcs)
            after = c.stats()  # (the told batch's answer read first)
            return before, counts(after), after["top_by_hits"]

    with trio.fail_after(60):
        before, after, top = await in_thread(work)
    assert before[0] == 0 and len(top) == 0, (before, top)  # no file spared a copy
    assert (after[0] - before[0], after[1] - before[1]) == (0, 3), (before, after)
    assert (after[2] - before[2], after[3] - before[3]) == (0, 3), (before, after)


async def test_told_files_the_daemon_holds_come_back_without_descriptors(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The Opener tells the daemon of files it copied here (Client._tell_here: batches
    that do not wait, whose answers nobody waits for). A told file the daemon holds
    (another process asked for it meanwhile) was answered with an fd, which sat unread
    in the socket until the client's next request, counted in the uid's fd budget
    (--max-fds-per-uid) for as long as the client did nothing: three told hits left a
    budget of four no room for a batch of two. Told batches now say serve false: the
    answer says which items the daemon holds, with no descriptor."""
    d: Daemon = await start_daemon("--racy-window", RACY, "--max-fds-per-uid", "4")
    files = [make_file(tmp_path / f"t{i}", os.urandom(30_000 + i)) for i in range(3)]
    settle(*files)

    def work() -> None:
        with (
            Client(d.socket_path, timeout=10) as asker,
            Client(d.socket_path, timeout=10) as teller,
        ):
            close_all(asker.open_many(files))  # cached now
            teller.connect()
            srcs = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files]
            try:
                assert teller._tell_here(srcs, [str(f) for f in files]) == (3, None)
            finally:
                close_all(srcs)
            sock = teller._sock
            assert sock is not None
            assert select.select([sock], [], [], 10)[0], "no answer to the told batch"
            data, anc, _, _ = sock.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4), socket.MSG_PEEK)
            peeked = fds_from_ancdata(anc)
            close_all(peeked)  # (a peek installs them too; the datagram keeps its own)
            told = msgpack.unpackb(data)
            assert [r["hit"] for r in told["results"]] == [True] * 3, told
            # The uid's budget has room for another client's batch of two.
            close_all(asker.open_many(files[:2]))
            assert peeked == [], f"{len(peeked)} descriptors came back for told files"

    with trio.fail_after(60):
        await in_thread(work)
