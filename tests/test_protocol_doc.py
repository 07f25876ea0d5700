# docs/protocol.md cannot drift from protocol.py: every ```wire example in it
# is decoded by the role that would receive it and encoded back to the same
# bytes, and its map is what msgpack reads from those bytes.
from __future__ import annotations

import json
import re
from pathlib import Path

import msgpack
import pytest

from shadowd import protocol as p

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
    assert ops == {"hello", "open", "open_batch", "stats", "lookup", "publish"}


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
            server.receive(msgpack.packb({"op": "hello", "id": 99, "version": 1}))
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
