# protocol.py without sockets: every rule of the wire format, synchronously.
from __future__ import annotations

import msgpack
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from shadowd import protocol as p


def pack(obj: object) -> bytes:
    return msgpack.packb(obj, use_bin_type=True)


def ready_server(limits: p.WireLimits | None = None) -> p.ServerConnection:
    conn = p.ServerConnection(limits)
    conn.receive(pack({"op": "hello", "id": 0, "version": 1}))
    assert conn.state is p.ConnectionState.READY
    return conn


def test_hello_then_open() -> None:
    conn = p.ServerConnection()
    assert conn.state is p.ConnectionState.AWAIT_HELLO
    ev = conn.receive(pack({"op": "hello", "id": 0, "version": 1, "client": "t"}))
    assert ev == p.Hello(id=0, version=1, client="t")
    ev = conn.receive(pack({"op": "open", "id": 1, "path": "/lib/libc.so.6"}), [7])
    assert ev == p.Open(id=1, fd=7, label="/lib/libc.so.6")


def test_first_request_must_be_hello() -> None:
    conn = p.ServerConnection()
    with pytest.raises(p.HelloRequired) as info:
        conn.receive(pack({"op": "open", "id": 4}), [9])
    assert info.value.fatal
    assert info.value.id == 4
    assert info.value.fds == (9,)
    assert conn.state is p.ConnectionState.CLOSED
    # A closed connection refuses everything, still handing back the fds.
    with pytest.raises(p.ProtocolError) as info2:
        conn.receive(pack({"op": "hello", "id": 0, "version": 1}), [3])
    assert info2.value.fds == (3,)


def test_unsupported_version_is_fatal() -> None:
    conn = p.ServerConnection()
    with pytest.raises(p.UnsupportedVersion) as info:
        conn.receive(pack({"op": "hello", "id": 0, "version": 99}))
    assert info.value.fatal and info.value.code == "unsupported-version"
    assert "99" in info.value.message


def test_second_hello_refused_but_not_fatal() -> None:
    conn = ready_server()
    with pytest.raises(p.MalformedMessage) as info:
        conn.receive(pack({"op": "hello", "id": 1, "version": 1}))
    assert not info.value.fatal
    assert conn.state is p.ConnectionState.READY


@pytest.mark.parametrize(
    ("msg", "fds", "exc", "fatal"),
    [
        ({"op": "open", "id": 1}, [], p.BadFds, False),
        ({"op": "open", "id": 1}, [3, 4], p.BadFds, False),
        ({"op": "stats", "id": 1}, [3], p.BadFds, False),
        ({"op": "open", "id": 1, "path": 5}, [3], p.MalformedMessage, False),
        ({"op": "open", "id": 1, "path": "x" * 5000}, [3], p.MalformedMessage, False),
        ({"op": "frobnicate", "id": 1}, [3], p.UnknownOp, False),
        ({"op": "open"}, [3], p.MalformedMessage, True),
        ({"op": "open", "id": -1}, [3], p.MalformedMessage, True),
        ({"op": "open", "id": True}, [3], p.MalformedMessage, True),
        ({"op": "open", "id": 1.5}, [3], p.MalformedMessage, True),
        ({"id": 1}, [3], p.MalformedMessage, False),
        ({"op": "open_batch", "id": 1}, [], p.BadFds, False),
        ({"op": "open_batch", "id": 1, "paths": ["a"]}, [3, 4], p.MalformedMessage, False),
        ({"op": "open_batch", "id": 1, "paths": "ab"}, [3, 4], p.MalformedMessage, False),
    ],
)
def test_refusals_keep_fds_and_id(msg: dict, fds: list[int], exc: type, fatal: bool) -> None:
    conn = ready_server()
    with pytest.raises(exc) as info:
        conn.receive(pack(msg), fds)
    assert info.value.fds == tuple(fds)
    assert info.value.fatal is fatal
    if not fatal:
        assert info.value.id == msg["id"]
        reply = conn.error_for(info.value)
        assert reply.code == exc.code
        data, out_fds = conn.send(reply)
        assert out_fds == []
        assert msgpack.unpackb(data)["ok"] is False


@pytest.mark.parametrize(
    "data",
    [b"", b"\xc1", b"\x92\x01\x02", pack([1, 2]), pack("open"), pack({"a": 1}) + b"x"],
)
def test_not_a_map_is_fatal(data: bytes) -> None:
    conn = ready_server()
    with pytest.raises(p.MalformedMessage) as info:
        conn.receive(data, [5, 6])
    assert info.value.fatal and info.value.fds == (5, 6)


