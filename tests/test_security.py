# Hostile and buggy clients against the daemon as a real subprocess: who may
# connect, what may be passed, and every bound (its flag, its default, its
# counter). Each test would fail if the defence it names broke.
from __future__ import annotations

import array
import contextlib
import fcntl
import grp
import os
import signal
import socket
import stat
import termios
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import trio
from shadowd_client import AsyncClient, Busy, Client, NotRegularFile, Opener

from shadowd.peer_limits import PeerLimits
from shadowd.protocol import WireLimits

from .conftest import NOBODY, Daemon, in_thread, make_file, read_fd, requires_root, run_as, settle
from .wire import Raw

GROUP = 4242

TRY_CONNECT = """
import trio
from shadowd_client import AsyncClient, Client, Opener, ShadowdError
res = {{}}
with Opener({path!r}, timeout=5, local_below=0) as opener:  # it copies itself when refused
    fd = opener.open("/bin/sh")
    res["opener"] = [opener.daemon_opens, opener.local_opens]
try:
    with Client({path!r}, timeout=5) as c:
        res["sync"] = c.stats()["server"][:7]
except ShadowdError as e:
    res["sync"] = [type(e).__name__, str(e)]
async def aio():
    try:
        async with AsyncClient({path!r}, timeout=5) as c:
            return (await c.stats())["server"][:7]
    except ShadowdError as e:
        return [type(e).__name__, str(e)]
res["async"] = trio.run(aio)
out(res)
"""


def try_connect(d: Daemon, uid: int, **kwargs: Any) -> dict[str, Any]:
    return run_as(uid, TRY_CONNECT.format(path=str(d.socket_path)), **kwargs)  # type: ignore[no-any-return]


def stats(d: Daemon) -> dict[str, Any]:
    with Client(d.socket_path, timeout=10) as c:
        return c.stats()


async def call(fn: Any, *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), abandon_on_cancel=True)


# -- who may connect -----------------------------------------------------------


@requires_root
async def test_by_default_another_user_cannot_connect(daemon: Daemon) -> None:
    assert stat.S_IMODE(daemon.socket_path.stat().st_mode) == 0o600
    with trio.fail_after(30):
        res = await call(try_connect, daemon, NOBODY)
    for side in ("sync", "async"):
        name, message = res[side]
        assert name == "DaemonUnavailable" and "Permission denied" in message
        # Who the socket lets in (a bare "Permission denied" before).
        assert "the socket is root:root, mode 0600: only root may connect" in message


@requires_root
async def test_allow_uid_turns_other_users_away_with_not_permitted(start_daemon: Any) -> None:
    d = await start_daemon("--socket-mode", "0666", "--allow-uid", "0")
    with trio.fail_after(30):
        res = await call(try_connect, d, NOBODY)
        for side in ("sync", "async"):
            name, message = res[side]
            assert name == "NotPermitted" and f"uid {NOBODY}" in message
        assert res["opener"] == [0, 1]
        # On the wire: an error reply with the stable code, then the close.
        code = f"""
        import socket, msgpack
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.connect({str(d.socket_path)!r})
        first = msgpack.unpackb(s.recv(4096))
        out([first, s.recv(4096).decode()])
        """
        first, after = await call(run_as, NOBODY, code)
        assert first["id"] is None and first["ok"] is False
        assert first["code"] == "not-permitted" and after == ""
        s = await call(stats, d)  # root is allowed
    assert s["peers_refused"] == 4 and s["refused_by_code"]["not-permitted"] == 4


#: A uid and gid past 2**31 (uid_t is unsigned: container uid ranges reach there).
BIG_ID = 3_000_000_000


@requires_root
@pytest.mark.parametrize("hit_path", ["c", "python"])
async def test_allow_lists_admit_ids_past_2_to_the_31_as_themselves(
    start_daemon: Any, hit_path: str
) -> None:
    """SO_PEERCRED's uid and gid were read as signed ints (the C accept_peer and its
    Python twin alike): uid 3,000,000,000, listed in --allow-uid, was refused as
    "uid -1294967296", and so was a member of such a gid."""
    env = None if hit_path == "c" else dict(os.environ, SHADOWD_NO_C="1")
    d = await start_daemon(
        "--socket-mode", "0666", "--allow-uid", str(BIG_ID), "--allow-gid", str(BIG_ID + 7), env=env
    )
    with trio.fail_after(60):
        assert (await call(try_connect, d, BIG_ID))["sync"] == "shadowd"
        assert (await call(try_connect, d, BIG_ID + 1, gid=BIG_ID + 7))["sync"] == "shadowd"
        name, message = (await call(try_connect, d, BIG_ID + 1))["sync"]
        assert name == "NotPermitted" and f"uid {BIG_ID + 1} " in message, message


