# The service-manager side in process: LISTEN_* parsing, the passed socket's
# checks, and the notifier over real datagram sockets (paths and abstract
# names), its queue when the manager is slow, its end when it is gone, and
# its refusal to say READY=1 once it said STOPPING=1.
from __future__ import annotations

import logging
import os
import socket
import uuid
from pathlib import Path
from typing import Any

import pytest
import trio

from shadowd.errors import ConfigError
from shadowd.fds import close_all
from shadowd.systemd import (
    LISTEN_VARIABLES,
    Notifier,
    PassedFd,
    activated,
    adopt_listening_socket,
    fd_store_limit,
    listen_fds,
    notify_address,
    socket_name,
)

from .manager import NotifyReceiver


def listening(kind: int = socket.SOCK_SEQPACKET, path: str | None = None) -> socket.socket:
    s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    s.bind(path or b"\0shadowd-test-" + uuid.uuid4().hex.encode())
    s.listen()
    return s


def test_listen_fds_takes_its_descriptors_and_unsets_the_variables() -> None:
    a, b = listening(), listening()
    os.set_inheritable(a.fileno(), True)
    try:
        start = a.fileno()
        # Two consecutive numbers stand for 3 and 4: the parsing is the same.
        if b.fileno() != start + 1:
            pytest.skip("no consecutive descriptor numbers free")
        env = {
            "LISTEN_PID": "4242",
            "LISTEN_FDS": "2",
            "LISTEN_FDNAMES": "shadowd.socket:",
            "LISTEN_PIDFDID": "1",
            "OTHER": "kept",
        }
        passed = listen_fds(env, pid=4242, start=start)
        assert passed == [PassedFd(start, "shadowd.socket"), PassedFd(start + 1, "unknown")]
        assert not os.get_inheritable(a.fileno())
        assert env == {"OTHER": "kept"}
    finally:
        a.close()
        b.close()


def test_listen_fds_of_another_process_are_left_alone() -> None:
    env = {"LISTEN_PID": "1", "LISTEN_FDS": "5"}
    assert listen_fds(env, pid=4242, start=3) == []
    assert not set(LISTEN_VARIABLES) & set(env)  # unset all the same
    assert listen_fds({}, pid=4242) == []


def test_listen_fds_promising_closed_descriptors_is_an_error() -> None:
    r, w = os.pipe()
    os.close(r)
    os.close(w)
    with pytest.raises(ConfigError, match=f"descriptor {r} is not open"):
        listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "1"}, pid=7, start=r)
    with pytest.raises(ConfigError, match="not whole numbers"):
        listen_fds({"LISTEN_PID": "7", "LISTEN_FDS": "two"}, pid=7)


def test_names_that_do_not_match_the_count_are_ignored(caplog: Any) -> None:
    s = listening()
    try:
        env = {"LISTEN_PID": "9", "LISTEN_FDS": "1", "LISTEN_FDNAMES": "a:b"}
        assert listen_fds(env, pid=9, start=s.fileno()) == [PassedFd(s.fileno(), "unknown")]
        assert "2 names for 1 descriptors" in caplog.text
    finally:
        s.close()


def test_activated_peeks_without_taking() -> None:
    env = {"LISTEN_PID": "9", "LISTEN_FDS": "1"}
    assert activated(env, pid=9) and not activated(env, pid=10)
    assert not activated({"LISTEN_PID": "9", "LISTEN_FDS": "0"}, pid=9)
    assert env == {"LISTEN_PID": "9", "LISTEN_FDS": "1"}


@pytest.mark.parametrize(
    ("kind", "listen", "problem"),
    [
        (socket.SOCK_STREAM, True, "is a SOCK_STREAM socket; shadowd needs SOCK_SEQPACKET"),
        (socket.SOCK_DGRAM, False, "is a SOCK_DGRAM socket"),
        (socket.SOCK_SEQPACKET, False, "is not listening"),
    ],
)
def test_a_passed_socket_of_the_wrong_kind_is_refused(
    kind: int, listen: bool, problem: str
) -> None:
    s = socket.socket(socket.AF_UNIX, kind | socket.SOCK_CLOEXEC)
    try:
        s.bind(b"\0shadowd-test-" + uuid.uuid4().hex.encode())
        if listen:
            s.listen()
        with pytest.raises(ConfigError, match=problem):
            adopt_listening_socket(PassedFd(s.fileno(), "x.socket"))
        os.fstat(s.fileno())  # still open: the caller closes it
    finally:
        s.close()