def test_truncation_flags() -> None:
    conn = ready_server()
    with pytest.raises(p.MessageTooLarge) as info:
        conn.receive(b"\x80", [3], data_truncated=True)
    assert info.value.fatal and info.value.fds == (3,)
    conn = ready_server()
    with pytest.raises(p.BadFds) as info2:
        conn.receive(pack({"op": "open", "id": 2}), [3], fds_truncated=True)
    assert not info2.value.fatal and info2.value.fds == (3,) and info2.value.id == 2


def test_oversized_request() -> None:
    conn = ready_server(p.WireLimits(max_request=600))
    with pytest.raises(p.MessageTooLarge):
        conn.receive(pack({"op": "stats", "id": 1, "pad": "x" * 700}))


def test_batch_limits() -> None:
    conn = ready_server(p.WireLimits(max_batch=2))
    ev = conn.receive(pack({"op": "open_batch", "id": 3, "paths": ["a", None]}), [4, 5])
    assert ev == p.OpenBatch(id=3, fds=(4, 5), labels=("a", None))
    with pytest.raises(p.BadFds):
        conn.receive(pack({"op": "open_batch", "id": 4}), [4, 5, 6])


def test_unknown_keys_ignored() -> None:
    conn = ready_server()
    ev = conn.receive(pack({"op": "stats", "id": 9, "future": [1, 2]}))
    assert ev == p.StatsRequest(id=9)


def test_non_string_keys_are_malformed() -> None:
    conn = ready_server()
    with pytest.raises(p.MalformedMessage) as info:
        conn.receive(pack({"op": "stats", "id": 9, 7: "x"}), [4])
    assert info.value.fatal and info.value.fds == (4,)


def test_client_round_trip() -> None:
    client = p.ClientConnection()
    server = p.ServerConnection()
    hello = p.Hello(id=client.next_id(), client="t")
    data, fds = client.send(hello)
    assert server.receive(data, fds) == hello
    data, fds = server.send(
        p.HelloReply(id=hello.id, version=1, server="shadowd/x", limits={"max_batch": 8})
    )
    reply = client.receive(data, fds)
    assert isinstance(reply, p.HelloReply) and client.server_limits == {"max_batch": 8}

    req = p.OpenBatch(id=client.next_id(), fds=(10, 11, 12), labels=("a", "b", "c"))
    data, fds = client.send(req)
    assert server.receive(data, fds) == req
    answer = p.BatchOpened(
        id=req.id,
        results=(
            p.OpenedItem(fd=20, size=3, hit=True),
            p.Refusal(code="not-regular", message="a FIFO"),
            p.OpenedItem(fd=21, size=0, hit=False),
        ),
    )
    data, fds = server.send(answer)
    assert fds == [20, 21]
    assert client.receive(data, fds) == answer
    assert client.pending == 0


def test_client_refuses_wrong_fd_counts() -> None:
    client = p.ClientConnection()
    client.send(p.Open(id=5, fd=3))
    bad = pack({"id": 5, "ok": True, "size": 1, "hit": False})
    with pytest.raises(p.BadFds) as info:
        client.receive(bad, [])
    assert info.value.fds == ()
    client.send(p.StatsRequest(id=6))
    with pytest.raises(p.BadFds) as info2:
        client.receive(pack({"id": 6, "ok": True, "stats": {}}), [8])
    assert info2.value.fds == (8,)
    with pytest.raises(p.MalformedMessage) as info3:
        client.receive(pack({"id": 77, "ok": True}), [9])
    assert info3.value.fds == (9,)


def test_error_reply_without_id() -> None:
    client = p.ClientConnection()
    reply = client.receive(pack({"id": None, "ok": False, "code": "bad-request", "message": "x"}))
    assert reply == p.ErrorReply(id=None, code="bad-request", message="x")


# -- property tests: anything in gives an event or a ProtocolError -----------