@requires_root
async def test_allow_gid_admits_primary_and_supplementary_members(start_daemon: Any) -> None:
    d = await start_daemon("--socket-mode", "0666", "--allow-gid", str(GROUP))
    with trio.fail_after(60):
        assert (await call(try_connect, d, 1000, gid=GROUP))["sync"] == "shadowd"
        assert (await call(try_connect, d, 1000, groups=(GROUP,)))["sync"] == "shadowd"
        assert (await call(try_connect, d, 1000))["sync"][0] == "NotPermitted"


@requires_root
async def test_socket_group_and_mode(start_daemon: Any) -> None:
    d = await start_daemon("--socket-mode", "0660", "--socket-group", str(GROUP))
    st = d.socket_path.stat()
    assert (stat.S_IMODE(st.st_mode), st.st_gid) == (0o660, GROUP)
    with trio.fail_after(60):
        assert (await call(try_connect, d, 1000, gid=GROUP))["sync"] == "shadowd"
        name, message = (await call(try_connect, d, 1000))["sync"]
        assert name == "DaemonUnavailable" and "Permission denied" in message
        try:
            group = grp.getgrgid(GROUP).gr_name
        except KeyError:
            group = str(GROUP)
        assert f"mode 0660: only root and the members of group {group} may connect" in message


# -- what may be passed --------------------------------------------------------


@in_thread()
def test_fifo_directory_socket_and_dev_zero_refused_within_a_second_each(
    daemon: Daemon, tmp_path: Path
) -> None:
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    ok = make_file(tmp_path / "ok", b"still serving")
    try:
        with Client(daemon.socket_path, timeout=5) as c:
            for what in (fifo, tmp_path, "/dev/zero", listener):
                started = time.monotonic()
                with pytest.raises(NotRegularFile):
                    if isinstance(what, socket.socket):
                        c.open_fd(what.fileno())  # a socket cannot be open()ed
                    else:
                        c.open(what)  # a FIFO with no writer: the client must not hang
                assert time.monotonic() - started < 1, what
                fd = c.open(ok)  # and the daemon keeps serving
                assert read_fd(fd) == b"still serving"
                os.close(fd)
        # The supervisor helper does not hang on a FIFO either.
        with Opener(daemon.socket_path, timeout=5) as opener:
            started = time.monotonic()
            with pytest.raises(NotRegularFile):
                opener.open(fifo)
            assert time.monotonic() - started < 1
    finally:
        listener.close()


# -- bounds: each has a flag, a default, a counter, and a test ---------------


@in_thread()
def test_default_limits_are_reported(daemon: Daemon) -> None:
    s = stats(daemon)
    peers, wire = PeerLimits(), WireLimits()
    assert s["limits"] == {
        "max_request": wire.max_request,
        "max_batch": wire.max_batch,
        "max_fds": wire.max_fds,
        "max_clients": peers.max_clients,
        "max_clients_per_uid": peers.max_clients_per_uid,
        "max_inflight": 32,
        "max_copies_per_uid": peers.max_copies_per_uid,
        "max_fds_per_uid": peers.max_fds_per_uid,
        "max_pinned_bytes_per_uid": peers.max_pinned_bytes_per_uid,
    }
    assert s["limit_hits"] == {}


async def test_max_request(start_daemon: Any) -> None:
    d = await start_daemon("--max-request", "1024")

    def work() -> None:
        with Raw(d.socket_path) as raw:
            reply, _ = raw.call({"op": "stats", "id": 1, "pad": "x" * 900})
            assert reply["ok"]
            reply, _ = raw.call({"op": "stats", "id": 2, "pad": "x" * 2000})
            assert reply["code"] == "request-too-large"
            with pytest.raises(EOFError):
                raw.recv()  # and the connection is closed
        s = stats(d)
        assert s["limit_hits"]["max_request"] == 1 and s["limits"]["max_request"] == 1024

    with trio.fail_after(30):
        await call(work)


