# Private files end to end: lookup and publish against the daemon as a real
# subprocess, real memfds and real uids. Each test proves one promise of the
# private-file path and would fail if that promise broke.
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import socket
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio
from shadowd_client import (
    AsyncClient,
    BadRequest,
    Client,
    FileKey,
    NotReadable,
    NotRegularFile,
    Opener,
    SizeMismatch,
)

from shadowd.memfd import REQUIRED_SEALS

from .conftest import NOBODY, Daemon, in_thread, make_file, read_fd, requires_root, run_as
from .wire import Raw, key_map, memfd_with, read_all

KEY = FileKey(ino=42, size=11, mtime_ns=1_000, ctime_ns=2_000)


async def call(fn: Any, *args: Any) -> Any:
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


def stats(d: Daemon) -> dict[str, Any]:
    with Client(d.socket_path, timeout=10) as c:
        return c.stats()


def writer(data: bytes, calls: list[int] | None = None) -> Any:
    def fill(fd: int) -> None:
        if calls is not None:
            calls.append(fd)
        os.write(fd, data)

    return fill


def open_private(d: Daemon, ns: str, key: FileKey, data: bytes) -> tuple[bytes, int]:
    """(the bytes served, how often fill ran) for one open_private."""
    calls: list[int] = []
    with Client(d.socket_path, timeout=10) as c:
        fd = c.open_private(ns, key, writer(data, calls))
    try:
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        return read_fd(fd), len(calls)
    finally:
        os.close(fd)


SUPERVISOR = """
from shadowd_client import Client, FileKey
calls = []
def fill(fd):
    calls.append(fd)
    os.write(fd, {data!r})
with Client({path!r}, timeout=10) as c:
    fd = c.open_private({ns!r}, FileKey(*{key!r}), fill)
    size = os.fstat(fd).st_size
    out([os.pread(fd, size, 0).decode(), len(calls), c.stats()["private_entries"]])
"""


def supervisor(d: Daemon, uid: int, data: bytes, ns: str = "image-sha256:ab12") -> list[Any]:
    key = (KEY.ino, KEY.size, KEY.mtime_ns, KEY.ctime_ns)
    code = SUPERVISOR.format(data=data, path=str(d.socket_path), ns=ns, key=key)
    return run_as(uid, code)  # type: ignore[no-any-return]


@requires_root
async def test_supervisors_of_one_uid_share_another_uid_never_sees_it(
    start_daemon: Any,
) -> None:
    d = await start_daemon("--socket-mode", "0666")
    with trio.fail_after(60):
        # The first supervisor of uid 1000 misses and fills.
        assert await call(supervisor, d, 1000, b"first bytes") == ["first bytes", 1, 1]
        # A second process of the same uid gets those bytes without filling.
        assert await call(supervisor, d, 1000, b"never used!") == ["first bytes", 0, 1]
        # Another uid naming the same namespace and key misses and fills its own.
        assert await call(supervisor, d, 1001, b"other bytes") == ["other bytes", 1, 2]
        assert await call(supervisor, d, NOBODY, b"nobody's...") == ["nobody's...", 1, 3]
        # And uid 1000 still gets its own.
        assert await call(supervisor, d, 1000, b"xxxxxxxxxxx") == ["first bytes", 0, 3]
    s = await call(stats, d)
    assert s["private_hits"] == 2 and s["private_entries"] == 3 and s["entries"] == 3