fd_lists = st.lists(st.integers(min_value=3, max_value=1 << 20), max_size=8)
msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20),
    lambda children: (
        st.lists(children, max_size=4)
        | st.dictionaries(st.text(max_size=8) | st.integers(-100, 100), children, max_size=4)
    ),
    max_leaves=12,
)
key_like = st.fixed_dictionaries(
    {},
    optional={
        # Anything msgpack can carry, in and out of each field's range.
        "ino": st.integers(min_value=-(2**63), max_value=2**64 - 1) | msgpack_values,
        "size": st.integers(min_value=-(2**63), max_value=2**64 - 1) | msgpack_values,
        "mtime_ns": st.integers(min_value=-(2**63), max_value=2**64 - 1) | msgpack_values,
        "ctime_ns": st.none() | st.integers(min_value=-(2**63), max_value=2**64 - 1),
    },
)
request_like = st.fixed_dictionaries(
    {},
    optional={
        "op": st.sampled_from(["hello", "open", "open_batch", "stats", "lookup", "publish", "x"])
        | msgpack_values,
        "namespace": st.text(max_size=70) | msgpack_values,
        "key": key_like | msgpack_values,
        "id": st.integers(min_value=-2, max_value=2**64 - 1) | msgpack_values,
        "version": st.integers(min_value=0, max_value=3) | msgpack_values,
        "path": st.text(max_size=10) | msgpack_values,
        "paths": st.lists(st.text(max_size=5) | st.none(), max_size=4) | msgpack_values,
        "client": msgpack_values,
    },
)


def _feed_server(data: bytes, fds: list[int], hello_first: bool, dt: bool, ft: bool) -> None:
    conn = p.ServerConnection(p.WireLimits(max_request=4096, max_batch=4))
    if hello_first:
        conn.receive(pack({"op": "hello", "id": 0, "version": 1}))
    try:
        ev = conn.receive(data, fds, data_truncated=dt, fds_truncated=ft)
    except p.ProtocolError as exc:
        assert sorted(exc.fds) == sorted(fds), "a refused datagram must hand back every fd"
        assert exc.code in set(p.ErrorCode)
        conn.send(conn.error_for(exc))
        return
    got: tuple[int, ...]
    if isinstance(ev, (p.Open, p.Publish)):
        got = (ev.fd,)
    elif isinstance(ev, p.OpenBatch):
        got = ev.fds
    else:
        got = ()
    assert sorted(got) == sorted(fds), "an event must carry exactly the fds that came with it"


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=200), fd_lists, st.booleans(), st.booleans(), st.booleans())
def test_server_any_bytes(data: bytes, fds: list[int], hello: bool, dt: bool, ft: bool) -> None:
    _feed_server(data, fds, hello, dt, ft)


@settings(max_examples=400, deadline=None)
@given(request_like, fd_lists, st.booleans(), st.booleans())
def test_server_request_shaped(msg: dict, fds: list[int], hello: bool, ft: bool) -> None:
    _feed_server(pack(msg), fds, hello, False, ft)


reply_like = st.fixed_dictionaries(
    {},
    optional={
        "id": st.integers(min_value=0, max_value=3) | msgpack_values,
        "ok": st.booleans() | msgpack_values,
        "size": st.integers(min_value=-1, max_value=10) | msgpack_values,
        "hit": st.booleans() | msgpack_values,
        "code": st.text(max_size=5) | msgpack_values,
        "message": st.text(max_size=5) | msgpack_values,
        "stats": msgpack_values,
        "results": st.lists(
            st.fixed_dictionaries(
                {"ok": st.booleans()},
                optional={
                    "size": st.integers(0, 5),
                    "hit": st.booleans(),
                    "code": st.text(max_size=3),
                    "message": st.text(max_size=3),
                },
            )
            | msgpack_values,
            max_size=4,
        )
        | msgpack_values,
        "version": msgpack_values,
        "server": msgpack_values,
        "limits": msgpack_values,
    },
)


KEY = p.FileKey(ino=1, size=2, mtime_ns=3, ctime_ns=None)
REQUESTS = {
    "hello": p.Hello(id=0),
    "open": p.Open(id=0, fd=3),
    "open_batch": p.OpenBatch(id=0, fds=(3, 4)),
    "stats": p.StatsRequest(id=0),
    "lookup": p.Lookup(id=0, namespace="n", key=KEY),
    "publish": p.Publish(id=0, namespace="n", key=KEY, fd=3),
}


@settings(max_examples=400, deadline=None)
@given(reply_like, fd_lists, st.sampled_from(sorted(REQUESTS)))
def test_client_any_reply(msg: dict, fds: list[int], kind: str) -> None:
    client = p.ClientConnection()
    requests = REQUESTS
    client.send(requests[kind])
    try:
        reply = client.receive(pack(msg), fds)
    except p.ProtocolError as exc:
        assert sorted(exc.fds) == sorted(fds)
        return
    if isinstance(reply, p.Opened):
        got: tuple[int, ...] = (reply.fd,)
    elif isinstance(reply, p.BatchOpened):
        got = reply.fds
    else:
        got = ()
    assert sorted(got) == sorted(fds)


