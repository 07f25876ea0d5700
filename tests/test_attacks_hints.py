# Attacks on the newer request paths (review 19b): misses that do not wait
# (open_batch with "wait": false, which the daemon fills in the background from
# the client's fds), the index and its reports. Each runs the daemon as a real
# subprocess and clients of other uids as real processes.
#
# Must never: leave a mount or a child process behind; wait on a hung mount
# without a deadline; pass for a reason other than the bound it names.
from __future__ import annotations

import contextlib
import os
import signal
import time
from pathlib import Path
from typing import Any

import trio

from .conftest import NOBODY, Daemon, make_file, requires_root, run_as, spawn_as, test_uid
from .fusefs import mounted
from .wire import Raw

pytestmark = requires_root

#: Uids of the attackers (need not exist in /etc/passwd).
FIRST_ATTACKER = test_uid(10)  # and the uids after it


# An attacker: two opens of files whose reads hang take both copy slots of its
# uid (a worker inspects each, on the uid's quota); then, once told, one batch
# of misses that do not wait, of files no one cached: every one is queued for
# a copy slot, holding a dup of its fd in the daemon.
HINTER = """
import os
from tests.wire import Raw
raw = Raw({path!r}, hello=False, timeout=20)
raw.send({{"op": "hello", "id": 0, "version": 2}})
assert raw.recv()[0]["ok"]
for i, name in enumerate({hung!r}):
    fd = os.open(name, os.O_RDONLY | os.O_NONBLOCK)
    raw.send({{"op": "open", "id": 1 + i}}, [fd])
    os.close(fd)
out("hung")
recv()
fds = [os.open(name, os.O_RDONLY) for name in {files!r}]
raw.send({{"op": "open_batch", "id": 9, "wait": False}}, fds)
for fd in fds:
    os.close(fd)
reply, got = raw.recv()
assert not got
out([bool(r.get("filling")) for r in reply["results"]] if reply["ok"] else reply["code"])
recv()
raw.close()
out("done")
"""

VICTIM = """
from shadowd_client import Client
with Client({path!r}, timeout=10) as c:
    got = []
    for _ in range(5):
        fd = c.open({name!r})
        got.append(len(os.pread(fd, 1 << 20, 0)))
        os.close(fd)
    out(got)
"""


