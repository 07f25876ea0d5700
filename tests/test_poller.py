# The poller on real socketpairs: one datagram per ready connection per round,
# the loop's time shared per uid (not per connection), the round's fds closed
# at its end, owners taken out mid-round skipped, and the rest of the loop kept
# running while connections stay ready; and the server's hand-over of a
# request to a connection's task.
from __future__ import annotations

import fcntl
import logging
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio
import trio.testing

from shadowd import dispatch as dispatch_module
from shadowd import hotcalls
from shadowd import poller as poller_module
from shadowd.access import Peer
from shadowd.cache import CacheLimits
from shadowd.connection import Received
from shadowd.fds import LONG_LIVED_BASE, close_all, fds_from_ancdata, scm_rights
from shadowd.memfd import _proc_fd_dir
from shadowd.metrics import count_open_fds
from shadowd.opens import HostOpens
from shadowd.poller import ROUND_BUDGET, Flow, Poller
from shadowd.refusals import Refusals
from shadowd.server import Server, ServerConfig


@pytest.fixture
def pairs() -> Iterator[list[tuple[socket.socket, socket.socket]]]:
    made = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(3)]
    for ours, _ in made:
        ours.setblocking(False)
    yield made
    for a, b in made:
        a.close()
        b.close()


def _park_all_ready(poller: Poller[int], pairs: list[tuple[socket.socket, socket.socket]]) -> None:
    """Park each pair's first end, owned by its index, with one datagram waiting."""
    for i, (ours, theirs) in enumerate(pairs):
        theirs.send(b"x")
        poller.park(ours.fileno(), i)


def _is_open(fd: int) -> bool:
    try:
        fcntl.fcntl(fd, fcntl.F_GETFD)
    except OSError:
        return False
    return True


async def test_each_ready_connection_gets_one_datagram_per_round(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """A connection with many datagrams queued does not go before the others' first."""
    poller: Poller[str] = Poller()
    names = {"a": pairs[0][0], "b": pairs[1][0], "c": pairs[2][0]}
    order: list[str] = []
    done = trio.Event()

    def answer(name: str) -> bool:
        order.append(names[name].recv(64).decode())
        if len(order) == 7:
            done.set()
        return True

    for i in range(5):
        pairs[0][1].send(f"a{i}".encode())
    pairs[1][1].send(b"b0")
    pairs[2][1].send(b"c0")
    for name, sock in names.items():
        poller.park(sock.fileno(), name)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run, answer)
            await done.wait()
            nursery.cancel_scope.cancel()
    poller.close()
    assert sorted(order[:3]) == ["a0", "b0", "c0"]
    assert order[3:] == ["a1", "a2", "a3", "a4"]


async def test_a_lone_connection_is_answered_datagram_by_datagram(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """With one connection parked the poller answers it without asking epoll which."""
    poller: Poller[int] = Poller()
    got: list[bytes] = []
    done = trio.Event()
    ours, theirs = pairs[0]

    def answer(i: int) -> bool:
        got.append(ours.recv(64))
        if len(got) == 3:
            done.set()
        return True

    poller.park(ours.fileno(), 0)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run, answer)
            for i in range(3):
                theirs.send(b"%d" % i)
                await trio.sleep(0.01)
            await done.wait()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    poller.close()
    assert got == [b"0", b"1", b"2"]  # and answer() was never called with nothing to read


async def test_fds_given_to_close_later_live_through_the_round_then_close(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    poller: Poller[int] = Poller()
    made: list[int] = []
    open_during: list[bool] = []
    done = trio.Event()

    def answer(i: int) -> bool:
        pairs[i][0].recv(64)
        fd = os.open("/dev/null", os.O_RDONLY | os.O_CLOEXEC)
        made.append(fd)
        poller.close_later(fd)
        open_during.append(all(_is_open(f) for f in made))
        if len(made) == 2:
            done.set()
        return True

    _park_all_ready(poller, pairs[:2])
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run, answer)
            await done.wait()
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    poller.close()
    assert open_during == [True, True]
    assert not any(_is_open(fd) for fd in made)


async def test_false_takes_the_connection_out_and_unpark_mid_round_skips_it(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    poller: Poller[int] = Poller()
    seen: list[int] = []

    def answer(i: int) -> bool:
        seen.append(i)
        pairs[i][0].recv(64)
        for other in (0, 1, 2):
            if other != i:
                poller.unpark(pairs[other][0].fileno())  # whoever is first wins
        return False

    _park_all_ready(poller, pairs)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run, answer)
            await trio.testing.wait_all_tasks_blocked()
            nursery.cancel_scope.cancel()
    assert len(seen) == 1
    assert len(poller) == 0
    # Out of the set: more data does not call answer again.
    pairs[seen[0]][1].send(b"y")
    poller.close()