# -- private files: the new ops keep the same promises --------------------------

keys = st.builds(
    p.FileKey,
    ino=st.integers(0, p.MAX_ID),
    size=st.integers(0, p.MAX_ID),
    mtime_ns=st.integers(p.MIN_INT64, p.MAX_INT64),
    ctime_ns=st.none() | st.integers(p.MIN_INT64, p.MAX_INT64),
)
namespaces = st.text(min_size=1, max_size=60).filter(
    lambda ns: 0 < len(ns.encode("utf-8", "surrogatepass")) <= p.MAX_NAMESPACE_BYTES
)


@settings(max_examples=300, deadline=None)
@given(st.integers(0, p.MAX_ID), namespaces, keys, st.booleans())
def test_private_requests_round_trip(id: int, ns: str, key: p.FileKey, publish: bool) -> None:
    event: p.Request = (
        p.Publish(id=id, namespace=ns, key=key, fd=7)
        if publish
        else p.Lookup(id=id, namespace=ns, key=key)
    )
    data, fds = p.encode_request(event)
    assert fds == ([7] if publish else [])
    assert ready_server().receive(data, fds) == event


@settings(max_examples=300, deadline=None)
@given(st.integers(0, p.MAX_ID), st.booleans(), st.integers(0, p.MAX_ID))
def test_private_replies_round_trip(id: int, hit: bool, size: int) -> None:
    client = p.ClientConnection()
    client.send(p.Lookup(id=id, namespace="n", key=KEY))
    reply: p.Reply = p.Opened(id=id, fd=9, size=size, hit=True) if hit else p.LookupMiss(id=id)
    data, fds = p.encode_reply(reply)
    assert client.receive(data, fds) == reply and client.pending == 0


@pytest.mark.parametrize(
    ("msg", "fds"),
    [
        ({"op": "lookup", "id": 1, "namespace": "n", "key": {"ino": 1, "size": 1}}, []),
        ({"op": "lookup", "id": 1, "namespace": "", "key": dict(ino=1, size=1, mtime_ns=1)}, []),
        ({"op": "lookup", "id": 1, "namespace": "x" * 256, "key": {}}, []),
        ({"op": "lookup", "id": 1, "namespace": "n", "key": [1, 2, 3]}, []),
        ({"op": "lookup", "id": 1, "namespace": "n", "key": dict(ino=-1, size=1, mtime_ns=1)}, []),
        (
            {"op": "lookup", "id": 1, "namespace": "n", "key": dict(ino=1, size=1, mtime_ns=2**63)},
            [],
        ),
        ({"op": "lookup", "id": 1, "namespace": 5, "key": dict(ino=1, size=1, mtime_ns=1)}, []),
        ({"op": "lookup", "id": 1, "namespace": "n", "key": dict(ino=1, size=1, mtime_ns=1)}, [4]),
        ({"op": "publish", "id": 1, "namespace": "n", "key": dict(ino=1, size=1, mtime_ns=1)}, []),
        (
            {"op": "publish", "id": 1, "namespace": "n", "key": dict(ino=1, size=1, mtime_ns=1)},
            [4, 5],
        ),
    ],
)
def test_private_refusals_keep_fds_and_id(msg: dict, fds: list[int]) -> None:
    conn = ready_server()
    with pytest.raises(p.ProtocolError) as info:
        conn.receive(pack(msg), fds)
    assert info.value.fds == tuple(fds) and info.value.id == 1 and not info.value.fatal


@settings(max_examples=100, deadline=None)
@given(st.lists(st.tuples(request_like, fd_lists, st.booleans()), min_size=1, max_size=8))
def test_a_connection_accounts_for_every_fd_of_a_sequence(
    datagrams: list[tuple[dict, list[int], bool]],
) -> None:
    """One connection, many datagrams: every fd in comes out exactly once."""
    conn = p.ServerConnection(p.WireLimits(max_request=4096, max_batch=4))
    fd_in: list[int] = []
    fd_out: list[int] = []
    next_fd = 3
    for msg, drawn, ft in datagrams:
        fds = list(range(next_fd, next_fd + len(drawn)))  # distinct numbers, to count them
        next_fd += len(fds)
        fd_in += fds
        try:
            ev = conn.receive(pack(msg), fds, fds_truncated=ft)
        except p.ProtocolError as exc:
            fd_out += exc.fds
            continue
        if isinstance(ev, (p.Open, p.Publish)):
            fd_out.append(ev.fd)
        elif isinstance(ev, p.OpenBatch):
            fd_out += ev.fds
    assert sorted(fd_out) == fd_in


