# The twelve attacks of issue 14, each reproduced end to end against the
# daemon as a real subprocess, each asserting the safe outcome the issue
# demands. The daemon before the fixes lost every one of them (each test was
# seen to fail on its attack's own assertion); one that the daemon still
# loses is marked xfail(strict), so that its fix turns it into an XPASS,
# which fails the suite until the marker is removed.
#
# Only the attack's own outcome may fail with AssertionError (xfail is told
# raises=AssertionError): a setup that goes wrong raises SetupError, so the
# test fails loudly instead of passing as an expected failure.
#
# Must never: leave a mount, a userfaultfd stall or a child process behind;
# wait on a hung mount without a deadline; pass for a reason other than the
# defence it names.
from __future__ import annotations

import contextlib
import hashlib
import mmap
import os
import signal
import stat
import statistics
import struct
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import (
    NOBODY,
    Daemon,
    make_file,
    requires_root,
    run_as,
    spawn_as,
    test_uid,
    watch_limits_work,
)
from .fusefs import FuseFile, HangingFS
from .mounts import ext4, mount_tmpfs, tmpfs, umount
from .uffd import PAGE, StalledWrite
from .wire import Raw, read_all

pytestmark = requires_root

#: Users of the attacks (need not exist in /etc/passwd).
ALICE, BOB, CAROL = test_uid(0), test_uid(1), test_uid(2)


# pytest-trio hands a test's exception on inside an ExceptionGroup.
_ATTACK_LOST: Any = (
    pytest.RaisesGroup(AssertionError, allow_unwrapped=True, flatten_subgroups=True)
    if hasattr(pytest, "RaisesGroup")
    else (AssertionError, BaseExceptionGroup)  # pytest < 8.4: any group will do
)


def attack(reason: str) -> pytest.MarkDecorator:
    """The marker of a test that today's daemon fails: an expected AssertionError."""
    return pytest.mark.xfail(strict=True, raises=_ATTACK_LOST, reason=f"issue 14: {reason}")


@pytest.fixture(params=["c", "python"])
def start_daemon(start_daemon: Any, request: pytest.FixtureRequest) -> Any:
    """conftest's factory, once with the hit path in C and once all in Python
    (SHADOWD_NO_C): every attack is fought on both paths."""
    if request.param == "c":
        return start_daemon

    async def start(*args: str, env: dict[str, str] | None = None, **kwargs: Any) -> Daemon:
        return await start_daemon(
            *args, env=dict(env if env is not None else os.environ, SHADOWD_NO_C="1"), **kwargs
        )

    return start


class SetupError(Exception):
    """The test could not set its attack up: a failure, never an expected one."""


def require(condition: object, message: str) -> None:
    if not condition:
        raise SetupError(message)


def child(uid: int, code: str, **kwargs: Any) -> Any:
    """run_as, with a crashed child reported as a SetupError (not an AssertionError)."""
    try:
        return run_as(uid, code, **kwargs)
    except AssertionError as exc:
        raise SetupError(str(exc)) from None


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), abandon_on_cancel=True)


def stats(d: Daemon) -> dict[str, Any]:
    from shadowd_client import Client

    with Client(d.socket_path, timeout=10) as c:
        return c.stats()


def open_raw(raw: Raw, path: Path, id: int = 1) -> tuple[dict[str, Any], bytes | None]:
    """One open on the wire: the reply and the served bytes (None when refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        reply, fds = raw.call({"op": "open", "id": id, "path": str(path)}, [fd])
    finally:
        os.close(fd)
    if not fds:
        return reply, None
    try:
        return reply, read_all(fds[0])
    finally:
        for got in fds:
            os.close(got)


def open_once(d: Daemon, path: Path) -> tuple[dict[str, Any], bytes | None]:
    with Raw(d.socket_path) as raw:
        return open_raw(raw, path)


def cache(d: Daemon, path: Path) -> None:
    """Have *path* cached: opened until an open is a hit (a SetupError if it never is)."""
    with Raw(d.socket_path) as raw:
        for i in range(20):
            reply, _data = open_raw(raw, path, i + 1)
            require(reply.get("ok"), f"cannot open {path}: {reply}")
            if reply.get("hit"):
                return
            time.sleep(0.02)
    raise SetupError(f"{path} never became a hit")


def read_text(path: str) -> str:
    with open(path) as f:
        return f.read()


def read_bytes(path: str) -> bytes:
    with open(path, "rb") as f:
        return f.read()


def mkdir_owned(path: Path, uid: int, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


@pytest.fixture(params=["tmpfs", "ext4"])
def fs_dir(request: pytest.FixtureRequest, shared_dir: Path) -> Iterator[Path]:
    """A directory on a fresh tmpfs, or on an ext4 loop image."""
    mount = tmpfs if request.param == "tmpfs" else ext4
    with mount(shared_dir / request.param) as path:
        yield path


# -- 11: the lock file -------------------------------------------------------


@pytest.mark.parametrize("where", ["sticky", "group-writable"])
async def test_11_lock_file_never_follows_a_symlink(
    start_daemon: Any, shared_dir: Path, where: str
) -> None:
    pub = shared_dir / "pub"
    pub.mkdir()
    group = 4242
    if where == "sticky":
        if read_text("/proc/sys/fs/protected_symlinks").strip() != "0":
            pytest.skip("fs.protected_symlinks: the kernel refuses to follow it in a sticky dir")
        pub.chmod(0o1777)
    else:  # a directory shared by a group (no sticky bit: protected_symlinks does not apply)
        os.chown(pub, 0, group)
        pub.chmod(0o2775)
    secret = b"root's secret, mode 0600\n"
    target = make_file(shared_dir / "secret", secret, 0o600)
    lock = pub / "s.sock.lock"
    child(NOBODY, f"os.symlink({str(target)!r}, {str(lock)!r})\nout(1)", groups=(group,))
    require(lock.is_symlink(), "the planted symlink is not there")
    with contextlib.suppress(RuntimeError):  # refusing to start is a fine answer
        await start_daemon("--racy-window", "0", socket_name="s.sock", directory=pub)
    after = target.read_bytes(), stat.S_IMODE(target.stat().st_mode)
    assert after == (secret, 0o600)


# -- 12: labels ----------------------------------------------------------------

LABEL_OPEN = """
from shadowd_client import Client
with Client({sock!r}, timeout=10) as c:
    for _ in range(3):
        os.close(c.open({path!r}))
out(1)
"""

LABEL_STATS = """
from shadowd_client import Client
with Client({sock!r}, timeout=10) as c:
    s = c.stats()
top = list(s["top_by_hits"]) + list(s["top_by_bytes"])
out(sorted({{e["path"] if isinstance(e, dict) else e[0] for e in top}}))
"""


async def test_12_labels_of_one_uid_are_not_listed_to_another(
    start_daemon: Any, shared_dir: Path
) -> None:
    d = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    home = mkdir_owned(shared_dir / "home", 0)
    alice = mkdir_owned(home / "alice", ALICE, 0o755)
    private = mkdir_owned(alice / "private", ALICE, 0o700)
    f = make_file(private / "payroll-2026.xlsx", b"salaries\n" * 1000, 0o600)
    os.chown(f, ALICE, ALICE)
    sock = str(d.socket_path)
    await call(child, ALICE, LABEL_OPEN.format(sock=sock, path=str(f)))
    seen_by_bob = await call(child, BOB, LABEL_STATS.format(sock=sock))
    seen_by_root = await call(child, 0, LABEL_STATS.format(sock=sock))
    require(str(f) in seen_by_root, f"the label never reached the top lists: {seen_by_root}")
    assert str(f) not in seen_by_bob


# -- 6: a per-user daemon's shared memfd changed through a served fd ----------


def posix_acl(user: int, group: int, other: int) -> bytes:
    """A minimal system.posix_acl_access value (the same as a mode)."""
    undefined = 0xFFFFFFFF
    return struct.pack(
        "<I" + "HHI" * 3, 2, 0x01, user, undefined, 0x04, group, undefined, 0x20, other, undefined
    )


TAMPER = """
import stat
from shadowd_client import Client
res = {{}}
with Client({sock!r}, timeout=10) as c:
    for name, how in {how!r}.items():
        fd = c.open({base!r} + "/" + name)
        try:
            if how == "chmod0":
                os.fchmod(fd, 0)
            else:
                os.setxattr(fd, "system.posix_acl_access", bytes.fromhex(how))
            res[name] = oct(stat.S_IMODE(os.fstat(fd).st_mode))
        except OSError as e:
            res[name] = "failed: " + e.strerror
        finally:
            os.close(fd)
