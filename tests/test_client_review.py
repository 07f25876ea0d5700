# The adversarial review of the Python client (client/shadowd_client): what a
# hostile or buggy world does to Client, AsyncClient and Opener, with real
# parts: the daemon as a subprocess, or a stand-in daemon this test plays on a
# real SOCK_SEQPACKET socket, real memfds, real SCM_RIGHTS, fork() and threads.
# Each test says what it attacks; each would fail if its defence broke.
from __future__ import annotations

import os
import threading
import warnings
from pathlib import Path
from typing import Any

import pytest
import trio
from shadowd_client import AsyncClient, Client, Opener
from shadowd_client import index as client_index

from shadowd.fds import close_all

from .conftest import Daemon, make_file, read_fd, settle

RACY = "0.05"


def fd_count() -> int:
    return len(os.listdir("/proc/self/fd"))


async def test_a_forked_child_of_an_async_client_talks_on_a_connection_of_its_own(
    daemon: Daemon, tmp_path: Path
) -> None:
    """An AsyncClient connected before a fork, used by parent and child at once (each in
    a trio.run of its own): each must get its own files' bytes. Sharing the inherited
    connection, each process read some of the other's replies (same ids, other files)."""
    files = [make_file(tmp_path / f"f{i}", os.urandom(2000 + i)) for i in range(8)]
    settle(*files)
    want = {f: f.read_bytes() for f in files}
    client = AsyncClient(daemon.socket_path, timeout=10)

    async def opens(offset: int) -> bytes:
        try:
            for k in range(300):
                f = files[(k + offset) % len(files)]
                fd = await client.open(f)
                try:
                    if os.pread(fd, 1 << 16, 0) != want[f]:
                        return b"wrong bytes"
                finally:
                    os.close(fd)
        except Exception as exc:  # the child reports it through the pipe
            return repr(exc).encode()[:300]
        return b"ok"

    r, w = os.pipe()

    def fork() -> int:
        pid = os.fork()
        if pid == 0:
            verdict = b"child died"
            try:
                # The parent's trio run set the process's signal wakeup fd; a
                # run in the child's (non-main) thread warns that it sees it.
                warnings.simplefilter("ignore", RuntimeWarning)
                verdict = trio.run(opens, 3)
            finally:
                os.write(w, verdict)
                os._exit(0)
        return pid

    with trio.fail_after(60):
        async with client:
            os.close(await client.open(files[0]))  # connected before the fork
            pid = await trio.to_thread.run_sync(fork)
            os.close(w)
            try:
                mine = await opens(0)
                theirs = await trio.to_thread.run_sync(os.read, r, 400)
            finally:
                os.close(r)
                await trio.to_thread.run_sync(os.waitpid, pid, 0)
    assert (mine, theirs) == (b"ok", b"ok")


@pytest.mark.parametrize("path", ["c", "python"])
async def test_threads_opening_through_one_opener_while_its_index_is_fetched_see_no_error(
    start_daemon: Any, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, path: str
) -> None:
    """Eight threads make the first opens of a fresh Opener at once, each fetching the
    daemon's index: a view one thread is reading through must not be closed under it
    by another that installs its own (before: BufferError or ValueError from
    Opener.open, and the half-closed view's descriptors and mapping left open)."""
    if path == "python":
        monkeypatch.setattr(client_index, "C_CALLS", None)
    d: Daemon = await start_daemon("--racy-window", RACY)
    files = [make_file(tmp_path / f"lib{i}.so", os.urandom(300_000 + i)) for i in range(8)]
    settle(*files)
    want = {f: f.read_bytes() for f in files}

    def work() -> tuple[list[str], int, int]:
        with Client(d.socket_path, timeout=10) as c:  # cached and indexed
            close_all(c.open_many(files))
        errors: list[str] = []
        index_opens = 0
        before = fd_count()
        for _ in range(15):
            opener = Opener(d.socket_path, local_below=0, held_files=0, timeout=10)
            start = threading.Barrier(8)

            def opens(i: int, opener: Opener = opener, start: threading.Barrier = start) -> None:
                start.wait()
                try:
                    for k in range(20):
                        f = files[(i + k) % len(files)]
                        fd = opener.open(f)
                        try:
                            if read_fd(fd) != want[f]:
                                errors.append("wrong bytes")
                        finally:
                            os.close(fd)
                except BaseException as exc:
                    errors.append(repr(exc))

            threads = [threading.Thread(target=opens, args=(i,)) for i in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join()
            opener.close()
            index_opens += opener.index_opens
        return errors, index_opens, fd_count() - before

    with trio.fail_after(120):
        errors, index_opens, leaked = await trio.to_thread.run_sync(work)
    assert errors == []
    assert index_opens > 0  # the race was run: the index served
    assert leaked == 0


def _non_utf8_tree(base: Path, data: bytes) -> bytes:
    """A settled file whose path, 1.5 KB of bytes that are not UTF-8, is a path label of
    4.5 KB (each byte becomes U+FFFD, 3 bytes): past what the daemon takes (4096)."""
    deep = os.fsencode(base)
    for _ in range(6):
        deep += b"/" + b"\xff" * 250
    os.makedirs(deep)
    path = deep + b"/lib.so"
    with open(path, "wb") as f:
        f.write(data)
    return path


async def test_a_file_whose_path_label_is_too_long_to_send_is_served_without_one(
    start_daemon: Any, tmp_path: Path
) -> None:
    """The daemon refuses a label over 4096 bytes (bad-request); the clients must leave
    such a label out, as they do one that would not fit max_request (before: every open
    but a connection's first, sent before the hello reply with no label, raised
    BadRequest, and so did the Opener's)."""
    d: Daemon = await start_daemon("--racy-window", RACY)
    data = os.urandom(300_000)
    path = _non_utf8_tree(tmp_path, data)
    await trio.sleep(1.05)  # older than the default racy window the Opener assumes at first

    def work() -> None:
        with Client(d.socket_path, timeout=10) as c:
            for _ in range(3):
                fd = c.open(path)
                assert read_fd(fd) == data
                os.close(fd)
            fds = c.open_many([path, path])
            assert [read_fd(fd) for fd in fds] == [data, data]
            close_all(fds)
            src = os.open(path, os.O_RDONLY)
            try:
                fd = c.open_fd(src, label="/" + "x" * 5000)  # a caller's label, too long
                os.close(fd)
                fd = c.open_fd(src, label="/a\udcffb")  # not UTF-8 at all (surrogateescape)
                os.close(fd)
            finally:
                os.close(src)
        with Opener(d.socket_path, local_below=0, held_files=0, use_index=False) as opener:
            for _ in range(3):
                fd = opener.open(path)
                assert read_fd(fd) == data
                os.close(fd)
            assert opener.daemon_opens == 3

    async with AsyncClient(d.socket_path, timeout=10) as ac:
        for _ in range(2):
            fd = await ac.open(path)
            assert read_fd(fd) == data
            os.close(fd)
    with trio.fail_after(60):
        await trio.to_thread.run_sync(work)