@pytest.mark.parametrize("limits", [{}, {"max_request": 2048}])
def test_client_leaves_out_labels_that_would_pass_max_request(limits: dict[str, int]) -> None:
    c = p.ClientConnection()
    c.server_limits = limits
    limit = limits.get("max_request", p.MIN_MAX_REQUEST)
    short, long = "/lib/" + "s" * 100, "/lib/" + "l" * limit
    data, _ = c.send(p.Open(id=1, fd=3, label=short))
    assert msgpack.unpackb(data)["path"] == short
    data, fds = c.send(p.Open(id=2, fd=3, label=long))
    assert len(data) <= limit and "path" not in msgpack.unpackb(data) and fds == [3]
    _, data, fds = c.send_open(4, long)
    assert len(data) <= limit and "path" not in msgpack.unpackb(data) and fds == [4]
    _, data, _ = c.send_open(4, short)
    assert msgpack.unpackb(data)["path"] == short
    data, fds = c.send(p.OpenBatch(id=9, fds=(3, 4), labels=(short, long)))
    assert len(data) <= limit and "paths" not in msgpack.unpackb(data) and fds == [3, 4]
    # What the daemon's parser makes of them: the same requests, unlabelled.
    s = p.ServerConnection(p.WireLimits(max_request=limit))
    s.receive(msgpack.packb({"op": "hello", "id": 0, "version": 1}))
    assert s.receive(data, [3, 4]) == p.OpenBatch(id=9, fds=(3, 4), labels=())


def test_a_reports_hits_are_taken_as_triples_of_uints() -> None:
    conn = ready_server()
    hits = [[0, 0, 0], [2049, 1048601, 37], [p.MAX_ID, p.MAX_ID, p.MAX_ID]]
    ev = conn.receive(pack({"op": "report", "id": 4, "hits": hits}))
    assert ev == p.Report(id=4, hits=tuple(tuple(h) for h in hits))
    many = [[1, i, 1] for i in range(p.MAX_REPORT)]
    assert len(conn.receive(pack({"op": "report", "id": 5, "hits": many})).hits) == p.MAX_REPORT


@pytest.mark.parametrize(
    "bad",
    [
        [1, 2],
        [1, 2, 3, 4],
        (1, 2, 3),  # packed as an array: fine; see below
        "abc",
        {"dev": 1, "ino": 2, "hits": 3},
        [True, 2, 3],
        [1, False, 3],
        [1, 2, True],
        [-1, 2, 3],
        [1, -2, 3],
        [1, 2, -3],
        [None, 2, 3],
        [1, 2, None],
        [1.0, 2, 3],
        [1, 2, "3"],
        [1, [2], 3],
    ],
)
def test_a_report_with_one_bad_triple_among_good_ones_is_refused(bad: object) -> None:
    """Each triple is checked wherever it is: one bad among 100 good ones refuses the
    report (not fatally), whichever of its parts is wrong."""
    conn = ready_server()
    for at in (0, 50, 100):
        hits: list[object] = [[1, i, 1] for i in range(100)]
        hits.insert(at, bad)
        data = pack({"op": "report", "id": 6, "hits": hits})
        if isinstance(bad, tuple):  # msgpack makes a list of it: a good triple
            assert len(conn.receive(data).hits) == 101
            continue
        with pytest.raises(p.MalformedMessage) as info:
            conn.receive(data)
        assert info.value.id == 6 and not info.value.fatal


def test_a_report_of_more_than_max_report_files_is_refused() -> None:
    conn = ready_server()
    many = [[1, i, 1] for i in range(p.MAX_REPORT + 1)]
    with pytest.raises(p.MalformedMessage) as info:
        conn.receive(pack({"op": "report", "id": 7, "hits": many}))
    assert info.value.id == 7 and not info.value.fatal


def test_a_peer_that_may_not_report_has_its_reports_hits_left_unread() -> None:
    """The daemon refuses such a report whatever it says: its hits are not checked."""
    conn = p.ServerConnection(reports=False)
    conn.receive(pack({"op": "hello", "id": 0, "version": 2}))
    bad = {"op": "report", "id": 3, "hits": [[1, 2, 3]] * 10 + ["x"]}
    assert conn.receive(pack(bad)) == p.Report(id=3, hits=())
    with pytest.raises(p.MalformedMessage):
        ready_server().receive(pack(bad))