async def test_connections_that_stay_ready_do_not_starve_the_loop(
    pairs: list[tuple[socket.socket, socket.socket]],
) -> None:
    """answer() that never drains: the poller still yields after each budget."""
    poller: Poller[int] = Poller()
    calls = 0
    calls_at_tick = 0
    ticks = 0

    def answer(i: int) -> bool:
        nonlocal calls
        calls += 1
        if calls - calls_at_tick > 10 * ROUND_BUDGET:
            raise AssertionError("the poller did not let the other task run")
        return True  # reads nothing: stays readable forever

    _park_all_ready(poller, pairs)
    with trio.fail_after(5):
        async with trio.open_nursery() as nursery:
            nursery.start_soon(poller.run, answer)
            for _ in range(20):
                await trio.lowlevel.checkpoint()
                ticks += 1
                calls_at_tick = calls
            nursery.cancel_scope.cancel()
    poller.close()
    assert ticks == 20
    assert calls >= 20 * ROUND_BUDGET // 2  # it went on answering meanwhile


class FakeClock:
    """The poller's clock, moved only by the answers: what each answer costs is
    then exactly what the test says, whatever the machine's speed."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


#: What an answer costs the loop, on the fake clock: a datagram of tens of
#: thousands of empty arrays, and a hit.
COSTLY, CHEAP = 0.005, 0.00002


@pytest.mark.parametrize("a_connections", [8, 300])
async def test_a_uid_is_answered_after_one_answer_of_another_whatever_its_connections(
    monkeypatch: pytest.MonkeyPatch, a_connections: int
) -> None:
    """Uid A has many connections, each with two costly datagrams queued; uid B has
    four connections, one cheap datagram each, sent after all of A's. B's are all
    answered after at most one of A's, with 8 connections of A as with 300 (before:
    after every one of A's connections had had one answer)."""
    clock = FakeClock()
    monkeypatch.setattr(poller_module, "_now", clock)
    poller: Poller[tuple[str, socket.socket]] = Poller()
    a, b = Flow(), Flow()
    made = [
        socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(a_connections + 4)
    ]
    order: list[str] = []
    done = trio.Event()

    def answer(owner: tuple[str, socket.socket]) -> bool:
        uid, sock = owner
        sock.recv(64)
        order.append(uid)
        clock.now += COSTLY if uid == "a" else CHEAP
        if order.count("b") == 4:
            done.set()
        return True

    try:
        for ours, theirs in made[:a_connections]:
            ours.setblocking(False)
            theirs.send(b"1")
            theirs.send(b"2")
            poller.park(ours.fileno(), ("a", ours), a)
        for ours, theirs in made[a_connections:]:
            ours.setblocking(False)
            theirs.send(b"1")
            poller.park(ours.fileno(), ("b", ours), b)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller.run, answer)
                await done.wait()
                nursery.cancel_scope.cancel()
    finally:
        poller.close()
        for ours, theirs in made:
            ours.close()
            theirs.close()
    last_b = len(order) - 1 - order[::-1].index("b")
    assert order[:last_b].count("a") <= 1, order[: last_b + 1]


