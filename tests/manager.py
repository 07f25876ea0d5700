# A small stand-in for systemd's service manager, for the tests: it owns the
# listening socket and a NOTIFY_SOCKET, starts the daemon the way systemd does
# (descriptors from 3 on, LISTEN_FDS / LISTEN_PID / LISTEN_FDNAMES set in the
# process that execs the daemon), keeps what the daemon stores with FDSTORE=1,
# drops what it removes with FDSTOREREMOVE=1, and passes the store to the next
# daemon it starts. Everything is real: sockets, SCM_RIGHTS, the subprocess.
from __future__ import annotations

import signal
import socket
import subprocess
import sys
import uuid
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import trio

from shadowd.fds import close_all, fds_from_ancdata
from shadowd.systemd import Notifier

from .conftest import POLL, repo_env

# Run in the child between fork and the daemon: move the passed descriptors to
# 3, 4, ... as systemd does, set the variables with our own pid (exec keeps
# it), then become the daemon.
LAUNCHER = """
import fcntl, os, sys
passed = [int(x) for x in os.environ.pop("MANAGER_FDS").split(",") if x]
names = os.environ.pop("MANAGER_NAMES")
n = len(passed)
high = [fcntl.fcntl(fd, fcntl.F_DUPFD_CLOEXEC, 1000) for fd in passed]
for fd in passed:
    os.close(fd)
for i, fd in enumerate(high):
    os.dup2(fd, 3 + i)  # inheritable, like systemd's
if n:  # systemd sets the variables only when it passes something
    os.environ["LISTEN_FDS"] = str(n)
    os.environ["LISTEN_PID"] = str(os.getpid())
    os.environ["LISTEN_FDNAMES"] = names
os.execv(sys.argv[1], sys.argv[1:])
"""

SOCKET_NAME = "shadowd.socket"
#: The daemon as the tests start it.
SERVE = [sys.executable, "-m", "shadowd", "serve", "--log-level", "debug"]


