# docs/protocol.md cannot drift from protocol.py: every ```wire example in it
# is decoded by the role that would receive it and encoded back to the same
# bytes, and its map is what msgpack reads from those bytes. And what the page
# promises beyond its examples (limits, closes, nil ids, seals, counters,
# the socket going at SIGTERM, the lock file) is what a real daemon does.
from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import signal
import socket
import stat
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from shadowd import protocol as p

from .conftest import NOBODY, Daemon, make_file, requires_root, run_as, settle
from .wire import Raw, key_map, memfd_with, read_all


async def call(fn: Any, *args: Any) -> Any:
    """Blocking socket work off the trio thread, so fail_after still works."""
    return await trio.to_thread.run_sync(fn, *args, abandon_on_cancel=True)


DOC = Path(__file__).resolve().parent.parent / "docs" / "protocol.md"
BLOCK = re.compile(r"```wire\n(.*?)```", re.DOTALL)


def examples() -> list[dict[str, str]]:
    out = []
    for body in BLOCK.findall(DOC.read_text()):
        fields: dict[str, str] = {}
        lines = body.splitlines()
        for i, line in enumerate(lines):
            if line == "bytes:":
                fields["bytes"] = " ".join(lines[i + 1 :])
                break
            key, _, value = line.partition(": ")
            fields[key] = value
        out.append(fields)
    return out


EXAMPLES = examples()
REQUESTS_FOR = {
    "hello": p.Hello(id=0),
    "open": p.Open(id=0, fd=3),
    "open_batch": p.OpenBatch(id=0, fds=(3,)),
    "stats": p.StatsRequest(id=0),
    "lookup": p.Lookup(id=0, namespace="n", key=p.FileKey(ino=1, size=1, mtime_ns=1)),
    "publish": p.Publish(id=0, namespace="n", key=p.FileKey(ino=1, size=1, mtime_ns=1), fd=3),
    "index": p.IndexRequest(id=0),
    "report": p.Report(id=0, hits=()),
}


def test_the_document_has_examples_of_every_op_and_reply() -> None:
    titles = [e["title"] for e in EXAMPLES]
    assert len(titles) >= 9
    directions = {e["direction"] for e in EXAMPLES}
    assert {
        "request",
        "reply to hello",
        "reply to open",
        "reply to open_batch",
        "reply to lookup",
        "reply to publish",
    } <= directions
    ops = {json.loads(e["map"]).get("op") for e in EXAMPLES if e["direction"] == "request"}
    assert ops == {"hello", "open", "open_batch", "stats", "lookup", "publish", "index", "report"}


@pytest.mark.parametrize("ex", EXAMPLES, ids=[e["title"] for e in EXAMPLES])
def test_example(ex: dict[str, str]) -> None:
    data = bytes.fromhex(ex["bytes"])
    assert msgpack.unpackb(data) == json.loads(ex["map"])
    nfds = int(ex["fds"])
    fds = list(range(10, 10 + nfds))
    direction = ex["direction"]
    if direction == "request":
        server = p.ServerConnection()
        if not data.startswith(bytes.fromhex("84 a2 6f 70 a5 68 65 6c 6c 6f")):
            version = int(ex.get("version", "1"))
            server.receive(msgpack.packb({"op": "hello", "id": 99, "version": version}))
        event = server.receive(data, fds)
        again, out_fds = p.encode_request(event)
    else:
        kind = direction.removeprefix("reply to ")
        client = p.ClientConnection()
        if kind != "unknown":
            request = REQUESTS_FOR[kind]
            reply_id = msgpack.unpackb(data)["id"]
            client.send(type(request)(**{**_fields(request), "id": reply_id}))
        event = client.receive(data, fds)
        again, out_fds = p.encode_reply(event)
    assert again == data, "re-encoding the decoded event must give the documented bytes"
    assert out_fds == fds


def _fields(event: object) -> dict[str, object]:
    import attrs

    return attrs.asdict(event, recurse=False)  # type: ignore[arg-type]


# -- What the page promises beyond its examples, each against a real daemon ----

TEXT = " ".join(DOC.read_text().split())  # whitespace folded: phrases span lines


