# The suite's daemons without an interpreter start each: a process that has
# imported shadowd (one per environment) forks each `shadowd serve`, which then
# serves as `python -m shadowd serve` would, in a process of its own. Starting
# Python and importing trio and shadowd took ~0.4 s of CPU per daemon, and the
# suite starts hundreds. It must never stand in for a start that differs (as
# another user, under a wrapper): those keep their own interpreter.
from __future__ import annotations

import json
import os
import select
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import threading
from pathlib import Path
from typing import Any

# The server: imports what `shadowd serve` runs, then forks a daemon a request
# (argv, cwd; its log as the descriptor sent along) and answers with its pid and
# a pidfd; says each child's exit status as Popen.returncode says it. The child
# leaves the loop with nothing of the server's open and runs shadowd.__main__'s
# code, so the interpreter's exit (threads, atexit) is that of a daemon's own.
_SERVER = textwrap.dedent(
    """
    import importlib, json, os, pkgutil, select, signal, socket, sys
    import shadowd, shadowd.cli
    for _m in pkgutil.iter_modules(shadowd.__path__):
        if _m.name not in ("__main__", "floor"):  # these would run at once
            importlib.import_module("shadowd." + _m.name)
    ctl = socket.socket(fileno=int(sys.argv[1]))
    wake_r, wake_w = os.pipe2(os.O_NONBLOCK | os.O_CLOEXEC)
    signal.set_wakeup_fd(wake_w)
    signal.signal(signal.SIGCHLD, lambda *_: None)
    request = None
    while request is None:
        ready = select.select([ctl, wake_r], [], [])[0]
        if wake_r in ready:
            while True:
                try:
                    os.read(wake_r, 512)
                except BlockingIOError:
                    break
            while True:
                try:
                    pid, status = os.waitpid(-1, os.WNOHANG)
                except ChildProcessError:
                    break
                if pid == 0:
                    break
                code = os.waitstatus_to_exitcode(status)
                ctl.send(json.dumps({"exited": pid, "code": code}).encode())
        if ctl in ready:
            msg, fds, _, _ = socket.recv_fds(ctl, 1 << 20, 1)
            if not msg:
                sys.exit(0)  # the suite's process is gone, or done
            (log,) = fds
            pid = os.fork()
            if pid == 0:
                request = json.loads(msg)
                break
            pidfd = os.pidfd_open(pid)
            socket.send_fds(ctl, [json.dumps({"pid": pid}).encode()], [pidfd])
            os.close(pidfd)
            os.close(log)
    # The child: as Popen(stdout=log, stderr=STDOUT) leaves a daemon.
    signal.set_wakeup_fd(-1)
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    ctl.detach()
    null = os.open(os.devnull, os.O_RDONLY)
    os.dup2(null, 0)
    os.dup2(log, 1)
    os.dup2(log, 2)
    os.closerange(3, os.sysconf("SC_OPEN_MAX"))
    os.chdir(request["cwd"])
    os.environ.clear()
    os.environ.update(request["env"])
    sys.argv = [os.path.join(os.path.dirname(shadowd.__file__), "__main__.py")]
    sys.argv += request["argv"]
    sys.exit(shadowd.cli.main())
    """
)


class ForkedProc:
    """A daemon forked by a ForkServer, with the parts of subprocess.Popen the
    suite uses: pid, returncode, poll, wait, send_signal, terminate, kill."""

    def __init__(self, server: ForkServer, pid: int, pidfd: int, args: list[str]) -> None:
        self.server = server
        self.pid = pid
        self.args = args
        self.returncode: int | None = None
        self._pidfd = pidfd

    def _exited(self, timeout: float | None) -> bool:
        if self.returncode is not None:
            return True
        if not select.select([self._pidfd], [], [], timeout)[0]:
            return False
        # Gone: its exit status follows from the server, which reaps it.
        self.returncode = self.server.exit_code(self.pid)
        os.close(self._pidfd)
        self._pidfd = -1
        return True

    def poll(self) -> int | None:
        self._exited(0)
        return self.returncode

    def wait(self, timeout: float | None = None) -> int:
        if not self._exited(timeout):
            raise subprocess.TimeoutExpired(self.args, timeout or 0)
        assert self.returncode is not None
        return self.returncode

    def send_signal(self, sig: int) -> None:
        if self.poll() is None:
            try:
                signal.pidfd_send_signal(self._pidfd, sig)
            except ProcessLookupError:
                pass  # exited meanwhile

    def terminate(self) -> None:
        self.send_signal(signal.SIGTERM)

    def kill(self) -> None:
        self.send_signal(signal.SIGKILL)


