"""Where a hit's time goes inside the daemon, without any wake-up.

Drives the server's hit path in one process over a socketpair: a real
`Server` (its loop running), a real cached memfd, a real fd sent with each
request. Prints, in microseconds per hit:

- each step of a hit done bare, in a tight loop (recvmsg, reading the fds
  out of the control data, unpackb, statx, fcntl, the reopen, packing the
  reply, sendmsg, closing), with the standard library and ctypes: the least
  a daemon written in Python alone pays;
- the same hits answered by `Server._answer_datagram`, as the poller calls
  it, with the round's closes: what shadowd pays.

With the C extension (shadowd/_hotcalls.c) the daemon answers a hit in
less than the bare Python steps take; with SHADOWD_NO_C=1 the difference is
the daemon's own Python (parsing, checks, the cache lookup, counters).
A plain timing benchmark (not a test):
`.venv/bin/python benchmarks/hit_path.py [HITS]`.
"""

from __future__ import annotations

import argparse
import os
import socket
import statistics
import tempfile
import time
from collections.abc import Callable

import msgpack
import trio

from shadowd import hotcalls
from shadowd.access import Peer
from shadowd.cache import CacheLimits
from shadowd.connection import Connection
from shadowd.fds import close_all, fds_from_ancdata, scm_rights
from shadowd.hotcalls import py_reopen, py_statx_nosync
from shadowd.memfd import sealed_from_bytes
from shadowd.protocol import ServerConnection
from shadowd.server import Server, ServerConfig
from shadowd.source import check_readable

SIZE = 4096
#: Alternations of the bare loop and the daemon's path.
ROUNDS = 7
_CMSG = socket.CMSG_SPACE(4 * 4)


def _file(workdir: str) -> str:
    path = os.path.join(workdir, "lib.so")
    with open(path, "wb") as f:
        f.write(os.urandom(SIZE))
    return path


def bare_steps(path: str, hits: int, *, each: bool = True) -> dict[str, float]:
    """Each step of a hit, timed on its own; microseconds per hit.

    With *each* false, the steps are timed together (under "bare hit"),
    without the cost of the clock reads between them.
    """
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    sealed = sealed_from_bytes(os.urandom(SIZE))
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    request = msgpack.packb({"op": "open", "id": 7, "path": path})
    pack = msgpack.Packer().pack
    buf = bytearray(65536)
    view = memoryview(buf)
    spent: dict[str, int] = {}
    clock = time.perf_counter_ns

    def step(name: str, since: int) -> int:
        now = clock()
        spent[name] = spent.get(name, 0) + now - since
        return now

    try:
        if not each:
            for _ in range(hits):
                theirs.sendmsg([request], scm_rights([src]))
                t = clock()
                n, anc, _flags, _ = ours.recvmsg_into([buf], _CMSG, socket.MSG_CMSG_CLOEXEC)
                fds = fds_from_ancdata(anc)
                msgpack.unpackb(view[:n])
                py_statx_nosync(fds[0])
                check_readable(fds[0])
                served = py_reopen(sealed.dir_fd, sealed.fd)
                reply = pack({"id": 7, "ok": True, "size": SIZE, "hit": True})
                ours.sendmsg([reply], scm_rights((served,)), socket.MSG_NOSIGNAL)
                close_all([fds[0], served])
                step("bare hit", t)
                _drain(theirs)
        for _ in range(hits if each else 0):
            theirs.sendmsg([request], scm_rights([src]))
            t = clock()
            n, anc, _flags, _ = ours.recvmsg_into([buf], _CMSG, socket.MSG_CMSG_CLOEXEC)
            t = step("recvmsg", t)
            fds = fds_from_ancdata(anc)
            t = step("fds from control data", t)
            msgpack.unpackb(view[:n])
            t = step("unpackb", t)
            py_statx_nosync(fds[0])
            t = step("statx (ctypes)", t)
            check_readable(fds[0])
            t = step("fcntl", t)
            served = py_reopen(sealed.dir_fd, sealed.fd)
            t = step("reopen (openat)", t)
            reply = pack({"id": 7, "ok": True, "size": SIZE, "hit": True})
            t = step("pack", t)
            ours.sendmsg([reply], scm_rights((served,)), socket.MSG_NOSIGNAL)
            t = step("sendmsg", t)
            close_all([fds[0], served])
            step("close_range", t)
            _drain(theirs)
    finally:
        os.close(src)
        sealed.release()
        ours.close()
        theirs.close()
    return {name: ns / hits / 1000 for name, ns in spent.items()}