def says(*phrases: str) -> None:
    for phrase in phrases:
        assert phrase in TEXT, f"docs/protocol.md does not say: {phrase}"


def lexists(path: str | Path) -> bool:
    return os.path.lexists(path)


def open_file(path: Path) -> int:
    return os.open(path, os.O_RDONLY | os.O_CLOEXEC)


async def test_labels_are_capped_whatever_max_request_allows(
    daemon: Daemon, tmp_path: Path
) -> None:
    says("at most 4096 bytes of UTF-8, whatever `max_request` allows")
    assert p.MAX_LABEL_BYTES == 4096
    f = make_file(tmp_path / "f", b"x" * 100)
    with trio.fail_after(30), Raw(daemon.socket_path) as r:
        src = open_file(f)
        try:
            ok, fds = await call(r.call, {"op": "open", "id": 1, "path": "/" + "a" * 4095}, [src])
            assert ok["ok"] and len(fds) == 1
            os.close(fds[0])
            long = {"op": "open", "id": 2, "path": "/" + "a" * 4096}
            refused, fds = await call(r.call, long, [src])
        finally:
            os.close(src)
        assert (refused["id"], refused["code"], fds) == (2, "bad-request", [])
        assert (await call(r.call, {"op": "stats", "id": 3}))[0]["ok"]  # still open


async def test_signed_times_and_keys_without_ctime_are_cached(daemon: Daemon) -> None:
    says("a file dated before 1970 has a negative one", "nil or left out")
    keys = [
        key_map(1, 3, mtime_ns=-1_000_000_000, ctime_ns=-5),
        {"ino": 2, "size": 3, "mtime_ns": 1},  # no ctime_ns at all
        key_map(3, 3, ctime_ns=None),
    ]
    with trio.fail_after(30), Raw(daemon.socket_path) as r:
        for i, key in enumerate(keys):
            memfd = memfd_with(b"abc")
            try:
                request = {"op": "publish", "id": 10 + i, "namespace": "ns", "key": key}
                reply, fds = await call(r.call, request, [memfd])
            finally:
                os.close(memfd)
            assert reply["ok"] and not reply["hit"], reply
            os.close(fds[0])
            lookup = {"op": "lookup", "id": 20 + i, "namespace": "ns", "key": key}
            hit, fds = await call(r.call, lookup)
            assert hit["hit"] and read_all(fds[0]) == b"abc", key
            os.close(fds[0])


async def test_served_seals_and_modes(daemon: Daemon, tmp_path: Path) -> None:
    says("mode exactly `0555`", "`0444` otherwise", "`seals & 0x0f == 0x0f`, not equality")
    exec_seal = _kernel_knows_exec_seal()
    with trio.fail_after(30), Raw(daemon.socket_path) as r:
        for mode, want_mode in ((0o755, 0o555), (0o644, 0o444)):
            f = make_file(tmp_path / f"f{mode:o}", b"y" * 100, mode)
            src = open_file(f)
            try:
                _, fds = await call(r.call, {"op": "open", "id": mode}, [src])
            finally:
                os.close(src)
            try:
                seals = fcntl.fcntl(fds[0], fcntl.F_GET_SEALS)
                assert seals & 0x0F == 0x0F
                assert bool(seals & 0x20) == exec_seal  # F_SEAL_EXEC, Linux 6.3+
                assert seals & ~0x3F == 0
                assert stat.S_IMODE(os.fstat(fds[0]).st_mode) == want_mode
            finally:
                os.close(fds[0])


def _kernel_knows_exec_seal() -> bool:
    try:
        fd = os.memfd_create("probe", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING | 0x0010)  # MFD_EXEC
    except OSError:
        return False
    os.close(fd)
    return True


UNREADABLE = {
    "too large": msgpack.packb({"op": "stats", "id": 1, "pad": "x" * 70_000}),
    "not msgpack": b"\xc1",
    "a key that is not a string": msgpack.packb({1: 2, "op": "stats", "id": 1}),
    "invalid UTF-8": b"\x82\xa2op\xa5st\xffts\xa2id\x01",
    "not a map": msgpack.packb([1, 2]),
    "no id": msgpack.packb({"op": "stats"}),
}