class ForkServer:
    """One server process (_SERVER) for one environment."""

    def __init__(self, env: dict[str, str]) -> None:
        ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        fd, name = tempfile.mkstemp(prefix="shadowd-forkserver-", suffix=".err")
        self._stderr = Path(name)
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _SERVER, str(theirs.fileno())],
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=fd,
                env=env,
                pass_fds=[theirs.fileno()],
            )
        finally:
            os.close(fd)
            theirs.close()
        self._ctl = ours
        self._lock = threading.Lock()
        self._codes: dict[int, int] = {}

    def _recv(self, timeout: float) -> tuple[dict[str, Any], list[int]]:
        self._ctl.settimeout(timeout)
        try:
            msg, fds, _, _ = socket.recv_fds(self._ctl, 4096, 1)
        except TimeoutError:
            raise RuntimeError(f"the fork server is silent:\n{self.stderr()}") from None
        if not msg:
            raise RuntimeError(f"the fork server exited:\n{self.stderr()}")
        return json.loads(msg), fds

    def spawn(self, argv: list[str], env: dict[str, str], log: int) -> ForkedProc:
        """Fork a daemon running `python -m shadowd *argv*` in *env* (the server's
        but for what pytest changes a test, _key), its output to *log*."""
        request = json.dumps({"argv": argv, "env": env, "cwd": os.getcwd()}).encode()
        with self._lock:
            socket.send_fds(self._ctl, [request], [log])
            while True:
                # The first request waits for the server's imports.
                reply, fds = self._recv(60)
                if "exited" in reply:
                    self._codes[reply["exited"]] = reply["code"]
                    continue
                (pidfd,) = fds
                return ForkedProc(self, reply["pid"], pidfd, argv)

    def exit_code(self, pid: int) -> int:
        """The exit status of *pid*, a child that exited (its pidfd said so)."""
        with self._lock:
            while pid not in self._codes:
                reply, fds = self._recv(30)
                for fd in fds:
                    os.close(fd)
                if "exited" in reply:
                    self._codes[reply["exited"]] = reply["code"]
            return self._codes.pop(pid)

    def stderr(self) -> str:
        try:
            return self._stderr.read_text(errors="replace")
        except OSError:
            return ""

    def close(self) -> None:
        self._ctl.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self._stderr.unlink(missing_ok=True)


_servers: dict[tuple[tuple[str, str], ...], ForkServer] = {}
_seen: set[tuple[tuple[str, str], ...]] = set()


#: What pytest sets for each test: no part of what a daemon imports with.
_PER_TEST = ("PYTEST_CURRENT_TEST",)


def _key(env: dict[str, str]) -> tuple[tuple[str, str], ...]:
    return tuple(sorted((k, v) for k, v in env.items() if k not in _PER_TEST))


def server_for(env: dict[str, str]) -> ForkServer | None:
    """The fork server of *env*: None the first time *env* is asked for (a daemon
    started once in an environment is started as before, without a server that
    would then idle), a server from the second time on."""
    key = _key(env)
    if key in _servers:
        return _servers[key]
    if key not in _seen:
        _seen.add(key)
        return None
    _servers[key] = server = ForkServer(env)
    return server


def close_all() -> None:
    """End every server (at the end of the session: the daemons are gone by then)."""
    while _servers:
        _, server = _servers.popitem()
        server.close()
