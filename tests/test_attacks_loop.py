# Attacks on the event loop's time (review 19c): one uid's many connections,
# each with datagrams that cost the loop milliseconds to unpack (a map with a
# key of 65,000 empty arrays, the most --max-request allows), against another
# uid's hit; and one connection alone in the poller, fed such datagrams
# without pause, ahead of a backlog of connections (attack 18). Counted, not
# timed: how many of the attacker's datagrams the daemon answers before the
# victim's hit. The daemon runs as a real subprocess, the attacker as another
# uid, the victim as root. Then what the loop did for a client besides
# answering: the last close of a large file the client unlinked (attack 19:
# which thread made it, as fanotify says), the order of replies that
# waited for room (attack 20), and what a peer leaves queued on a socket the
# daemon closes (attack 21: a lingering TCP socket's close, which thread
# waits in it; descriptors queued past the uid's bound), sockets waiting to
# be closed up to the daemon's fd limit (attack 27), and releases that take
# the kernel long: a device's (attack 28), a rewritten file's (attack 29),
# many smaller ones in one datagram (attack 30), the pages of a memfd the
# cache let go of (attack 32); and queues read on after their end: in turn
# (attack 31), or not at all when they carry no fd (attack 33). Where a count
# of what the daemon did is not to be had, which thread did it: fanotify's
# thread ids, or each thread's run time (schedstat) once the daemon rests.
#
# Must never: leave the daemon stopped or a child process behind; count
# answers made after the victim's (the daemon is stopped the moment the
# victim has its reply, and the attacker counts only then).
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import select
import signal
import socket
import struct
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import trio

from shadowd.fds import close_all

from .conftest import Daemon, make_file, requires_root, spawn_as, test_uid
from .fusefs import FuseFile, mounted
from .wire import Raw

pytestmark = requires_root

#: The attacker's uid (need not exist in /etc/passwd).
ATTACKER = test_uid(40)
#: The attacker's connections; each sends two costly datagrams.
CONNECTIONS = 128

# The attacker. "fresh": its connections are made and their datagrams sent
# while the daemon is stopped, so all of them wait in the listening socket's
# backlog ahead of the victim's. "parked": its connections said hello first
# and wait in the poller, ahead of the victim's, when the datagrams come.
ATTACK = """
import msgpack, socket, struct
def costly(op, **fields):
    # About 64 KiB: 65,000 empty arrays under a key the daemon ignores.
    return msgpack.packb({{"op": op, "id": 1, **fields, "x": [[]] * 65000}})
hello, report = costly("hello", version=1), costly("report", hits=[])
assert len(hello) <= 65536 and len(report) <= 65536
socks = []
recv()
for _ in range({connections}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    # Timeouts the kernel keeps: with Python's own, each send would first wait
    # for the socket to poll writable, which it does only while less than a
    # quarter of its buffer is taken (one costly datagram takes more).
    for opt in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
        s.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", 30, 0))
    s.connect({path!r})
    socks.append(s)
if {style!r} == "parked":
    for s in socks:
        s.send(msgpack.packb({{"op": "hello", "id": 0, "version": 1}}))
    for s in socks:
        assert msgpack.unpackb(s.recv(1 << 16))["ok"]
    out("parked")
    recv()
    for s in socks:
        s.send(report)
        s.send(report)
else:
    for s in socks:
        s.send(hello)
        s.send(report)
out("sent")
recv()
answered = 0
for s in socks:
    s.setblocking(False)
    while True:
        try:
            if not s.recv(1 << 16):
                break
        except BlockingIOError:
            break
        answered += 1
out(answered)
recv()
"""