async def test_writable_mapping_cannot_change_what_others_are_served(daemon: Daemon) -> None:
    data = b"sealed once"
    maps: list[mmap.mmap] = []

    def fill(fd: int) -> None:
        os.ftruncate(fd, len(data))
        m = mmap.mmap(fd, len(data), mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        m[:] = data
        maps.append(m)  # kept: the daemon cannot seal this memfd

    def work() -> None:
        with Client(daemon.socket_path, timeout=10) as c:
            mine = c.open_private("ns", KEY, fill)
            maps[0][:] = b"CHANGED!!!!"  # the publisher writes after publishing
            theirs = c.open_private("ns", KEY, writer(b"not called"))
        try:
            assert read_fd(mine) == data and read_fd(theirs) == data
        finally:
            os.close(mine)
            os.close(theirs)
            maps[0].close()
        s = stats(daemon)
        assert (s["private_copied"], s["private_sealed_in_place"]) == (1, 0)

    with trio.fail_after(30):
        await call(work)


async def test_publisher_keeping_a_writable_fd_cannot_write_after_publishing(
    daemon: Daemon,
) -> None:
    kept: list[int] = []

    def fill(fd: int) -> None:
        os.write(fd, b"hello world")
        kept.append(os.dup(fd))  # the same memfd, open for writing

    def work() -> None:
        with Client(daemon.socket_path, timeout=10) as c:
            fd = c.open_private("ns", KEY, fill)
        try:
            with pytest.raises(OSError) as info:
                os.pwrite(kept[0], b"X", 0)
            assert info.value.errno == errno.EPERM  # sealed in place
            with pytest.raises(OSError):
                os.ftruncate(kept[0], 1)
            assert read_fd(fd) == b"hello world"
            assert open_private(daemon, "ns", KEY, b"not called!") == (b"hello world", 0)
        finally:
            os.close(fd)
            os.close(kept[0])
        s = stats(daemon)
        assert (s["private_copied"], s["private_sealed_in_place"]) == (0, 1)

    with trio.fail_after(30):
        await call(work)


async def test_concurrent_publishers_one_wins_all_get_its_bytes(daemon: Daemon) -> None:
    barrier = threading.Barrier(3)
    results: dict[int, bytes] = {}

    def publisher(i: int) -> None:
        def fill(fd: int) -> None:
            barrier.wait(timeout=10)  # every publisher has missed before any publishes
            os.write(fd, b"publisher %d" % i)

        key = FileKey(ino=7, size=11, mtime_ns=5)
        with Client(daemon.socket_path, timeout=10) as c:
            fd = c.open_private("race", key, fill)
        results[i] = read_fd(fd)
        os.close(fd)

    with trio.fail_after(30):
        async with trio.open_nursery() as nursery:
            for i in range(3):
                nursery.start_soon(call, publisher, i)
    assert len(set(results.values())) == 1, results
    s = await call(stats, daemon)
    assert s["private_entries"] == 1 and s["private_races_lost"] == 2


@in_thread()
def test_key_is_checked_against_the_bytes(daemon: Daemon) -> None:
    with Raw(daemon.socket_path) as raw:
        fd = memfd_with(b"12345")
        try:
            reply, fds = raw.call(
                {"op": "publish", "id": 1, "namespace": "n", "key": key_map(1, 6)}, [fd]
            )
            assert (reply["code"], fds) == ("size-mismatch", [])
            # Nothing was cached: the right size is a miss, then published.
            reply, fds = raw.call({"op": "lookup", "id": 2, "namespace": "n", "key": key_map(1, 5)})
            assert reply == {"id": 2, "ok": True, "hit": False} and fds == []
        finally:
            os.close(fd)
    # The client library checks before it asks.
    with Client(daemon.socket_path, timeout=5) as c, pytest.raises(SizeMismatch):
        c.open_private("n", FileKey(ino=1, size=6, mtime_ns=1), writer(b"12345"))


@in_thread()
def test_version_is_part_of_the_key(daemon: Daemon) -> None:
    assert open_private(daemon, "ns", KEY, b"version one") == (b"version one", 1)
    for changed in (
        FileKey(ino=KEY.ino, size=11, mtime_ns=KEY.mtime_ns + 1, ctime_ns=KEY.ctime_ns),
        FileKey(ino=KEY.ino, size=11, mtime_ns=KEY.mtime_ns, ctime_ns=KEY.ctime_ns + 1),
        FileKey(ino=KEY.ino, size=11, mtime_ns=KEY.mtime_ns, ctime_ns=None),
    ):
        assert open_private(daemon, "ns", changed, b"version two") == (b"version two", 1)
    assert open_private(daemon, "other", KEY, b"other space") == (b"other space", 1)


@in_thread()
def test_only_readable_regular_files_and_memfds_are_taken(daemon: Daemon, tmp_path: Path) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    host = make_file(tmp_path / "host", b"host file!!")
    cases = {
        "fifo": (os.open(fifo, os.O_RDONLY | os.O_NONBLOCK), "not-regular"),
        "directory": (os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY), "not-regular"),
        "socket": (os.dup(listener.fileno()), "not-regular"),
        "/dev/zero": (os.open("/dev/zero", os.O_RDONLY), "not-regular"),
        "o_path": (os.open(host, os.O_PATH), "not-readable"),
        "write-only": (os.open(host, os.O_WRONLY), "not-readable"),
    }
    try:
        with Raw(daemon.socket_path) as raw:
            for i, (name, (fd, code)) in enumerate(cases.items()):
                started = time.monotonic()
                reply, fds = raw.call(
                    {"op": "publish", "id": i, "namespace": "n", "key": key_map(i, 11)}, [fd]
                )
                assert time.monotonic() - started < 1, f"{name} took too long"
                assert (reply.get("code"), fds) == (code, []), name
            # A regular file that is no memfd is copied; one of ours is sealed in place.
            with open(host, "rb") as f:
                reply, fds = raw.call(
                    {"op": "publish", "id": 90, "namespace": "n", "key": key_map(90, 11)},
                    [f.fileno()],
                )
            assert reply["ok"] and read_all(fds[0]) == b"host file!!"
            os.close(fds[0])
    finally:
        for fd, _ in cases.values():
            os.close(fd)
        listener.close()
    s = stats(daemon)
    assert s["private_copied"] == 1 and s["refused_by_code"]["not-regular"] == 4


