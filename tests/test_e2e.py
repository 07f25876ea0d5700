# End to end: `shadowd serve` as a real subprocess, real sockets, real memfds,
# real SCM_RIGHTS. Each test proves one rule of DESIGN.md and would fail if
# that rule broke.
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import itertools
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
from shadowd_client import (
    Client,
    FileTooLarge,
    NotReadable,
    NotRegularFile,
    Opener,
)

from shadowd import hotcalls
from shadowd.memfd import REQUIRED_SEALS

from .conftest import (
    NOBODY,
    REPO,
    Daemon,
    deep_file,
    make_file,
    read_fd,
    requires_root,
    run_as,
    settle,
)
from .wire import Raw

LIBZ = "/lib/x86_64-linux-gnu/libz.so.1"


async def call(fn: Any, *args: Any) -> Any:
    """Run blocking client code off the trio thread (so fail_after still works)."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def stats(d: Daemon) -> dict[str, Any]:
    with Client(d.socket_path, timeout=10) as c:
        return c.stats()


def _open_once(d: Daemon, path: Path) -> int:
    with Client(d.socket_path, timeout=10) as c:
        return c.open(path)


def _open_fd_once(d: Daemon, fd: int) -> int:
    with Client(d.socket_path, timeout=10) as c:
        return c.open_fd(fd)


def open_bytes(d: Daemon, path: Path) -> bytes:
    with Client(d.socket_path, timeout=10) as c:
        fd = c.open(path)
    try:
        return read_fd(fd)
    finally:
        os.close(fd)


async def test_bytes_exact_first_open_misses_then_hits(daemon: Daemon, tmp_path: Path) -> None:
    sizes = [0, 1, 4095, 4096, 65537, 1024 * 1024 + 3]
    files = [make_file(tmp_path / f"f{n}", os.urandom(n)) for n in sizes]
    settle(*files)

    def work() -> None:
        with Client(daemon.socket_path, timeout=10) as c:
            for round_ in range(3):
                for f in files:
                    fd = c.open(f)
                    try:
                        assert read_fd(fd) == f.read_bytes()
                    finally:
                        os.close(fd)
                s = c.stats()
                assert s["misses"] == len(files)
                assert s["hits"] == round_ * len(files)
                assert s["entries"] == len(files)
                assert s["bytes"] == sum(sizes)

    with trio.fail_after(30):
        await call(work)
    # The daemon says which hit path it ran, and it is the one asked for.
    in_python = daemon.env is not None and daemon.env.get("SHADOWD_NO_C") == "1"
    expected = "Python (SHADOWD_NO_C is set)" if in_python else hotcalls.DESCRIPTION
    assert f"hit path system calls in {expected})" in daemon.log()


async def test_served_fd_is_sealed_read_only_and_private(daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "data", b"0123456789" * 100)
    settle(f)

    def work() -> None:
        with Client(daemon.socket_path, timeout=10) as c:
            a = c.open(f)
            b = c.open(f)  # a hit: another open file description of the same memfd
        try:
            assert fcntl.fcntl(a, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
            assert fcntl.fcntl(a, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
            assert fcntl.fcntl(a, fcntl.F_GETFD) & fcntl.FD_CLOEXEC
            assert os.fstat(a).st_ino == os.fstat(b).st_ino  # one copy per version
            with pytest.raises(OSError):
                os.write(a, b"x")
            with pytest.raises(OSError):
                os.ftruncate(a, 0)
            try:
                rw = os.open(f"/proc/self/fd/{a}", os.O_RDWR)
            except PermissionError:
                rw = -1
            if rw >= 0:
                try:
                    with pytest.raises(OSError) as info:
                        os.write(rw, b"x")
                    assert info.value.errno == errno.EPERM
                    with pytest.raises(OSError):
                        os.ftruncate(rw, 1)
                finally:
                    os.close(rw)
            # Independent offsets: reading one does not move the other.
            assert os.read(a, 5) == b"01234"
            assert os.read(b, 3) == b"012"
            assert os.read(a, 2) == b"56"
            assert os.lseek(b, 0, os.SEEK_CUR) == 3
        finally:
            os.close(a)
            os.close(b)

    with trio.fail_after(30):
        await call(work)


async def test_same_size_rewrite_with_old_mtime_is_served_fresh(
    daemon: Daemon, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "conf", b"A" * 4096)
    old = f.stat()
    settle(f)

    def work() -> None:
        assert open_bytes(daemon, f) == b"A" * 4096
        assert open_bytes(daemon, f) == b"A" * 4096
        assert stats(daemon)["hits"] == 1
        f.write_bytes(b"B" * 4096)
        os.utime(f, ns=(old.st_atime_ns, old.st_mtime_ns))
        now = f.stat()
        assert (now.st_size, now.st_mtime_ns) == (old.st_size, old.st_mtime_ns)
        assert open_bytes(daemon, f) == b"B" * 4096
        assert stats(daemon)["invalidations"] == 1

    with trio.fail_after(30):
        await call(work)


async def test_a_file_dated_past_2262_is_cached_and_hit(daemon: Daemon, tmp_path: Path) -> None:
    # Its mtime does not fit 64-bit nanoseconds; the key must still be exact.
    f = make_file(tmp_path / "future", b"from the future")
    settle(f)
    os.utime(f, ns=(10**19 + 5, 10**19 + 5))
    settle(f)

    def work() -> None:
        for _ in range(3):
            assert open_bytes(daemon, f) == b"from the future"
        s = stats(daemon)
        assert (s["misses"], s["hits"], s["invalidations"]) == (1, 2, 0)

    with trio.fail_after(30):
        await call(work)


async def test_a_long_path_is_served_by_a_daemon_with_a_small_max_request(
    start_daemon: Any, tmp_path: Path
) -> None:
    d = await start_daemon("--racy-window", "0.05", "--max-request", "512")
    f = deep_file(tmp_path, 600, b"deep bytes")

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:
            for _ in range(2):  # the first request goes before the hello reply
                fd = c.open(f)
                try:
                    assert read_fd(fd) == b"deep bytes"
                finally:
                    os.close(fd)
            assert c.stats()["hits"] == 1

    with trio.fail_after(30):
        await call(work)


async def test_200_rewrite_then_open_rounds_never_stale(start_daemon: Any, tmp_path: Path) -> None:
    # No racy window: every round is cached, so every round tests the key.
    d = await start_daemon("--racy-window", "0")
    f = make_file(tmp_path / "hot", b"0" * 8192)
    mtime = f.stat().st_mtime_ns

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:
            for i in range(200):
                content = (b"%08d" % i) * 1024
                f.write_bytes(content)
                os.utime(f, ns=(mtime, mtime))
                fd = c.open(f)
                try:
                    got = read_fd(fd)
                finally:
                    os.close(fd)
                assert got == content, f"stale bytes served in round {i}"
            s = c.stats()
            assert s["misses"] == 200

    with trio.fail_after(60):
        await call(work)


async def test_racy_fresh_file_is_served_but_not_cached(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon()  # the default window of one second
    f = make_file(tmp_path / "new", b"fresh")

    def work() -> None:
        assert open_bytes(d, f) == b"fresh"
        s = stats(d)
        assert s["uncached"] == 1 and s["entries"] == 0

    with trio.fail_after(30):
        await call(work)


async def test_replaced_by_rename_is_served_fresh(daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "lib.so", b"old" * 1000)
    settle(f)

    def work() -> None:
        assert open_bytes(daemon, f) == b"old" * 1000
        tmp = make_file(tmp_path / "lib.so.tmp", b"new" * 1000)
        os.rename(tmp, f)
        assert open_bytes(daemon, f) == b"new" * 1000

    with trio.fail_after(30):
        await call(work)


async def test_entry_budget_and_lru_order(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon("--racy-window", "0.05", "--max-entries", "3")
    files = {n: make_file(tmp_path / n, n.encode() * 100) for n in "abcd"}
    settle(*files.values())

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:

            def hit(name: str) -> bool:
                before = c.stats()["hits"]
                fd = c.open(files[name])
                try:
                    assert read_fd(fd) == files[name].read_bytes()
                finally:
                    os.close(fd)
                s = c.stats()
                assert s["entries"] <= 3
                return bool(s["hits"] - before)

            assert [hit(n) for n in "abc"] == [False, False, False]
            assert hit("a")  # a is now the most recently used
            assert not hit("d")  # evicts b, the least recently used
            assert hit("a") and hit("c") and hit("d")
            assert not hit("b")  # b was the one evicted
            assert c.stats()["evictions"] == 2

    with trio.fail_after(30):
        await call(work)


async def test_byte_budget_never_exceeded(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon("--racy-window", "0.05", "--max-bytes", "10K")
    rng = random.Random(3)
    files = [make_file(tmp_path / f"f{i}", os.urandom(rng.randrange(1, 6000))) for i in range(12)]
    settle(*files)

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:
            for _ in range(80):
                f = rng.choice(files)
                fd = c.open(f)
                try:
                    assert read_fd(fd) == f.read_bytes()
                finally:
                    os.close(fd)
                s = c.stats()
                assert s["bytes"] <= 10 * 1024
            assert c.stats()["evictions"] > 0

    with trio.fail_after(60):
        await call(work)


async def test_file_over_max_file_size_is_never_cached(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon("--racy-window", "0.05", "--max-file-size", "1K")
    big = make_file(tmp_path / "big", os.urandom(2048))
    small = make_file(tmp_path / "small", os.urandom(1024))
    settle(big, small)

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:
            for _ in range(2):
                with pytest.raises(FileTooLarge, match="max-file-size"):
                    c.open(big)
            fd = c.open(small)
            os.close(fd)
            s = c.stats()
            assert s["entries"] == 1 and s["bytes"] == 1024 and s["copies"] == 1
        # The supervisor helper copies it locally instead.
        with Opener(d.socket_path, local_below=0) as opener:
            fd = opener.open(big)
            try:
                assert read_fd(fd) == big.read_bytes()
                assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
            finally:
                os.close(fd)
            assert (opener.local_opens, opener.daemon_opens) == (1, 0)

    with trio.fail_after(30):
        await call(work)


async def test_served_dso_loads_and_served_binary_runs(daemon: Daemon) -> None:
    def work() -> None:
        with Client(daemon.socket_path, timeout=10) as c:
            lib = c.open(LIBZ)
            echo = c.open("/bin/echo")
        try:
            z = ctypes.CDLL(f"/proc/self/fd/{lib}")
            z.zlibVersion.restype = ctypes.c_char_p
            assert z.zlibVersion().startswith(b"1.")
            assert os.fstat(echo).st_mode & 0o111
            out = subprocess.run(
                [
                    sys.executable,
                    "-c",
                    "import os, sys; fd = int(sys.argv[1]); "
                    "os.execve(fd, ['echo', 'served', 'by', 'shadowd'], {})",
                    str(echo),
                ],
                pass_fds=[echo],
                capture_output=True,
                timeout=10,
                check=True,
            )
            assert out.stdout == b"served by shadowd\n"
        finally:
            os.close(lib)
            os.close(echo)

    with trio.fail_after(30):
        await call(work)


MAPS_OF_A_DSO = """
import ctypes, sys
lib = ctypes.CDLL(f"/proc/self/fd/{sys.argv[1]}")
print("".join(line for line in open("/proc/self/maps") if "memfd:" in line))
"""


async def test_a_program_that_maps_a_served_dso_sees_its_name(
    daemon: Daemon, tmp_path: Path
) -> None:
    """perf, gdb and pmap tell libraries apart: each memfd has its file's basename."""
    lib = tmp_path / "libnamed.so.1"
    shutil.copyfile(LIBZ, lib)
    settle(lib)

    def work() -> list[str]:
        maps = []
        with Client(daemon.socket_path, timeout=10) as c:
            for _ in range(2):  # the miss, then the hit (the cached memfd)
                src = os.open(lib, os.O_RDONLY | os.O_CLOEXEC)
                try:
                    # The label a client chooses names nothing.
                    fd = c.open_fd(src, label="/some/label/chosen-by-client.so")
                finally:
                    os.close(src)
                try:
                    maps.append(
                        subprocess.run(
                            [sys.executable, "-c", MAPS_OF_A_DSO, str(fd)],
                            pass_fds=[fd],
                            capture_output=True,
                            text=True,
                            timeout=10,
                            check=True,
                        ).stdout
                    )
                finally:
                    os.close(fd)
        return maps

    with trio.fail_after(30):
        maps = await call(work)
    for text in maps:
        lines = [ln for ln in text.splitlines() if ln.strip()]
        assert lines, text
        assert all(ln.endswith("/memfd:libnamed.so.1 (deleted)") for ln in lines), text
    targets = daemon.fd_targets()
    assert "/memfd:libnamed.so.1 (deleted)" in targets
    assert not any("chosen-by-client" in t or str(tmp_path) in t for t in targets)


