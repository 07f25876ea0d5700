# The per-user limit on descriptors in flight in SCM_RIGHTS messages nobody
# has received yet (ETOOMANYREFS): reproduced with a non-root sender and a
# low RLIMIT_NOFILE; is it counted per sending uid across its processes?
from __future__ import annotations

import array
import os
import resource
import socket

from _fs import errno_name, kernel, show

UID_A, UID_B = 43210, 43211  # users nothing else on the host runs as
LIMIT = 32


def sender(uid: int, nofile: int, target: int, pipes: tuple[int, int, int]) -> None:
    """In a child: as *uid*, send one fd a message, unread, until *target* or an error."""
    go, report, hold = pipes
    resource.setrlimit(resource.RLIMIT_NOFILE, (nofile, nofile))
    os.setresgid(uid, uid, uid)
    os.setresuid(uid, uid, uid)
    a, _b = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    a.setblocking(False)
    fd = os.open("/dev/null", os.O_RDONLY)
    os.read(go, 1)
    sent, error = 0, "none"
    while sent < target:
        try:
            a.sendmsg(
                [b"x"], [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", [fd]).tobytes())]
            )
        except OSError as exc:
            error = errno_name(exc)
            break
        sent += 1
    os.write(report, f"{sent} {error}\n".encode())
    os.read(hold, 1)  # keep them in flight until told
    os._exit(0)


def start(uid: int, nofile: int, target: int) -> tuple[int, int, int, int]:
    go_r, go_w = os.pipe()
    rep_r, rep_w = os.pipe()
    hold_r, hold_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        sender(uid, nofile, target, (go_r, rep_w, hold_r))
    return pid, go_w, rep_r, hold_w


def run(uid: int, nofile: int, target: int) -> tuple[str, tuple[int, int, int, int]]:
    child = start(uid, nofile, target)
    os.write(child[1], b"g")
    return os.read(child[2], 100).decode().strip(), child


def finish(child: tuple[int, int, int, int]) -> None:
    pid, go_w, rep_r, hold_w = child
    os.write(hold_w, b"x")
    os.waitpid(pid, 0)
    for fd in (go_w, rep_r, hold_w):
        os.close(fd)


def main() -> None:
    show("kernel", kernel())
    got, one = run(UID_A, LIMIT, 10_000)
    show(f"uid {UID_A}, RLIMIT_NOFILE {LIMIT}, one process: fds sent before the error", got)
    finish(one)
    first, a1 = run(UID_A, LIMIT, 20)
    second, a2 = run(UID_A, LIMIT, 10_000)
    other, b1 = run(UID_B, LIMIT, 10_000)
    show(f"uid {UID_A}: a first process holds in flight", first)
    show(f"uid {UID_A}: then a second process of the same uid sends", second)
    show(f"uid {UID_B}: meanwhile another uid sends", other)
    for child in (a1, a2, b1):
        finish(child)
    big, a3 = run(UID_A, 4 * LIMIT, 10_000)
    show(f"uid {UID_A} with RLIMIT_NOFILE {4 * LIMIT}: fds sent before the error", big)
    finish(a3)
    root, r = run(0, LIMIT, 1_000)
    show(f"root (CAP_SYS_RESOURCE), RLIMIT_NOFILE {LIMIT}: sent (of 1000)", root)
    finish(r)


if __name__ == "__main__":
    main()
