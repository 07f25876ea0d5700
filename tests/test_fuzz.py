# A live fuzz test: thousands of random and mutated datagrams, with random fds
# attached (pipes, sockets, directories, devices, memfds, O_PATH fds), too many
# fds for the control buffer, clients that vanish mid-request, against the
# daemon as a real subprocess. Afterwards it must serve exactly as before, log
# no bug of its own, and hold exactly the fds it held before (plus one per
# cache entry). Bounded in time, with a fixed seed, so CI stays fast and a
# failure can be replayed.
from __future__ import annotations

import array
import errno
import os
import random
import select
import socket
import time
from pathlib import Path
from typing import Any

import msgpack
import trio
from shadowd_client import Client, FileKey

from .conftest import Daemon, make_file, read_fd, settle
from .wire import key_map, memfd_with

SEED = 20261126
MESSAGES = 5000
TIME_BUDGET = 20.0  # seconds for the storm, whatever the machine's load
MAX_BATCH = 8


def _templates(rng: random.Random) -> list[dict[str, Any]]:
    key = key_map(rng.randrange(4), rng.choice([0, 5, 11, 4096]), rng.randrange(3))
    return [
        {"op": "hello", "id": 0, "version": rng.choice([1, 1, 1, 2])},
        {"op": "open", "id": rng.randrange(5), "path": "/fuzz"},
        {"op": "open_batch", "id": rng.randrange(5), "paths": ["a", None]},
        {"op": "stats", "id": rng.randrange(5)},
        {"op": "lookup", "id": rng.randrange(5), "namespace": "fz", "key": key},
        {"op": "publish", "id": rng.randrange(5), "namespace": "fz", "key": key},
    ]


def _junk(rng: random.Random) -> Any:
    return rng.choice(
        [None, True, -1, 2**64 - 1, 1.5, "", "x" * rng.randrange(300), b"\x00\xff", [1], {"k": 2}]
    )


def _mutate(rng: random.Random, msg: dict[str, Any]) -> bytes:
    """A well-formed request, bent in one of several ways."""
    msg = dict(msg)
    how = rng.randrange(8)
    if how == 0 and msg:
        del msg[rng.choice(list(msg))]
    elif how == 1 and msg:
        msg[rng.choice(list(msg))] = _junk(rng)
    elif how == 2 and isinstance(msg.get("key"), dict):
        msg["key"] = dict(msg["key"], **{rng.choice(["ino", "size", "mtime_ns"]): _junk(rng)})
    elif how == 3:
        msg[rng.choice(["extra", 7, "op"])] = _junk(rng)  # type: ignore[index]
    data = msgpack.packb(msg, use_bin_type=True)
    if how == 4:  # flip some bits
        raw = bytearray(data)
        for _ in range(rng.randrange(1, 4)):
            raw[rng.randrange(len(raw))] ^= 1 << rng.randrange(8)
        data = bytes(raw)
    elif how == 5:  # cut short
        data = data[: rng.randrange(len(data))]
    elif how == 6:  # trailing bytes
        data += os.urandom(rng.randrange(1, 5))
    return data


class Storm:
    """Hostile clients that never wait on the daemon (non-blocking sockets)."""

    def __init__(self, d: Daemon, fds: list[int], rng: random.Random) -> None:
        self.d = d
        self.fds = fds
        self.rng = rng
        self.conns: list[socket.socket] = []
        self.sent = 0

    def connect(self) -> socket.socket | None:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        try:
            s.connect(str(self.d.socket_path))
        except OSError:
            s.close()
            return None
        s.setblocking(False)
        if self.rng.random() < 0.85 and not self.send(s, msgpack.packb(_templates(self.rng)[0])):
            return None
        self.conns.append(s)
        return s

    def send(self, s: socket.socket, data: bytes, fds: list[int] = ()) -> bool:  # type: ignore[assignment]
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        try:
            s.sendmsg([data], anc if fds else [])
        except OSError:
            self.drop(s)
            return False
        self.sent += 1
        return True

    def drain(self, s: socket.socket, wait: float = 0.0) -> None:
        """Read the replies that come within *wait* seconds, closing any fds they carry."""
        if wait and not select.select([s], [], [], wait)[0]:
            return
        for _ in range(8):
            try:
                _, anc, _, _ = s.recvmsg(1 << 16, socket.CMSG_SPACE(64 * 4))
            except BlockingIOError:
                return
            except OSError:
                self.drop(s)
                return
            for level, kind, data in anc:
                if (level, kind) == (socket.SOL_SOCKET, socket.SCM_RIGHTS):
                    for fd in array.array("i", data[: len(data) - len(data) % 4]):
                        os.close(fd)

    def drop(self, s: socket.socket) -> None:
        if s in self.conns:
            self.conns.remove(s)
        s.close()

    def step(self) -> None:
        rng = self.rng
        if (not self.conns or (len(self.conns) < 16 and rng.random() < 0.2)) and (
            self.connect() is None
        ):
            return
        s = rng.choice(self.conns)
        kind = rng.random()
        if kind < 0.1:
            data = os.urandom(rng.randrange(0, 200))
        elif kind < 0.15:
            data = b"\x80" * rng.randrange(5000, 9000)  # larger than --max-request
        else:
            data = _mutate(rng, rng.choice(_templates(rng)))
        count = rng.choice([0, 0, 1, 1, 1, 2, 3, MAX_BATCH + 1, 20])  # beyond MAX_BATCH: CTRUNC
        fds = [rng.choice(self.fds) for _ in range(count)]
        if not self.send(s, data, fds):
            return
        what = rng.random()
        if what < 0.1:
            self.drop(s)  # vanish mid-request, replies unread
        elif what < 0.9:
            self.drain(s, wait=0.05)  # mostly, wait for the answer: every datagram counts
        else:
            self.drain(s)  # or pipeline on

    def close(self) -> None:
        for s in list(self.conns):
            self.drop(s)