@pytest.mark.parametrize("kind", ["unsealable", "seal-sealed", "read-only", "sealed"])
@in_thread()
def test_memfds_that_cannot_be_sealed_are_copied(daemon: Daemon, kind: str) -> None:
    data = b"some bytes!"
    fd = memfd_with(data, sealable=kind != "unsealable")
    if kind == "seal-sealed":
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, fcntl.F_SEAL_SEAL)
    elif kind == "read-only":
        ro = os.open(f"/proc/self/fd/{fd}", os.O_RDONLY)
        os.close(fd)
        fd = ro
    elif kind == "sealed":
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
    try:
        with Raw(daemon.socket_path) as raw:
            reply, fds = raw.call(
                {"op": "publish", "id": 1, "namespace": "n", "key": key_map(1, len(data))}, [fd]
            )
        assert reply["ok"] and not reply["hit"], reply
        assert read_all(fds[0]) == data
        assert fcntl.fcntl(fds[0], fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
        os.close(fds[0])
    finally:
        os.close(fd)
    s = stats(daemon)
    assert s["private_copied"] == (0 if kind == "sealed" else 1)


@in_thread()
def test_namespace_is_bounded(daemon: Daemon) -> None:
    with Client(daemon.socket_path, timeout=5) as c:
        for ns in ("", "n" * 256, "é" * 128):
            with pytest.raises(BadRequest):
                c.open_private(ns, KEY, writer(b"x" * 11))
        fd = c.open_private("n" * 255, KEY, writer(b"x" * 11))
        os.close(fd)


async def test_private_entries_share_the_budgets_and_are_counted_apart(
    start_daemon: Any, tmp_path: Path
) -> None:
    d = await start_daemon("--racy-window", "0", "--max-entries", "2")
    host = make_file(tmp_path / "host", b"host")

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:
            os.close(c.open(host))
            for ino in (1, 2):
                key = FileKey(ino=ino, size=3, mtime_ns=1)
                os.close(c.open_private("n", key, writer(b"abc")))
            s = c.stats()
        assert s["entries"] == 2 and s["evictions"] == 1
        assert (s["private_entries"], s["private_bytes"], s["private_misses"]) == (2, 6, 2)
        assert s["misses"] == 3

    with trio.fail_after(30):
        await call(work)


@in_thread()
def test_executable_private_file(daemon: Daemon) -> None:
    with Client(daemon.socket_path, timeout=5) as c:
        fd = c.open_private("n", KEY, writer(b"#!/bin/sh\n\n"), executable=True)
        other = c.open_private("m", KEY, writer(b"plain data\n"))
    assert os.fstat(fd).st_mode & 0o111
    assert not os.fstat(other).st_mode & 0o111
    os.close(fd)
    os.close(other)


async def test_async_client_open_private(daemon: Daemon) -> None:
    async def fill(fd: int) -> None:
        await trio.lowlevel.checkpoint()
        os.write(fd, b"async bytes")

    with trio.fail_after(30):
        async with AsyncClient(daemon.socket_path, timeout=10) as c:
            first = await c.open_private("ns", KEY, fill)
            second = await c.open_private("ns", KEY, writer(b"unused....."))
            assert read_fd(first) == read_fd(second) == b"async bytes"
            os.close(first)
            os.close(second)
            with pytest.raises(SizeMismatch):
                await c.open_private("ns", FileKey(ino=9, size=1, mtime_ns=1), fill)


def test_opener_makes_private_files_itself_when_the_daemon_is_down(tmp_path: Path) -> None:
    with Opener(tmp_path / "nobody-home.sock", timeout=1) as opener:
        fd = opener.open_private("ns", KEY, writer(b"local bytes"))
    try:
        assert read_fd(fd) == b"local bytes"
        assert fcntl.fcntl(fd, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    finally:
        os.close(fd)
    assert opener.local_opens == 1


@in_thread()
def test_not_readable_publish_is_refused_by_the_client_library_too(daemon: Daemon) -> None:
    # A publish of an fd that cannot be read says so (not-readable), whoever sends it.
    fd = memfd_with(b"abc")
    wo = os.open(f"/proc/self/fd/{fd}", os.O_WRONLY)
    try:
        with Raw(daemon.socket_path) as raw:
            reply, _ = raw.call(
                {"op": "publish", "id": 1, "namespace": "n", "key": key_map(1, 3)}, [wo]
            )
        assert reply["code"] == NotReadable.code
        assert NotRegularFile.code == "not-regular"
    finally:
        os.close(wo)
        os.close(fd)