def test_a_passed_file_is_not_a_socket(tmp_path: Path) -> None:
    fd = os.open(tmp_path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        with pytest.raises(ConfigError, match="not a socket"):
            adopt_listening_socket(PassedFd(fd, "odd"))
    finally:
        os.close(fd)


def test_a_passed_listening_seqpacket_socket_is_adopted(tmp_path: Path) -> None:
    s = listening(path=str(tmp_path / "s.sock"))
    sock = adopt_listening_socket(PassedFd(s.detach(), "shadowd.socket"))
    try:
        assert socket_name(sock) == str(tmp_path / "s.sock")
    finally:
        sock.close()
    abstract = listening()
    try:
        assert socket_name(abstract).startswith("@shadowd-test-")
    finally:
        abstract.close()


def test_notify_addresses() -> None:
    assert notify_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_address("@foo/bar") == b"\0foo/bar"
    assert notify_address("@") is None
    assert notify_address("relative/path") is None
    assert notify_address("vsock:2:1234") is None


def test_fd_store_limit() -> None:
    assert fd_store_limit(None, {}) == 0
    assert fd_store_limit(None, {"FDSTORE": "128"}) == 128
    assert fd_store_limit(500, {}) == 500
    assert fd_store_limit(500, {"FDSTORE": "128"}) == 128
    assert fd_store_limit(0, {"FDSTORE": "128"}) == 0


class Held:
    """Stands for a SealedFile: counts the references the notifier takes."""

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self.refs = 1

    @property
    def size(self) -> int:
        return 0

    def retain(self) -> Held:
        self.refs += 1
        return self

    def release(self) -> None:
        self.refs -= 1
        if self.refs == 0:
            os.close(self.fd)

    def share(self) -> int:
        raise NotImplementedError


def test_notifier_sends_messages_and_descriptors_to_an_abstract_address() -> None:
    rx = NotifyReceiver()
    notifier = rx.notifier()
    fd = os.memfd_create("shadowd", os.MFD_CLOEXEC)
    try:
        assert notifier.send("READY=1\nSTATUS=serving")
        assert notifier.send("FDSTORE=1\nFDNAME=x", [fd])
        (m1, f1), (m2, f2) = rx.receive_all()
        assert (m1, f1) == ("READY=1\nSTATUS=serving", [])
        assert m2 == "FDSTORE=1\nFDNAME=x" and len(f2) == 1
        assert os.fstat(f2[0]).st_ino == os.fstat(fd).st_ino
        close_all(f2)
    finally:
        os.close(fd)
        notifier.close()
        rx.sock.close()


def test_ready_never_follows_stopping() -> None:
    rx = NotifyReceiver()
    notifier = rx.notifier()
    try:
        assert notifier.ready("serving")
        notifier.stopping("draining")
        assert not notifier.ready("serving")
        assert not notifier.ready()
        assert [m for m, _ in rx.receive_all()] == [
            "READY=1\nSTATUS=serving",
            "STOPPING=1\nSTATUS=draining",
        ]
    finally:
        notifier.close()
        rx.sock.close()
    rx = NotifyReceiver()
    notifier = rx.notifier()
    try:
        notifier.stopping()  # stopped before it was ever ready
        assert not notifier.ready("serving")
        assert [m for m, _ in rx.receive_all()] == ["STOPPING=1"]
    finally:
        notifier.close()
        rx.sock.close()


def test_no_notify_socket_no_notifier(caplog: Any) -> None:
    assert Notifier.from_environment({}) is None
    env = {"NOTIFY_SOCKET": "not/absolute"}
    assert Notifier.from_environment(env) is None
    assert env == {} and "not a path" in caplog.text


async def test_notifier_queues_in_order_while_the_manager_is_full() -> None:
    rx = NotifyReceiver()
    notifier = rx.notifier(max_queue=10_000)
    files = []
    try:
        # Fill the manager's queue: the kernel refuses more without blocking.
        n = 0
        while notifier.queued == 0:
            assert notifier.send(f"STATUS={n}")
            n += 1
            assert n < 100_000
        # Queued with descriptors: the files stay open while they wait.
        for i in range(3):
            held = Held(os.memfd_create(f"q{i}", os.MFD_CLOEXEC))
            files.append(held)
            assert notifier.send(f"FDSTORE=1\nFDNAME=q{i}", [held.fd], held)
            held.release()  # the cache lets go; the queue holds it
            assert held.refs == 1
        with trio.fail_after(10):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(notifier.run)
                got: list[tuple[str, list[int]]] = []
                while len(got) < n + 3:
                    got += rx.receive_all()
                    await trio.sleep(0.01)
                nursery.cancel_scope.cancel()
        assert [m for m, _ in got] == [f"STATUS={i}" for i in range(n)] + [
            f"FDSTORE=1\nFDNAME=q{i}" for i in range(3)
        ]
        assert notifier.queued == 0 and all(h.refs == 0 for h in files)
        for _, fds in got[n:]:
            assert len(fds) == 1
            close_all(fds)
    finally:
        notifier.close()
        rx.sock.close()


def test_notifier_queue_is_bounded_and_releases_what_it_drops(caplog: Any) -> None:
    rx = NotifyReceiver()
    notifier = rx.notifier(max_queue=2)
    try:
        while notifier.queued < 2:
            notifier.send("STATUS=x")
        held = Held(os.memfd_create("dropped", os.MFD_CLOEXEC))
        assert not notifier.send("FDSTORE=1\nFDNAME=d", [held.fd], held)
        assert held.refs == 1  # not retained: the caller still owns it
        held.release()
        assert "not reading" in caplog.text
    finally:
        notifier.close()
        rx.sock.close()


def test_a_manager_that_went_away_stops_the_notifier(caplog: Any, tmp_path: Path) -> None:
    caplog.set_level(logging.WARNING)
    notifier = Notifier.from_environment({"NOTIFY_SOCKET": str(tmp_path / "gone")})
    assert notifier is not None
    try:
        assert not notifier.send("READY=1")
        assert notifier.broken and not notifier.send("STATUS=still here?")
        assert caplog.text.count("cannot notify the service manager") == 1
    finally:
        notifier.close()