def _fd_pool(tmp_path: Path, good: Path) -> list[int]:
    r, w = os.pipe()
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    fds = [
        r,
        w,
        a.detach(),
        b.detach(),
        os.open(fifo, os.O_RDONLY | os.O_NONBLOCK),
        os.open("/dev/null", os.O_RDONLY),
        os.open("/dev/zero", os.O_RDONLY),
        os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY),
        os.open(good, os.O_RDONLY),
        os.open(good, os.O_PATH),
        os.open(good, os.O_WRONLY),
        memfd_with(b"x" * 11),
        memfd_with(b"y" * 5, sealable=False),
        memfd_with(b""),
    ]
    if hasattr(os, "eventfd"):
        fds.append(os.eventfd(0))
    return fds


async def test_live_fuzz_leaves_the_daemon_serving_at_its_fd_baseline(
    start_daemon: Any, tmp_path: Path
) -> None:
    d = await start_daemon(
        "--racy-window", "0.05", "--max-batch", str(MAX_BATCH), "--max-request", "4096"
    )
    good = make_file(tmp_path / "good", b"exact bytes")
    settle(good)
    pool = _fd_pool(tmp_path, good)
    key = FileKey(ino=1, size=11, mtime_ns=1, ctime_ns=1)

    def check_serving() -> None:
        with Client(d.socket_path, timeout=10) as c:
            fd = c.open(good)
            assert read_fd(fd) == b"exact bytes"
            os.close(fd)
            fd = c.open_private("kept", key, lambda fd: os.write(fd, b"never again"))
            assert read_fd(fd) == b"private set"
            os.close(fd)

    def warm() -> None:
        with Client(d.socket_path, timeout=10) as c:
            os.close(c.open_private("kept", key, lambda fd: os.write(fd, b"private set")))
        check_serving()

    def storm() -> int:
        rng = random.Random(SEED)
        st = Storm(d, pool, rng)
        deadline = time.monotonic() + TIME_BUDGET
        try:
            while st.sent < MESSAGES and time.monotonic() < deadline:
                st.step()
        finally:
            st.close()
        return st.sent

    try:
        with trio.fail_after(120):
            await trio.to_thread.run_sync(warm)
            baseline, _ = await trio.to_thread.run_sync(d.settled_fds)
            sent = await trio.to_thread.run_sync(storm)
            assert sent >= 1000, f"only {sent} datagrams sent in {TIME_BUDGET}s"
            # The daemon closes the last connections and fds shortly.
            with trio.move_on_after(15):
                while (await trio.to_thread.run_sync(d.settled_fds))[0] != baseline:
                    await trio.sleep(0.1)
            now, entries = await trio.to_thread.run_sync(d.settled_fds)
            assert now == baseline, (now, baseline, entries, d.fd_targets())
            await trio.to_thread.run_sync(check_serving)
            with Client(d.socket_path, timeout=10) as c:
                s = await trio.to_thread.run_sync(c.stats)
    finally:
        for fd in pool:
            try:
                os.close(fd)
            except OSError as exc:
                assert exc.errno == errno.EBADF
    assert d.proc is not None and d.proc.poll() is None
    assert "Traceback" not in d.log() and "internal error" not in d.log()
    assert s["refused"] > sent // 4 and s["fds_refused"] > sent // 2, s
    assert s["limit_hits"].get("max_fds", 0) > 0 and s["limit_hits"].get("max_request", 0) > 0