@contextlib.contextmanager
def stopped(d: Daemon) -> Any:
    """The daemon stopped (SIGSTOP) inside the block, running again after it."""
    os.kill(d.pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(d.pid, signal.SIGCONT)


async def _back_to(d: Daemon, baseline: int, seconds: float) -> None:
    """Wait until the daemon's open fds are back to *baseline* (within *seconds*)."""
    deadline = time.monotonic() + seconds
    while d.open_fds() > baseline and time.monotonic() < deadline:
        await trio.sleep(0.05)
    assert d.open_fds() <= baseline, d.fd_targets()


@pytest.mark.parametrize("style", ["fresh", "parked"])
async def test_another_uids_many_connections_do_not_hold_up_a_hit(
    start_daemon: Any, shared_dir: Path, style: str
) -> None:
    """128 connections of another uid, each with two datagrams that cost the loop
    milliseconds each, are ahead of a root client's hit. The daemon answers at
    most a few of them before the hit, not all: before, every one ("fresh", the
    victim connecting anew: 256 of 256, one connection accepted per turn of the
    loop and each answering its two datagrams first) or one per attacker
    connection ("parked", the victim already connected: one datagram per ready
    connection per round, in the kernel's order)."""
    d: Daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    f = make_file(shared_dir / "lib.so", b"x" * 100_000)
    code = ATTACK.format(path=str(d.socket_path), connections=CONNECTIONS, style=style)

    def victim_hit(raw: Raw, fd: int, id: int) -> None:
        raw.send({"op": "open", "id": id}, [fd])

    def victim_reply(raw: Raw) -> dict[str, Any]:
        reply, fds = raw.recv()
        for got in fds:
            os.close(got)
        return reply

    with trio.fail_after(90):
        src = os.open(f, os.O_RDONLY)
        child = spawn_as(ATTACKER, code)
        try:
            # Two opens after the hello: the second is answered by the poller, so
            # this connection waits there now (a new connection's first datagrams
            # are answered before it first waits, see connection.FIRST_ANSWERED).
            # The file is cached: the victim's open is a hit.
            parked = Raw(d.socket_path, timeout=60)
            for i in range(2):
                await trio.to_thread.run_sync(victim_hit, parked, src, 1 + i)
                await trio.to_thread.run_sync(victim_reply, parked)
            if style == "fresh":
                parked.close()
                with stopped(d):
                    child.send("go")
                    assert await trio.to_thread.run_sync(child.recv) == "sent"
                    # Connected anew, hello and open sent at once, as the clients do.
                    raw = Raw(d.socket_path, hello=False, timeout=60)
                    raw.send({"op": "hello", "id": 0, "version": 1})
                    victim_hit(raw, src, 3)
                hello = await trio.to_thread.run_sync(victim_reply, raw)
                assert hello["ok"], hello
            else:
                raw = parked
                child.send("go")
                assert await trio.to_thread.run_sync(child.recv) == "parked"
                with stopped(d):
                    child.send("go")
                    assert await trio.to_thread.run_sync(child.recv) == "sent"
                    victim_hit(raw, src, 3)
            with raw:
                reply = await trio.to_thread.run_sync(victim_reply, raw)
                with stopped(d):
                    child.send("count")
                    answered = await trio.to_thread.run_sync(child.recv)
            assert reply["ok"] and reply["hit"] and reply["id"] == 3, reply
            assert answered <= 16, f"{answered} of the attacker's datagrams went first"
        finally:
            os.close(src)
            child.close()


# The attacker of attack 18: one connection, the only one in the poller,
# kept fed with costly datagrams (a thread sends while another counts the
# replies), and BACKLOG connections made and closed at once, which wait in
# the listening socket's backlog ahead of the victim's.
LONE_ATTACK = """
import msgpack, socket, struct, threading
report = msgpack.packb({{"op": "report", "id": 1, "hits": [], "x": [[]] * 65000}})
assert len(report) <= 65536
c = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
for opt in (socket.SO_SNDTIMEO, socket.SO_RCVTIMEO):
    c.setsockopt(socket.SOL_SOCKET, opt, struct.pack("ll", 60, 0))
c.connect({path!r})
c.send(msgpack.packb({{"op": "hello", "id": 0, "version": 1}}))
assert msgpack.unpackb(c.recv(1 << 16))["ok"]
out("parked")
recv()
answered = [0]
def feed():
    try:
        while True:
            c.send(report)
    except OSError:
        pass
def count():
    try:
        while c.recv(1 << 16):
            answered[0] += 1
    except OSError:
        pass
threading.Thread(target=feed, daemon=True).start()
threading.Thread(target=count, daemon=True).start()
for _ in range({backlog}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect({path!r})
    s.close()
out("sent")
recv()
out(answered[0])
recv()
"""
#: Connections made and closed ahead of the victim's in the backlog.
BACKLOG = 300


async def test_a_lone_connections_costly_datagrams_do_not_hold_up_the_backlog(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 18: another uid's one connection, alone in the poller, sends costly
    datagrams without pause, and 300 connections it made and closed wait in the
    backlog ahead of a root client connecting anew. The victim's hello and hit come
    after at most a few of the costly answers: before, a lone connection's answers
    did not count in the poller's longest round, so the acceptor took one
    connection a turn, each turn one costly answer (293-301 of them, 4.7-6.1 s)."""
    d: Daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    f = make_file(shared_dir / "lib.so", b"x" * 100_000)
    code = LONE_ATTACK.format(path=str(d.socket_path), backlog=BACKLOG)

    def reply_of(raw: Raw) -> dict[str, Any]:
        reply, fds = raw.recv()
        for got in fds:
            os.close(got)
        return reply

    with trio.fail_after(120):
        src = os.open(f, os.O_RDONLY)
        child = spawn_as(ATTACKER, code)
        try:
            # The file cached (the victim's open is a hit), and no connection
            # but the attacker's left in the poller.
            with Raw(d.socket_path) as warm:
                for i in range(2):
                    warm.send({"op": "open", "id": 1 + i}, [src])
                    await trio.to_thread.run_sync(reply_of, warm)
            assert await trio.to_thread.run_sync(child.recv) == "parked"
            with stopped(d):
                child.send("go")
                assert await trio.to_thread.run_sync(child.recv) == "sent"
                raw = Raw(d.socket_path, hello=False, timeout=100)
                raw.send({"op": "hello", "id": 0, "version": 1})
                raw.send({"op": "open", "id": 3}, [src])
            with raw:
                hello = await trio.to_thread.run_sync(reply_of, raw)
                reply = await trio.to_thread.run_sync(reply_of, raw)
                with stopped(d):
                    child.send("count")
                    answered = await trio.to_thread.run_sync(child.recv)
            assert hello["ok"], hello
            assert reply["ok"] and reply["hit"] and reply["id"] == 3, reply
            assert answered <= 16, f"{answered} of the attacker's datagrams went first"
        finally:
            os.close(src)
            child.close()


# Attack 19: a client hands the daemon the last reference to a large file
# it unlinked. The kernel frees such a file at its last close (its blocks
# and, on a file system mounted with discard, a trim of each: 25-250 ms for
# a 10 GiB file on the project's VM), and the loop closed it. Which thread
# closes the file is what the test looks at (fanotify, FAN_REPORT_TID), not
# how long that takes: the last close of the attacker's open file description
# is where the kernel would free the file.
_libc = ctypes.CDLL(None, use_errno=True)
_libc.fanotify_mark.argtypes = [
    ctypes.c_int,
    ctypes.c_uint,
    ctypes.c_uint64,
    ctypes.c_int,
    ctypes.c_char_p,
]
FAN_CLOEXEC, FAN_NONBLOCK, FAN_REPORT_TID = 0x1, 0x2, 0x100
FAN_MARK_ADD, FAN_CLOSE_NOWRITE, AT_FDCWD = 0x1, 0x10, -100
_FAN_EVENT = struct.Struct("IBBHQii")  # struct fanotify_event_metadata


def _closer_of(path: Path) -> Callable[[float], int]:
    """Watch *path*'s inode; returns a call that waits (up to *timeout* seconds) for
    the last close of an open file description of it and says which thread made it."""
    fan = _libc.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID, os.O_RDONLY)
    if fan < 0:
        pytest.skip(f"no fanotify here: {os.strerror(ctypes.get_errno())}")
    if _libc.fanotify_mark(fan, FAN_MARK_ADD, FAN_CLOSE_NOWRITE, AT_FDCWD, bytes(path)) != 0:
        os.close(fan)
        pytest.skip(f"cannot watch {path} with fanotify: {os.strerror(ctypes.get_errno())}")

    def closer(timeout: float) -> int:
        try:
            if not select.select([fan], [], [], timeout)[0]:
                raise TimeoutError(f"nobody closed {path} in {timeout}s")
            data = os.read(fan, 4096)
            _len, _vers, _res, _mlen, _mask, fd, tid = _FAN_EVENT.unpack_from(data)
            if fd >= 0:
                os.close(fd)
            return int(tid)
        finally:
            os.close(fan)

    return closer


#: How the attacker hands the daemon its descriptor: in a request refused
#: file-too-large (an open, a batch, a publish); in an open or a batch that
#: misses without waiting (a file of 32 MiB, young: no copy is made); among
#: more than a request may carry (before, the kernel closed the ones past
#: --max-batch in recvmsg); in a datagram left unread when a fatal error ends
#: the connection; or in a datagram of a connection turned away at its uid's
#: connection limit.
WAYS = [
    "open",
    "open_batch",
    "publish",
    "miss",
    "batch-miss",
    "past-max-batch",
    "unread-at-close",
    "turned-away",
]


@pytest.mark.parametrize("way", WAYS)
async def test_the_last_close_of_a_clients_large_unlinked_file_is_not_made_on_the_loop(
    start_daemon: Any, shared_dir: Path, way: str
) -> None:
    """Attack 19: a large file (sparse here; fallocated, its last close frees its
    blocks, which on this VM's disk waits for it), unlinked, its only open file
    description sent to the daemon and closed by the sender before the daemon
    reads it. The daemon's loop thread must not be the one that closes it last:
    before, it was, every way (a batch of four fallocated 4 GiB files held the loop
    137-392 ms on the project's VM)."""
    d: Daemon = await start_daemon(
        "--racy-window", "60", "--max-request", "512", "--max-clients-per-uid", "1"
    )
    path = shared_dir / "huge"
    with open(path, "wb") as f:
        f.truncate(32 << 20 if "miss" in way else 1 << 40)
    closer = _closer_of(path)
    fd = os.open(path, os.O_RDONLY)
    path.unlink()
    small = os.open(shared_dir, os.O_RDONLY)
    try:
        with trio.fail_after(60), Raw(d.socket_path, hello=False, timeout=30) as raw:
            await trio.to_thread.run_sync(raw.call, {"op": "hello", "id": 0, "version": 2})
            # Sent while the daemon is stopped and closed here at once: the
            # daemon's descriptor is the description's last.
            with stopped(d):
                if way == "publish":
                    key = {"ino": 1, "size": 1 << 40, "mtime_ns": 1, "ctime_ns": 2}
                    raw.send({"op": way, "id": 1, "namespace": "n", "key": key}, [fd])
                elif way == "miss":
                    raw.send({"op": "open", "id": 1, "wait": False}, [fd])
                elif way == "batch-miss":
                    raw.send({"op": "open_batch", "id": 1, "wait": False}, [fd])
                elif way == "past-max-batch":
                    raw.send({"op": "open_batch", "id": 1}, [small] * 64 + [fd])
                elif way == "unread-at-close":
                    raw.send(b"x" * 600)  # past --max-request: the connection ends
                    raw.send({"op": "open", "id": 1}, [fd])
                elif way == "turned-away":
                    other = Raw(d.socket_path, hello=False)  # its uid has its one seat
                    other.send({"op": "open", "id": 1}, [fd])
                else:
                    raw.send({"op": way, "id": 1}, [fd])
                os.close(fd)
            if way == "turned-away":
                with other:
                    reply, _ = await trio.to_thread.run_sync(other.recv)
            else:
                reply, fds = await trio.to_thread.run_sync(raw.recv)
                close_all(fds)
            got = reply["results"][0] if way in ("open_batch", "batch-miss") else reply
            if "miss" in way:
                assert got["ok"] and got["miss"] and not got["filling"], reply
            else:
                code = {
                    "past-max-batch": "bad-fds",
                    "unread-at-close": "request-too-large",
                    "turned-away": "busy",
                }.get(way, "file-too-large")
                assert got["code"] == code, reply
            tid = await trio.to_thread.run_sync(closer, 30.0)
            assert tid != d.pid, "the daemon's loop thread closed it"
        # The daemon goes on serving.
        with trio.fail_after(30), Raw(d.socket_path, timeout=30) as raw:
            assert (await trio.to_thread.run_sync(raw.call, {"op": "stats", "id": 2}))[0]["ok"]
    finally:
        os.close(small)


async def test_peers_turned_away_with_descriptors_queued_leave_no_fd_behind(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 19's peers turned away: 200 connections of a uid at its connection
    limit, each with two datagrams carrying three descriptors queued before it is
    accepted, are refused and drained and closed in worker threads (64 waiting at
    most, the rest on the loop); the daemon's fd count comes back to its baseline
    and it goes on serving."""
    d: Daemon = await start_daemon("--max-clients-per-uid", "1")
    f = make_file(shared_dir / "f", b"x" * 100)

    def burst() -> None:
        with Raw(d.socket_path, timeout=30) as seated:  # its uid's one seat
            baseline = d.open_fds()
            src = os.open(f, os.O_RDONLY)
            others = []
            try:
                with stopped(d):
                    for _ in range(200):
                        other = Raw(d.socket_path, hello=False, timeout=30)
                        others.append(other)
                        for j in range(2):
                            other.send({"op": "open", "id": j}, [src, src, src])
                for other in others:
                    reply, fds = other.recv()
                    close_all(fds)
                    assert reply["code"] == "busy", reply
            finally:
                os.close(src)
                for other in others:
                    other.close()
            deadline = time.monotonic() + 10
            while d.open_fds() != baseline and time.monotonic() < deadline:
                time.sleep(0.05)
            assert d.open_fds() == baseline, d.fd_targets()
            assert seated.call({"op": "stats", "id": 1})[0]["ok"]

    with trio.fail_after(60):
        await trio.to_thread.run_sync(burst)


#: Attack 20: requests each connection pipelines before it reads a reply.
PIPELINED = 2000


async def test_replies_that_wait_for_room_keep_the_order_of_their_requests(
    daemon: Daemon,
) -> None:
    """Attack 20: three connections each pipeline 2,000 lookups and read nothing
    for a while, so that the daemon's replies wait for room in their sockets.
    Each connection's replies come in the order of its requests: before, the
    replies a round deferred in one step of the loop were sent by tasks that run
    in any order (trio reverses a step's new tasks half the time), and runs of
    them came reversed (20 of 30 connections in a reproduction)."""
    key = {"ino": 1, "size": 1, "mtime_ns": 1, "ctime_ns": 2}

    def pipeline(raw: Raw) -> list[int]:
        raw.sock.settimeout(None)  # a send waits for room without polling first

        def send() -> None:
            for i in range(1, PIPELINED + 1):
                raw.send({"op": "lookup", "id": i, "namespace": "n", "key": key})

        sender = threading.Thread(target=send)
        sender.start()
        time.sleep(0.3)  # the daemon's replies fill the socket meanwhile
        raw.sock.settimeout(30)
        ids = [raw.recv()[0]["id"] for _ in range(PIPELINED)]
        sender.join()
        return ids

    with trio.fail_after(120):
        for _ in range(3):
            conns = [Raw(daemon.socket_path, timeout=30) for _ in range(3)]
            try:
                got: list[list[int]] = []

                async def run(raw: Raw, got: list[list[int]] = got) -> None:
                    got.append(await trio.to_thread.run_sync(pipeline, raw))

                async with trio.open_nursery() as nursery:
                    for raw in conns:
                        nursery.start_soon(run, raw)
            finally:
                for c in conns:
                    c.close()
            for ids in got:
                assert ids == list(range(1, PIPELINED + 1)), [
                    (a, b) for a, b in itertools.pairwise(ids) if b < a
                ][:5]


# Attack 21: a TCP socket whose peer never reads, with SO_LINGER set: the last
# close of it waits up to the linger time (here an hour) in whichever thread
# makes it, and when its last reference is in a datagram queued on the daemon's
# socket, the thread that drops that datagram (a read without room for the
# descriptors, or the close of the socket) makes it.
LINGERING = """
import array, os, socket, struct
path = {path!r}
def lingering():
    lst = socket.socket()
    lst.bind(("127.0.0.1", 0))
    lst.listen(1)
    c = socket.socket()
    c.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    c.connect(lst.getsockname())
    peer, _ = lst.accept()
    peer.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    lst.close()
    c.setblocking(False)
    try:
        while True:
            c.send(b"x" * 65536)
    except BlockingIOError:
        pass
    c.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 3600))
    return c, peer
peers, socks = [], []
def connection(carry):
    if carry:
        c, peer = lingering()
        peers.append(peer)
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    socks.append(s)
    if carry:
        rights = array.array("i", [c.fileno()]).tobytes()
        s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, rights)])
        c.close()  # the daemon's is the last reference
    return s
recv()
for i in range({n}):
    connection(i in (0, 1) or i == {n} - 1)
out("sent")
recv()
for p in peers:
    p.close()  # a reset: every lingering close ends
for s in socks:
    s.close()
out("released")
recv()
"""


async def _until_cached(raw: Raw, src: int) -> None:
    """Open *src* on *raw* (waiting for the daemon's copy) until an open is a hit."""
    for i in itertools.count():
        reply, fds = await trio.to_thread.run_sync(
            raw.call, {"op": "open", "id": i, "wait": True}, [src]
        )
        close_all(fds)
        if reply.get("hit"):
            return
        await trio.sleep(0.02)


async def _victims_hit(d: Daemon, src: int) -> None:
    """A root client's open of *src*, on a connection of its own made now, is a hit
    answered within 10 s (far past what a hit takes)."""
    with Raw(d.socket_path, timeout=10) as victim:
        reply, fds = await trio.to_thread.run_sync(victim.call, {"op": "open", "id": 2}, [src])
        close_all(fds)
        assert reply["ok"] and reply["hit"], reply


def _lingering_closes(pid: int) -> list[int]:
    """The threads of process *pid* that wait in the last close of a lingering socket."""
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if "sk_stream_wait_close" in (task / "stack").read_text():
                found.append(int(task.name))
    return found


async def test_a_peer_turned_away_cannot_hold_the_loop_with_a_lingering_socket(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 21: a peer the daemon turns away (another uid, not in --allow-uid)
    sends, before it is accepted, a TCP socket set to linger an hour over unsent
    data, and closes its own descriptor of it. Two such peers, 64 that send
    nothing, and a third such peer: before, the two workers that drain and close
    turned-away peers each waited in that last close, the next 64 waited for them,
    and the loop drained and closed the third itself (past 64 waiting), waiting
    the hour: no request of anyone was answered. Now the loop reads what a
    turned-away peer queued (descriptors received, never dropped) and gives what
    may wait to workers on the peer uid's quota: a root client's hit is answered
    at once, and once the attacker lets the sockets go, the daemon's fd count
    comes back to its baseline."""
    d: Daemon = await start_daemon(
        "--socket-mode", "0666", "--allow-uid", "0", "--racy-window", "0"
    )
    f = make_file(shared_dir / "lib.so", b"x" * 100_000)
    src = os.open(f, os.O_RDONLY)
    child = spawn_as(ATTACKER, LINGERING.format(path=str(d.socket_path), n=67))
    try:
        with trio.fail_after(120):
            with Raw(d.socket_path, timeout=30) as raw:
                await _until_cached(raw, src)
            baseline = await trio.to_thread.run_sync(d.quiet_fds)
            with stopped(d):  # every datagram queued before its peer is accepted
                child.send(1)
                assert await trio.to_thread.run_sync(child.recv) == "sent"
            # A new connection, after every one of the attacker's: each was
            # turned away first. 10 s: far short of the hour the loop waited before.
            await _victims_hit(d, src)
            # The attack did bite: threads of the daemon wait in those closes,
            # none of them the loop's.
            deadline = time.monotonic() + 10
            while not (waiting := _lingering_closes(d.pid)) and time.monotonic() < deadline:
                await trio.sleep(0.05)
            assert waiting and d.pid not in waiting, waiting
            child.send(1)
            assert await trio.to_thread.run_sync(child.recv) == "released"
            await _back_to(d, baseline, 20)
            assert "Traceback" not in d.log()
    finally:
        child.close()
        os.close(src)


FLOODED = """
import array, msgpack, os, resource, socket
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # fds in flight count against it
r, w = os.pipe()
rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r] * 253).tobytes())]
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({path!r})
s.send(msgpack.packb({{"op": "hello", "id": 0, "version": 2}}))
assert msgpack.unpackb(s.recv(65536))["ok"]
recv()
sent = 0
s.setblocking(False)
try:
    for i in range({datagrams}):
        s.sendmsg([msgpack.packb({{"op": "open", "id": i + 1}})], rights)
        sent += 1