async def test_a_round_ends_when_its_time_is_spent_and_the_rest_waits_in_order(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Costly answers end a round after its time (the rest of the loop runs), and the
    connections left are answered next round in the order they were queued."""
    clock = FakeClock()
    monkeypatch.setattr(poller_module, "_now", clock)
    poller: Poller[int] = Poller()
    flow = Flow()
    made = [socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(6)]
    order: list[int] = []
    ticks: list[int] = []
    done = trio.Event()

    def answer(i: int) -> bool:
        made[i][0].recv(64)
        order.append(i)
        clock.now += COSTLY
        if len(order) == len(made):
            done.set()
        return True

    async def tick() -> None:
        while True:
            ticks.append(len(order))
            await trio.lowlevel.checkpoint()

    try:
        for i, (ours, theirs) in enumerate(made):
            ours.setblocking(False)
            theirs.send(b"x")
            poller.park(ours.fileno(), i, flow)
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(tick)
                nursery.start_soon(poller.run, answer)
                await done.wait()
                nursery.cancel_scope.cancel()
    finally:
        poller.close()
        for ours, theirs in made:
            ours.close()
            theirs.close()
    assert order == list(range(len(made)))
    # One costly answer a round: the other task ran while they went on (trio
    # runs the tasks of a turn in either order, so it may see two at a time).
    between = {n for n in ticks if 0 < n < len(made)}
    assert len(between) >= (len(made) - 1) // 2, ticks


def test_a_new_connection_is_answered_at_once_unless_its_uid_is_ahead(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A new connection's first datagrams are answered at once (its hello and index
    request cost no round), unless its uid has had more of the loop than the
    poller's clock allows: then it is parked and answered in turn. Before, every new
    connection of a uid was answered at once, so a uid that opened many connections
    had each one's first datagrams answered ahead of everyone."""
    clock = FakeClock()
    monkeypatch.setattr(poller_module, "_now", clock)
    poller: Poller[str] = Poller()
    a, b = Flow(), Flow()
    answered: list[str] = []

    def answer(name: str) -> bool:
        answered.append(name)
        clock.now += COSTLY if name.startswith("a") else CHEAP
        return True

    try:
        assert poller.answer_first(answer, "a1", a) is True
        # A is ahead now: its next connections wait for their turn ...
        assert poller.answer_first(answer, "a2", a) is None
        assert poller.answer_first(answer, "a3", a) is None
        # ... while B's hello and index request are answered at once.
        assert poller.answer_first(answer, "b-hello", b) is True
        assert poller.answer_first(answer, "b-index", b) is True
    finally:
        poller.close()
    assert answered == ["a1", "b-hello", "b-index"]


async def test_a_uid_alone_is_not_held_back_once_the_poller_is_idle(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """With nobody waiting, the poller's clock catches up: a uid that went ahead
    alone has its next new connection answered at once again."""
    clock = FakeClock()
    monkeypatch.setattr(poller_module, "_now", clock)
    poller: Poller[str] = Poller()
    a = Flow()

    def answer(name: str) -> bool:
        clock.now += COSTLY
        return True

    try:
        assert poller.answer_first(answer, "a1", a) is True
        assert poller.answer_first(answer, "a2", a) is None
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller.run, answer)
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        assert poller.answer_first(answer, "a2", a) is True
    finally:
        poller.close()


async def test_a_lone_connections_answers_count_in_the_longest_round(
    pairs: list[tuple[socket.socket, socket.socket]], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The only parked connection is answered without epoll_wait and without a
    charge, but what its answers cost still counts in longest_round, the
    acceptor's pace (attack 18): before, it did not, and a lone connection's
    costly datagrams held the backlog to one connection a turn."""
    clock = FakeClock()
    monkeypatch.setattr(poller_module, "_now", clock)
    poller: Poller[int] = Poller()
    ours, theirs = pairs[0]
    done = trio.Event()

    def answer(i: int) -> bool:
        ours.recv(64)
        clock.now += COSTLY
        done.set()
        return True

    poller.park(ours.fileno(), 0)
    try:
        with trio.fail_after(5):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(poller.run, answer)
                theirs.send(b"x")
                await done.wait()
                await trio.testing.wait_all_tasks_blocked()
                nursery.cancel_scope.cancel()
        assert poller.longest_round() == pytest.approx(COSTLY)
        assert poller.longest_round() == 0.0  # until the next answer
    finally:
        poller.close()


def test_epoll_fd_is_kept_above_the_hit_path_numbers() -> None:
    poller: Poller[int] = Poller()
    try:
        assert poller._epoll.fileno() >= LONG_LIVED_BASE
    finally:
        poller.close()


async def _serve_and_greet(
    nursery: trio.Nursery, server: Server, client: trio.socket.SocketType, path: Path
) -> socket.socket:
    """Serve on a new listening socket at *path*, connect *client*, say hello.

    Returns the listening socket, for the caller to close once serving ended.
    """
    lsock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    lsock.bind(str(path))
    lsock.listen()
    await nursery.start(server.serve, lsock)
    await client.connect(str(path))
    await client.send(msgpack.packb({"op": "hello", "id": 0, "version": 1}))
    assert msgpack.unpackb(await client.recv(4096))["ok"]
    return lsock


async def _handed_over_around_a_stop(tmp_path: Path, *, stop: str) -> list[Any]:
    """The poller's round reads a publish (handed to the connection's task), around a stop.

    *stop* is "after" (shutdown once the job is handed over), "shutdown" (a
    round that was due as shutdown() ran) or "cancel" (the server's scope
    cancelled without a shutdown, then the round). Returns the replies the
    client got before the connection closed (their fds closed), and checks
    that no fd leaked.
    """
    _proc_fd_dir()  # opened once per process, on first use: not ours to count
    before = count_open_fds()
    server = Server(ServerConfig(socket_path=""))
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    raw.setblocking(False)
    client = trio.socket.from_stdlib_socket(raw)
    replies: list[Any] = []
    with trio.fail_after(10):
        async with trio.open_nursery() as nursery:
            lsock = await _serve_and_greet(nursery, server, client, tmp_path / "s.sock")
            memfd = os.memfd_create("published", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
            os.write(memfd, b"private bytes")
            key = {"ino": 1, "size": 13, "mtime_ns": 1, "ctime_ns": 1}
            publish = {"op": "publish", "id": 1, "namespace": "ns", "key": key}
            # Sent without a checkpoint: the poller task cannot take it first.
            raw.sendmsg([msgpack.packb(publish)], scm_rights([memfd]))
            os.close(memfd)
            (conn,) = server._connections
            if stop == "shutdown":
                server.shutdown()
            elif stop == "cancel":
                nursery.cancel_scope.cancel()
            # What the poller does in a round, synchronously.
            answered = server._answer_ready(conn)
            if stop == "shutdown":
                assert answered is True and conn.job is None  # nothing read
            else:
                assert answered is False and isinstance(conn.job, Received)
            if stop == "after":
                server.shutdown()
        try:
            while True:
                data, anc, _, _ = await client.recvmsg(4096, socket.CMSG_SPACE(4))
                close_all(fds_from_ancdata(anc))
                if not data:
                    break
                replies.append(msgpack.unpackb(data))
        except ConnectionResetError:  # closed with our request unread
            pass
    client.close()
    lsock.close()
    server.cache.clear()
    assert count_open_fds() == before
    return replies


async def test_request_handed_over_before_shutdown_is_answered(tmp_path: Path) -> None:
    (reply,) = await _handed_over_around_a_stop(tmp_path, stop="after")
    assert reply["id"] == 1 and reply["ok"], reply


async def test_no_request_is_read_once_shutdown_began(tmp_path: Path) -> None:
    assert await _handed_over_around_a_stop(tmp_path, stop="shutdown") == []


async def test_request_handed_over_to_a_cancelled_task_is_dropped_leaking_nothing(
    tmp_path: Path,
) -> None:
    """The task was cancelled before the poller's round: the fd is closed, nothing sent."""
    assert await _handed_over_around_a_stop(tmp_path, stop="cancel") == []


async def test_a_bug_on_one_batch_item_fails_that_item_only(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    files = [tmp_path / f"lib{i}.so" for i in range(3)]
    for f in files:
        f.write_bytes(os.urandom(2000))
    _proc_fd_dir()
    before = count_open_fds()
    server = Server(ServerConfig(socket_path=""))
    serve_now = HostOpens.serve_now
    calls = 0

    def buggy(*args: object, **kwargs: object) -> object:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise RuntimeError("a bug of ours")
        return serve_now(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(HostOpens, "serve_now", buggy)
    client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    srcs = [os.open(f, os.O_RDONLY | os.O_CLOEXEC) for f in files]
    lsock = None
    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                lsock = await _serve_and_greet(nursery, server, client, tmp_path / "s.sock")
                batch = msgpack.packb({"op": "open_batch", "id": 1})
                await client.sendmsg([batch], scm_rights(srcs))
                data, anc, _, _ = await client.recvmsg(4096, socket.CMSG_SPACE(16))
                served = fds_from_ancdata(anc)
                reply = msgpack.unpackb(data)
                close_all(served)
                items = reply["results"]
                assert [item["ok"] for item in items] == [True, False, True], reply
                assert items[1]["code"] == "internal" and len(served) == 2
                assert server.refusals.internal_errors == 1
                assert server.refusals.refused_by_code == {"internal": 1}
                # The connection goes on.
                await client.sendmsg([msgpack.packb({"op": "open", "id": 2})], scm_rights(srcs[:1]))
                data, anc, _, _ = await client.recvmsg(4096, socket.CMSG_SPACE(4))
                close_all(fds_from_ancdata(anc))
                assert msgpack.unpackb(data)["ok"]
                server.shutdown()
    finally:
        close_all(srcs)
        client.close()
        if lsock is not None:
            lsock.close()
    assert count_open_fds() == before


async def test_replies_waiting_for_room_are_still_sent_after_shutdown(tmp_path: Path) -> None:
    """A client stops reading; its replies wait; shutdown comes; it reads: nothing is lost."""
    f = tmp_path / "lib.so"
    f.write_bytes(os.urandom(3000))
    _proc_fd_dir()
    before = count_open_fds()
    server = Server(ServerConfig(socket_path="", cache=CacheLimits(racy_window_ns=0)))
    raw = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    client = trio.socket.from_stdlib_socket(raw)
    src = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    got: set[int] = set()
    sent = 0
    try:
        with trio.fail_after(20):
            async with trio.open_nursery() as nursery:
                lsock = await _serve_and_greet(nursery, server, client, tmp_path / "s.sock")
                # Until the daemon stops reading us (max_inflight replies wait).
                idle = 0
                while idle < 10:
                    try:
                        raw.sendmsg([msgpack.packb({"op": "open", "id": sent})], scm_rights([src]))
                        sent += 1
                        idle = 0
                    except BlockingIOError:
                        idle += 1
                        await trio.sleep(0.01)
                assert sent > server.config.max_inflight
                server.shutdown()
                # Read what comes: every request the daemon read gets its reply.
                while True:
                    data, anc, _, _ = await client.recvmsg(4096, socket.CMSG_SPACE(4))
                    close_all(fds_from_ancdata(anc))
                    if not data:
                        break
                    reply = msgpack.unpackb(data)
                    assert reply["ok"], reply
                    got.add(reply["id"])
    finally:
        os.close(src)
        client.close()
    lsock.close()
    # Every request the daemon read was answered (the rest were never read:
    # the daemon stopped reading at shutdown).
    read = server.cache.hits + server.cache.misses
    assert got == set(range(read)) and read > server.config.max_inflight, (sent, read)
    server.cache.clear()
    assert count_open_fds() == before


def test_internal_errors_are_all_counted_but_logged_at_most_20_a_minute(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Input that trips a bug (say, in every item of a batch) must not flood the log."""
    refusals = Refusals()
    peer = Peer(pid=1, uid=2, gid=3)
    with caplog.at_level(logging.ERROR, logger="shadowd.refusals"):
        for i in range(50):
            refusals.internal(peer, i, RuntimeError("a bug of ours"))
    assert refusals.internal_errors == 50
    logged = [r for r in caplog.records if "internal error" in r.getMessage()]
    assert len(logged) == 20


def test_a_server_that_never_serves_holds_no_fd() -> None:
    before = count_open_fds()
    server = Server(ServerConfig(socket_path=""))
    assert count_open_fds() == before
    assert server.stats().clients == 0


@pytest.mark.parametrize("impl", ["default", "python"])
async def test_a_hit_whose_reopen_fails_is_refused_and_the_connection_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, impl: str
) -> None:
    if impl == "python":
        monkeypatch.setattr(dispatch_module, "_send_reopened", hotcalls.py_send_reopened)
    f = tmp_path / "lib.so"
    f.write_bytes(os.urandom(3000))
    _proc_fd_dir()
    before = count_open_fds()
    server = Server(ServerConfig(socket_path="", cache=CacheLimits(racy_window_ns=0)))
    client = trio.socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    src = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    lsock = None

    async def open_once(id: int) -> dict[str, Any]:
        await client.sendmsg([msgpack.packb({"op": "open", "id": id})], scm_rights([src]))
        data, anc, _, _ = await client.recvmsg(4096, socket.CMSG_SPACE(4))
        fds = fds_from_ancdata(anc)
        reply: dict[str, Any] = msgpack.unpackb(data)
        assert len(fds) == (1 if reply["ok"] else 0)
        if fds:
            assert os.read(fds[0], 5000) == f.read_bytes()
        close_all(fds)
        return reply

    try:
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                lsock = await _serve_and_greet(nursery, server, client, tmp_path / "s.sock")
                assert (await open_once(1))["hit"] is False
                (entry,) = server.cache._entries.values()
                proc_dir, entry.file.dir_fd = entry.file.dir_fd, -1  # openat(-1, "N"): EBADF
                reply = await open_once(2)
                assert reply["ok"] is False
                assert "cannot open a served descriptor" in reply["message"]
                entry.file.dir_fd = proc_dir
                assert (await open_once(3))["hit"] is True
                server.shutdown()
    finally:
        os.close(src)
        client.close()
        if lsock is not None:
            lsock.close()
    assert count_open_fds() == before


def test_refusals_log_as_warnings_and_what_was_kept_out_is_said_at_exit(
    caplog: pytest.LogCaptureFixture,
) -> None:
    """journalctl -p warning shows refusals; the lines the budget dropped are counted."""
    refusals = Refusals()
    peer = Peer(pid=1, uid=2, gid=3)
    with caplog.at_level(logging.WARNING, logger="shadowd.refusals"):
        for _ in range(25):
            refusals.count(peer, "not-regular", "only regular files are served")
        refusals.flush_log()
    logged = [r for r in caplog.records if "refused pid 1" in r.getMessage()]
    assert len(logged) == 20 and all(r.levelno == logging.WARNING for r in logged)
    assert refusals.refused == 25
    assert "5 refusal and 0 internal error lines were not logged" in caplog.text
