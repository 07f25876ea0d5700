# An in-process index over a cache of real files, with no daemon: what the
# readers of the index (IndexView in tests/test_index.py, the C client in
# tests/test_c_client.py) are tested against, slot by slot. And the same as a
# stand-in daemon of a given uid, in a process of its own, that holds
# something else than a memfd at a number of its range (what a hostile
# daemon can do).
from __future__ import annotations

import ctypes
import os
import socket
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, TypeVar

import msgpack
import pytest
import trio
from shadowd_client import Client
from shadowd_client.index import IndexView

from shadowd.cache import Cache, CacheLimits, HostKey
from shadowd.fdrange import FdRange
from shadowd.index import LIVE, Index, read_slot, slot_of
from shadowd.memfd import sealed_from_bytes

from .conftest import NOBODY, Child, make_file, spawn_as

T = TypeVar("T")


class IndexedCache:
    """*n* files of a directory, cached and published in an index of 64 slots.

    *ranged*: the index keeps its memfds in a descriptor range of 8 numbers
    (shadowd/fdrange.py), which readers open without the O_PATH step; else
    none, and every reader takes it.
    """

    def __init__(self, tmp_path: Path, n: int = 4, *, ranged: bool = False) -> None:
        self.cache = Cache(CacheLimits(racy_window_ns=0))
        self.index = Index(64, FdRange.reserve(8) if ranged else None)
        self.cache.add_observer(self.index)
        self.files: list[tuple[Path, os.stat_result]] = []
        for i in range(n):
            f = make_file(tmp_path / f"f{i}", os.urandom(3000 + i))
            st = f.stat()
            sealed = sealed_from_bytes(f.read_bytes())
            self.cache.insert(
                HostKey(st.st_dev, st.st_ino),
                (st.st_size, st.st_mtime_ns, st.st_ctime_ns),
                sealed,
                ctime_ns=1,
                wd=1,  # as if watched: only watched entries are published
            )
            sealed.release()
            self.files.append((f, st))

    def entry(self, i: int) -> Any:
        _, st = self.files[i]
        return self.cache.peek(HostKey(st.st_dev, st.st_ino))

    def slot_number(self, st: os.stat_result) -> int:
        """The slot that holds the file whose stat is *st*."""
        start = slot_of(st.st_dev, st.st_ino, self.index.slots, self.index.key)
        probes = [(start + i) % self.index.slots for i in range(16)]
        return next(k for k in probes if read_slot(self.index._map, k).ino == st.st_ino)

    def close(self) -> None:
        self.cache.clear()
        self.index.close()


@contextmanager
def standing_in(number: int, other: int) -> Iterator[None]:
    """*other*'s file at descriptor *number* for the block (what a slot names is then
    something else), and *number*'s own file put back after."""
    saved = os.dup(number)
    try:
        os.dup2(other, number)
        yield
    finally:
        os.dup2(saved, number)
        os.close(saved)


@contextmanager
def cached_view(socket_path: Path, f: Path) -> Iterator[IndexView]:
    """*f* cached by the daemon at *socket_path* (opened twice: the first open waits for
    the copy), and the daemon's index as this process takes it; closed at the end."""
    with Client(socket_path, timeout=10) as c:
        for _ in range(2):
            os.close(c.open(f))
        view = c.index()
        assert view is not None
        try:
            yield view
        finally:
            view.close()


def live_slot_fds(view: IndexView, f: Path) -> list[int]:
    """The descriptor numbers that *view*'s live slots of *f* name."""
    slots = [read_slot(view._map, k) for k in range(view.slots)]
    return [s.fd for s in slots if s.state == LIVE and s.ino == f.stat().st_ino]


def range_number_of(socket_path: Path, f: Path) -> int:
    """*f* cached by the daemon at *socket_path* and the descriptor number its live slot
    names, checked to be in the daemon's descriptor range."""
    with cached_view(socket_path, f) as view:
        fds = live_slot_fds(view, f)
        assert len(fds) == 1 and fds[0] in view.range, (fds, view.range)
        return fds[0]


def answer_as_daemon(
    cache: IndexedCache, conn: socket.socket, reports: list[Any] | None = None
) -> None:
    """Answer the client on *conn* as a version 2 daemon whose index is *cache*'s:
    hello, index (its fd and our pid) and report (kept in *reports*); anything else
    is answered `busy`. Returns when the client hangs up."""
    while True:
        data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        if not data:
            return
        for _, _, fds in anc:
            for i in range(0, len(fds) - len(fds) % 4, 4):
                os.close(int.from_bytes(fds[i : i + 4], "little"))
        answer_one(cache, conn, msgpack.unpackb(data), reports)


def answer_one(
    cache: IndexedCache, conn: socket.socket, msg: dict[str, Any], reports: list[Any] | None
) -> None:
    """Answer one request *msg* on *conn* as answer_as_daemon does."""
    if msg["op"] == "hello":
        reply = {"id": msg["id"], "ok": True, "version": 2, "server": "stand",
                 "limits": {"racy_window_ns": 0}}  # fmt: skip
        conn.send(msgpack.packb(reply))
    elif msg["op"] == "index":
        fd = cache.index.reader_fd()
        reply = {"id": msg["id"], "ok": True, "pid": os.getpid(), "slots": cache.index.slots}
        conn.sendmsg([msgpack.packb(reply)], [(socket.SOL_SOCKET, socket.SCM_RIGHTS,
                                               fd.to_bytes(4, "little"))])  # fmt: skip
        os.close(fd)
    elif msg["op"] == "report":
        if reports is not None:
            reports.append(msg["hits"])
        conn.send(msgpack.packb({"id": msg["id"], "ok": True}))
    else:
        no = {"id": msg["id"], "ok": False, "code": "busy", "message": "a stand-in"}
        conn.send(msgpack.packb(no))