except BlockingIOError:
    pass
s.close()  # the connection ends with its datagrams unread
out(sent)
recv()
"""


async def test_a_connection_that_ends_with_descriptors_queued_is_held_to_its_uids_bound(
    start_daemon: Any,
) -> None:
    """Attack 21's second way: a connection of another uid queues datagrams of 253
    descriptors each (a pipe's, the same one: sending costs nothing) and ends.
    Before, the daemon received every descriptor still queued at once, whatever
    its uid's bound (13,000 and more into its fd table, each then closed in a
    worker on the uid's quota, two at a time: seconds near the fd limit, when
    another uid's hit fails for want of a descriptor). Now it receives them only
    while the uid's bound has room, and a worker on the uid's quota closes the
    socket with the rest: the daemon's fd count stays within the bound (and a
    datagram's worth) of its baseline, and comes back to it."""
    d: Daemon = await start_daemon("--socket-mode", "0666", "--max-fds-per-uid", "512")
    with trio.fail_after(20):
        # Before the child connects: quiet_fds waits for no connection at all.
        baseline = await trio.to_thread.run_sync(d.quiet_fds)
    child = spawn_as(ATTACKER, FLOODED.format(path=str(d.socket_path), datagrams=60))
    peak = 0
    try:
        with trio.fail_after(60):
            child.send(1)
            sent = await trio.to_thread.run_sync(child.recv)
            assert sent >= 40, sent  # so many that the bound cannot take them
            deadline = time.monotonic() + 20
            while (now := d.open_fds()) > baseline and time.monotonic() < deadline:
                peak = max(peak, now - baseline)
                await trio.sleep(0.005)
            assert d.open_fds() <= baseline, d.fd_targets()
        # The uid's bound, a datagram's worth past it, and a few for the socket.
        assert peak <= 512 + 2 * 253 + 16, peak
    finally:
        child.close()


#: Worker jobs per uid (--max-copies-per-uid's default).
QUOTA = 2

# Attack 23: descriptors of a file whose every close waits (a FUSE file whose
# server never answers FLUSH), 253 to a datagram, 8 datagrams on each of
# several connections queued before the daemon accepts them.
FLUSHING = """
import array, os, resource, socket
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))  # fds in flight count against it
fd = os.open({stuck!r}, os.O_RDONLY | os.O_NONBLOCK)  # never closed: its close would wait too
rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * 253).tobytes())]
socks = []
recv()
for _ in range({peers}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect({path!r})
    for _ in range(8):
        s.sendmsg([b"x"], rights)
    socks.append(s)
out("sent")
recv()
"""


async def test_a_peer_past_its_bound_cannot_make_the_loop_flush_a_hung_file(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 23: drain_final looked, past the uid's fd bound, at a queued datagram
    with MSG_PEEK and closed the duplicates it installed on the loop. That close
    is never the file's last, but every close(2) of a descriptor flushes it (FUSE
    sends FLUSH and waits): a peer turned away (a uid not in --allow-uid, default
    limits) whose earlier peers' descriptors of a FUSE file whose server never
    answers FLUSH held its bound (4,048 closes waiting on its quota) made the loop
    close the third peer's duplicates itself: no request of anyone was answered.
    Now a datagram past the bound is looked at without room for its descriptors
    (none is installed; the kernel says MSG_CTRUNC) and the socket goes to a
    worker: a root client's hit is answered, only the uid's two workers wait in a
    flush, and the fd count comes back to its baseline once the mount gives up."""
    d: Daemon = await start_daemon(
        "--socket-mode", "0666", "--allow-uid", "0", "--racy-window", "0"
    )
    f = make_file(shared_dir / "lib.so", b"x" * 100_000)
    src = os.open(f, os.O_RDONLY)
    stuck = FuseFile(b"s" * 100, ino=7, hang_flush=True)
    with mounted(shared_dir / "fuse", files={"stuck": stuck}) as fs:
        child = spawn_as(
            ATTACKER,
            FLUSHING.format(path=str(d.socket_path), stuck=str(fs.mountpoint / "stuck"), peers=3),
        )
        try:
            with trio.fail_after(120):
                with Raw(d.socket_path, timeout=30) as raw:
                    await _until_cached(raw, src)
                baseline = await trio.to_thread.run_sync(d.quiet_fds)
                with stopped(d):  # every datagram queued before its peer is accepted
                    child.send(1)
                    assert await trio.to_thread.run_sync(child.recv) == "sent"
                # Before, the loop waited for good.
                await _victims_hit(d, src)
                # The attack did bite: the uid's own workers wait in flushes.
                deadline = time.monotonic() + 10
                while fs.hung_flushes < QUOTA and time.monotonic() < deadline:
                    await trio.sleep(0.05)
                await trio.sleep(0.2)
                assert fs.hung_flushes == QUOTA
                fs.close()  # the mount gives up: every waiting close ends
                await _back_to(d, baseline, 30)
                assert "Traceback" not in d.log()
        finally:
            fs.close()
            child.close()
            os.close(src)


# Attack 24: peers of many uids, none admitted, each with a few descriptors
# of a file whose every close waits, queued before it is accepted. A root
# child forks one process per uid (the FUSE descriptor inherited), which
# drops to it, connects, sends, and waits to be let go.
MANY_UIDS = """
import array, os, socket
fd = os.open({stuck!r}, os.O_RDONLY | os.O_NONBLOCK)
rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd] * 4).tobytes())]
go_r, go_w = os.pipe()
recv()
kids = []
for uid in {uids!r}:
    ready_r, ready_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.setgroups([])
        os.setresgid(uid, uid, uid)
        os.setresuid(uid, uid, uid)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect({path!r})
        s.sendmsg([b"x"], rights)
        os.write(ready_w, b"x")
        os.read(go_r, 1)  # until the test lets go (the mount aborted first)
        os._exit(0)
    os.read(ready_r, 1)
    os.close(ready_r)
    os.close(ready_w)
    kids.append(pid)