@pytest.mark.parametrize("what", list(UNREADABLE))
async def test_datagrams_that_are_no_request_get_a_nil_id_and_the_end(
    daemon: Daemon, what: str
) -> None:
    says("a reply whose `id` is nil, then closes the connection")
    with trio.fail_after(30), Raw(daemon.socket_path) as r:
        r.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 1 << 18)
        r.send(UNREADABLE[what])
        reply, _ = await call(r.recv)
        assert reply["id"] is None and not reply["ok"]
        assert reply["code"] == ("request-too-large" if what == "too large" else "bad-request")
        with pytest.raises(EOFError):
            await call(r.recv)


async def test_a_zero_length_datagram_ends_the_connection(daemon: Daemon) -> None:
    says("A zero-length datagram closes the connection without a reply")
    with trio.fail_after(30), Raw(daemon.socket_path) as r:
        r.sock.send(b"")
        with pytest.raises(EOFError):
            await call(r.recv)


async def test_a_malformed_hello_leaves_the_connection_waiting(daemon: Daemon) -> None:
    says("the connection stays open, waiting for a correct `hello`")
    with trio.fail_after(30), Raw(daemon.socket_path, hello=False) as r:
        bad, _ = await call(r.call, {"op": "hello", "id": 0, "version": "1"})
        assert (bad["id"], bad["code"]) == (0, "bad-request")
        good, _ = await call(r.call, {"op": "hello", "id": 1, "version": 1})
        assert good["ok"]
        again, _ = await call(r.call, {"op": "hello", "id": 2, "version": 1})
        assert again["code"] == "bad-request"


async def test_not_readable_comes_before_not_regular(daemon: Daemon) -> None:
    says("an `O_PATH` descriptor of a directory is `not-readable`, not `not-regular`")
    directory = os.open("/tmp", os.O_PATH | os.O_CLOEXEC)
    r_end, w_end = os.pipe()
    try:
        with trio.fail_after(30), Raw(daemon.socket_path) as r:
            for i, fd in enumerate((directory, w_end)):
                reply, _ = await call(r.call, {"op": "open", "id": i}, [fd])
                assert reply["code"] == "not-readable", reply
            reply, _ = await call(r.call, {"op": "open", "id": 9}, [r_end])
            assert reply["code"] == "not-regular"  # readable, but a FIFO
    finally:
        for fd in (directory, r_end, w_end):
            os.close(fd)


async def test_a_wrong_size_publish_onto_an_entry_gets_the_cached_copy(daemon: Daemon) -> None:
    says("a `publish` of the wrong size onto an entry that exists gets the cached copy")
    key = key_map(5, 3)
    with trio.fail_after(30), Raw(daemon.socket_path) as r:
        for i, data in enumerate((b"abc", b"wrong size")):
            memfd = memfd_with(data)
            try:
                request = {"op": "publish", "id": i, "namespace": "ns", "key": key}
                reply, fds = await call(r.call, request, [memfd])
            finally:
                os.close(memfd)
            assert (reply["ok"], reply["hit"], read_all(fds[0])) == (True, i == 1, b"abc")
            os.close(fds[0])


async def test_duplicate_ids_in_flight_are_both_answered(daemon: Daemon, tmp_path: Path) -> None:
    says("answers two requests with one id twice, each with that id")
    f = make_file(tmp_path / "f", b"z" * 1000)
    settle(f)
    with trio.fail_after(30), Raw(daemon.socket_path) as r:
        src = open_file(f)
        try:
            r.send({"op": "open", "id": 7}, [src])
            r.send({"op": "open", "id": 7}, [src])
            replies = [await call(r.recv), await call(r.recv)]
        finally:
            os.close(src)
    for reply, fds in replies:
        assert reply["id"] == 7 and reply["ok"] and read_all(fds[0]) == b"z" * 1000
        os.close(fds[0])


async def admitted(d: Daemon) -> Raw:
    """A connection that got in, at once: the start probe's connection, closed before
    the daemon was found ready, no longer counts at --max-clients (a peer that hung up
    and whose connection can only end gives its seat back: shadowd/access.py,
    Gate._make_room), seen or not."""
    r: Raw = await call(Raw, d.socket_path)  # hello answered, or it raises
    return r