out(res)
"""

VICTIM_OPENS = """
import hashlib, stat
from shadowd_client import Client, ShadowdError
res = {{}}
with Client({sock!r}, timeout=10) as c:
    for name in {names!r}:
        try:
            fd = c.open({base!r} + "/" + name)
        except ShadowdError as e:
            res[name] = type(e).__name__
            continue
        data = os.pread(fd, 1 << 20, 0)
        res[name] = [hashlib.sha256(data).hexdigest(), oct(stat.S_IMODE(os.fstat(fd).st_mode))]
        os.close(fd)
out(res)
"""


async def test_06_a_served_fd_cannot_change_what_others_are_served(
    start_daemon: Any, shared_dir: Path
) -> None:
    run = mkdir_owned(shared_dir / "run", ALICE)
    d = await start_daemon("--racy-window", "0", user=(ALICE, ALICE), directory=run)
    files = {
        "data": make_file(shared_dir / "data", b"plain data\n" * 300, 0o644),
        "script": make_file(shared_dir / "script", b"#!/bin/sh\necho tampered\n", 0o644),
        "binary": make_file(shared_dir / "binary", read_bytes("/bin/true"), 0o755),
    }
    how = {
        "data": "chmod0",  # the daemon's own reopen of the memfd is refused
        "script": posix_acl(7, 4, 4).hex(),  # 0744 on a non-executable copy
        "binary": posix_acl(6, 6, 4).hex(),  # 0664 on an executable one
    }
    sock, base = str(d.socket_path), str(shared_dir)
    tampered = await call(child, ALICE, TAMPER.format(sock=sock, base=base, how=how))
    if "Operation not supported" in str(tampered):
        pytest.skip(f"no POSIX ACLs on memfds in this kernel: {tampered}")
    require(
        tampered == {"data": "0o0", "script": "0o744", "binary": "0o664"},
        f"the tampering did not take: {tampered}",
    )
    got = await call(child, ALICE, VICTIM_OPENS.format(sock=sock, base=base, names=list(files)))
    want = {
        name: [hashlib.sha256(f.read_bytes()).hexdigest(), "0o555" if name == "binary" else "0o444"]
        for name, f in files.items()
    }
    assert got == want


# -- 3, 4, 5: writes the daemon cannot see in stat -----------------------------


def torn_then_later(d: Daemon, f: Path) -> dict[str, Any]:
    """Attack 3 in a worker thread: a write stalled half way while the daemon copies."""
    old, new = b"o" * (4 * PAGE), b"n" * (4 * PAGE)
    f.write_bytes(old)
    wfd = os.open(f, os.O_WRONLY | os.O_CLOEXEC)
    try:
        writer = StalledWrite(wfd, new, stall_at=2 * PAGE)
        try:
            writer.wait_stalled()
            during = f.read_bytes()
            require(during not in (old, new), "the write did not stall half way")
            _reply, copied = open_once(d, f)  # the daemon copies the half-written file
            require(copied == during, "the copy did not see the half-written file")
            require(writer.finish() == len(new), "the stalled write did not complete")
        finally:
            writer.close()
    finally:
        os.close(wfd)
    require(f.read_bytes() == new, "the file does not hold the new bytes after the write")
    later = [open_once(d, f) for _ in range(5)]
    return {
        "torn_served_after_the_write": sum(data != new for _, data in later),
        "hits": sum(bool(reply.get("hit")) for reply, _ in later),
    }


async def test_03_a_write_stalled_half_way_is_never_cached(start_daemon: Any, fs_dir: Path) -> None:
    d = await start_daemon("--racy-window", "0")
    with trio.fail_after(20):
        outcome = await call(torn_then_later, d, fs_dir / "lib.so")
    assert outcome["torn_served_after_the_write"] == 0, outcome


def racing_a_writer(d: Daemon, f: Path) -> dict[str, Any]:
    """Attack 4 in a worker thread: opens while another fd holds the file open for writing."""
    size = 64 * 1024
    contents = [bytes([65 + i]) * size for i in range(6)]
    f.write_bytes(contents[0])
    hits_with_writer = stale = torn = served = 0
    wfd = os.open(f, os.O_RDWR | os.O_CLOEXEC)
    try:
        with Raw(d.socket_path) as raw:
            ids = iter(range(1, 1 << 30))
            # Writes between opens: every copy is exact, none may be cached.
            for content in contents[1:]:
                os.pwrite(wfd, content, 0)
                for _ in range(2):
                    reply, data = open_raw(raw, f, next(ids))
                    require(reply.get("ok"), f"open refused: {reply}")
                    hits_with_writer += bool(reply.get("hit"))
                    stale += data != content
            # Whole-file writes racing the opens: torn copies may be served
            # (a read() racing them is torn too), never cached.
            stop = threading.Event()

            def write_all_the_time() -> None:
                i = 0
                while not stop.is_set():
                    os.pwrite(wfd, contents[i % 2], 0)
                    i += 1

            thread = threading.Thread(target=write_all_the_time)
            thread.start()
            try:
                for _ in range(100):
                    reply, data = open_raw(raw, f, next(ids))
                    if not reply.get("ok"):
                        continue  # "unstable" is a fine answer to a file that keeps changing
                    served += 1
                    hits_with_writer += bool(reply.get("hit"))
                    torn += data not in contents[:2]
            finally:
                stop.set()
                thread.join()
    finally:
        os.close(wfd)
    final = f.read_bytes()
    _reply, after = open_once(d, f)
    return {
        "hits_while_a_writer_held_it_open": hits_with_writer,
        "stale_served_between_writes": stale,
        "correct_after_the_writer_closed": after == final,
        "torn_served_while_racing": torn,
        "served_while_racing": served,
    }


async def test_04_nothing_is_cached_while_a_writer_holds_the_file(
    start_daemon: Any, fs_dir: Path
) -> None:
    d = await start_daemon("--racy-window", "0")
    with trio.fail_after(30):
        outcome = await call(racing_a_writer, d, fs_dir / "lib.so")
    print(outcome)
    assert (
        outcome["hits_while_a_writer_held_it_open"],
        outcome["stale_served_between_writes"],
        outcome["correct_after_the_writer_closed"],
    ) == (0, 0, True), outcome


def through_a_mapping(d: Daemon, f: Path) -> dict[str, Any]:
    """Attack 5 in a worker thread: changes through a MAP_SHARED writable mapping."""
    size = 2 * PAGE
    f.write_bytes(b"a" * size)
    cache(d, f)
    wfd = os.open(f, os.O_RDWR | os.O_CLOEXEC)
    try:
        m = mmap.mmap(wfd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        try:
            m[:PAGE] = b"b" * PAGE  # the first write fault (ext4 stamps the times here)
            for _ in range(2):
                open_once(d, f)  # served, and maybe cached, in between
            m[:PAGE] = b"c" * PAGE  # no fault: the page is writable already
        finally:
            m.close()
    finally:
        os.close(wfd)
    now = f.read_bytes()
    require(now[:PAGE] == b"c" * PAGE, "the mapping did not write the file")
    later = [open_once(d, f)[1] for _ in range(3)]
    return {"stale_served_after_the_writer_left": sum(data != now for data in later)}


async def test_05_changes_through_a_shared_mapping_are_served(
    start_daemon: Any, fs_dir: Path
) -> None:
    d = await start_daemon("--racy-window", "0")
    with trio.fail_after(20):
        outcome = await call(through_a_mapping, d, fs_dir / "lib.so")
    assert outcome["stale_served_after_the_writer_left"] == 0, outcome


# -- 9, 10: sparse files ----------------------------------------------------------

MiB = 1 << 20


def memfd_bytes(*pids: int) -> int:
    """The memory in the memfds these processes hold, each counted once (its pages,
    st_blocks): what the daemon made and its clients keep. Not the host's Shmem,
    which other tests beside this one (a test of 250 MiB memfds) move meanwhile."""
    seen: dict[tuple[int, int], int] = {}
    for pid in pids:
        base = f"/proc/{pid}/fd"
        for name in os.listdir(base):
            try:
                if not os.readlink(f"{base}/{name}").startswith("/memfd:"):
                    continue
                st = os.stat(f"{base}/{name}")
            except OSError:
                continue  # closed meanwhile
            seen[(st.st_dev, st.st_ino)] = st.st_blocks * 512
    return sum(seen.values())


def sparse_files(directory: Path, n: int, size: int) -> list[Path]:
    """*n* files of *size* bytes that hold no data (one hole each), readable by all."""
    files = []
    for i in range(n):
        f = directory / f"sparse{i}"
        with open(f, "wb") as out:
            out.truncate(size)
        f.chmod(0o644)
        files.append(f)
    return files


HOLD = """
import mmap
from shadowd_client import Client, ShadowdError
with Client({sock!r}, timeout=30) as c:
    got = c.open_many({paths!r}, return_exceptions=True)  # one batch: copies in parallel