async def test_max_fds_extras_closed_and_counted(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon("--max-batch", "4")
    f = make_file(tmp_path / "f", b"x")

    def work() -> None:
        with Client(d.socket_path) as c:
            os.close(c.open(f))  # warm up the daemon's own fds
        baseline = d.quiet_fds()
        fds = [os.open(f, os.O_RDONLY) for _ in range(10)]
        try:
            with Raw(d.socket_path) as raw:
                reply, got = raw.call({"op": "open_batch", "id": 1}, fds)
                assert (reply["code"], got) == ("bad-fds", [])
                reply, got = raw.call({"op": "open_batch", "id": 2}, fds[:4])
                assert reply["ok"] and len(got) == 4
                for fd in got:
                    os.close(fd)
                reply, got = raw.call({"op": "stats", "id": 3}, fds[:3])  # wrong count
                assert (reply["code"], got) == ("bad-fds", [])
        finally:
            for fd in fds:
                os.close(fd)
        s = stats(d)
        assert s["limit_hits"]["max_fds"] == 1
        # All ten (received whole, none left to the kernel to close on the
        # daemon's loop, attack 19), and the wrong count.
        assert s["fds_refused"] == 10 + 3
        deadline = time.monotonic() + 5
        while d.open_fds() != baseline and time.monotonic() < deadline:
            time.sleep(0.05)
        assert d.open_fds() == baseline, d.fd_targets()

    with trio.fail_after(30):
        await call(work)


@contextlib.contextmanager
def connected(d: Daemon, n: int) -> Iterator[list[Client]]:
    """*n* clients connected (hello answered), closed on the way out."""
    held = [Client(d.socket_path, timeout=5) for _ in range(n)]
    try:
        for c in held:
            # The fixture's probes (connect, close) may not have been seen
            # to go yet: at the limit, they no longer count.
            c.connect()
        yield held
    finally:
        for c in held:
            c.close()


async def test_max_clients(start_daemon: Any) -> None:
    d = await start_daemon("--max-clients", "3")

    def work() -> None:
        with connected(d, 3) as held:
            with pytest.raises(Busy, match="3 clients"), Client(d.socket_path) as extra:
                extra.stats()
            held.pop().close()  # its place is free at once, seen or not
            with Client(d.socket_path, timeout=5) as again:
                s = again.stats()
        assert s["limit_hits"]["max_clients"] == 1 and s["refused_by_code"]["busy"] == 1

    with trio.fail_after(30):
        await call(work)


@requires_root
async def test_max_clients_per_uid(start_daemon: Any) -> None:
    d = await start_daemon("--max-clients-per-uid", "2", "--socket-mode", "0666")

    def work() -> None:
        with connected(d, 2) as held:
            with pytest.raises(Busy, match="uid 0 has 2"), Client(d.socket_path) as extra:
                extra.stats()
            # Another uid has its own share (its three clients one after the
            # other: each leaves its place to the next).
            assert try_connect(d, NOBODY)["sync"] == "shadowd"
            assert held[0].stats()["limit_hits"]["max_clients_per_uid"] == 1

    with trio.fail_after(30):
        await call(work)


#: Peers that connect and hang up while the daemon is stopped (in one test).
GONE_IN_BURST = 20
HELLO = {"op": "hello", "id": 0, "version": 1}
#: Each connection limit at 2, and the refusal that names it.
AT_TWO = {
    "max_clients_per_uid": (
        ("--max-clients-per-uid", "2"),
        f"uid {os.geteuid()} has 2 connections",
    ),
    "max_clients": (("--max-clients", "2"), "the daemon serves 2 clients already"),
}


@pytest.mark.parametrize("limit", sorted(AT_TWO))
async def test_peers_gone_before_they_were_served_do_not_count_against_a_live_one(
    start_daemon: Any, limit: str
) -> None:
    """Peers that came and went in a burst the daemon had not served yet (stopped
    here; on a busy host, while it accepts a backlog) hold no place at its limits:
    a live client behind them is served, and the counts stay exact."""
    args, refusal = AT_TWO[limit]
    d = await start_daemon(*args)
    path = str(d.socket_path)

    def work() -> None:
        os.kill(d.pid, signal.SIGSTOP)
        try:
            for _ in range(GONE_IN_BURST):
                gone = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
                gone.connect(path)  # into the backlog: the daemon is stopped
                gone.close()
            live = Raw(path, hello=False)
            live.send(HELLO)
        finally:
            os.kill(d.pid, signal.SIGCONT)
        with live:
            reply, _ = live.recv()
            assert reply["ok"], reply  # not refused for the peers that left
            with Raw(path), Raw(path, hello=False) as third:
                # Two live ones are the limit: the next is refused, by name.
                turned_away, _ = third.recv()
                assert turned_away["code"] == "busy" and refusal in turned_away["message"]
                reply, _ = live.call({"op": "stats", "id": 1})
            s = reply["stats"]
            assert s["clients"] == 2, s  # the two live ones, none of those gone
            assert s["limit_hits"] == {limit: 1} and s["refused_by_code"] == {"busy": 1}, s
        # Everyone left: nothing stays counted (nor went below zero).
        while (s := stats(d))["clients"] != 1:  # this stats connection
            time.sleep(0.02)
        assert s["clients"] == 1 and s["limit_hits"] == {limit: 1}, s

    with trio.fail_after(30):
        await call(work)


def _queued(sock: socket.socket) -> int:
    """Bytes waiting to be read on *sock*."""
    buf = array.array("i", [0])
    fcntl.ioctl(sock.fileno(), termios.FIONREAD, buf, True)
    return buf[0]


async def test_a_peer_that_shut_down_with_a_descriptor_unread_keeps_its_place(
    start_daemon: Any, tmp_path: Path
) -> None:
    """A peer that hung up but still holds a reply's fd unread is not gone: its
    connection stays counted at the limit; once it closes, it no longer is."""
    d = await start_daemon("--max-clients-per-uid", "2")
    path = str(d.socket_path)
    f = make_file(tmp_path / "f", b"served")

    def work() -> None:
        src = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
        try:
            with Raw(path) as holder, Raw(path):
                holder.send({"op": "open", "id": 1}, [src])
                while not _queued(holder.sock):  # its reply, with an fd, arrived
                    time.sleep(0.01)
                holder.sock.shutdown(socket.SHUT_RDWR)  # hung up, the fd still unread
                with Raw(path, hello=False) as third:
                    turned_away, _ = third.recv()
                assert turned_away["code"] == "busy", turned_away
                assert f"uid {os.geteuid()} has 2 connections" in turned_away["message"]
                holder.close()  # the reply and its fd go with the socket
                with Raw(path) as again:  # the place it held is free at once
                    s = again.call({"op": "stats", "id": 1})[0]["stats"]
        finally:
            os.close(src)
        assert s["clients"] == 2 and s["fds_in_flight"] == 0, s
        assert s["limit_hits"] == {"max_clients_per_uid": 1}, s

    with trio.fail_after(30):
        await call(work)


async def _many_misses(d: Daemon, files: list[Path]) -> dict[str, Any]:
    """Open every file at once, pipelined on one connection; check every byte."""
    contents = {f: f.read_bytes() for f in files}
    async with AsyncClient(d.socket_path, timeout=30) as client:

        async def one(f: Path) -> None:
            fd = await client.open(f)
            try:
                assert read_fd(fd) == contents[f]
            finally:
                os.close(fd)

        async with trio.open_nursery() as nursery:
            for f in files:
                nursery.start_soon(one, f)
        return await client.stats()


async def test_max_inflight(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon("--max-inflight", "2", "--copy-workers", "1", "--racy-window", "0")
    files = [make_file(tmp_path / f"f{i}", os.urandom(256 * 1024)) for i in range(12)]
    with trio.fail_after(60):
        s = await _many_misses(d, files)
    assert s["limit_hits"]["max_inflight"] >= 1 and s["copies"] == 12


async def test_max_copies_per_uid(start_daemon: Any, tmp_path: Path) -> None:
    d = await start_daemon("--max-copies-per-uid", "1", "--racy-window", "0.05")
    files = [make_file(tmp_path / f"f{i}", os.urandom(64 * 1024)) for i in range(12)]
    settle(*files)
    with trio.fail_after(60):
        s = await _many_misses(d, files)
    assert s["limit_hits"]["max_copies_per_uid"] >= 1
    assert (s["copies"], s["misses"], s["hits"]) == (12, 12, 0)


def test_limit_flags_reject_nonsense() -> None:
    from shadowd.cli import main

    for flag in (
        "--max-clients",
        "--max-clients-per-uid",
        "--max-copies-per-uid",
        "--max-inflight",
        "--max-fds-per-uid",
        "--max-pinned-bytes-per-uid",
    ):
        with pytest.raises(SystemExit) as info:
            main(["serve", flag, "0"])
        assert info.value.code == 2
    # A usage error like the others (one line naming the flag: tests/test_cli.py).
    with pytest.raises(SystemExit) as info:
        main(["serve", "--socket", "/nonexistent/x.sock", "--max-request", "100"])
    assert info.value.code == 2


def test_stats_table_shows_limits_reached_and_refused_peers() -> None:
    from shadowd.report import format_table
    from shadowd.stats import Stats

    from .test_report import sample_stats

    s = sample_stats(
        peers_refused=2,
        private_publishes=3,
        private_sealed_in_place=2,
        private_copied=1,
        limits={"max_clients": 3},
        limit_hits={"max_clients": 1},
    )
    assert Stats.from_wire(s.to_wire()) == s
    table = format_table(s)
    assert "peers refused      2" in table
    assert "max_clients (3) 1" in table
    assert "3 (2 sealed in place, 1 copied, 0 races lost)" in table