async def test_non_regular_files_refused_quickly(daemon: Daemon, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    sock_path = tmp_path / "s.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(str(sock_path))

    def work() -> None:
        with Client(daemon.socket_path, timeout=5) as c:
            for path in (fifo, tmp_path, "/dev/zero"):
                with pytest.raises(NotRegularFile):
                    c.open(path)
            # A socket cannot be open()ed; pass the fd itself.
            with pytest.raises(NotRegularFile, match="socket"):
                c.open_fd(listener.fileno())
            ok = make_file(tmp_path / "ok", b"fine")
            fd = c.open(ok)
            assert read_fd(fd) == b"fine"
            os.close(fd)

    try:
        with trio.fail_after(10):
            await call(work)
    finally:
        listener.close()


async def test_batch_open(daemon: Daemon, tmp_path: Path) -> None:
    files = [make_file(tmp_path / f"b{i}", os.urandom(100 + i)) for i in range(5)]
    settle(*files)

    def work() -> None:
        with Client(daemon.socket_path, timeout=10) as c:
            paths: list[Any] = [*files, "/dev/null", tmp_path / "missing"]
            first = c.open_many(paths, return_exceptions=True)
            second = c.open_many(files)
        try:
            for fd, f in zip(first[:5], files, strict=True):
                assert read_fd(fd) == f.read_bytes()
            assert isinstance(first[5], NotRegularFile)
            assert type(first[6]).__name__ == "SourceError"
            for fd, f in zip(second, files, strict=True):
                assert read_fd(fd) == f.read_bytes()
        finally:
            for fd in first[:5] + second:
                os.close(fd)
        s = stats(daemon)
        assert s["misses"] == 5 and s["hits"] == 5

    with trio.fail_after(30):
        await call(work)


async def test_16_clients_at_once(daemon: Daemon, tmp_path: Path) -> None:
    rng = random.Random(16)
    files = [
        make_file(tmp_path / f"lib{i}.so", os.urandom(rng.choice([0, 100, 4096, 70_000, 300_000])))
        for i in range(30)
    ]
    settle(*files)
    contents = {f: f.read_bytes() for f in files}

    def client(seed: int) -> int:
        r = random.Random(seed)
        with Client(daemon.socket_path, timeout=30) as c:
            for _ in range(300):
                f = r.choice(files)
                fd = c.open(f)
                try:
                    size = os.fstat(fd).st_size
                    assert os.pread(fd, size + 1, 0) == contents[f]
                finally:
                    os.close(fd)
        return 300

    with trio.fail_after(120):
        async with trio.open_nursery() as nursery:
            for i in range(16):
                nursery.start_soon(call, client, i)
    s = stats(daemon)
    assert s["hits"] + s["misses"] == 16 * 300
    assert s["copies"] == 30  # one copy per file, however many clients raced


async def _cached_with_baseline(d: Daemon, path: Path, size: int) -> tuple[Path, bytes, int]:
    """A file of *size* random bytes the daemon has cached, its bytes, and the
    daemon's fd count once that settled."""
    f = make_file(path, os.urandom(size))
    settle(f)
    data = f.read_bytes()
    assert open_bytes(d, f) == data  # cached from here on
    return f, data, await trio.to_thread.run_sync(d.quiet_fds)


@pytest.mark.parametrize("op", ["open", "open_batch", "lookup", "index", "report"])
async def test_pipelining_client_that_stops_reading_holds_up_nobody(
    daemon: Daemon, tmp_path: Path, op: str
) -> None:
    """One connection queues hits until its socket is full and reads nothing.

    Its replies wait (the daemon holds their fds), the other clients are
    answered meanwhile, every reply arrives once it reads, and the daemon's
    fds return to their baseline.
    """
    f, data, baseline = await _cached_with_baseline(daemon, tmp_path / "lib.so", 5000)
    flood = Raw(daemon.socket_path)
    flood.sock.setblocking(False)
    sent = 0
    src = os.open(f, os.O_RDONLY)
    st = os.fstat(src)
    try:
        with trio.fail_after(60):
            # Until the daemon stops reading us: our receive buffer is full
            # of its replies, so it holds one and reads nothing more.
            idle = 0
            while idle < 20:
                request: dict[str, Any] = {"op": op, "id": sent + 1}
                if op == "lookup":  # a private file nobody published: a miss each time
                    key = {"ino": 1, "size": 1, "mtime_ns": 1, "ctime_ns": 1}
                    request.update(namespace="flood", key=key)
                elif op == "report":
                    request["hits"] = [[st.st_dev, st.st_ino, 1]]
                try:
                    flood.send(request, {"open": [src], "open_batch": [src, src]}.get(op, []))
                    sent += 1
                    idle = 0
                except BlockingIOError:
                    idle += 1
                    await trio.sleep(0.02)
            assert sent > 10

            def others() -> None:
                for _ in range(50):
                    assert open_bytes(daemon, f) == data

            async with trio.open_nursery() as nursery:
                for _ in range(3):
                    nursery.start_soon(call, others)
            flood.sock.setblocking(True)
            flood.sock.settimeout(10)
            got = set()
            for _ in range(sent):
                reply, fds = await call(flood.recv)
                assert reply["ok"], reply
                assert len(fds) == {"open": 1, "open_batch": 2, "index": 1}.get(op, 0), reply
                for fd in fds:
                    if op == "index":
                        assert reply["slots"] > 0 and os.fstat(fd).st_size > 0
                    else:
                        assert os.pread(fd, len(data) + 1, 0) == data
                    os.close(fd)
                got.add(reply["id"])
            assert got == set(range(1, sent + 1))
            flood.sock.close()
            while daemon.open_fds() != baseline:
                await trio.sleep(0.05)
    finally:
        os.close(src)
        flood.sock.close()


async def test_a_new_clients_pipelined_requests_are_answered_in_order(
    daemon: Daemon, tmp_path: Path
) -> None:
    """A client sends its hello, the index request and more before reading anything.

    The first are answered before its connection first waits in the poller,
    the rest by the poller's rounds and the connection's task (stats): every
    reply comes once, in the order asked, with its fds, and the daemon's fds
    return to their baseline when the client goes.
    """
    f, data, baseline = await _cached_with_baseline(daemon, tmp_path / "lib.so", 3000)
    st = f.stat()
    src = os.open(f, os.O_RDONLY)
    burst: list[tuple[dict[str, Any], list[int], int]] = [
        ({"op": "hello", "id": 1, "version": 2}, [], 0),
        ({"op": "index", "id": 2}, [], 1),
        ({"op": "report", "id": 3, "hits": [[st.st_dev, st.st_ino, 2]]}, [], 0),
        ({"op": "open", "id": 4}, [src], 1),
        ({"op": "stats", "id": 5}, [], 0),
        ({"op": "index", "id": 6}, [], 1),
        ({"op": "open", "id": 7}, [src], 1),
    ]
    try:
        for _ in range(20):
            with Raw(daemon.socket_path, hello=False, timeout=10) as raw:
                for msg, fds, _n in burst:
                    raw.send(msg, fds)
                for msg, _fds, nfds in burst:
                    reply, got = await call(raw.recv)
                    try:
                        assert reply["id"] == msg["id"] and reply["ok"], (msg, reply)
                        assert len(got) == nfds, (msg, reply)
                        if msg["op"] == "open":
                            assert os.pread(got[0], len(data) + 1, 0) == data
                        elif msg["op"] == "index":
                            assert reply["pid"] == daemon.pid and reply["slots"] > 0
                    finally:
                        for fd in got:
                            os.close(fd)
    finally:
        os.close(src)
    assert stats(daemon)["index_hits"] == 20 * 2
    with trio.fail_after(10):
        while daemon.open_fds() != baseline:
            await trio.sleep(0.05)


# -- refusals in turn ----------------------------------------------------------

REFUSED_PAIRS = 200


def _assert_in_asked_order(ids: list[int]) -> None:
    """Reply ids as they came, the requests' ids rising: none overtook an earlier one."""
    out_of_order = [(a, b) for a, b in itertools.pairwise(ids) if b < a]
    assert ids == sorted(ids), (
        f"{len(out_of_order)} replies overtook an earlier one: {out_of_order[:5]}"
    )


def _reply_order_as(uid: int, socket_path: Path, op: str) -> Any:
    """In a child of *uid*: a hello, then REFUSED_PAIRS of (*op*, lookup) pipelined;
    the ids of the replies, as they came."""
    code = f"""
import socket, msgpack
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.settimeout(20)
s.connect({str(socket_path)!r})
key = {{"ino": 1, "size": 1, "mtime_ns": 1, "ctime_ns": 1}}
msgs = [{{"op": "hello", "id": 0, "version": 2}}]
for i in range({REFUSED_PAIRS}):
    msgs.append({{"op": {op!r}, "id": 2 * i + 1, "hits": [[1, 1, 1]]}})
    msgs.append({{"op": "lookup", "id": 2 * i + 2, "namespace": "n", "key": key}})
ids = []
# A few at a time: below the bound of datagrams queued on each side.
for at in range(0, len(msgs), 4):
    chunk = msgs[at:at + 4]
    for m in chunk:
        s.send(msgpack.packb(m))
    for m in chunk:
        reply = msgpack.unpackb(s.recv(1 << 16))
        ids.append([reply["id"], reply.get("code")])
out(ids)
"""
    return run_as(uid, code, timeout=60)


@requires_root
@pytest.mark.parametrize("op", ["index", "report"])
async def test_a_refused_index_is_answered_before_the_next_request(
    start_daemon: Any, op: str
) -> None:
    """A peer of another uid pipelines index or report requests (refused: not its
    uid) and lookups: each refusal is sent before the next request's reply."""
    daemon = await start_daemon("--racy-window", "0.05", "--socket-mode", "0666")
    with trio.fail_after(90):
        got = await trio.to_thread.run_sync(
            functools.partial(_reply_order_as, NOBODY, daemon.socket_path, op)
        )
    ids = [i for i, _code in got]
    codes = {i: code for i, code in got}
    assert codes[1] == "not-permitted", got[:4]
    _assert_in_asked_order(ids)


async def test_a_refused_open_is_answered_before_the_next_request(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The same with an open of a FIFO (refused) before each lookup, as the daemon's uid."""
    daemon = await start_daemon("--racy-window", "0.05")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    src = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)
    key = {"ino": 1, "size": 1, "mtime_ns": 1, "ctime_ns": 1}
    try:
        with Raw(daemon.socket_path, hello=False, timeout=20) as raw:
            msgs: list[tuple[dict[str, Any], list[int]]] = [
                ({"op": "hello", "id": 0, "version": 2}, [])
            ]
            for i in range(REFUSED_PAIRS):
                msgs.append(({"op": "open", "id": 2 * i + 1}, [src]))
                lookup = {"op": "lookup", "id": 2 * i + 2, "namespace": "n", "key": key}
                msgs.append((lookup, []))
            ids = []
            with trio.fail_after(60):
                # A few at a time: below the bound of datagrams queued on each side.
                for at in range(0, len(msgs), 4):
                    chunk = msgs[at : at + 4]
                    for msg, fds in chunk:
                        raw.send(msg, fds)
                    for _ in chunk:
                        reply, got = await trio.to_thread.run_sync(raw.recv)
                        for fd in got:
                            os.close(fd)
                        ids.append(reply["id"])
    finally:
        os.close(src)
    _assert_in_asked_order(ids)


async def test_index_requests_of_peers_that_leave_unread_leak_no_fd(
    start_daemon: Any, tmp_path: Path
) -> None:
    """Peers that ask for the index (the first two datagrams answered before the
    connection parks, the rest by the poller) and leave without reading: the
    daemon's fds return to their baseline."""
    from shadowd_client import Client

    daemon = await start_daemon("--racy-window", "0.05", "--max-inflight", "4")
    f = tmp_path / "lib.so"
    f.write_bytes(os.urandom(5000))
    os.utime(f, ns=(1, 1))
    with Client(daemon.socket_path, timeout=10) as c:
        os.close(c.open(str(f)))
    baseline = await trio.to_thread.run_sync(daemon.quiet_fds)

    def leave(n: int) -> None:
        raw = Raw(daemon.socket_path, hello=False, timeout=10)
        raw.sock.setblocking(False)
        try:
            raw.send({"op": "hello", "id": 0, "version": 2})
            for i in range(n):
                try:
                    raw.send({"op": "index", "id": i + 1})
                except BlockingIOError:
                    break
        finally:
            raw.close()

    with trio.fail_after(60):
        for n in (1, 2, 3, 50, 1000):
            for _ in range(20):
                await trio.to_thread.run_sync(leave, n)
        while daemon.open_fds() != baseline:
            await trio.sleep(0.05)
    assert daemon.open_fds() == baseline


def _garbage(d: Daemon, rng: random.Random, extra: list[int]) -> None:
    """One hostile connection of a random kind."""
    kind = rng.randrange(8)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.settimeout(5)
    try:
        s.connect(str(d.socket_path))
        fds = rng.sample(extra, rng.randrange(0, len(extra)))
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(_ints(fds))))] if fds else []
        if kind == 0:
            s.sendmsg([os.urandom(rng.randrange(1, 300))], anc)
        elif kind == 1:
            s.sendmsg([msgpack.packb([1, 2, {"op": "open"}])], anc)
        elif kind == 2:
            hello = msgpack.packb({"op": "hello", "id": 0, "version": 1})
            s.sendmsg([hello])
            s.sendmsg([msgpack.packb({"op": "open", "id": 1, "path": 7})], anc)
        elif kind == 3:  # too many fds: the kernel truncates the control data
            s.sendmsg([msgpack.packb({"op": "hello", "id": 0, "version": 1})])
            many = [extra[0]] * 250
            s.sendmsg(
                [msgpack.packb({"op": "open_batch", "id": 1})],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, bytes(memoryview(_ints(many))))],
            )
        elif kind == 4:  # larger than any request may be
            s.sendmsg([b"\x80" * 100_000], anc)
        elif kind == 5:  # leave mid-request
            s.sendmsg([msgpack.packb({"op": "hello", "id": 0, "version": 1})])
            s.sendmsg([msgpack.packb({"op": "open", "id": 1})], anc)
            s.close()
            return
        elif kind == 6:  # valid requests with the wrong fd counts
            s.sendmsg([msgpack.packb({"op": "hello", "id": 0, "version": 1})], anc)
            s.sendmsg([msgpack.packb({"op": "stats", "id": 1})], anc)
        else:  # an empty datagram carrying fds
            s.sendmsg([b""], anc)
        s.shutdown(socket.SHUT_WR)  # the daemon sees the end; read what it answered
        try:
            while s.recv(65536):
                pass
        except OSError:
            pass
    finally:
        s.close()


