# The daemon's side of a connected AF_UNIX SOCK_SEQPACKET socket whose peer
# does not read: what SIOCOUTQ reports, what one small reply with one
# SCM_RIGHTS fd costs, how many fit before EAGAIN, whether EPOLLOUT comes
# back when the peer reads; SO_SNDBUF's default and minimum.
from __future__ import annotations

import array
import fcntl
import os
import select
import socket
import struct

from _fs import kernel, show

SIOCOUTQ = 0x5411  # TIOCOUTQ
SIOCINQ = 0x541B  # FIONREAD
REPLY = b"\x84\xa2id\x01\xa2ok\xc3\xa4size\xcd\x10\x00\xa3hit\xc3"  # an open reply's size


def outq(sock: socket.socket) -> int:
    buf = fcntl.ioctl(sock.fileno(), SIOCOUTQ, struct.pack("i", 0))
    return int(struct.unpack("i", buf)[0])


def send_reply(sock: socket.socket, fd: int | None) -> None:
    anc = (
        [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
        if fd is not None
        else []
    )
    sock.sendmsg([REPLY], anc, socket.MSG_DONTWAIT)


def fill(with_fd: bool, sndbuf: int | None = None) -> None:
    daemon, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    if sndbuf is not None:
        daemon.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
    fd = os.memfd_create("probe") if with_fd else None
    label = "with one fd" if with_fd else "without fds"
    show(
        f"SO_SNDBUF ({'default' if sndbuf is None else f'asked {sndbuf}'})",
        daemon.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF),
    )
    show("SIOCOUTQ before any send", outq(daemon))
    send_reply(daemon, fd)
    one = outq(daemon)
    show(f"SIOCOUTQ after one {len(REPLY)}-byte reply {label} (its truesize)", one)
    n = 1
    try:
        while True:
            send_reply(daemon, fd)
            n += 1
    except BlockingIOError:
        pass
    show(f"replies {label} that fit before EAGAIN", f"{n} (SIOCOUTQ {outq(daemon)})")
    ep = select.epoll()
    ep.register(daemon.fileno(), select.EPOLLOUT | select.EPOLLET)
    show("  EPOLLOUT while full", bool(ep.poll(0.05)))
    _data, anc, _, _ = peer.recvmsg(4096, socket.CMSG_SPACE(4))
    for _level, _type, data in anc:
        for received in array.array("i", data[: len(data) - len(data) % 4]):
            os.close(received)
    show("  SIOCOUTQ after the peer read one", outq(daemon))
    show("  EPOLLOUT after the peer read one", bool(ep.poll(0.05)))
    try:
        send_reply(daemon, fd)
        show("  a send after the peer read one", "ok")
    except BlockingIOError:
        show("  a send after the peer read one", "EAGAIN")
    reads = 1
    while not ep.poll(0):
        peer.recvmsg(4096, socket.CMSG_SPACE(4))  # fds received are closed with the socket
        reads += 1
    sndbuf = daemon.getsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF)
    show(
        "  EPOLLOUT first fires after the peer read",
        f"{reads} of {n + 1} (SIOCOUTQ {outq(daemon)}, SO_SNDBUF {sndbuf})",
    )
    ep.close()
    daemon.close()
    peer.close()
    if fd is not None:
        os.close(fd)


def main() -> None:
    show("kernel", kernel())
    for name in ("wmem_default", "wmem_max"):
        with open(f"/proc/sys/net/core/{name}") as f:
            show(f"net.core.{name}", f.read().strip())
    with open("/proc/sys/net/unix/max_dgram_qlen") as f:
        show("net.unix.max_dgram_qlen", f.read().strip())
    fill(with_fd=False)
    fill(with_fd=True)
    fill(with_fd=True, sndbuf=1)  # the kernel's minimum
    # A batch reply: 64 fds and about 1 KiB of msgpack.
    daemon, peer = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    fds = [os.memfd_create("probe") for _ in range(64)]
    daemon.sendmsg(
        [b"x" * 1024], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())]
    )
    show("SIOCOUTQ after one 1 KiB reply with 64 fds (its truesize)", outq(daemon))
    n = 1
    daemon.setblocking(False)
    try:
        while True:
            daemon.sendmsg(
                [b"x" * 1024],
                [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())],
            )
            n += 1
    except BlockingIOError:
        pass
    show("1 KiB replies with 64 fds that fit before EAGAIN", n)
    daemon.close()
    peer.close()
    for fd in fds:
        os.close(fd)
    # SIOCINQ on the peer for comparison: bytes of the next datagram.
    a, b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.send(REPLY)
    a.send(REPLY)
    buf = fcntl.ioctl(b.fileno(), SIOCINQ, struct.pack("i", 0))
    show("SIOCINQ on the peer with two replies queued", struct.unpack("i", buf)[0])
    a.close()
    b.close()


if __name__ == "__main__":
    main()
