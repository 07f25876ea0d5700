# The transport floor for `shadowd bench`: the least a server can do to
# answer an open. It speaks just enough of the protocol for the real client
# (hello, open) and answers every open with a fresh read-only reopen of a
# sealed memfd of zeros of the file's size, with no checks and no cache: one
# fstat of the passed fd, as the client takes only an fd of the size its own
# fstat of the source saw. What shadowd takes above this floor is what its
# cache logic costs.
#
# Must never: be mistaken for a server: it serves zeros whatever file is
# asked for. It exists only to be measured against.
from __future__ import annotations

import os
import socket
import sys

import msgpack
import trio

from .fds import close_all, fds_from_ancdata, scm_rights
from .memfd import SealedFile, sealed_from_bytes


def _zeros(size: int, made: dict[int, SealedFile]) -> str:
    """The name in /proc/self/fd of a sealed memfd of *size* zeros (made once)."""
    sealed = made.get(size)
    if sealed is None:
        sealed = made[size] = sealed_from_bytes(b"\0" * size)
    return str(sealed.fd)


async def _connection(sock: socket.socket, made: dict[int, SealedFile], procfd: int) -> None:
    buf = bytearray(65536)
    view = memoryview(buf)
    pack = msgpack.Packer().pack
    with sock:
        while True:
            try:
                n, anc, _flags, _ = sock.recvmsg_into([buf], 4096, socket.MSG_CMSG_CLOEXEC)
            except BlockingIOError:
                await trio.lowlevel.wait_readable(sock)
                continue
            except OSError:
                return
            fds = fds_from_ancdata(anc)
            if n == 0 and not fds:
                return
            msg = msgpack.unpackb(view[:n])
            if msg.get("op") == "hello":
                hello = {"id": msg["id"], "ok": True, "version": 1, "server": "floor"}
                sock.sendmsg([pack({**hello, "limits": {"max_batch": 1}})])
                close_all(fds)
                continue
            size = os.fstat(fds[0]).st_size if fds else 0
            served = os.open(_zeros(size, made), os.O_RDONLY | os.O_CLOEXEC, dir_fd=procfd)
            try:
                reply = pack({"id": msg["id"], "ok": True, "size": size, "hit": True})
                sock.sendmsg([reply], scm_rights([served]), socket.MSG_NOSIGNAL)
            except OSError:
                return
            finally:
                close_all([*fds, served])


async def serve_floor(path: str) -> None:
    """Serve the floor on *path* until killed."""
    made: dict[int, SealedFile] = {}
    procfd = os.open("/proc/self/fd", os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_NONBLOCK)
    listener.bind(path)
    listener.listen()
    async with trio.open_nursery() as nursery:
        while True:
            try:
                sock, _ = listener.accept()
            except BlockingIOError:
                await trio.lowlevel.wait_readable(listener)
                continue
            sock.setblocking(False)
            nursery.start_soon(_connection, sock, made, procfd)


if __name__ == "__main__":
    trio.run(serve_floor, sys.argv[1])