async def test_what_fds_refused_and_limit_hits_count(start_daemon: Any, tmp_path: Path) -> None:
    says("`fds_refused` counts descriptors", "is not counted", "`limit_hits` instead")
    d = await start_daemon("--max-clients", "1")
    f = make_file(tmp_path / "f", b"x")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    with trio.fail_after(30), await admitted(d) as r:
        src = open_file(f)
        pipe = os.open(fifo, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            two, _ = await call(r.call, {"op": "open", "id": 1}, [src, src])
            assert two["code"] == "bad-fds"
            regular, _ = await call(r.call, {"op": "open", "id": 2}, [pipe])
            assert regular["code"] == "not-regular"
        finally:
            os.close(src)
            os.close(pipe)
        # A second connection is over --max-clients: busy, counted as a limit.
        with Raw(d.socket_path, hello=False) as turned_away:
            busy, _ = await call(turned_away.recv)
        assert (busy["id"], busy["code"]) == (None, "busy")
        stats = (await call(r.call, {"op": "stats", "id": 3}))[0]["stats"]
    assert stats["fds_refused"] == 2  # the two of bad-fds; the FIFO was looked at
    assert stats["limit_hits"].get("max_clients", 0) >= 1
    assert stats["peers_refused"] == 0  # that counts --allow-uid/--allow-gid only


@requires_root
async def test_peers_refused_counts_allow_lists(start_daemon: Any) -> None:
    says("`peers_refused` counts connections turned away at accept because")
    d = await start_daemon("--socket-mode", "0666", "--allow-uid", "0")
    code = f"""
    from shadowd_client import Client, NotPermitted
    try:
        Client({str(d.socket_path)!r}, timeout=5).stats()
        out("admitted")
    except NotPermitted:
        out("refused")
    """
    with trio.fail_after(30):
        assert await call(run_as, NOBODY, code) == "refused"
        with Raw(d.socket_path) as r:
            stats = (await call(r.call, {"op": "stats", "id": 1}))[0]["stats"]
    assert stats["peers_refused"] == 1


async def test_sigterm_removes_the_socket_at_once(daemon: Daemon, tmp_path: Path) -> None:
    """The socket goes at SIGTERM, while a reply still waits to be sent (the drain)."""
    says("removes its socket file at once")
    f = make_file(tmp_path / "f", b"w" * 5000)
    settle(f)
    src = open_file(f)
    flood = Raw(daemon.socket_path)
    try:
        with trio.fail_after(60):
            flood.sock.setblocking(False)
            sent, idle = 0, 0
            while idle < 20:  # until the daemon holds a reply our full buffer cannot take
                try:
                    flood.send({"op": "open", "id": sent + 1}, [src])
                    sent += 1
                    idle = 0
                except BlockingIOError:
                    idle += 1
                    await trio.sleep(0.02)
            assert daemon.proc is not None
            daemon.proc.send_signal(signal.SIGTERM)
            while lexists(daemon.socket_path):
                await trio.sleep(0.01)
            assert daemon.proc.poll() is None  # still draining: the socket went first
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
            with pytest.raises(FileNotFoundError):
                probe.connect(str(daemon.socket_path))
            probe.close()
            flood.sock.setblocking(True)
            flood.sock.settimeout(10)
            answered = 0
            with contextlib.suppress(EOFError):
                while True:
                    _, fds = await call(flood.recv)
                    for fd in fds:
                        os.close(fd)
                    answered += 1
            assert answered > 0
            while daemon.proc.poll() is None:
                await trio.sleep(0.02)
            assert daemon.proc.returncode == 0
    finally:
        os.close(src)
        flood.close()


async def test_the_lock_file_beside_the_socket(daemon: Daemon) -> None:
    says("`PATH.lock`", "The file stays when the daemon exits")
    lock = f"{daemon.socket_path}.lock"
    fd = os.open(lock, os.O_RDWR | os.O_CLOEXEC)
    try:
        assert os.pread(fd, 64, 0).decode().strip() == str(daemon.pid)
        with pytest.raises(BlockingIOError):
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # held while it runs
        with trio.fail_after(30):
            assert await daemon.terminate() == 0
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # free once it exits
    finally:
        os.close(fd)
    assert lexists(lock)
