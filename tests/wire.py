# A raw protocol connection for tests that must say what a well-behaved client
# never would: any map, any fds, then read the daemon's answer as it is.
from __future__ import annotations

import array
import os
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import msgpack

from shadowd.fds import fds_from_ancdata


class Raw:
    """A blocking SOCK_SEQPACKET connection speaking msgpack maps directly."""

    def __init__(self, path: Path | str, *, hello: bool = True, timeout: float = 5) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.sock.settimeout(timeout)
        try:
            self.sock.connect(str(path))
            if hello:
                self.send({"op": "hello", "id": 0, "version": 1})
                reply, fds = self.recv()
                assert reply["ok"] and not fds, reply
        except BaseException:
            self.sock.close()  # a daemon that never answers must not leak our socket
            raise

    def send(self, msg: dict[str, Any] | bytes, fds: Sequence[int] = ()) -> None:
        data = msg if isinstance(msg, bytes) else msgpack.packb(msg, use_bin_type=True)
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
        self.sock.sendmsg([data], anc if fds else [])

    def recv(self) -> tuple[dict[str, Any], list[int]]:
        data, anc, _flags, _ = self.sock.recvmsg(1 << 18, socket.CMSG_SPACE(256 * 4))
        if not data:
            raise EOFError("the daemon closed the connection")
        return msgpack.unpackb(data), fds_from_ancdata(anc)

    def call(
        self, msg: dict[str, Any], fds: Sequence[int] = ()
    ) -> tuple[dict[str, Any], list[int]]:
        self.send(msg, fds)
        return self.recv()

    def close(self) -> None:
        self.sock.close()

    def __enter__(self) -> Raw:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def key_map(ino: int, size: int, mtime_ns: int = 1, ctime_ns: int | None = 2) -> dict[str, Any]:
    return {"ino": ino, "size": size, "mtime_ns": mtime_ns, "ctime_ns": ctime_ns}


def memfd_with(data: bytes, *, sealable: bool = True) -> int:
    flags = os.MFD_CLOEXEC | (os.MFD_ALLOW_SEALING if sealable else 0)
    fd = os.memfd_create("test", flags)
    os.write(fd, data)
    return fd


def read_all(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""