def _ints(fds: list[int]) -> Any:
    import array

    return array.array("i", fds)


async def test_garbage_clients_leak_nothing(daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "good", b"still good")
    settle(f)
    r, w = os.pipe()
    extra = [
        r,
        w,
        os.open("/dev/null", os.O_RDONLY),
        os.open(f, os.O_RDONLY),
        os.memfd_create("junk"),
        os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
    ]

    def warm() -> None:
        assert open_bytes(daemon, f) == b"still good"

    def storm() -> None:
        rng = random.Random(300)
        for _ in range(300):
            _garbage(daemon, rng, extra)

    try:
        with trio.fail_after(120):
            await call(warm)
            baseline = await call(daemon.quiet_fds)
            await call(storm)
            while True:  # the daemon closes the last connections shortly
                s = await call(stats, daemon)
                if s["clients"] == 1 and daemon.open_fds() == baseline:
                    break
                await trio.sleep(0.05)
            assert s["refused"] > 0
            assert await call(open_bytes, daemon, f) == b"still good"
            with trio.move_on_after(5):
                while daemon.open_fds() != baseline:
                    await trio.sleep(0.05)
            assert daemon.open_fds() == baseline, daemon.fd_targets()
    finally:
        for fd in extra:
            os.close(fd)


@requires_root
async def test_user_who_cannot_read_a_file_cannot_get_its_bytes(
    start_daemon: Any, shared_dir: Path
) -> None:
    d = await start_daemon("--racy-window", "0", "--socket-mode", "0666")
    secret = make_file(shared_dir / "secret", b"root only", mode=0o600)
    writeonly = make_file(shared_dir / "wo", b"write only", mode=0o622)
    # The daemon has the secret cached already: the refusal must not depend on a miss.
    assert open_bytes(d, secret) == b"root only"
    code = f"""
    import socket, array, msgpack
    from shadowd_client import Client, ShadowdError
    from shadowd.protocol import Hello, Open, encode_request
    res = {{}}
    c = Client({str(d.socket_path)!r}, timeout=5)
    try:
        c.open({str(secret)!r})
        res["open"] = "served"
    except ShadowdError as e:
        res["open"] = type(e).__name__
    def raw(fd):
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect({str(d.socket_path)!r})
        s.sendmsg([encode_request(Hello(id=0))[0]])
        data, fds = encode_request(Open(id=1, fd=fd))
        s.sendmsg([data], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds))])
        replies = [s.recvmsg(4096, 64) for _ in range(2)]
        r = msgpack.unpackb(replies[1][0])
        return [r.get("ok"), r.get("code"), len(replies[1][1])]
    res["o_path"] = raw(os.open({str(secret)!r}, os.O_PATH))
    res["o_wronly"] = raw(os.open({str(writeonly)!r}, os.O_WRONLY))
    out(res)
    """
    with trio.fail_after(30):
        res = await call(run_as, NOBODY, code)
    assert res["open"] == "SourceError"
    assert res["o_path"] == [False, "not-readable", 0]
    assert res["o_wronly"] == [False, "not-readable", 0]