out("sent")
recv()
os.write(go_w, b"x" * len(kids))
for pid in kids:
    os.waitpid(pid, 0)
out("done")
"""


async def test_peers_of_uids_not_admitted_cannot_take_the_workers_of_admitted_ones(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 24: attack 21's fix closes what a turned-away peer queued in workers
    on its uid's quota, and made a share for each such uid. The workers of file
    systems that may hang are one pool of 64 for every uid, so 33 uids that may
    not use the daemon at all (--allow-uid 0), each with one connection queuing
    descriptors of a FUSE file whose server never answers FLUSH, held the whole
    pool: an admitted client's open of a file on a FUSE mount (inspected and
    copied in that pool) waited for good. Now every peer turned away whose uid
    has no share of its own shares one (Gate.turned_away): together they hold at
    most --max-copies-per-uid workers, and the admitted client is served."""
    d: Daemon = await start_daemon(
        "--socket-mode", "0666", "--allow-uid", "0", "--racy-window", "0"
    )
    uids = [test_uid(50 + i) for i in range(33)]  # 64 workers / 2 a uid, and one more
    stuck = FuseFile(b"s" * 100, ino=7, hang_flush=True)
    with mounted(shared_dir / "fuse", files={"stuck": stuck}) as fs:
        child = spawn_as(
            0,
            MANY_UIDS.format(
                path=str(d.socket_path), stuck=str(fs.mountpoint / "stuck"), uids=uids
            ),
        )
        ok = os.open(fs.mountpoint / "ok", os.O_RDONLY)
        try:
            with trio.fail_after(120):
                baseline = await trio.to_thread.run_sync(d.quiet_fds)
                with stopped(d):  # every datagram queued before its peer is accepted
                    child.send(1)
                    assert await trio.to_thread.run_sync(child.recv, 60) == "sent"
                deadline = time.monotonic() + 10
                while fs.hung_flushes < QUOTA and time.monotonic() < deadline:
                    await trio.sleep(0.05)
                await trio.sleep(0.5)
                # 10 s: far past what a copy of 4 KiB takes; before, it waited for good.
                with Raw(d.socket_path, timeout=10) as victim:
                    reply, fds = await trio.to_thread.run_sync(
                        victim.call, {"op": "open", "id": 2, "wait": True}, [ok]
                    )
                    close_all(fds)
                    assert reply["ok"], reply
                assert fs.hung_flushes == QUOTA  # the turned-away peers' share, all of them
                fs.close()  # the mount gives up: every waiting close ends
                child.send(1)
                assert await trio.to_thread.run_sync(child.recv, 60) == "done"
                await _back_to(d, baseline, 30)
                assert "Traceback" not in d.log()
        finally:
            fs.close()
            child.close()
            with contextlib.suppress(OSError):
                os.close(ok)