class ServiceManager:
    """Owns the daemon's socket and fd store across daemon processes."""

    def __init__(
        self, directory: Path, *, notify_name: str = "notify", fdstore_max: int | None = 64
    ) -> None:
        self.directory = directory
        #: Set as $FDSTORE, as systemd 254 and later do; None: as older ones.
        self.fdstore_max = fdstore_max
        self.socket_path = directory / "shadowd.sock"
        self.listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        self.listener.bind(str(self.socket_path))
        self.listener.listen(64)
        self.notify_path = directory / notify_name
        notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        notify.bind(str(self.notify_path))
        self.notify = trio.socket.from_stdlib_socket(notify)
        #: name -> descriptors, in the order they were stored.
        self.store: dict[str, list[int]] = {}
        #: Every message received, as a dict of its fields.
        self.messages: list[dict[str, str]] = []
        self.proc: subprocess.Popen[bytes] | None = None
        self.log_path = directory / "daemon.log"
        self._changed = trio.Event()

    # -- the notify socket ----------------------------------------------

    async def pump(self) -> None:
        """Receive notifications forever (run it in a nursery)."""
        while True:
            data, ancdata, _flags, _ = await self.notify.recvmsg(
                4096, socket.CMSG_SPACE(253 * 4), socket.MSG_CMSG_CLOEXEC
            )
            fds = fds_from_ancdata(ancdata)
            fields = dict(line.split("=", 1) for line in data.decode().splitlines() if "=" in line)
            self.messages.append(fields)
            if fields.get("FDSTORE") == "1":
                name = fields.get("FDNAME", "stored")
                self.store.setdefault(name, []).extend(fds)
            else:
                close_all(fds)
                if fields.get("FDSTOREREMOVE") == "1":
                    close_all(self.store.pop(fields.get("FDNAME", ""), []))
            self._changed.set()
            self._changed = trio.Event()

    async def wait_until(self, predicate: Callable[[], bool], timeout: float = 20.0) -> None:
        with trio.fail_after(timeout):
            while not predicate():
                await self._changed.wait()

    async def wait_for(self, key: str, value: str = "1", *, after: int = 0) -> dict[str, str]:
        """The first message from index *after* on with key=value."""

        def found() -> dict[str, str] | None:
            for msg in self.messages[after:]:
                if msg.get(key) == value:
                    return msg
            return None

        await self.wait_until(lambda: found() is not None)
        result = found()
        assert result is not None
        return result

    # -- the daemon ------------------------------------------------------

    def start(
        self, *args: str, extra: list[tuple[str, int]] | None = None, with_socket: bool = True
    ) -> int:
        """Start a daemon with the socket and the stored descriptors; returns the message index.

        *extra* adds (name, fd) pairs to what is passed, as if they were stored.
        Without *with_socket*, only the store is passed (a service with no
        socket unit).
        """
        passed = [(SOCKET_NAME, self.listener.fileno())] if with_socket else []
        passed += [(name, fd) for name, fds in self.store.items() for fd in fds]
        passed += extra or []
        env = repo_env()
        env["NOTIFY_SOCKET"] = str(self.notify_path)
        env["MANAGER_FDS"] = ",".join(str(fd) for _, fd in passed)
        env["MANAGER_NAMES"] = ":".join(name for name, _ in passed)
        env.pop("JOURNAL_STREAM", None)
        env.pop("FDSTORE", None)
        if self.fdstore_max is not None:
            env["FDSTORE"] = str(self.fdstore_max)
        log = open(self.log_path, "ab")  # noqa: SIM115
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", LAUNCHER, *SERVE, *args],
                pass_fds=[fd for _, fd in passed],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        finally:
            log.close()
        return len(self.messages)

    async def start_ready(self, *args: str, **kwargs: Any) -> int:
        """Start a daemon and wait for its READY=1; returns the message index it started at."""
        index = self.start(*args, **kwargs)
        with trio.fail_after(30):
            while True:
                if any(m.get("READY") == "1" for m in self.messages[index:]):
                    return index
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"daemon exited {self.proc.returncode}:\n{self.log()}")
                with trio.move_on_after(0.05):
                    await self._changed.wait()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.proc is not None
        self.proc.send_signal(sig)
        with trio.fail_after(30):
            while self.proc.poll() is None:
                await trio.sleep(POLL)
        return self.proc.returncode

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    async def wait_for_log(self, text: str, timeout: float = 30.0) -> None:
        """Until the daemon's log holds *text*; fails if the daemon exits first."""
        assert self.proc is not None
        with trio.fail_after(timeout):
            while text not in self.log():
                assert self.proc.poll() is None, self.log()
                await trio.sleep(0.02)

    async def said_since(self, index: int) -> list[dict[str, str]]:
        """Every message from *index* on, once all the daemon sent is read: a
        message of ours sent now comes after them (a datagram socket keeps the
        order), and is left out."""
        with trio.fail_after(10):
            with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
                s.sendto(b"TEST=end", str(self.notify_path))
            await self.wait_for("TEST", "end", after=index)
        return self.messages[index:-1]

    def close(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for fds in self.store.values():
            close_all(fds)
        self.store.clear()
        self.listener.close()
        self.notify.close()


class NotifyReceiver:
    """The manager's end of NOTIFY_SOCKET alone, for tests in process: an abstract address."""

    def __init__(self) -> None:
        self.name = f"shadowd-test-{uuid.uuid4().hex}"
        self.sock = socket.socket(
            socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
        )
        self.sock.bind(b"\0" + self.name.encode())

    def notifier(self, **kwargs: Any) -> Notifier:
        """A notifier made the daemon's way, from NOTIFY_SOCKET=@name (then unset)."""
        env = {"NOTIFY_SOCKET": "@" + self.name}
        notifier = Notifier.from_environment(env, **kwargs)
        assert notifier is not None and env == {}
        return notifier

    def receive_all(self) -> list[tuple[str, list[int]]]:
        """Every message waiting, with the descriptors that came with it (now the caller's)."""
        out = []
        while True:
            try:
                data, anc, _, _ = self.sock.recvmsg(4096, socket.CMSG_SPACE(16 * 4))
            except BlockingIOError:
                return out
            out.append((data.decode(), fds_from_ancdata(anc)))

    def fields(self) -> list[tuple[dict[str, str], int]]:
        """Every message waiting as (fields, number of descriptors); the descriptors are closed."""
        out = []
        for text, fds in self.receive_all():
            close_all(fds)
            out.append((dict(line.split("=", 1) for line in text.splitlines()), len(fds)))
        return out

    def close(self) -> None:
        self.sock.close()


@asynccontextmanager
async def running(shared_dir: Path, **kwargs: Any) -> AsyncIterator[ServiceManager]:
    """A ServiceManager pumping its notify socket until the block ends; its daemon's
    log printed (shown when a test fails), then closed."""
    m = ServiceManager(shared_dir, **kwargs)
    try:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(m.pump)
            yield m
            nursery.cancel_scope.cancel()
    finally:
        print(f"--- daemon log ---\n{m.log()}")
        m.close()