async def test_sigterm_exits_zero_removes_socket_and_fds_outlive_it(
    daemon: Daemon, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "keep", b"outlives the daemon")
    settle(f)
    with trio.fail_after(30):
        fd = await call(_open_once, daemon, f)
        try:
            assert await daemon.terminate(signal.SIGTERM) == 0
            assert not daemon.socket_path.exists()
            assert read_fd(fd) == b"outlives the daemon"
            assert "exiting" in daemon.log()
        finally:
            os.close(fd)


async def test_sigint_also_drains(daemon: Daemon) -> None:
    with trio.fail_after(30):
        assert await daemon.terminate(signal.SIGINT) == 0
        assert not daemon.socket_path.exists()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_stop_signals_sent_again_and_again_still_exit_zero(
    daemon: Daemon, tmp_path: Path, sig: int
) -> None:
    """A manager (or an impatient operator) that repeats the stop signal until
    the daemon is gone: the first drains, a second stops now, and none after
    kills it. Copy workers are alive then, and the interpreter's exit puts the
    default action (a kill) back for Python handlers while they live: 5 of 5
    such stops died of SIGTERM before."""
    files = [make_file(tmp_path / f"f{i}", b"w%d" % i) for i in range(4)]
    for f in files:
        settle(f)
    with trio.fail_after(30):
        for f in files:  # misses: copied by workers, whose threads then idle on
            os.close(await call(_open_once, daemon, f))
        proc = daemon.proc
        assert proc is not None
        while proc.poll() is None:
            proc.send_signal(sig)
            await trio.sleep(0.0005)
        assert proc.returncode == 0, daemon.log()
        assert not daemon.socket_path.exists()