# Attack 26: two peers whose lingering sockets hold the closing share's two
# workers, then many peers that each queue one datagram more than a turn-away
# reads, none with a descriptor, and leave.
PILED = (
    LINGERING.split("recv()\n", maxsplit=1)[0]
    + """recv()
for i in range(2):
    connection(True)
for i in range({n}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    for _ in range(9):
        s.send(b"x")
    s.close()  # the datagrams stay queued on the daemon's end
out("sent")
recv()
for p in peers:
    p.close()  # a reset: every lingering close ends
for s in socks:
    s.close()
out("released")
recv()
"""
)


async def test_sockets_of_peers_turned_away_do_not_pile_up_behind_closes_that_wait(
    start_daemon: Any,
) -> None:
    """Attack 26: a socket whose queue drain_final did not empty went to a worker on
    its peer's share, whatever the reason: past a turn-away's 8 datagrams too, which
    costs the peer nothing (no descriptor in flight). With that share's two workers
    held by lingering sockets (attack 21), every such socket waited in the daemon's
    fd table: 600 peers of a uid not admitted, each with 9 empty datagrams, took 600
    more descriptors, and any number would have (the daemon's fd limit, then EMFILE
    for everyone). Now a queue with no descriptor left to take is read to its end
    on the loop, a slice at a time; only a queue holding descriptors past the
    share's bound waits for a worker."""
    d: Daemon = await start_daemon(
        "--socket-mode", "0666", "--allow-uid", "0", "--racy-window", "0"
    )
    baseline = await trio.to_thread.run_sync(d.quiet_fds)
    child = spawn_as(ATTACKER, PILED.format(path=str(d.socket_path), n=600))
    try:
        with trio.fail_after(120):
            with stopped(d):  # every datagram queued before its peer is accepted
                child.send(1)
                assert await trio.to_thread.run_sync(child.recv, 60) == "sent"
            deadline = time.monotonic() + 10
            while not _lingering_closes(d.pid) and time.monotonic() < deadline:
                await trio.sleep(0.05)
            assert _lingering_closes(d.pid)  # the share's workers wait
            with Raw(d.socket_path, timeout=10) as victim:  # after all of them
                assert (await trio.to_thread.run_sync(victim.call, {"op": "stats", "id": 1}))[0][
                    "ok"
                ]
            # Two sockets carrying the lingering ones, and those two in the
            # workers' hands; a few of the daemon's own besides.
            held = d.open_fds() - baseline
            assert held <= 16, held
            child.send(1)
            assert await trio.to_thread.run_sync(child.recv) == "released"
            await _back_to(d, baseline, 20)
            assert "Traceback" not in d.log()
    finally:
        child.close()


# Attack 27: a uid not admitted holds its share's two workers with lingering
# sockets (attack 21), then queues one descriptor (a pipe's) on each of many
# peers and leaves: past the share's bound each such socket waits for a worker,
# one descriptor of the daemon each, up to the daemon's fd limit.
HELD = (
    LINGERING.split("recv()\n", maxsplit=1)[0]
    + """import resource
resource.setrlimit(resource.RLIMIT_NOFILE, resource.getrlimit(resource.RLIMIT_NOFILE)[1:] * 2)
r, w = os.pipe()
one = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
recv()
for i in range(2):
    connection(True)
for i in range({n}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect(path)
    s.sendmsg([b"x"], one)  # in flight, counted against this uid's fd limit
    s.close()
out("sent")
recv()
for p in peers:
    p.close()  # a reset: every lingering close ends
for s in socks:
    s.close()
out("released")
recv()
"""
)

# An admitted uid's one connection, which sends a lingering socket in an open
# when told to: read by the daemon at its fd limit, the kernel would drop it,
# its last reference, in the reading thread.
CARRIER = (
    LINGERING.split("recv()\n", maxsplit=1)[0]
    + """import msgpack
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect(path)
s.send(msgpack.packb({{"op": "hello", "id": 0, "version": 1}}))
assert msgpack.unpackb(s.recv(65536))["ok"]
out("ready")
recv()
c, peer = lingering()
rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [c.fileno()]).tobytes())]
s.sendmsg([msgpack.packb({{"op": "open", "id": 1}})], rights)
c.close()
out("sent")
recv()
peer.close()
s.close()
out("released")
recv()
"""
)


async def test_sockets_waiting_for_a_worker_cannot_take_the_daemon_to_its_fd_limit(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 27: a socket whose peer queued descriptors past its share's bound is
    closed by a worker on that share's quota, and waits for one in the daemon's fd
    table. A uid not admitted held its share's two workers with lingering sockets,
    then 1,100 peers each queued one pipe's descriptor and left: the daemon (here at
    1,024 descriptors) took every one, then its table was full: a root client's open
    came back with its descriptor dropped by the kernel, and a lingering socket that
    another, admitted, uid sent then was dropped by the kernel on the loop, which
    waited in its close. Now sockets waiting to be closed are bounded (a sixteenth
    of the fd limit): past that the daemon stops accepting until one is closed."""
    carrier_uid = test_uid(41)
    d: Daemon = await start_daemon(
        "--socket-mode",
        "0666",
        "--allow-uid",
        "0",
        "--allow-uid",
        str(carrier_uid),
        "--racy-window",
        "0",
        nofile=(1024, 1024),
    )
    f = make_file(shared_dir / "lib.so", b"x" * 100_000)
    src = os.open(f, os.O_RDONLY)
    carrier = spawn_as(carrier_uid, CARRIER.format(path=str(d.socket_path), n=0))
    child = spawn_as(ATTACKER, HELD.format(path=str(d.socket_path), n=1100))
    peak = 0
    try:
        with trio.fail_after(180):
            with Raw(d.socket_path, timeout=30) as victim:
                await _until_cached(victim, src)
                assert await trio.to_thread.run_sync(carrier.recv) == "ready"
                baseline = d.open_fds()
                with stopped(d):  # every datagram queued before its peer is accepted
                    child.send(1)
                    assert await trio.to_thread.run_sync(child.recv, 60) == "sent"
                # Until the daemon took what it takes of the backlog.
                last, since = -1, time.monotonic()
                while time.monotonic() - since < 1.0:
                    now = d.open_fds()
                    peak = max(peak, now)
                    if now != last:
                        last, since = now, time.monotonic()
                    await trio.sleep(0.05)
                carrier.send(1)
                assert await trio.to_thread.run_sync(carrier.recv) == "sent"
                await trio.sleep(0.5)  # read by the daemon (or dropped, before)
                # 10 s: far past what a hit takes, far short of the linger's hour.
                victim.sock.settimeout(10)
                reply, fds = await trio.to_thread.run_sync(
                    victim.call, {"op": "open", "id": 10**6}, [src]
                )
                close_all(fds)
                assert reply["ok"] and reply["hit"], reply
                assert d.pid not in _lingering_closes(d.pid)
                # The attack did bite: the acceptor waited for room.
                stats = (await trio.to_thread.run_sync(victim.call, {"op": "stats", "id": 3}))[0]
                assert stats["stats"]["limit_hits"].get("max_sockets_closing"), stats
                print("peak above the baseline:", peak - baseline)
                # A sixteenth of the limit, and the share's bound of descriptors
                # waiting for its workers (half the limit), and the daemon's own.
                assert peak - baseline <= 64 + 512 + 32, peak - baseline
            child.send(1)
            assert await trio.to_thread.run_sync(child.recv, 60) == "released"
            carrier.send(1)
            assert await trio.to_thread.run_sync(carrier.recv) == "released"
            await _back_to(d, baseline, 30)
            with Raw(d.socket_path, timeout=10) as late:  # accepting again
                assert (await trio.to_thread.run_sync(late.call, {"op": "stats", "id": 1}))[0]["ok"]
            assert "Traceback" not in d.log()
    finally:
        child.close()
        carrier.close()
        os.close(src)


# Attack 28: descriptors of character devices whose release takes the kernel
# long. A tun device (made by an unprivileged user in a user and network
# namespace of its own, through a /dev/net/tun open to all, as systemd's udev
# rules make it) is unregistered at its last close: 15-30 ms on this VM.
TUNS = """
import array, ctypes, fcntl, os, socket, struct
libc = ctypes.CDLL(None, use_errno=True)
uid, gid = os.getuid(), os.getgid()
libc.prctl(4, 1, 0, 0, 0)  # PR_SET_DUMPABLE: our /proc/self is ours again after the uid drop
if libc.unshare(0x10000000 | 0x40000000) != 0:  # CLONE_NEWUSER | CLONE_NEWNET
    out("no user namespace: " + os.strerror(ctypes.get_errno()))
    raise SystemExit(0)