async def test_hints_queued_for_copy_slots_stay_within_each_uids_fd_bound(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Misses that do not wait, queued while the uid's copy slots are taken, hold a
    dup of each fd in the daemon: they must stay within --max-fds-per-uid, so that
    uids together cannot take the daemon past its fd limit. Eight uids, each with its
    two copy slots hung on a FUSE file and one batch of 64 hints, against a daemon of
    512 fds (256 for all uids, 384 at most) whose uids may hold 70 each: the batches
    past the daemon's share are refused busy, another uid's opens still succeed, and
    the daemon holds no more than the budget allows."""
    uids, per_uid, batch = 8, 70, 64
    d: Daemon = await start_daemon(
        "--socket-mode",
        "0666",
        "--racy-window",
        "0",
        "--max-copies-per-uid",
        "2",
        "--max-fds-per-uid",
        str(per_uid),
        nofile=(512, 512),
    )
    local = make_file(shared_dir / "victim", b"v" * 1000)
    names = [
        [str(make_file(shared_dir / f"u{u}-f{i}", b"%d-%d" % (u, i))) for i in range(batch)]
        for u in range(uids)
    ]

    def warm() -> None:  # the daemon opens a few fds of its own on its first hit
        from shadowd_client import Client

        with Client(d.socket_path, timeout=10) as c:
            for _ in range(2):
                os.close(c.open(local))

    await trio.to_thread.run_sync(warm)
    baseline = await trio.to_thread.run_sync(d.quiet_fds)
    settled = (await trio.to_thread.run_sync(d.settled_fds))[0]
    with mounted(shared_dir / "fuse", hanging=2 * uids) as fs:
        mnt = fs.mountpoint
        children = []
        answers: list[Any] = []
        try:
            with trio.fail_after(120):
                for u in range(uids):
                    hung = [str(mnt / f"hang{2 * u}"), str(mnt / f"hang{2 * u + 1}")]
                    code = HINTER.format(path=str(d.socket_path), hung=hung, files=names[u])
                    child = spawn_as(FIRST_ATTACKER + u, code)
                    children.append(child)
                    assert await trio.to_thread.run_sync(child.recv) == "hung"
                    while fs.hung() < 2 * (u + 1):  # both its copy slots taken
                        await trio.sleep(0.02)
                    child.send("go")
                    filling = await trio.to_thread.run_sync(child.recv)
                    answers.append(filling)
                held = d.open_fds() - baseline
                # Victim first: its opens must succeed whatever the count says.
                code = VICTIM.format(path=str(d.socket_path), name=str(local))
                got = await trio.to_thread.run_sync(run_as, NOBODY, code)
                assert got == [1000] * 5
                # The hard bound (three quarters of 512) on what all uids hold,
                # and their connections.
                assert held <= 384 + uids, held
                queued = [a.count(True) for a in answers if isinstance(a, list)]
                assert "busy" in answers and sum(queued) >= 2 * batch, answers
        finally:
            fs.close()  # the hung reads fail: the slots free, the fills copy
            for child in children:
                with contextlib.suppress(Exception):
                    child.send("bye")
                child.close()
    # Every fd queued is closed once its fill is done (or dropped).
    with trio.fail_after(60):
        while True:
            fds, _ = await trio.to_thread.run_sync(d.settled_fds)
            if fds <= settled:
                break
            await trio.sleep(0.1)


STATS_AS = """
from shadowd_client import Client
with Client({path!r}, timeout=10) as c:
    s = c.stats()
out([s["index_hits"], s["entries"]])
"""


async def test_reports_of_huge_hit_counts_do_not_break_anyones_stats(
    start_daemon: Any, shared_dir: Path
) -> None:
    """A peer that may report index hits (root, or the daemon's uid: a buggy
    supervisor will do) says it served 2**64 - 1 hits of a file, three times: the
    counters are plain integers, so the stats' wire form (int64) could no longer
    carry them and every later stats request, of every uid, failed `internal`.
    They saturate instead."""
    from shadowd_client import Client

    from .wire import Raw

    d: Daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    f = make_file(shared_dir / "lib.so", b"x" * 100_000)

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:
            for _ in range(3):
                os.close(c.open(f))
        st = f.stat()
        with Raw(d.socket_path, timeout=10) as raw:
            for i in range(3):
                reply, _ = raw.call(
                    {"op": "report", "id": 1 + i, "hits": [[st.st_dev, st.st_ino, 2**64 - 1]]}
                )
                assert reply["ok"], reply
        with Client(d.socket_path, timeout=10) as c:
            s = c.stats()
        assert s["index_hits"] >= 2**62, s["index_hits"]
        (top,) = [t for t in s["top_by_hits"] if t["path"] == str(f)]
        assert top["hits"] >= 2**62 and top["bytes_saved"] >= 2**62, top
        assert run_as(NOBODY, STATS_AS.format(path=str(d.socket_path)))[1] == 1

    with trio.fail_after(60):
        await trio.to_thread.run_sync(work)


REPORTS_THEN_GONE = """
from tests.wire import Raw
raw = Raw({path!r}, timeout=20)
out("ready")
recv()
raw.sock.setblocking(False)
sent = 0
try:
    for i in range({n}):
        raw.send({{"op": "report", "id": 1 + i, "hits": [[{dev}, {ino}, {hits}]]}})
        sent += 1
except BlockingIOError:
    pass  # the socket is full
raw.close()
out(sent)
recv()
"""


async def test_reports_left_queued_by_a_closed_connection_are_counted_within_a_bound(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Reports queued behind an answer that fails (the client closed) are read and
    counted when the connection ends, but only a bounded number (FINAL_REPORT_DATAGRAMS,
    8): 100 queued reports of one hit each, sent while the daemon is stopped, count
    9 (the first answered, the rest read at the end), not 1 (before) nor 100; and
    another uid's queued reports, which it may not send at all, count nothing."""
    from shadowd_client import Client

    from shadowd.connection import FINAL_REPORT_DATAGRAMS

    d: Daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    f = make_file(shared_dir / "lib.so", b"x" * 100_000)

    def index_hits() -> int:
        with Client(d.socket_path, timeout=10) as c:
            return int(c.stats()["index_hits"])

    def work() -> tuple[list[int], int]:
        with Client(d.socket_path, timeout=10) as c:
            os.close(c.open(f))
        st = f.stat()
        base = index_hits()
        children = []
        sent: list[int] = []
        try:
            for uid, hits in (FIRST_ATTACKER, 2**40), (0, 1):
                code = REPORTS_THEN_GONE.format(
                    path=str(d.socket_path), n=100, dev=st.st_dev, ino=st.st_ino, hits=hits
                )
                children.append(spawn_as(uid, code))
                assert children[-1].recv() == "ready"  # its hello answered
            os.kill(d.pid, signal.SIGSTOP)
            try:
                for child in children:
                    child.send("go")
                    sent.append(child.recv())
            finally:
                os.kill(d.pid, signal.SIGCONT)
        finally:
            for child in children:
                child.close()
        deadline = time.monotonic() + 10
        while index_hits() - base < FINAL_REPORT_DATAGRAMS and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # anything more would be counted by now
        return sent, index_hits() - base

    with trio.fail_after(60):
        sent, counted = await trio.to_thread.run_sync(work)
    assert sent[1] > FINAL_REPORT_DATAGRAMS + 1, sent  # more than the bound queued
    assert counted == FINAL_REPORT_DATAGRAMS + 1, (sent, counted)


async def test_a_stopping_daemon_copies_no_told_file_still_queued(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 35: files a uid only told of, queued behind its copy slots (up to 512 a
    uid), are not copied by a daemon that is stopping: SIGTERM lets go of them at once
    (their fds closed), while the requests it had received are still answered; before,
    the queue kept the daemon copying files nobody waits for, up to its shutdown's grace.
    Both copy slots hang on a FUSE file, so the queue cannot move until the mount ends."""
    n = 256
    d: Daemon = await start_daemon("--racy-window", "0", "--max-copies-per-uid", "2")
    names = [make_file(shared_dir / f"told{i}", b"told %d" % i) for i in range(n)]
    with mounted(shared_dir / "fuse", hanging=2) as fs:
        mnt = fs.mountpoint
        with trio.fail_after(60):

            def hang_and_tell() -> tuple[Raw, list[bool]]:
                raw = Raw(d.socket_path, hello=False, timeout=30)
                raw.send({"op": "hello", "id": 0, "version": 2})
                assert raw.recv()[0]["ok"]
                for i in range(2):
                    fd = os.open(mnt / f"hang{i}", os.O_RDONLY | os.O_NONBLOCK)
                    raw.send({"op": "open", "id": 1 + i}, [fd])
                    os.close(fd)
                while fs.hung() < 2:  # both copy slots taken
                    time.sleep(0.01)
                filling: list[bool] = []
                for b in range(0, n, 64):
                    fds = [os.open(p, os.O_RDONLY) for p in names[b : b + 64]]
                    labels = [str(p) for p in names[b : b + 64]]
                    batch = {"op": "open_batch", "id": 10 + b, "wait": False, "labels": labels}
                    raw.send(batch, fds)
                    for fd in fds:
                        os.close(fd)
                    reply, got = raw.recv()
                    assert reply["ok"] and not got, reply
                    filling += [bool(r.get("filling")) for r in reply["results"]]
                return raw, filling

            raw, filling = await trio.to_thread.run_sync(hang_and_tell)
            try:
                assert filling == [True] * n  # every one queued behind the hung slots
                queued = d.open_fds()
                d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
                # The queued fills' descriptors go at once, while the hung requests wait.
                while d.open_fds() > queued - n:
                    await trio.sleep(0.02)
                assert fs.hung() == 2
                fs.close()  # the hung reads fail: their requests are answered, in turn
                codes = [(await trio.to_thread.run_sync(raw.recv))[0].get("code") for _ in "ab"]
                assert codes == ["io-error"] * 2, codes
            finally:
                raw.close()
            assert await d.terminate() == 0
    cached = [line for line in d.log().splitlines() if "cached" in line and "told" in line]
    assert not cached, cached[:3]