async def test_not_readable_fd_refused_in_process(daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "w", b"data")
    fd = os.open(f, os.O_WRONLY)
    try:
        with trio.fail_after(10), pytest.raises(NotReadable):
            await call(_open_fd_once, daemon, fd)
    finally:
        os.close(fd)


async def test_pseudo_file_is_refused_off_the_loop(daemon: Daemon) -> None:
    """/proc files claim size 0 and hold more: never served, never cached.

    procfs is not a filesystem the loop trusts, so this also drives the
    worker-thread path (stat, copy and close in a worker).
    """

    def work() -> None:
        from shadowd_client import FileUnstable

        with Client(daemon.socket_path, timeout=10) as c:
            with pytest.raises(FileUnstable):
                c.open("/proc/self/status")
            assert c.stats()["entries"] == 0

    with trio.fail_after(30):
        await call(work)


@requires_root
async def test_file_on_a_mount_the_daemon_cannot_see_is_served_by_workers(
    daemon: Daemon, shared_dir: Path
) -> None:
    """A client in its own mount namespace, on a tmpfs the daemon cannot see.

    The daemon does not know that filesystem, so it must not touch the fd on
    its event loop: a worker stats, copies and closes it. The bytes must be
    exact and the second open a hit.
    """
    if shutil.which("unshare") is None:
        pytest.skip("unshare is not installed")
    paths = [str(REPO), str(REPO / "client")]
    code = f"""
import os, sys, subprocess, json
sys.path[:0] = {paths!r}
from shadowd_client import Client
mnt = {str(shared_dir / "mnt")!r}
os.makedirs(mnt, exist_ok=True)
subprocess.run(["mount", "-t", "tmpfs", "none", mnt], check=True)
path = os.path.join(mnt, "private")
data = os.urandom(50000)
with open(path, "wb") as f:
    f.write(data)
import time; time.sleep(0.1)
out = []
with Client({str(daemon.socket_path)!r}, timeout=10) as c:
    for _ in range(2):
        fd = c.open(path)
        out.append(os.pread(fd, 60000, 0) == data)
        os.close(fd)
    s = c.stats()
print(json.dumps([out, s["hits"], s["misses"], os.major(os.stat(path).st_dev)]))
"""
    with trio.fail_after(60):
        proc = await call(
            lambda: subprocess.run(
                ["unshare", "--mount", "--propagation", "private", sys.executable, "-c", code],
                capture_output=True,
                text=True,
                timeout=50,
                check=False,
            )
        )
    assert proc.returncode == 0, proc.stderr
    (same, hits, misses, major) = json.loads(proc.stdout.splitlines()[-1])
    assert major == 0  # an anonymous-device filesystem, unknown to the daemon
    assert same == [True, True]
    assert (hits, misses) == (1, 1)
    assert daemon.log().count("a worker inspects it") == 2