open("/proc/self/setgroups", "w").write("deny")
open("/proc/self/uid_map", "w").write(f"0 {{uid}} 1")
open("/proc/self/gid_map", "w").write(f"0 {{gid}} 1")
tuns = []
for i in range({n}):
    fd = os.open({node!r}, os.O_RDWR)
    fcntl.ioctl(fd, 0x400454CA, struct.pack("16sH", b"t%d" % i, 0x1001))  # TUNSETIFF, TUN|NO_PI
    tuns.append(fd)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({path!r})
out("ready")
recv()
s.sendmsg([b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", tuns).tobytes())])
for fd in tuns:
    os.close(fd)  # the daemon's descriptors are the last
out("sent")
recv()
"""

#: Tun devices the attacker sends in one datagram.
TUN_DEVICES = 64


def _releasing_tuns(pid: int) -> set[int]:
    """The threads of process *pid* in a tun device's release, as their stacks say."""
    found = set()
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if "tun_chr_close" in (task / "stack").read_text():
                found.add(int(task.name))
    return found


async def test_the_release_of_a_clients_device_is_not_made_on_the_loop(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 28: a device node on a file system the loop trusts (devtmpfs is a
    tmpfs) counted as a file the loop may close, but a device's release runs its
    driver: a tun device is unregistered at its last close (15-30 ms each here),
    and any client may make them by the hundred in a network namespace of its own.
    A datagram of 64 tun descriptors (refused: not a request) had the loop release
    each, a second and more: before, the daemon's loop thread was seen in
    tun_chr_close; now only workers on the uid's quota are, as for any file that
    is not a regular one."""
    if not Path("/dev/net/tun").exists():  # noqa: ASYNC240 (a look at /dev, never waits)
        pytest.skip("no /dev/net/tun here")
    d: Daemon = await start_daemon("--socket-mode", "0666")
    node = shared_dir / "tun"
    os.mknod(node, 0o666 | 0o020000, os.makedev(10, 200))  # /dev/net/tun, open to all
    node.chmod(0o666)
    child = spawn_as(ATTACKER, TUNS.format(path=str(d.socket_path), node=str(node), n=TUN_DEVICES))
    try:
        with trio.fail_after(120):
            said = await trio.to_thread.run_sync(child.recv, 60)
            if said != "ready":
                pytest.skip(said)
            with stopped(d):  # the attacker's descriptors closed before the daemon reads
                child.send(1)
                assert await trio.to_thread.run_sync(child.recv) == "sent"
            seen: set[int] = set()
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and not (seen and not _releasing_tuns(d.pid)):
                seen |= _releasing_tuns(d.pid)
                await trio.sleep(0.002)
            assert seen, "nobody was seen releasing a tun device"  # the attack did bite
            assert d.pid not in seen, "the daemon's loop thread released a device"
            with Raw(d.socket_path, timeout=10) as raw:  # and it goes on serving
                assert (await trio.to_thread.run_sync(raw.call, {"op": "stats", "id": 1}))[0]["ok"]
    finally:
        child.close()


# Attack 29: a file truncated, then rewritten (ext4 writes such a file out at
# the next release of any of its descriptors, auto_da_alloc), over
# --max-file-size; the writer stays open, a reader is sent and closed.
REWRITTEN = """
import msgpack, os, socket, array
w = os.open({path!r}, os.O_RDWR)
os.write(w, b"y" * 4096)
os.fsync(w)
os.ftruncate(w, 0)  # the next release writes the file out
chunk = b"z" * (1 << 20)
for _ in range({mib}):
    os.write(w, chunk)
r = os.open({path!r}, os.O_RDONLY)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({sock!r})
s.send(msgpack.packb({{"op": "hello", "id": 0, "version": 1}}))
assert msgpack.unpackb(s.recv(65536))["ok"]
rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
s.sendmsg([msgpack.packb({{"op": "open", "id": 1}})], rights)
os.close(r)  # the daemon's descriptor is the last of that open file description
out(msgpack.unpackb(s.recv(65536)))
recv()
os.close(w)
"""


async def test_the_write_out_of_a_clients_rewritten_file_is_not_made_on_the_loop(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 29: ext4 (and XFS, btrfs) write a file out at the release of any of
    its descriptors after it was truncated, so that a file replaced by truncating
    and rewriting it survives a crash. A client truncates its file, writes 300 MiB
    (120 ms of its time: page cache), and sends a read-only descriptor in an open,
    refused file-too-large: the daemon's close of it wrote the file out (about
    250 ms for 512 MiB here). Before, fanotify saw the loop thread make that
    release; now a worker does: a large file changed in the last minute is
    closed as one with no link left is (attack 19)."""
    d: Daemon = await start_daemon("--socket-mode", "0666")
    path = shared_dir / "rewritten"
    path.write_bytes(b"")
    os.chown(path, ATTACKER, ATTACKER)
    closer = _closer_of(path)
    child = spawn_as(ATTACKER, REWRITTEN.format(path=str(path), sock=str(d.socket_path), mib=300))
    try:
        with trio.fail_after(60):
            reply = await trio.to_thread.run_sync(child.recv)
            assert reply["code"] == "file-too-large", reply
            tid = await trio.to_thread.run_sync(closer, 30.0)
            assert tid != d.pid, "the daemon's loop thread wrote the file out"
            child.send(1)
    finally:
        child.close()
        path.unlink()


# Attack 30: many files each below attack 29's threshold, each truncated and
# rewritten through the one descriptor sent (O_RDWR: the daemon's close is the
# release that writes it out), all in one datagram (refused: more than
# --max-batch).
REWRITTEN_MANY = """
import msgpack, os, socket, array
chunk = b"z" * (1 << 20)
fds = []
for path in {paths!r}:
    w = os.open(path, os.O_RDWR)
    os.write(w, b"y")
    os.ftruncate(w, 0)  # the next release writes the file out
    os.write(w, chunk)
    fds.append(w)
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({sock!r})
s.send(msgpack.packb({{"op": "hello", "id": 0, "version": 1}}))
assert msgpack.unpackb(s.recv(65536))["ok"]
out("ready")
recv()  # the daemon is stopped now
rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
s.sendmsg([msgpack.packb({{"op": "open_batch", "id": 1}})], rights)
for w in fds:
    os.close(w)  # the daemon's descriptors are the last of these descriptions
out("sent")
out(msgpack.unpackb(s.recv(65536)))
recv()
"""

#: Files in attack 30's datagram (the most one may carry), of 1 MiB each.
REWRITTEN_FILES = 253
FAN_CLOSE_WRITE = 0x8


async def test_the_write_out_of_many_small_rewritten_files_is_not_made_on_the_loop(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 30: attack 29's threshold is per file, and a datagram carries 253. A
    client truncates and rewrites 253 files of 1 MiB through the descriptors it
    sends (refused: more than --max-batch) and closes its own: each release wrote
    its file out, all on the loop (253 files of 4 MiB held another client's hit
    0.5 s here). Before, fanotify saw the loop thread make all 253 releases; now
    the loop makes releases that may write out or free at most FREES_MUCH bytes,
    and that again only as time passes, the rest go to workers on the sender's
    quota."""
    d: Daemon = await start_daemon("--socket-mode", "0666")
    top = shared_dir / "rewritten"
    top.mkdir()
    paths = []
    fan = _libc.fanotify_init(FAN_CLOEXEC | FAN_NONBLOCK | FAN_REPORT_TID, os.O_RDONLY)
    if fan < 0:
        pytest.skip(f"no fanotify here: {os.strerror(ctypes.get_errno())}")
    child = None
    try:
        for i in range(REWRITTEN_FILES):
            path = top / f"f{i}"
            path.write_bytes(b"")
            os.chown(path, ATTACKER, ATTACKER)
            mask = FAN_CLOSE_WRITE | FAN_CLOSE_NOWRITE
            assert _libc.fanotify_mark(fan, FAN_MARK_ADD, mask, AT_FDCWD, bytes(path)) == 0
            paths.append(str(path))
        child = spawn_as(ATTACKER, REWRITTEN_MANY.format(paths=paths, sock=str(d.socket_path)))
        with trio.fail_after(60):
            assert await trio.to_thread.run_sync(child.recv) == "ready"
            with stopped(d):  # the attacker's descriptors closed before the daemon reads
                child.send(1)
                assert await trio.to_thread.run_sync(child.recv) == "sent"
            reply = await trio.to_thread.run_sync(child.recv)
            assert reply["code"] == "bad-fds", reply
            tids: list[int] = []
            deadline = time.monotonic() + 30
            while len(tids) < REWRITTEN_FILES and time.monotonic() < deadline:
                if not select.select([fan], [], [], 0)[0]:
                    await trio.sleep(0.01)
                    continue
                data = os.read(fan, 1 << 16)
                at = 0
                while at < len(data):
                    size, _vers, _res, _mlen, _mask, fd, tid = _FAN_EVENT.unpack_from(data, at)
                    if fd >= 0:
                        os.close(fd)
                    tids.append(tid)
                    at += size
            assert len(tids) == REWRITTEN_FILES, f"{len(tids)} releases seen"
            on_loop = tids.count(d.pid)
            # 16 MiB of releases at once, and 16 MiB more a second: the test's
            # few seconds allow a few dozen; before, all 253.
            assert on_loop <= 64, f"the loop thread released {on_loop} of the rewritten files"
            child.send(1)
            with Raw(d.socket_path, timeout=10) as raw:  # and it goes on serving
                assert (await trio.to_thread.run_sync(raw.call, {"op": "stats", "id": 1}))[0]["ok"]
    finally:
        os.close(fan)
        if child is not None:
            child.close()


# Attack 31: connections that end with as many empty datagrams queued as their
# send buffers hold (the first one reads as the end: the connection ends and
# the rest is read on); the attacker keeps its sockets and says how much of
# what it queued is still unread (SIOCOUTQ, in datagrams).
QUEUED_MANY = """
import array, fcntl, msgpack, os, socket, struct, termios
def unread(s):
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\\0" * 4))[0]
a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
a.send(b"")
each = unread(a)  # what the kernel charges an empty datagram until it is read
a.close(); b.close()
socks = []
for _ in range({n}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.connect({path!r})
    s.send(msgpack.packb({{"op": "hello", "id": 0, "version": 1}}))
    assert msgpack.unpackb(s.recv(65536))["ok"]
    socks.append(s)
r, w = os.pipe()
last = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [r]).tobytes())]
out("ready")
recv()  # the daemon is stopped now
for s in socks:
    for _ in range({each}):
        s.send(b"")
    s.sendmsg([b""], last)  # one fd at the end: the queue is read on, not freed (attack 33)
while recv() is not None:
    out(sum(unread(s) for s in socks) // each)
"""

#: Attack 31's connections, and the empty datagrams each queues (in 4 MiB of
#: the kernel's memory).
QUEUED_SOCKETS = 32
QUEUED_EACH = 5000


async def test_sockets_read_on_after_their_end_take_a_bounded_slice_of_a_turn_in_all(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 31: a socket read on after its connection ended (Closer.drain_later)
    had a task of its own, each reading 256 datagrams a turn of the loop, so a
    turn read 256 for each such socket: 64 connections of another uid, each
    ending with its send buffer full of empty datagrams (700,000 in all), held a
    root client's hits for 0.1-0.6 s each, again and again for 5 s. Counted, not
    timed: the datagrams the daemon reads between the victim's hit and its reply
    (the daemon is stopped at both ends); before, 8,000 and more for 32 sockets;
    now the sockets read on share one slice a turn. (Each queue ends with a
    datagram carrying an fd: one without is freed by a worker now, attack 33.)"""
    d: Daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    f = make_file(shared_dir / "f", b"x" * 100)
    src = os.open(f, os.O_RDONLY)
    child = spawn_as(
        ATTACKER,
        QUEUED_MANY.format(path=str(d.socket_path), n=QUEUED_SOCKETS, each=QUEUED_EACH),
    )
    try:
        with trio.fail_after(120), Raw(d.socket_path, timeout=30) as victim:
            await _until_cached(victim, src)
            assert await trio.to_thread.run_sync(child.recv, 60) == "ready"
            with stopped(d):
                child.send(1)
                child.send(1)
                queued = await trio.to_thread.run_sync(child.recv)
            assert queued > QUEUED_SOCKETS * QUEUED_EACH, queued
            # Wait until the connections have ended and their sockets are read on.
            while True:
                child.send(1)
                now = await trio.to_thread.run_sync(child.recv)
                if queued - now >= QUEUED_SOCKETS * 2048 + 10000:
                    break
                await trio.sleep(0.001)
            assert now > queued // 4, "drained before the victim could ask"
            with stopped(d):
                child.send(1)
                before = await trio.to_thread.run_sync(child.recv)
                victim.send({"op": "open", "id": 1}, [src])
            reply, fds = await trio.to_thread.run_sync(victim.recv)
            with stopped(d):
                child.send(1)
                after = await trio.to_thread.run_sync(child.recv)
            close_all(fds)
            assert reply["ok"] and reply["hit"], reply
            assert before - after <= 2048, f"{before - after} datagrams read before the hit"
    finally:
        child.close()
        os.close(src)


def _runtimes(pid: int) -> dict[int, int]:
    """Nanoseconds each thread of process *pid* has run so far (schedstat)."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, ValueError):
            out[int(task.name)] = int((task / "schedstat").read_text().split()[0])
    return out


def _asleep(pid: int) -> bool:
    """Whether every thread of process *pid* sleeps (waits for something to do)."""
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            if (task / "stat").read_text().rsplit(")", 1)[1].split()[0] != "S":
                return False
    return True


async def _until_asleep(pid: int, timeout: float = 30) -> None:
    """Wait until every thread of process *pid* sleeps (see _asleep)."""
    deadline = time.monotonic() + timeout
    while not _asleep(pid):
        assert time.monotonic() < deadline, f"the daemon's threads never all slept: {_states(pid)}"
        await trio.sleep(0.01)


def _states(pid: int) -> dict[str, str]:
    """Each thread of process *pid*'s state letter (R, S, D...), by thread id."""
    out = {}
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError):
            out[task.name] = (task / "stat").read_text().rsplit(")", 1)[1].split()[0]
    return out


#: Attack 32's file: its memfd's pages take the kernel tens of milliseconds to free.
FREED_MIB = 200
#: The one inotify event asked for: IN_IGNORED comes anyway, when the inode goes.
IN_IGNORED_ONLY = 0x00008000
_libc.inotify_add_watch.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_uint32]


@pytest.mark.parametrize("how", ["changed", "evicted"])
async def test_the_daemon_frees_the_large_memfds_it_lets_go_of_off_the_loop(
    start_daemon: Any, shared_dir: Path, how: str
) -> None:
    """Attack 32: when the cache lets go of an entry (evicted, or its file changed)
    and nobody else holds its memfd, the daemon's close frees its pages: 30-115 ms
    for 250 MiB here, made on the loop. A client that publishes 250 MiB memfds
    one after another (each evicting an earlier one) held another client's hits
    up to 70-96 ms, again and again. Which thread freed the pages of a 200 MiB
    copy, from the file's change (or the other file's open) to the memfd's inode
    going (IN_IGNORED): the loop thread must have run less than another thread of
    the daemon meanwhile; before, it ran the free itself (and no other thread
    ran as long)."""
    d: Daemon = await start_daemon("--racy-window", "0", "--max-entries", "1")
    big = make_file(shared_dir / "big", b"b" * (FREED_MIB << 20))
    other = make_file(shared_dir / "other", b"o" * 100)
    src = os.open(big, os.O_RDONLY)
    ino = _libc.inotify_init1(os.O_NONBLOCK | os.O_CLOEXEC)
    assert ino >= 0
    try:
        with trio.fail_after(60), Raw(d.socket_path, timeout=30) as raw:
            await _until_cached(raw, src)
            reply, fds = await trio.to_thread.run_sync(raw.call, {"op": "open", "id": 1}, [src])
            assert reply["hit"], reply
            # The served descriptor names the cached memfd: watch its inode go.
            path = f"/proc/self/fd/{fds[0]}".encode()
            assert _libc.inotify_add_watch(ino, path, IN_IGNORED_ONLY) >= 0
            close_all(fds)
            before = _runtimes(d.pid)
            if how == "changed":
                with open(big, "r+b") as f:
                    f.write(b"c")  # IN_MODIFY: the entry goes at the daemon's next round
                await trio.to_thread.run_sync(raw.call, {"op": "stats", "id": 2})
            else:
                probe = os.open(other, os.O_RDONLY)  # cached in its place
                try:
                    await _until_cached(raw, probe)
                finally:
                    os.close(probe)
            deadline = time.monotonic() + 30
            while not select.select([ino], [], [], 0)[0]:
                assert time.monotonic() < deadline, "the memfd was not freed"
                await trio.sleep(0.01)
            # IN_IGNORED comes as the inode goes, before its pages are freed: wait
            # until that is done, whichever thread does it.
            while not _asleep(d.pid):
                assert time.monotonic() < deadline, "the daemon never rested"
                await trio.sleep(0.01)
            after = _runtimes(d.pid)
            ran = {tid: after[tid] - before.get(tid, 0) for tid in after}
            loop = ran.pop(d.pid)
            assert loop < max(ran.values()), (
                f"the loop thread ran {loop / 1e6:.1f} ms, no other more: it freed the memfd"
            )
    finally:
        os.close(src)
        os.close(ino)


# Attack 33: connections of a uid not admitted, each with its send buffer full
# of empty datagrams queued before the daemon accepts it; the attacker says how
# much of what it queued is still unread (SIOCOUTQ, in datagrams).
TURNED_AWAY_FULL = """
import fcntl, socket, struct, termios
def unread(s):
    return struct.unpack("i", fcntl.ioctl(s.fileno(), termios.TIOCOUTQ, b"\\0" * 4))[0]
socks = []
recv()  # the daemon is stopped now
for _ in range({n}):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4 << 20)
    s.connect({path!r})
    s.setblocking(False)
    try:
        while True:
            s.send(b"")
    except BlockingIOError:
        pass
    socks.append(s)
out("sent")
while recv() is not None:
    out(sum(unread(s) for s in socks))
"""


def _counts_queued_fds() -> bool:
    """Whether the kernel says how many fds a datagram socket's queue carries."""
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) as probe:
        return b"scm_fds:" in Path(f"/proc/self/fdinfo/{probe.fileno()}").read_bytes()