def serve_as_daemon(cache: IndexedCache, listener: socket.socket) -> None:
    """answer_as_daemon on every connection *listener* takes, each in a thread of its own."""
    while True:
        conn, _ = listener.accept()

        def answer(conn: socket.socket = conn) -> None:
            with conn:
                try:
                    answer_as_daemon(cache, conn)
                except OSError:
                    pass  # the client went away

        threading.Thread(target=answer, daemon=True).start()


# The stand-in daemon's process (tests/conftest.py's spawn_as runs it as the
# uid asked). It listens (so that SO_PEERCRED names it), or, as a service
# manager would, its parent does before it forks it. Then two files cached in
# a ranged index, what it is told to plant opened O_PATH (its user may name
# it, not open it) and put at the number of file 0's memfd, in its range; it
# serves until its input closes.
_STAND_IN = """
import os, socket, threading
from pathlib import Path
from tests.indexed import IndexedCache, serve_as_daemon
args = recv()
listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
listener.bind(args["socket"])
listener.listen(16)
if args["manager"] and os.fork() != 0:
    os.wait()  # until the daemon's input closes
    os._exit(0)
cache = IndexedCache(Path(args["dir"]), 2, ranged=True)
n = cache.entry(0).file.fd
planted = os.open(args["plant"], os.O_PATH | os.O_CLOEXEC)
os.dup2(planted, n, inheritable=False)
os.close(planted)
threading.Thread(target=serve_as_daemon, args=(cache, listener), daemon=True).start()
fd_range = cache.index.fd_range
out({"pid": os.getpid(), "n": n, "range": [fd_range.base, fd_range.size],
     "files": [str(f) for f, _ in cache.files]})
recv()
"""


#: The cases of a planting daemon's tests (uid, manager): a daemon of another uid;
#: of ours, listening itself; of ours, on a socket a service manager listened on.
planting_cases = pytest.mark.parametrize(
    ("uid", "manager"),
    [(NOBODY, False), (0, False), (0, True)],
    ids=["another-uid", "our-uid", "our-uid-a-managers-socket"],
)


@contextmanager
def planting_daemon(
    uid: int, directory: Path, plant: Path, *, manager: bool = False
) -> Iterator[dict[str, Any]]:
    """A stand-in daemon of *uid*, in a process of its own, serving an index of two
    files (written in *directory*, which *uid* may write) on ``directory/stand.sock``,
    with *plant* (opened O_PATH) at the number file 0's slot names, a number of its
    range. *manager*: its socket was made and listened on by its parent, as a
    service manager does (SO_PEERCRED then names the parent). Yields what it said:
    pid, n, range (base, size), files, and socket."""
    child: Child = spawn_as(uid, _STAND_IN)
    try:
        sock = directory / "stand.sock"
        child.send(
            {"dir": str(directory), "plant": str(plant), "socket": str(sock), "manager": manager}
        )
        said: dict[str, Any] = child.recv()
        said["socket"] = str(sock)
        base, size = said["range"]
        assert base <= said["n"] < base + size, said
        yield said
    finally:
        child.close()


def fifo_to_plant(directory: Path, uid: int) -> tuple[Path, Path]:
    """A FIFO of root's in *directory* (0600: *uid* may name it, not open it), and a
    directory *uid* may write, for planting_daemon."""
    fifo = directory / "fifo"
    os.mkfifo(fifo, 0o600)
    work = directory / "stand"
    work.mkdir()
    os.chown(work, uid, uid)
    return fifo, work


async def without_hanging(fifo: Path, call: Callable[[], T], timeout: float = 20) -> T:
    """*call*() in a worker thread. Should it hang (a FIFO opened for real, with no
    O_NONBLOCK, waits for a writer), it fails the test after *timeout* seconds, and
    *fifo* gets a writer for a moment so that the thread can finish."""
    try:
        with trio.fail_after(timeout):
            return await trio.to_thread.run_sync(call, abandon_on_cancel=True)
    finally:
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass  # ENXIO: nobody is opening it for reading


class OpenWatch:
    """An inotify instance that sees real opens of the files it watches (IN_OPEN,
    which an O_PATH open does not raise)."""

    IN_OPEN = 0x20

    def __init__(self) -> None:
        self._libc = ctypes.CDLL(None, use_errno=True)
        self.fd = self._libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
        assert self.fd >= 0

    def add(self, path: str | os.PathLike[str]) -> None:
        """Watch *path* for opens from now on."""
        assert self._libc.inotify_add_watch(self.fd, os.fsencode(path), self.IN_OPEN) >= 0

    def events(self) -> int:
        """How many bytes of events are waiting (and read): 0 for none."""
        try:
            return len(os.read(self.fd, 4096))
        except BlockingIOError:
            return 0

    def close(self) -> None:
        os.close(self.fd)

    def __enter__(self) -> OpenWatch:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