async def test_fd_limit_raised_to_hard_limit(start_daemon: Any) -> None:
    d = await start_daemon(nofile=(256, 2048))
    with trio.fail_after(30):
        s = await call(stats, d)
    assert s["fd_limit"] == 2048
    assert 0 < s["open_fds"] < 2048


async def test_emfile_at_accept_is_logged_and_survived(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon("--racy-window", "0.05", nofile=(48, 48))
    f = make_file(tmp_path / "f", b"after the storm")
    settle(f)

    def storm() -> None:
        held = []
        try:
            for _ in range(80):  # more connections than the daemon has fds
                s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
                s.connect(str(d.socket_path))  # queued in the backlog even if not accepted
                held.append(s)
            deadline = time.monotonic() + 10
            while "accept failed" not in d.log() and time.monotonic() < deadline:
                time.sleep(0.05)
        finally:
            for s in held:
                s.close()

    with trio.fail_after(60):
        await call(storm)
        assert "accept failed (Too many open files)" in d.log()
        assert await call(open_bytes, d, f) == b"after the storm"


@requires_root
async def test_other_users_cannot_connect_by_default(daemon: Daemon) -> None:
    code = f"""
    from shadowd_client import Client, DaemonUnavailable
    try:
        with Client({str(daemon.socket_path)!r}, timeout=5) as c:
            c.stats()
        out("connected")
    except DaemonUnavailable as e:
        out(str(e))
    """
    with trio.fail_after(30):
        res = await call(run_as, NOBODY, code)
    assert "Permission denied" in res and str(daemon.socket_path) in res