async def test_a_turned_away_peers_queue_without_descriptors_is_not_read_on_the_loop(
    start_daemon: Any,
) -> None:
    """Attack 33: what is left queued on a client's socket past the drain at its
    end was read on the loop, 5-9 us a datagram, the socket held (counted against
    max_sockets) meanwhile: 80 peers of a uid not admitted, each with its send
    buffer full of empty datagrams (874,000 in all), had the daemon pause
    accepting until they were read, and a new root client's hello waited 7.6 s
    (at a 1,024 fd limit). The kernel counts the fds a datagram socket's queue
    carries (scm_fds): a queue with none is closed in the thread that frees
    memfds, where its close only frees buffers. Which thread consumed 20 such
    queues: the loop thread must have run less than another thread of the daemon
    from their accept until they are all consumed and the daemon rests; before,
    it read them all itself."""
    d: Daemon = await start_daemon("--socket-mode", "0666", "--allow-uid", "0")
    if not _counts_queued_fds():
        pytest.skip("this kernel does not count the fds a socket's queue carries")
    child = spawn_as(ATTACKER, TURNED_AWAY_FULL.format(path=str(d.socket_path), n=20))
    try:
        with trio.fail_after(120):
            with stopped(d):
                child.send(1)
                assert await trio.to_thread.run_sync(child.recv, 60) == "sent"
                before = _runtimes(d.pid)
            while True:
                child.send(1)
                if await trio.to_thread.run_sync(child.recv) == 0:
                    break
                await trio.sleep(0.01)
            while not _asleep(d.pid):
                await trio.sleep(0.01)
            after = _runtimes(d.pid)
            ran = {tid: after[tid] - before.get(tid, 0) for tid in after}
            loop = ran.pop(d.pid)
            assert loop < max(ran.values()), (
                f"the loop thread ran {loop / 1e6:.1f} ms, no other more: it read the queues"
            )
            with Raw(d.socket_path, timeout=10) as raw:  # and it goes on serving
                assert (await trio.to_thread.run_sync(raw.call, {"op": "stats", "id": 1}))[0]["ok"]
    finally:
        child.close()