async def _reply(sock: socket.socket) -> dict[str, object]:
    """The next reply on *sock*, waiting on the loop (the server runs on it too)."""
    with trio.fail_after(10):
        while True:
            try:
                data, anc, _, _ = sock.recvmsg(4096, _CMSG, socket.MSG_DONTWAIT)
            except BlockingIOError:
                await trio.sleep(0.01)
                continue
            close_all(fds_from_ancdata(anc))
            reply: dict[str, object] = msgpack.unpackb(data)
            return reply


def _drain(sock: socket.socket) -> None:
    _, anc, _, _ = sock.recvmsg(4096, _CMSG)
    close_all(fds_from_ancdata(anc))


async def _daemon_hits(path: str, hits: int) -> float:
    """Microseconds per hit of Server._answer_datagram, the round's closes included."""
    server = Server(ServerConfig(socket_path="", cache=CacheLimits(racy_window_ns=0)))
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind("")  # an autobind abstract address: nobody connects to it
    listener.listen()
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    ours.setblocking(False)
    src = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        async with trio.open_nursery() as nursery:
            await nursery.start(server.serve, listener)
            peer = Peer.from_socket(ours)
            conn = Connection(
                sock=ours,
                peer=peer,
                share=server.gate.admit(peer, ours).share,
                proto=ServerConnection(server.config.wire),
                services=server._services,
            )
            conn.nursery = nursery

            async def ask(msg: dict[str, object], fds: list[int]) -> None:
                theirs.sendmsg([msgpack.packb(msg)], scm_rights(fds))
                if not server._answer_datagram(conn):
                    job, conn.job = conn.job, None
                    assert job is not None
                    await conn.answer(job)

            await ask({"op": "hello", "id": 0, "version": 1}, [])
            await _reply(theirs)
            await ask({"op": "open", "id": 1}, [src])  # a miss: a worker copies it
            await _reply(theirs)
            await ask({"op": "open", "id": 2}, [src])
            if not (await _reply(theirs))["hit"]:
                raise RuntimeError("the file was not cached")
            requests = [msgpack.packb({"op": "open", "id": i, "path": path}) for i in range(hits)]
            per_hit = _timed(server, conn, theirs, src, requests)
            nursery.cancel_scope.cancel()
    finally:
        os.close(src)
        ours.close()
        theirs.close()
        listener.close()
    return per_hit


def _timed(
    server: Server, conn: Connection, theirs: socket.socket, src: int, requests: list[bytes]
) -> float:
    answer: Callable[[Connection], bool] = server._answer_datagram
    poller = server._poller
    spent = 0
    for request in requests:
        theirs.sendmsg([request], scm_rights([src]))
        t = time.perf_counter_ns()
        answered = answer(conn)
        close_all(poller.closing)
        poller.closing.clear()
        spent += time.perf_counter_ns() - t
        if not answered:
            raise RuntimeError(f"not answered as a hit: {conn.job}")
        _drain(theirs)
    return spent / len(requests) / 1000


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "hits", nargs="?", type=int, default=20000, help="hits per measurement (default 20000)"
    )
    hits = parser.parse_args(argv).hits
    if hits < ROUNDS:
        parser.error(f"HITS must be at least {ROUNDS}")
    with tempfile.TemporaryDirectory() as workdir:
        path = _file(workdir)
        bare_steps(path, min(hits, 2000))  # warm up
        steps = bare_steps(path, hits)
        # The two that compare, alternated against drift; medians of the rounds.
        bares, daemons = [], []
        for _ in range(ROUNDS):
            bares.append(bare_steps(path, hits // ROUNDS, each=False)["bare hit"])
            daemons.append(trio.run(_daemon_hits, path, hits // ROUNDS))
        bare, daemon = statistics.median(bares), statistics.median(daemons)
    print(f"one hit's steps, bare, each timed on its own ({hits} hits), us:")
    for name, us in steps.items():
        print(f"  {name:<24} {us:6.2f}")
    print(f"  {'sum':<24} {sum(steps.values()):6.2f} (the clock reads between steps included)")
    print(f"the same steps timed together: {bare:6.2f} us per hit (median of {ROUNDS} rounds)")
    print(f"the daemon's hit path (Server._answer_datagram): {daemon:6.2f} us per hit (median)")
    print(f"  with its system calls in {hotcalls.DESCRIPTION}")
    print(
        f"the daemon against the bare Python steps: {daemon - bare:+6.2f} us ({daemon / bare:.2f}x)"
    )


if __name__ == "__main__":
    main()