held = [fd for fd in got if isinstance(fd, int)]
refused = [type(e).__name__ for e in got if not isinstance(e, int)]
maps = []
if {touch!r}:
    # A shared read-only mapping's faults fill a memfd's holes with real
    # pages (a private one maps the zero page): copying holes as holes is
    # not enough, what a uid is handed must count at its full size.
    for fd in held:
        size = os.fstat(fd).st_size
        m = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        sum(m[i] for i in range(0, size, mmap.PAGESIZE))
        maps.append(m)
out({{"held": len(held), "refused": refused}})
recv()  # keep every served fd until the test has measured
"""

MAX_BYTES = 256 * MiB
#: --max-pinned-bytes-per-uid's default: what one uid may have under way
#: and held out of the cache, counted at full size.
MAX_PINNED = 256 * MiB
#: What docs/security.md states: the memfds the daemon made hold at most
#: --max-bytes in the cache plus, per uid, --max-pinned-bytes-per-uid; plus
#: this much for the daemon's own (its index, say).
SHMEM_MARGIN = 64 * MiB


@pytest.mark.parametrize("touch", [False, True], ids=["held", "held-and-mapped"])
async def test_09_sparse_files_cannot_pin_memory_beyond_max_bytes(
    start_daemon: Any, shared_dir: Path, touch: bool
) -> None:
    d = await start_daemon("--socket-mode", "0666", "--racy-window", "0", "--max-bytes", "256M")
    files = sparse_files(shared_dir, 16, 200 * MiB)
    before = memfd_bytes(d.pid)
    code = HOLD.format(sock=str(d.socket_path), paths=[str(f) for f in files], touch=touch)
    with trio.fail_after(60), spawn_as(NOBODY, code) as holder:
        held = await call(holder.recv, 60)
        grown = memfd_bytes(d.pid, holder.proc.pid) - before
        s = await call(stats, d)
    print(f"shmem grew {grown / MiB:.0f} MiB; {held}; stats say {s['bytes'] / MiB:.0f} MiB")
    require(held["held"] + len(held["refused"]) == 16, f"the client did not finish: {held}")
    assert grown <= MAX_BYTES + MAX_PINNED + SHMEM_MARGIN, f"shmem grew {grown / MiB:.0f} MiB"
    # Past the uid's bound, its copies are refused with busy: it copies for itself.
    assert set(held["refused"]) <= {"Busy"}, held


def _holds_inode(pid: int, ino: int) -> bool:
    """Whether process *pid* has a descriptor of a memfd whose inode is *ino*."""
    for name in os.listdir(f"/proc/{pid}/fd"):
        try:
            st = os.stat(f"/proc/{pid}/fd/{name}")
        except OSError:
            continue
        if st.st_ino == ino and os.readlink(f"/proc/{pid}/fd/{name}").startswith("/memfd:"):
            return True
    return False


async def test_36_a_memfd_freed_while_inotify_lost_events_is_not_charged_forever(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 36: a memfd out of the cache is charged to its uid until the kernel
    removes its watch (IN_IGNORED). Events past fs.inotify.max_queued_events between
    two of the daemon's reads are lost, that one included: the uid stayed charged for
    memory nobody held, for good. Here two cached memfds' mode changes (alternating,
    so that none merge) fill the daemon's queue while it is stopped, then the last
    holder of an uncached copy lets go of it: once the daemon reads on, its charge
    must be given back (it asks the kernel which watches are left), and only its:
    the two memfds still held (out of the cache since the overflow) stay charged.
    Twenty files cached first put the watches' numbers past 9 (the kernel lists
    them in hexadecimal)."""
    d = await start_daemon("--racy-window", "2")
    others = [make_file(shared_dir / f"o{i}", b"o%d" % i) for i in range(20)]
    a = make_file(shared_dir / "a", b"a" * 4096)
    b = make_file(shared_dir / "b", b"b" * 4096)
    young_size = 1 << 20
    with open("/proc/sys/fs/inotify/max_queued_events", encoding="ascii") as f:
        max_queued = int(f.read())
    from shadowd_client import Client

    def work() -> tuple[int, int]:
        time.sleep(max(0.0, a.stat().st_ctime + 2.1 - time.time()))  # old enough to cache
        young = make_file(shared_dir / "young", os.urandom(young_size))  # served uncached
        with Client(d.socket_path, timeout=10) as c:
            for other in others:
                os.close(c.open(other))
            fa, fb = c.open(a), c.open(b)
            fy = c.open(young)
            try:
                assert c.stats()["pinned_bytes"] == young_size
                ino = os.fstat(fy).st_ino
                deadline = time.monotonic() + 10
                while _holds_inode(d.pid, ino):  # the daemon let go of its own
                    assert time.monotonic() < deadline
                    time.sleep(0.01)
                os.kill(d.pid, signal.SIGSTOP)
                try:
                    for i in range(max_queued + 16):
                        os.fchmod((fa, fb)[i % 2], 0o444 if i % 4 < 2 else 0o440)
                    os.close(fy)  # its IN_IGNORED finds the queue full
                finally:
                    os.kill(d.pid, signal.SIGCONT)
            except BaseException:
                os.close(fa)
                os.close(fb)
                raise
        return fa, fb

    with trio.fail_after(60):
        fa, fb = await call(work)
        try:
            while "inotify lost events" not in d.log():  # the daemon read on
                await trio.sleep(0.02)
            while (pinned := (await call(stats, d))["pinned_bytes"]) > 2 * 4096:
                await trio.sleep(0.05)
            assert pinned == 2 * 4096  # the two held: a live watch is never taken for gone
        finally:
            os.close(fa)
            os.close(fb)
        while (await call(stats, d))["pinned_bytes"]:
            await trio.sleep(0.05)


# Attack 37: another uid sends each memfd it was served back as a host file.
SEND_BACK = """
from shadowd_client import Busy, Client
held, busy = [], 0
with Client({sock!r}, timeout=10) as c:
    for path in {paths!r}:
        try:
            fd = c.open(path)  # young: served uncached, charged to this uid
        except Busy:
            busy += 1
            continue
        held.append(fd)
        try:
            os.close(c.open_fd(fd))  # its own memfd, as a host file
        except Busy:
            busy += 1
    pinned = c.stats()["pinned_bytes"]
out({{"held": len(held), "busy": busy, "pinned": pinned}})
"""