# Attack 34: an open of a file too young to be cached, sent by a client that
# leaves before its reply: the copy is made, then its reply cannot be sent.
LEAVES = """
import array, msgpack, os, socket
s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
s.connect({sock!r})
s.send(msgpack.packb({{"op": "hello", "id": 0, "version": 1}}))
assert msgpack.unpackb(s.recv(65536))["ok"]
out("ready")
recv()
os.chmod({path!r}, 0o640)  # its ctime now: too young to cache
fd = os.open({path!r}, os.O_RDONLY)
rights = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
s.sendmsg([msgpack.packb({{"op": "open", "id": 1, "wait": True}})], rights)
os.close(fd)
s.close()  # gone before the copy is made
out("sent")
recv()
"""

#: Attack 34's file: its copy's pages take the kernel tens of milliseconds to free.
LEFT_MIB = 512
#: What the loop may run, in all, from the attacker's open until the daemon rests
#: (answering it costs a millisecond or two); freeing the copy took it 45-65 ms.
LEFT_LOOP_NS = 20_000_000


async def test_a_copy_whose_client_left_is_not_freed_on_the_loop(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Attack 34: a copy that is not cached (its file is too young) and whose client
    went away before the reply: the reply cannot be sent, and the daemon's close of
    the served descriptor was the memfd's last, freeing its pages on the loop (two
    clients doing it with 200 MiB files held another's hits up to 56 ms). The loop
    thread's run time from the open until the daemon rests: a millisecond or two
    of answering; before, the free besides."""
    # A racy window of a minute: however long the copy takes here, it is not cached.
    d: Daemon = await start_daemon(
        "--socket-mode",
        "0666",
        "--racy-window",
        "60",
        "--max-file-size",
        "1G",
        "--max-pinned-bytes-per-uid",
        "2G",
    )
    path = make_file(shared_dir / "young", b"y" * (LEFT_MIB << 20))
    os.chown(path, ATTACKER, ATTACKER)
    copied = _closer_of(path)  # the last close of the attacker's open: its copy's end
    child = spawn_as(ATTACKER, LEAVES.format(sock=str(d.socket_path), path=str(path)))
    try:
        with trio.fail_after(120):
            assert await trio.to_thread.run_sync(child.recv, 60) == "ready"
            await _until_asleep(d.pid)
            before = _runtimes(d.pid)
            child.send(1)
            assert await trio.to_thread.run_sync(child.recv) == "sent"
            await trio.to_thread.run_sync(copied, 60.0)
            # Then the reply is tried, and the copy let go of.
            await _until_asleep(d.pid)
            after = _runtimes(d.pid)
            with Raw(d.socket_path, timeout=30) as raw:  # it was so
                reply, _ = await trio.to_thread.run_sync(raw.call, {"op": "stats", "id": 1})
                assert reply["stats"]["uncached"] == 1, reply
            loop = after[d.pid] - before[d.pid]
            assert loop < LEFT_LOOP_NS, f"the loop thread ran {loop / 1e6:.1f} ms"
    finally:
        child.close()
