# Cache poisoning across uids: a client of one uid tries every combination of
# namespace, key and kind of fd to make a client of another uid be served bytes
# it supplied, before and after the victim's own entries exist; and to read
# the victim's entries. Real uids, the daemon as a real subprocess.
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import trio

from .conftest import Daemon, make_file, requires_root, run_as, test_uid

VICTIM, ATTACKER = test_uid(3), test_uid(4)
NAMESPACES = ["sha256:victim-image", "sha256:attacker-image", "0", "/"]
FD_KINDS = ["memfd", "mapped", "hostfile", "served", "sealed"]

ATTACK = """
import array, fcntl, mmap, socket, msgpack
NSS, KEYS, KINDS = {nss!r}, {keys!r}, {kinds!r}
EVIL = b"POISONED!!!"
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    s.connect({path!r})
    call(s, {{"op": "hello", "id": 0, "version": 1}})
    return s
def call(s, msg, fds=()):
    anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    s.sendmsg([msgpack.packb(msg)], anc if fds else [])
    data, anc, _, _ = s.recvmsg(65536, socket.CMSG_SPACE(16))
    got = [fd for _, _, d in anc for fd in array.array("i", d)]
    return msgpack.unpackb(data), got
def read(fd):
    return os.pread(fd, 64, 0).decode()
kept = []
def make(kind, served):
    if kind == "hostfile":
        return os.open({evil_file!r}, os.O_RDONLY)
    if kind == "served":
        return os.dup(served)
    fd = os.memfd_create("evil", os.MFD_ALLOW_SEALING)
    os.write(fd, EVIL)
    if kind == "mapped":
        kept.append(mmap.mmap(fd, len(EVIL), mmap.MAP_SHARED, mmap.PROT_WRITE | mmap.PROT_READ))
    if kind == "sealed":
        fcntl.fcntl(fd, fcntl.F_ADD_SEALS, 0xF)
    return fd
s = connect()
mode = {mode!r}
res = []
served = None
for i, (ns, key) in enumerate((ns, key) for ns in NSS for key in KEYS):
    if mode == "lookup":
        reply, fds = call(s, {{"op": "lookup", "id": 1, "namespace": ns, "key": key}})
        res.append([reply.get("hit"), [read(fd) for fd in fds]])
        continue
    for kind in KINDS:
        fd = make(kind, served)
        reply, fds = call(s, {{"op": "publish", "id": 1, "namespace": ns, "key": key}}, [fd])
        os.close(fd)
        for m in kept:
            m[:] = b"CHANGED!!!!"  # and write after publishing, where it still can
        res.append([kind, reply.get("code"), [read(fd) for fd in fds]])
        if fds and served is None:
            served = fds[0]
out(res)
"""

VICTIM_CODE = """
from shadowd_client import Client, FileKey
NSS, KEYS = {nss!r}, {keys!r}
res = []
with Client({path!r}, timeout=10) as c:
    fd = c.open({host!r})
    res.append(os.pread(fd, 64, 0).decode())
    for ns in NSS:
        for key in KEYS:
            filled = []
            def fill(fd):
                filled.append(os.write(fd, b"victim data"))
            fd = c.open_private(ns, FileKey(**key), fill)
            res.append([os.pread(fd, 64, 0).decode(), bool(filled)])
out(res)
"""


def keys_for(host: Path) -> list[dict[str, Any]]:
    st = host.stat()
    exact = {"ino": st.st_ino, "size": 11, "mtime_ns": st.st_mtime_ns, "ctime_ns": st.st_ctime_ns}
    return [
        exact,  # what a victim would name for this very file
        dict(exact, mtime_ns=exact["mtime_ns"] + 1),  # another version of it
        dict(exact, ctime_ns=None),
        {"ino": 1, "size": 11, "mtime_ns": 0, "ctime_ns": 0},
    ]


@requires_root
async def test_no_uid_can_poison_or_read_another_uids_entries(
    start_daemon: Any, shared_dir: Path
) -> None:
    d: Daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    host = make_file(shared_dir / "lib.so", b"host bytes!")
    own = shared_dir / "attacker"
    own.mkdir()
    evil_file = make_file(own / "evil", b"POISONED!!!")
    os.chown(evil_file, ATTACKER, ATTACKER)
    keys = keys_for(host)
    common = {"nss": NAMESPACES, "keys": keys, "path": str(d.socket_path)}

    def attack(mode: str) -> list[Any]:
        code = ATTACK.format(kinds=FD_KINDS, evil_file=str(evil_file), mode=mode, **common)
        return run_as(ATTACKER, code)  # type: ignore[no-any-return]

    def victim() -> list[Any]:
        return run_as(VICTIM, VICTIM_CODE.format(host=str(host), **common))  # type: ignore[no-any-return]

    combos = len(NAMESPACES) * len(keys)
    with trio.fail_after(120):
        first = await trio.to_thread.run_sync(attack, "publish")
        # The attacker's own publishes worked (so the attempt was real): its
        # bytes, never changed by its later writes through a mapping.
        assert len(first) == combos * len(FD_KINDS)
        assert all(code is None and got == ["POISONED!!!"] for _, code, got in first), first
        # The victim, after every poisoning attempt: its own bytes, always a miss.
        seen = await trio.to_thread.run_sync(victim)
        assert seen[0] == "host bytes!"
        assert seen[1:] == [["victim data", True]] * combos, seen
        # Now the victim's entries exist. Keys 0 to 2 name one inode in three
        # versions, so each uid's own lookups and publishes replace its own
        # entry of that inode; key 3 stays. The attacker sees only its own:
        own_only = [[False, []], [False, []], [False, []], [True, ["POISONED!!!"]]]
        looked = await trio.to_thread.run_sync(attack, "lookup")
        assert looked == own_only * len(NAMESPACES), looked
        # ...cannot replace the victim's...
        again = await trio.to_thread.run_sync(attack, "publish")
        assert all(got == ["POISONED!!!"] for _, _, got in again), again
        # ...nor drop them: the victim misses exactly where its own lookups
        # replaced its own entry, and hits key 3.
        seen = await trio.to_thread.run_sync(victim)
        expected = [["victim data", i % len(keys) != 3] for i in range(combos)]
        assert seen[1:] == expected, seen
    assert "victim data" not in json.dumps([first, looked, again])