async def test_37_a_memfd_sent_back_as_a_host_file_does_not_lose_its_uids_charge(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 37: one inotify fd has one watch per inode. A memfd of the daemon's,
    served to a client, comes back as that client's host file: its source watch was
    the memfd's own watch, whose mask the daemon's add replaced, and which the
    daemon removed once the copy of it was done with; the kernel's IN_IGNORED then
    said the memfd was freed, and its uid's charge (--max-pinned-bytes-per-uid) was
    given back while the uid held it. Each round of young 1 MiB file, open, send
    back, keep the first fd pinned 1 MiB uncharged: twelve rounds against a bound
    of 4 MiB must be refused busy from the fifth on, and the daemon's figure must
    count what the uid holds."""
    d = await start_daemon(
        "--socket-mode", "0666", "--racy-window", "60", "--max-pinned-bytes-per-uid", "4M"
    )
    size = 1 << 20
    paths = [str(make_file(shared_dir / f"young{i}", os.urandom(size))) for i in range(12)]
    with trio.fail_after(60):
        got = await call(child, ALICE, SEND_BACK.format(sock=str(d.socket_path), paths=paths))
    print(got)
    assert got["held"] <= 4, got  # before: all twelve, each uncharged after its round
    assert got["pinned"] >= got["held"] * size, got  # before: 0 while twelve were held


# Attack 38: another uid holds many tiny copies the cache does not keep.
TINY = """
import time
from shadowd_client import Busy, Client
held, busy, big_held, big_busy = [], 0, [], 0
with Client({sock!r}, timeout=10) as c:
    for i in range({n}):
        os.utime({tiny!r}, ns=(i, i))  # a new version, too young to cache
        try:
            held.append(c.open({tiny!r}))
        except Busy:
            busy += 1
    for path in {big!r}:
        os.utime(path)  # young: served uncached, charged (when its memfd is watched)
        try:
            big_held.append(c.open(path))
        except Busy:
            big_busy += 1
    out({{"held": len(held), "busy": busy, "big_held": len(big_held), "big_busy": big_busy}})
    recv()
"""


async def test_38_tiny_copies_held_cannot_take_the_daemons_inotify_watches(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 38: every memfd the daemon made that is alive has an inotify watch
    (it says when the memfd is freed), and the watches of the daemon's uid are
    bounded by fs.inotify.max_user_watches. A copy was charged to its uid at its
    size, so a uid could hold as many 1-byte copies as it liked: at the limit no
    file of anyone was cached any more, and no memfd the daemon could not watch was
    charged, so the uid's large copies were held past its bound. Against a daemon
    allowed 300 watches (a user namespace of its own), another uid holds 600 young
    1-byte copies, then four young 4 MiB ones under --max-pinned-bytes-per-uid 8M:
    it must be refused busy before it holds more than the bound over
    pins.PIN_FLOOR (64 KiB) copies, none of the large ones past the bound, and another
    client's file must still be cached."""
    if not watch_limits_work():
        pytest.skip("no user namespace with a watch limit of its own here")
    bound, floor = 8 << 20, 64 << 10  # floor: shadowd/pins.py PIN_FLOOR
    d = await start_daemon(
        "--socket-mode", "0666", "--max-pinned-bytes-per-uid", str(bound), watches=300
    )
    victim = make_file(shared_dir / "victim", b"v" * 4096)
    tiny = make_file(shared_dir / "tiny", b"x")
    big = [make_file(shared_dir / f"big{i}", os.urandom(4 << 20)) for i in range(4)]
    for path in (tiny, *big):
        os.chown(path, ALICE, ALICE)
    code = TINY.format(sock=str(d.socket_path), n=600, tiny=str(tiny), big=[str(b) for b in big])

    def victim_asks() -> list[bool]:
        from shadowd_client import Client

        time.sleep(max(0.0, victim.stat().st_ctime + 1.2 - time.time()))  # old enough
        src = os.open(victim, os.O_RDONLY)
        try:
            with Client(d.socket_path, timeout=10) as c:
                hits = []
                for _ in range(2):
                    answer = c.ask(src, wait=True)
                    assert answer.fd is not None
                    os.close(answer.fd)
                    hits.append(answer.hit)
                return hits
        finally:
            os.close(src)

    with trio.fail_after(120), spawn_as(ALICE, code) as attacker:
        got = await call(attacker.recv, 100)
        hits = await call(victim_asks)
    print(got, hits)
    require(got["held"] + got["busy"] == 600, f"the attacker did not finish: {got}")
    # Before: 600 held, the four large ones too (16 MiB, uncharged), no hit.
    assert (got["held"] <= bound // floor, got["big_held"], hits[1]) == (True, 0, True), got


# Attack 38's floor, turned on another uid: B holds the entries A's requests made.
MAKER_OPENS = """
from shadowd_client import Busy, Client
def young_opens():
    ok = 0
    with Client({sock!r}, timeout=10) as c:
        for path in {young!r}:
            os.utime(path)  # young: served uncached, a copy charged to this uid
            try:
                os.close(c.open(path))
                ok += 1
            except Busy:
                pass
    return ok
with Client({sock!r}, timeout=10) as c:
    for path in {small!r}:
        os.close(c.open(path))  # cached: this uid's requests made them
out(young_opens())
recv()
out(young_opens())
"""

HOLDER = """
from shadowd_client import Client
with Client({sock!r}, timeout=10) as c:
    held = [c.open(path) for path in {small!r}]  # hits: A's copies
    for path in {others!r}:
        os.close(c.open(path))  # its own copies, cached: A's entries go while held
    out(c.stats()["hits"])
    recv()
"""


async def test_41_held_entries_of_another_uids_copies_do_not_use_up_its_bound(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 41: uid A's requests made a hundred 100-byte cached copies; uid B opens
    them (hits) and holds them, then fills the cache (--max-entries 100) with its own,
    so that A's leave it while held. Each was charged to A, the uid whose request made
    it, at 64 KiB at least (attack 38): 6.25 MiB for 10,000 bytes, past A's bound of
    4 MiB, so every miss of A was refused busy while B held them. A memfd another uid's
    request found is charged to all uids together only now: A keeps its copies."""
    d = await start_daemon(
        "--socket-mode", "0666", "--racy-window", "0.05",
        "--max-entries", "100", "--max-pinned-bytes-per-uid", "4M",
    )  # fmt: skip
    small = [str(make_file(shared_dir / f"hdr{i}", b"h" * 100)) for i in range(100)]
    others = [str(make_file(shared_dir / f"other{i}", b"o" * 100)) for i in range(100)]
    young = [str(make_file(shared_dir / f"young{i}", b"y" * 1024, 0o666)) for i in range(5)]
    await trio.sleep(0.1)  # past the racy window
    sock = str(d.socket_path)
    with contextlib.ExitStack() as stack, trio.fail_after(120):
        maker = stack.enter_context(
            spawn_as(ALICE, MAKER_OPENS.format(sock=sock, small=small, young=young))
        )
        alone = await call(maker.recv, 60)
        holder = stack.enter_context(
            spawn_as(BOB, HOLDER.format(sock=sock, small=small, others=others))
        )
        hits = await call(holder.recv, 60)
        maker.send(None)
        held = await call(maker.recv, 60)
    print(f"A's young files served: {alone} alone, {held} while B holds; B's hits {hits}")
    require(alone == 5 and hits >= 100, f"setup: {alone} served alone, {hits} hits")
    assert held == 5, held  # before: 0


# Attack 41's answer turned round: a uid gets a second uid of its own to find each
# of its copies, so that none is charged to it, and holds them all.
OPEN_AND_HOLD = """
from shadowd_client import Busy, Client
held = []
with Client({sock!r}, timeout=10) as c:
    while (path := recv()) is not None:
        try:
            held.append(c.open(path))  # a miss: its copy is cached, this uid's
            out(True)
        except Busy:
            out(False)
"""

FIND = """
from shadowd_client import Client
with Client({sock!r}, timeout=10) as c:
    while (path := recv()) is not None:
        os.close(c.open(path))  # a hit: another uid found it
        out(c.stats()["hits"])
"""


async def tight_pins(start_daemon: Any, shared_dir: Path) -> tuple[Daemon, list[str]]:
    """A daemon of --max-bytes 8M (so 12 MiB at most out of the cache for all uids),
    2 MiB a uid and --max-entries 4, and twenty-four 1 MiB files it caches at once."""
    d = await start_daemon(
        "--socket-mode", "0666", "--racy-window", "0.05", "--max-entries", "4",
        "--max-bytes", "8M", "--max-pinned-bytes-per-uid", "2M",
    )  # fmt: skip
    paths = [str(make_file(shared_dir / f"file{i}", os.urandom(1 << 20))) for i in range(24)]
    await trio.sleep(0.1)  # past the racy window
    return d, paths


async def test_41_copies_another_uid_found_are_held_within_the_all_uids_bound(
    start_daemon: Any, shared_dir: Path
) -> None:
    """What attack 41's answer lets a uid do: a copy another uid's request found is
    charged to no uid, so a uid whose second uid (a subordinate uid of its own) finds
    each of its copies holds them out of the cache past its own bound. They are still
    charged to all uids together, and no copy starts past half as much again over
    --max-bytes (attack 40): under --max-bytes 8M (12 MiB at most) and 2 MiB a uid,
    twenty-four cached 1 MiB copies, each found by the second uid, held and evicted
    (--max-entries 4): at most 12 MiB pinned. Fails where a shared memfd is charged
    to nobody at all (all twenty-four held, 20 MiB pinned)."""
    mib = 1 << 20
    d, paths = await tight_pins(start_daemon, shared_dir)
    sock = str(d.socket_path)
    with contextlib.ExitStack() as stack, trio.fail_after(120):
        holder = stack.enter_context(spawn_as(ALICE, OPEN_AND_HOLD.format(sock=sock)))
        finder = stack.enter_context(spawn_as(BOB, FIND.format(sock=sock)))
        served, hits = 0, 0
        for path in paths:
            holder.send(path)
            if await call(holder.recv, 30):
                served += 1
                finder.send(path)
                hits = await call(finder.recv, 30)
        pinned = (await call(stats, d))["pinned_bytes"]
    print(f"served {served} of {len(paths)}; {hits} found by the other uid; pinned {pinned}")
    require(hits == served and served > 6, f"setup: {served} served, {hits} found")
    assert pinned <= 12 * mib, (served, pinned)


# Attack 40: the uids of a range each hold copies up to their own bound.
HOLD_YOUNG = """
from shadowd_client import Busy, Client
held = []
with Client({sock!r}, timeout=10) as c:
    for path in {paths!r}:
        try:
            held.append(c.open(path))  # young: served uncached, charged to this uid
        except Busy:
            pass
    out(len(held))
    recv()
"""


async def test_40_many_uids_together_pin_no_more_than_the_daemon_wide_bound(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 40: --max-pinned-bytes-per-uid bounded each uid, and nothing bounded all
    uids together: whoever may use many uids (a container's or a user's subordinate
    uid range: thousands) pinned that much memory once per uid. Eight uids, each
    holding young 1 MiB copies under a bound of 8 MiB a uid: 64 MiB pinned beside a
    cache of 16 MiB. All uids together may pin --max-bytes now, and past it only a uid
    below its fair share more, never past half as much again: at most 24 MiB here."""
    mib = 1 << 20
    d = await start_daemon(
        "--socket-mode", "0666", "--racy-window", "60",
        "--max-bytes", "16M", "--max-pinned-bytes-per-uid", "8M",
    )  # fmt: skip
    paths = [str(make_file(shared_dir / f"young{i}", os.urandom(mib))) for i in range(10)]
    code = HOLD_YOUNG.format(sock=str(d.socket_path), paths=paths)
    with contextlib.ExitStack() as stack, trio.fail_after(120):
        held = []
        for k in range(8):
            holder = stack.enter_context(spawn_as(test_uid(40 + k), code))
            held.append(await call(holder.recv, 60))
        pinned = (await call(stats, d))["pinned_bytes"]
    print(f"held per uid: {held}; pinned {pinned / mib:.0f} MiB")
    require(held[0] == 8, f"the first uid did not reach its own bound: {held}")
    assert pinned <= 24 * mib, (held, pinned)  # before: 64 MiB, eight uids at 8 each


FLOOD = """
import threading
from shadowd_client import Client, ShadowdError
paths = {paths!r}
stop = threading.Event()
done = []
def flood(k):
    with Client({sock!r}, timeout=60) as c:
        for path in paths[k::8]:
            if stop.is_set():
                return
            try:
                os.close(c.open(path))
                done.append(path)
            except ShadowdError:
                pass
threads = [threading.Thread(target=flood, args=(k,)) for k in range(8)]
for t in threads:
    t.start()
out("flooding")
recv()
stop.set()
for t in threads:
    t.join()
out(len(done))
"""

MEASURE = """
import time
from shadowd_client import Client
def measure(hit, misses):
    with Client({sock!r}, timeout=30) as c:
        os.close(c.open(hit))
        hits, miss = [], []
        for _ in range({n_hits}):
            t = time.perf_counter()
            os.close(c.open(hit))
            hits.append(time.perf_counter() - t)
        for path in misses:
            t = time.perf_counter()
            os.close(c.open(path))
            miss.append(time.perf_counter() - t)
    return sorted(hits), sorted(miss)
out(measure({hit!r}, {quiet!r}))
recv()
out(measure({hit!r}, {busy!r}))
"""


def p50(xs: list[float]) -> float:
    return statistics.median(xs)


async def test_10_one_uids_copies_do_not_slow_another_uid(
    start_daemon: Any, shared_dir: Path
) -> None:
    # The pinned-bytes bound would refuse most of the flood (attack 9 holds it):
    # lifted here, so that the flood's copies are many and this measures the
    # copy workers' isolation alone.
    d = await start_daemon(
        "--socket-mode", "0666", "--racy-window", "0", "--max-pinned-bytes-per-uid", "64G"
    )
    big = sparse_files(shared_dir, 160, 256 * MiB)
    small = shared_dir / "small"
    small.mkdir(mode=0o755)
    hit = make_file(small / "hit", os.urandom(16 * 1024))
    misses = [make_file(small / f"m{i}", os.urandom(64 * 1024)) for i in range(30)]
    sock = str(d.socket_path)
    victim_code = MEASURE.format(
        sock=sock,
        hit=str(hit),
        n_hits=300,
        quiet=[str(m) for m in misses[:20]],
        busy=[str(m) for m in misses[20:]],  # ten: each takes 0.2-2 s today
    )
    flood_code = FLOOD.format(sock=sock, paths=[str(f) for f in big])
    with trio.fail_after(60), spawn_as(NOBODY, victim_code) as victim:
        quiet_hits, quiet_misses = await call(victim.recv, 30)
        with spawn_as(ALICE, flood_code) as flood:
            require(await call(flood.recv, 30) == "flooding", "the flood did not start")
            await trio.sleep(0.5)  # its copies are under way
            victim.send("go")
            busy_hits, busy_misses = await call(victim.recv, 30)
            flood.send("stop")
            copied = await call(flood.recv, 60)
    figures = {
        "hit_p50_ms": (round(p50(quiet_hits) * 1e3, 2), round(p50(busy_hits) * 1e3, 2)),
        "miss_p50_ms": (round(p50(quiet_misses) * 1e3, 2), round(p50(busy_misses) * 1e3, 2)),
        "miss_max_ms": (round(quiet_misses[-1] * 1e3, 2), round(busy_misses[-1] * 1e3, 2)),
        "flood_copies": copied,
    }
    print(figures)
    require(copied >= 8, f"the flood made too few copies to matter: {figures}")
    # Generous bounds (a quiet daemon answers both in well under 1 ms; today
    # the misses wait 0.2-2 s for copy workers): another uid's hits at most
    # 2 ms at the median, its misses 50 ms at the median and 500 ms at most.
    bounds = (p50(busy_hits) <= 0.002, p50(busy_misses) <= 0.05, busy_misses[-1] <= 0.5)
    assert bounds == (True, True, True), figures


# -- 7, 8: descriptors a peer makes the daemon hold ---------------------------

NEVER_READ = """
import array, errno, socket, time
import msgpack
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect({sock!r})
    s.send(msgpack.packb({{"op": "hello", "id": 0, "version": 1}}))
    s.recv(65536)
    s.setblocking(False)
    return s
fds = [os.open(p, os.O_RDONLY) for p in {paths!r}]
conns, sent = [], 0
for _ in range({connections}):
    s = connect()
    conns.append(s)
    waits = 0
    for i in range({requests}):
        op = {{"op": "open", "id": i + 1}} if len(fds) == 1 else {{"op": "open_batch", "id": i + 1}}
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        done = False
        while not done:
            try:
                s.sendmsg([msgpack.packb(op)], anc)
                done = True
            except OSError as e:
                # Our own fds in flight at their limit: wait a little for the daemon
                # to take some in (however fast it answered our hello), then go on.
                if e.errno != errno.ETOOMANYREFS or waits == 20:
                    break
                waits += 1
                time.sleep(0.001)
        if not done:
            break  # the daemon stopped reading us, or our fds in flight stay at their limit
        sent += 1
for _ in range({idle}):  # and connections that only take a slot of the daemon's fd table
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect({sock!r})
    conns.append(s)
out(sent)
recv()  # hold every connection, never reading a reply, until the test is done
"""

CANARY = """
from shadowd_client import Client, ShadowdError
ok, failed = 0, []
for _ in range({rounds}):
    try:
        with Client({sock!r}, timeout={timeout}) as c:
            for _ in range(10):
                fd = c.open({path!r})
                ok += os.pread(fd, 1 << 16, 0) == {data!r}
                os.close(fd)
    except ShadowdError as e:
        failed.append(type(e).__name__ + ": " + str(e)[:80])
out([ok, failed])
"""


async def test_07_unread_replies_do_not_fail_another_uids_requests(
    start_daemon: Any, shared_dir: Path
) -> None:
    run = mkdir_owned(shared_dir / "run", ALICE)
    # Not root: no CAP_SYS_RESOURCE, so what it has in flight in SCM_RIGHTS
    # messages is bounded by its RLIMIT_NOFILE, as for the shipped unit.
    d = await start_daemon(
        "--socket-mode",
        "0666",
        "--racy-window",
        "0",
        user=(ALICE, ALICE),
        directory=run,
        nofile=(256, 256),
    )
    data = b"canary\n" * 100
    f = make_file(shared_dir / "f", data)
    await call(cache, d, f)
    sock = str(d.socket_path)
    flood = NEVER_READ.format(sock=sock, paths=[str(f)], connections=2, requests=200, idle=0)
    with trio.fail_after(60), spawn_as(BOB, flood) as attacker:
        sent = await call(attacker.recv, 30)
        require(sent >= 300, f"the attacker got only {sent} requests out")
        await trio.sleep(0.3)  # the daemon answers what it can
        ok, failed = await call(
            child, CAROL, CANARY.format(sock=sock, path=str(f), data=data, rounds=5, timeout=5)
        )
    print(f"attacker sent {sent}; canary: {ok} ok, {len(failed)} failed {failed[:3]}")
    assert (ok, failed) == (50, [])


async def test_08_pending_batch_replies_do_not_exhaust_the_daemons_fds(
    start_daemon: Any, shared_dir: Path
) -> None:
    d = await start_daemon("--socket-mode", "0666", "--racy-window", "0", nofile=(4096, 4096))
    data = b"canary\n" * 100
    f = make_file(shared_dir / "f", data)
    await call(cache, d, f)
    sock = str(d.socket_path)
    # 40 connections of pipelined 64-fd batches, then 100 idle ones: the
    # replies that do not fit their sockets hold up to --max-inflight x 64
    # fds each, and the idle connections take what is left.
    flood = NEVER_READ.format(
        sock=sock, paths=[str(f)] * 64, connections=40, requests=300, idle=100
    )
    with trio.fail_after(60), spawn_as(ALICE, flood) as attacker:
        sent = await call(attacker.recv, 30)
        await trio.sleep(0.5)  # the daemon answers what it can
        held = d.open_fds()
        # What the attack is for: the daemon holding the fds of replies nobody
        # reads (1180-1244, idle or loaded). The batches it took to get there
        # are the host's: with two busy loops 673-784 (40 x 20 was required
        # here), idle 1455-1861.
        require(held >= 1000, f"the daemon held only {held} fds ({sent} batches sent)")
        ok, failed = await call(
            child, NOBODY, CANARY.format(sock=sock, path=str(f), data=data, rounds=2, timeout=2)
        )
    accept_failed = d.log().count("accept failed")
    print(
        f"{sent} batches sent; daemon held {held} fds; canary {ok} ok, {failed[:3]}; "
        f"{accept_failed} accept failures logged"
    )
    assert (ok, failed, accept_failed) == (20, [], 0)


# -- 1, 2: a device number freed by one mount and given to a FUSE mount -------

ATTEMPTS = 5  # another mount on the host may take the freed number first

READ_AS_ANOTHER = """
import hashlib
from shadowd_client import Client, ShadowdError
try:
    with Client({sock!r}, timeout=10) as c:
        fd = c.open({path!r})
    data = os.pread(fd, 1 << 20, 0)
    out({{"sha256": hashlib.sha256(data).hexdigest(), "head": data[:24].decode("latin-1")}})
except ShadowdError as e:
    out({{"error": type(e).__name__}})
"""


def mimic(st: os.stat_result, data: bytes, **kwargs: Any) -> FuseFile:
    """A FUSE file that reports *st*'s inode number, size and times, with bytes of its own."""
    require(len(data) == st.st_size, "the mimic must have the same size")
    return FuseFile(
        data=data, ino=st.st_ino, mtime_ns=st.st_mtime_ns, ctime_ns=st.st_ctime_ns, **kwargs
    )


def mount_fuse(mountpoint: Path, files: dict[str, FuseFile]) -> HangingFS:
    """A HangingFS with *files* on *mountpoint* (made here); skips where FUSE cannot mount."""
    mountpoint.mkdir()
    try:
        return HangingFS(mountpoint, files=files)
    except OSError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot mount a FUSE file system here: {exc}")


def fuse_on_freed_number(
    d: Daemon, base: Path, secret: bytes, own: bytes
) -> tuple[HangingFS, os.stat_result]:
    """Root's 0600 file cached from a tmpfs, the tmpfs unmounted, its number given to FUSE."""
    for attempt in range(ATTEMPTS):
        t = base / f"tmpfs{attempt}"
        dev = mount_tmpfs(t)
        try:
            f = make_file(t / "secret", secret, 0o600)
            st = f.stat()
            cache(d, f)
        finally:
            umount(t)
        fs = mount_fuse(
            base / f"fuse{attempt}",
            {"mine": mimic(st, own, mode=0o444, uid=NOBODY, gid=NOBODY)},
        )
        if fs.st_dev == dev:
            mine = os.stat(fs.mountpoint / "mine")
            require(
                (mine.st_dev, mine.st_ino, mine.st_size, mine.st_mtime_ns, mine.st_ctime_ns)
                == (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns),
                "the FUSE file does not report the tmpfs file's stat",
            )
            return fs, st
        fs.close()
    pytest.skip(f"no FUSE mount got a freed device number back in {ATTEMPTS} attempts")


async def test_01_a_reused_device_number_never_serves_another_files_bytes(
    start_daemon: Any, shared_dir: Path
) -> None:
    d = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    secret = b"ROOT ONLY " * 42_000
    own = b"nobody's own file ".ljust(len(secret), b".")
    fs, _st = await call(fuse_on_freed_number, d, shared_dir, secret, own)
    try:
        code = READ_AS_ANOTHER.format(sock=str(d.socket_path), path=str(fs.mountpoint / "mine"))
        got = await call(child, NOBODY, code)
    finally:
        fs.close()
    print(got)
    require("error" not in got, f"the open was refused: {got}")
    assert got["sha256"] == hashlib.sha256(own).hexdigest(), got["head"]


# Root in a mount namespace of its own (as a container's runtime would be):
# a tmpfs there first, so that the number the test frees next is the lowest.
ELSEWHERE = """
import ctypes, time
from pathlib import Path
from tests.fusefs import FuseFile, HangingFS
from tests.mounts import mount_tmpfs
from tests.wire import Raw
libc = ctypes.CDLL(None, use_errno=True)
if libc.unshare(0x20000) != 0 or libc.mount(b"none", b"/", None, 0x4000 | 0x40000, None) != 0:
    raise OSError(ctypes.get_errno(), "unshare the mount namespace")
base = Path({base!r})
own = base / "own"
mount_tmpfs(own)
(own / "f").write_bytes(b"x" * 100)
out("ready")
raw = Raw({sock!r})
recv()
fd = os.open(own / "f", os.O_RDONLY)
reply, fds = raw.call({{"op": "open", "id": 1}}, [fd])  # the daemon reads its mount table
out(bool(reply.get("ok")))
mimic = recv()
(base / "fuse").mkdir()
fs = HangingFS(base / "fuse", files={{"hang": FuseFile(bytes.fromhex(mimic.pop("data")), **mimic)}})
out(fs.st_dev)
recv()
hang = os.open(base / "fuse" / "hang", os.O_RDONLY | os.O_NONBLOCK)  # kept: our close would hang
raw.send({{"op": "open", "id": 2}}, [hang])
deadline = time.monotonic() + 2
while fs.hung_flushes == 0 and time.monotonic() < deadline:
    time.sleep(0.01)
out(fs.hung_flushes)
recv()
fs.close()  # abort the connection: every flush waiting on it fails at once
out("aborted")
recv()
"""


def canary_latencies(d: Daemon, f: Path, n: int = 5, timeout: float = 2.0) -> list[float]:
    """Seconds each of *n* fresh connections took to open *f* (*timeout* when it never did)."""
    took = []
    for _ in range(n):
        started = time.monotonic()
        try:
            with Raw(d.socket_path, timeout=timeout, hello=False) as raw:
                raw.call({"op": "hello", "id": 0, "version": 1})
                reply, data = open_raw(raw, f)
        except (TimeoutError, OSError, EOFError):
            took.append(timeout)
            break  # the loop is stuck: one is enough
        require(reply.get("ok") and data == f.read_bytes(), f"canary refused: {reply}")
        took.append(time.monotonic() - started)
    return took


def main_thread_stack(d: Daemon) -> list[str]:
    """The kernel functions the daemon's main thread (its event loop) is in, innermost first."""
    try:
        text = Path(f"/proc/{d.pid}/task/{d.pid}/stack").read_text()
    except OSError:
        return []
    return [line.split()[1].split("+")[0] for line in text.splitlines() if len(line.split()) > 1]


def hang_the_loop(d: Daemon, base: Path, local: Path) -> dict[str, Any]:
    """Attack 2 in a worker thread; returns what the canary saw."""
    for attempt in range(ATTEMPTS):
        where = base / f"ns{attempt}"
        where.mkdir()
        with spawn_as(0, ELSEWHERE.format(base=str(where), sock=str(d.socket_path))) as other:
            require(other.recv() == "ready", "the other namespace is not ready")
            t = base / f"tmpfs{attempt}"
            dev = mount_tmpfs(t)
            try:
                f = make_file(t / "lib.so", b"tmpfs bytes\n" * 100)
                st = f.stat()
                cache(d, f)
                other.send("go")
                require(other.recv() is True, "the other namespace's own file was refused")
            finally:
                umount(t)
            other.send(
                {
                    "data": b"fuse bytes!\n".ljust(st.st_size, b".").hex(),
                    "ino": st.st_ino,
                    "mtime_ns": st.st_mtime_ns,
                    "ctime_ns": st.st_ctime_ns,
                    "hang_flush": True,
                }
            )
            if other.recv() != dev:
                continue  # another mount took the number first: start over
            other.send("go")
            flushes = other.recv()
            took = canary_latencies(d, local)
            loop_stack = main_thread_stack(d)
            other.send("abort")
            require(other.recv() == "aborted", "the FUSE connection was not aborted")
        time.sleep(0.5)  # let the daemon go on, and log whatever it does
        _reply, data = open_once(d, local)
        require(data == local.read_bytes(), "the daemon no longer serves after the abort")
        return {
            "canary_seconds": took,
            "flushes_waiting": flushes,
            "loop_stack": loop_stack,
            "log": d.log(),
        }
    pytest.skip(f"no FUSE mount got a freed device number back in {ATTEMPTS} attempts")


async def test_02_a_hung_fuse_file_in_another_namespace_never_blocks_the_loop(
    start_daemon: Any, shared_dir: Path
) -> None:
    d = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    local = make_file(shared_dir / "local", b"served to everyone\n" * 50)
    await call(cache, d, local)
    with trio.fail_after(60):
        outcome = await call(hang_the_loop, d, shared_dir, local)
    took = outcome["canary_seconds"]
    print(f"canary: {took}; flushes waiting: {outcome['flushes_waiting']}")
    print(f"the loop's thread in the kernel: {outcome['loop_stack'][:6]}")
    assert (max(took) < 1.0, "Traceback" not in outcome["log"]) == (True, True), took


# Attacks 47 onward come from red team 26 (a hostile daemon facing its clients,
# the pins, the index).


@contextlib.contextmanager
def _daemon_sending(
    shared_dir: Path, fs: HangingFS, name: str, answered: list[str]
) -> Iterator[Path]:
    """A stand-in daemon (threads of this process) that answers hello and then every
    open with a descriptor of *fs*'s file *name*, opened anew for each reply (after
    the client connected: a child that closed it between its fork and its exec
    would wait on the flush); *answered* gets each request's op."""
    import msgpack

    from shadowd.fds import scm_rights

    from .test_c_client import _requests, stand_in_daemon

    def hostile(conn: Any) -> None:
        hello = msgpack.unpackb(conn.recv(4096))
        limits = {"max_batch": 64, "racy_window_ns": 0}
        conn.send(
            msgpack.packb(
                {"id": hello["id"], "ok": True, "version": 2, "server": "x", "limits": limits}
            )
        )
        for msg, fds in _requests(conn):
            for fd in fds:
                os.close(fd)
            answered.append(msg["op"])
            planted = os.open(fs.mountpoint / name, os.O_RDONLY | os.O_CLOEXEC)
            reply = {"id": msg["id"], "ok": True, "size": 3000, "hit": True}
            conn.sendmsg([msgpack.packb(reply)], scm_rights([planted]))
            # Closing ours waits on the flush as well, until the mount's abort; left
            # open, the child of the C client's fork would wait on it instead.
            threading.Thread(target=_close_quietly, args=(planted,), daemon=True).start()

    path = shared_dir / f"hostile-{len(answered)}-{time.monotonic_ns()}.sock"
    with stand_in_daemon(path, hostile):
        yield path


async def test_47_a_daemons_descriptor_that_is_no_memfd_never_holds_a_client(
    shared_dir: Path, c_client_build: Callable[..., tuple[str | None, str]]
) -> None:
    """A daemon (a server that took the socket's name: attack 11's remains) answers
    an open with a descriptor of a file of its own FUSE mount, whose server never
    answers a flush. Each client refuses it (it is not sealed) and closes it, and
    that close waited for the flush for good: the open never returned. Every open
    must end: refused, or copied here by the routed opens."""
    from shadowd_client import AsyncClient, Client, Opener, ShadowdError

    data = b"the caller's own file; " * 100  # no newline: the C client's output is read by line
    src = make_file(shared_dir / "own", data)
    fake = FuseFile(data=b"f" * 3000, ino=4747, mode=0o444, hang_flush=True)
    binary, why = c_client_build()
    require(binary is not None, f"the C client did not build: {why}")
    outcomes: dict[str, str] = {}
    answered: list[str] = []
    with mounted_fuse(shared_dir / "fuse", fake) as fs:
        try:

            def client() -> str:
                with Client(sock, timeout=2) as c:
                    try:
                        os.close(c.open(src))
                    except ShadowdError as exc:
                        return type(exc).__name__
                    return "served"

            def opener() -> str:
                with Opener(sock, timeout=2, local_below=0, use_index=False) as o:
                    fd = o.open(src)
                    try:
                        return "copied here" if read_all(fd) == data else "wrong bytes"
                    finally:
                        os.close(fd)

            async def aclient() -> str:
                async with AsyncClient(sock, timeout=2) as c:
                    try:
                        os.close(await c.open(src))
                    except ShadowdError as exc:
                        return type(exc).__name__
                    return "served"

            def c_routed() -> str:
                import subprocess

                assert binary is not None
                c_args = ["-s", str(sock), str(src), str(src)]
                proc = subprocess.Popen(
                    [binary, "-q", "-r", "-g", "--local-below", "0", "--young", "0", *c_args],
                    stdin=subprocess.PIPE,
                    stdout=subprocess.PIPE,
                    stderr=subprocess.DEVNULL,
                )
                assert proc.stdin is not None and proc.stdout is not None
                _c_procs.append(proc)
                require(proc.stdout.readline() == b"ready\n", "the C client did not start")
                proc.stdin.write(b"go\n")
                proc.stdin.flush()
                # The first open's bytes, then "ready" for the second: it returned.
                line = proc.stdout.readline()
                return "copied here" if line == data + b"ready\n" else f"got {line[:40]!r}"

            def async_client() -> str:  # a loop of its own: a close may hold its thread
                return trio.run(aclient)

            clients = {"Client": client, "Opener": opener, "C routed": c_routed}
            for name, run in {**clients, "AsyncClient": async_client}.items():
                with _daemon_sending(shared_dir, fs, "fake", answered) as sock:
                    try:
                        with trio.fail_after(10):
                            outcomes[name] = await trio.to_thread.run_sync(
                                run, abandon_on_cancel=True
                            )
                    except trio.TooSlowError:
                        outcomes[name] = "waited"
            flushes = fs.hung_flushes
        finally:
            fs.close()  # the flushes fail: whatever waited on one ends
            for proc in _c_procs:
                proc.kill()
                proc.communicate()  # and its pipes closed
            _c_procs.clear()
    print(f"{outcomes}; asked {answered}; {flushes} flushes unanswered")
    require(len(answered) >= 4, f"the stand-in was not asked by every client: {answered}")
    assert outcomes == {
        "Client": "UnsealedDescriptor",
        "Opener": "copied here",
        "C routed": "copied here",
        "AsyncClient": "UnsealedDescriptor",
    }, outcomes


_c_procs: list[Any] = []


def _close_quietly(fd: int) -> None:
    with contextlib.suppress(OSError):  # ENOTCONN: the flush of an aborted mount
        os.close(fd)


@contextlib.contextmanager
def mounted_fuse(mountpoint: Path, fake: FuseFile) -> Iterator[HangingFS]:
    """fusefs.mounted with the one file *fake*, called "fake"."""
    from .fusefs import mounted

    with mounted(mountpoint, files={"fake": fake}, hanging=0) as fs:
        yield fs


async def test_48_a_served_descriptor_whose_offset_another_holder_moved_is_refused(
    shared_dir: Path, c_client_build: Callable[..., tuple[str | None, str]]
) -> None:
    """A daemon answers an open with a description it shares (a dup of what it hands
    others, or sends to several): sealed, read-only, the file's bytes and size, but
    at the offset another holder's reads left it. A tracee that reads it sequentially
    reads from there, and moves it under the others. The C client refuses a served
    descriptor whose offset is not 0 (a new open file description's); the Python
    clients took it."""
    import msgpack
    from shadowd_client import AsyncClient, Client, ProtocolViolation

    from shadowd.fds import scm_rights
    from shadowd.memfd import sealed_from_bytes

    from .test_c_client import _requests, stand_in_daemon

    data = b"the caller's own file; " * 100
    src = make_file(shared_dir / "own", data)
    sealed = sealed_from_bytes(data)
    shared = sealed.share()  # one description, sent to every request
    sealed.release()
    asked: list[str] = []

    def sharing(conn: Any) -> None:
        hello = msgpack.unpackb(conn.recv(4096))
        reply = {"id": hello["id"], "ok": True, "version": 1, "server": "x", "limits": {}}
        conn.send(msgpack.packb(reply))
        for msg, fds in _requests(conn):
            for fd in fds:
                os.close(fd)
            asked.append(msg["op"])
            os.lseek(shared, 100, os.SEEK_SET)  # another holder read 100 bytes of it
            answer = {"id": msg["id"], "ok": True, "size": len(data), "hit": True}
            conn.sendmsg([msgpack.packb(answer)], scm_rights([shared]))

    def outcome(fd: int) -> str:
        try:
            return f"taken at offset {os.lseek(fd, 0, os.SEEK_CUR)}"
        finally:
            os.close(fd)

    def client() -> str:
        with Client(sock, timeout=5) as c:
            try:
                return outcome(c.open(src))
            except ProtocolViolation:
                return "refused"

    async def aclient() -> str:
        async with AsyncClient(sock, timeout=5) as c:
            try:
                return outcome(await c.open(src))
            except ProtocolViolation:
                return "refused"

    def c_client() -> str:
        import subprocess

        assert binary is not None
        done = subprocess.run(
            [binary, "-q", "-s", str(sock), str(src)], capture_output=True, timeout=20, check=False
        )
        return "refused" if b"offset is not 0" in done.stderr else f"exit {done.returncode}"

    binary, why = c_client_build()
    require(binary is not None, f"the C client did not build: {why}")
    outcomes: dict[str, str] = {}
    try:
        with trio.fail_after(60):
            for name in ("Client", "AsyncClient", "C"):
                with stand_in_daemon(shared_dir / f"sharing-{name}.sock", sharing):
                    sock = shared_dir / f"sharing-{name}.sock"
                    if name == "AsyncClient":
                        outcomes[name] = await aclient()
                    else:
                        run = client if name == "Client" else c_client
                        outcomes[name] = await trio.to_thread.run_sync(run)
    finally:
        os.close(shared)
    print(f"{outcomes}; asked {asked}")
    require(len(asked) >= 3, f"the stand-in was not asked by every client: {asked}")
    assert outcomes == {"Client": "refused", "AsyncClient": "refused", "C": "refused"}, outcomes


async def test_49_a_served_memfd_published_back_is_not_pinned_once_its_entry_goes(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Another uid that may read a cached file publishes the descriptor it was served
    as a private file of its own and lets go of everything; the daemon kept its own
    cached memfd as that private entry. Once the file's host entry is evicted, that
    memfd counted as held out of the cache (pinned, in all uids' bound: a memfd
    another uid found) while the cache, as the private entry, counted it too, and no
    client held any of it. pinned_bytes must come back to 0."""
    from .test_attacks_25 import MALLORY, REPUBLISH

    d: Daemon = await start_daemon(
        "--socket-mode", "0666", "--racy-window", "0", "--max-entries", "2"
    )
    f = make_file(shared_dir / "libshared.so", b"s" * 50_000)
    others = [make_file(shared_dir / f"other{i}", bytes([i]) * 3000) for i in range(2)]

    def owner_opens(*paths: Path) -> dict[str, int]:
        from shadowd_client import Client

        with Client(d.socket_path, timeout=10) as c:
            for p in paths:
                for _ in range(2):
                    os.close(c.open(p))
            s = c.stats()
        return {k: s[k] for k in ("hits", "entries", "evictions", "pinned_bytes")}

    with trio.fail_after(60):
        cached = await trio.to_thread.run_sync(owner_opens, f)
        require(cached["hits"] == 1, f"the file was not cached: {cached}")
        code = REPUBLISH.format(path=str(d.socket_path), name=str(f))
        published = await trio.to_thread.run_sync(run_as, MALLORY, code)
        require(published is True, f"the publish was refused: {published}")
        after = await trio.to_thread.run_sync(owner_opens, *others[:1])
        for _ in range(50):  # the memfds let go of are read as freed on later rounds
            if after["pinned_bytes"] == 0:
                break
            await trio.sleep(0.1)
            after = await trio.to_thread.run_sync(owner_opens)
    print(f"cached {cached}; after the eviction {after}")
    require(after["evictions"] >= 1, f"nothing was evicted: {after}")
    assert after["pinned_bytes"] == 0, after
