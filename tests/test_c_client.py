# The C client (client/c) against the real daemon and against stand-in
# daemons in Python: exact bytes, refusals, timeouts set at run time, the
# circuit breaker, a stopped, killed and restarted daemon, batches, private
# files, the pipelined interface, openat, local copies, the process-local
# tier (and what it serves after a change stat cannot show) and the socket
# rule. Most tests talk to tests/c_driver.c, a program
# that runs one API call per line it reads and answers in JSON; some run
# shadowd-open. Built with the host's C compiler; skipped where there is none.
from __future__ import annotations

import ctypes
import errno
import fcntl
import functools
import json
import os
import select
import shutil
import signal
import socket
import stat
import struct
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import msgpack
import pytest
import trio

from shadowd.bench import c_compiler, run_c_clients
from shadowd.fds import scm_rights

from . import churn
from .conftest import (
    NOBODY,
    REPO,
    Daemon,
    deep_file,
    make_file,
    requires_root,
    settle,
    test_uid,
)
from .fusefs import FuseFile, mounted
from .indexed import (
    IndexedCache,
    OpenWatch,
    answer_one,
    fifo_to_plant,
    planting_cases,
    planting_daemon,
    range_number_of,
    standing_in,
    without_hanging,
)
from .mapped import invalidations, until_invalidated, write_through_a_mapping
from .mounts import tmpfs

pytestmark = pytest.mark.skipif(c_compiler() is None, reason="no C compiler here")

C_DIR = REPO / "client" / "c"
ALL_SEALS = 0xF  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
OLD_NS = 1_700_000_000_123_456_789  # a ctime far outside any racy window


@pytest.fixture(scope="module")
def c_client(c_client_build: Callable[..., tuple[str | None, str]]) -> str:
    binary, why = c_client_build()
    assert binary is not None, why
    return binary


@pytest.fixture(scope="module")
def driver_bin(tmp_path_factory: pytest.TempPathFactory) -> str:
    """tests/c_driver.c built with client/c/shadowd.c, warnings as errors."""
    out = tmp_path_factory.mktemp("cdriver") / "c_driver"
    cc = c_compiler()
    assert cc is not None
    done = subprocess.run(
        [cc, "-std=gnu99", "-O2", "-Wall", "-Wextra", "-Werror", "-I", str(C_DIR), "-o", str(out),
         str(REPO / "tests" / "c_driver.c"), str(C_DIR / "shadowd.c"), "-pthread"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    return str(out)


def run(binary: str, *args: str, timeout: float = 20) -> subprocess.CompletedProcess[bytes]:
    return subprocess.run([binary, *args], capture_output=True, timeout=timeout, check=False)


def fnv(data: bytes) -> str:
    """FNV-1a 64, as the driver hashes what an fd holds."""
    # Past a few pages the loop below takes seconds (2 s for 16 MiB): the same
    # hash compiled here, once per session, checked against the loop first.
    h = _fnv_compiled()(data) if len(data) >= _FNV_COMPILED_FROM else _fnv_loop(data)
    return f"{h:016x}"


def _fnv_loop(data: bytes) -> int:
    h = 0xCBF29CE484222325
    for b in data:
        h = ((h ^ b) * 0x100000001B3) & 0xFFFFFFFFFFFFFFFF
    return h


_FNV_COMPILED_FROM = 64 * 1024
_FNV_C = """
#include <stddef.h>
#include <stdint.h>
uint64_t fnv1a64(const unsigned char *p, size_t n)
{
    uint64_t h = 0xcbf29ce484222325ULL;
    for (size_t i = 0; i < n; i++)
        h = (h ^ p[i]) * 0x100000001b3ULL;
    return h;
}
"""


@functools.cache
def _fnv_compiled() -> Callable[[bytes], int]:
    """_fnv_loop in C (the module's tests run only where there is a compiler)."""
    cc = c_compiler()
    assert cc is not None
    with tempfile.TemporaryDirectory(prefix="shadowd-fnv-") as tmp:
        src, lib = os.path.join(tmp, "fnv.c"), os.path.join(tmp, "fnv.so")
        with open(src, "w") as f:
            f.write(_FNV_C)
        done = subprocess.run(
            [cc, "-O2", "-shared", "-fPIC", "-o", lib, src],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr
        dll = ctypes.CDLL(lib)  # mapped: the file may go
    dll.fnv1a64.argtypes = [ctypes.c_char_p, ctypes.c_size_t]
    dll.fnv1a64.restype = ctypes.c_uint64

    def compiled(data: bytes) -> int:
        return int(dll.fnv1a64(data, len(data)))

    # What it answers is the loop's, or every hash compared with it is suspect.
    for sample in (b"", b"\x00", b"\xff" * 7, os.urandom(_FNV_COMPILED_FROM + 13)):
        assert compiled(sample) == _fnv_loop(sample), sample[:16]
    return compiled


class Driver:
    """tests/c_driver.c in a subprocess: one command a line, one JSON answer a line."""

    def __init__(
        self,
        binary: str,
        log: Path,
        env: dict[str, str] | None = None,
        user: int | None = None,
        argv: list[str] | None = None,
    ) -> None:
        self.log = log
        self._err = open(log, "wb")  # noqa: SIM115
        self.proc = subprocess.Popen(
            argv or [binary],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=self._err,
            env=env,
            user=user,
            group=user,
            extra_groups=[] if user is not None else None,
        )
        self._buf = b""

    def __call__(self, *words: object, timeout: float = 20) -> Any:
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write(" ".join(str(w) for w in words).encode() + b"\n")
        self.proc.stdin.flush()
        deadline = time.monotonic() + timeout
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"the driver did not answer {words!r}")
            ready, _, _ = select.select([self.proc.stdout], [], [], left)
            if ready:
                chunk = os.read(self.proc.stdout.fileno(), 1 << 16)
                if not chunk:
                    raise EOFError(f"the driver exited: {self.stderr()}")
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def stderr(self) -> str:
        self._err.flush()
        return self.log.read_text(errors="replace")

    def finish(self) -> str:
        """Let the driver exit; what it wrote on stderr."""
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        assert self.proc.wait(timeout=20) == 0
        return self.stderr()

    def __enter__(self) -> Driver:
        return self

    def __exit__(self, *exc: object) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        for pipe in (self.proc.stdin, self.proc.stdout):
            if pipe is not None:
                pipe.close()
        self._err.close()


@pytest.fixture
def driver(driver_bin: str, tmp_path: Path) -> Iterator[Callable[..., Driver]]:
    """A factory of drivers, all killed at the end of the test."""
    made: list[Driver] = []

    def make(env: dict[str, str] | None = None, user: int | None = None) -> Driver:
        d = Driver(driver_bin, tmp_path / f"driver{len(made)}.err", env, user)
        made.append(d)
        return d

    yield make
    for d in made:
        d.__exit__()


def stats(d: Daemon) -> dict[str, Any]:
    from shadowd_client import Client

    with Client(d.socket_path, timeout=10) as c:
        return c.stats()


async def counted_once(d: Daemon, key: str, n: int) -> dict[str, Any]:
    """*d*'s stats once their *key* counts at least *n*: what a client does on its
    own connection, the stats asked on ours may come before (a deadline is the
    caller's fail_after)."""
    while (s := await trio.to_thread.run_sync(stats, d))[key] < n:
        await trio.sleep(0.005)
    return s


async def ask(d: Driver, *words: object) -> Any:
    """One driver command from a trio test."""
    return await trio.to_thread.run_sync(lambda: d(*words))


async def until_route(d: Driver, f: Path, route: str, timeout: float = 10) -> list[Any]:
    """Routed opens of *f* until one takes *route* (a miss is filled meanwhile); all of them."""
    got: list[Any] = []
    deadline = time.monotonic() + timeout
    while not got or got[-1]["route"] != route:
        assert time.monotonic() < deadline, got[-3:]
        if got:
            await trio.sleep(0.01)
        got.append(await ask(d, "routed", f))
    return got


def big(path: Path, size: int = 200_000, mode: int = 0o644) -> tuple[Path, str]:
    """A file above the routed open's crossover, and the hash of its bytes."""
    data = os.urandom(size)
    return make_file(path, data, mode), fnv(data)


# -- stand-in daemons ------------------------------------------------------


def _greet(
    conn: socket.socket, server: str, limits: dict[str, int] | None = None
) -> dict[str, Any]:
    """Read a client's hello on a stand-in daemon's *conn* and answer it; the hello."""
    hello: dict[str, Any] = msgpack.unpackb(conn.recv(4096))
    reply = {"id": hello["id"], "ok": True, "version": 1, "server": server, "limits": limits or {}}
    conn.send(msgpack.packb(reply))
    return hello


def _drop_fds(anc: list[tuple[int, int, bytes]]) -> None:
    for _, _, data in anc:
        for i in range(0, len(data) - len(data) % 4, 4):
            os.close(int.from_bytes(data[i : i + 4], "little"))


def sealed_fd(data: bytes) -> int:
    from shadowd.memfd import sealed_from_bytes

    sealed = sealed_from_bytes(data)
    try:
        return sealed.share()
    finally:
        sealed.release()


@contextmanager
def stand_in_daemon(path: Path, handle: Callable[[socket.socket], None]) -> Iterator[None]:
    """A SOCK_SEQPACKET listener at *path* running *handle* on every connection."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(16)
    listener.settimeout(0.1)
    stop = threading.Event()
    handlers: list[threading.Thread] = []
    conns: list[socket.socket] = []

    def serve_one(conn: socket.socket) -> None:
        with conn:
            conn.settimeout(10)
            try:
                handle(conn)
            except OSError:
                pass  # the client went away

    def accept() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except TimeoutError:
                continue
            conns.append(conn)
            handlers.append(threading.Thread(target=serve_one, args=(conn,), daemon=True))
            handlers[-1].start()

    acceptor = threading.Thread(target=accept, daemon=True)
    acceptor.start()
    try:
        yield
    finally:
        stop.set()
        acceptor.join(timeout=10)
        listener.close()
        for conn in conns:  # wake handlers waiting on a client that stays
            try:
                conn.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass
        for t in handlers:
            t.join(timeout=10)


def until_closed(conn: socket.socket) -> None:
    while True:
        data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(64 * 4))
        _drop_fds(anc)
        if not data:
            return


def mute(conn: socket.socket) -> None:
    """A daemon that reads everything and answers nothing, not even hello."""
    until_closed(conn)


def greets_only(conn: socket.socket) -> None:
    """A daemon that answers hello, then nothing."""
    _greet(conn, "greets-only")
    until_closed(conn)


# -- the tool and the build --------------------------------------------------


def test_compiles_as_c99_without_warnings(tmp_path: Path) -> None:
    cc = c_compiler()
    assert cc is not None
    for source in ("shadowd.c", "shadowd-open.c"):
        done = subprocess.run(
            [cc, "-std=gnu99", "-Wall", "-Wextra", "-Wpedantic", "-Werror", "-c",
             "-o", str(tmp_path / "x.o"), str(C_DIR / source)],
            capture_output=True, text=True, check=False,
        )  # fmt: skip
        assert done.returncode == 0, done.stderr


def test_help_and_usage(c_client: str) -> None:
    for flag in ("-h", "--help"):
        done = run(c_client, flag)
        assert done.returncode == 0, done.stderr
        assert done.stdout.startswith(b"usage: shadowd-open")
        for option in (
            b"--routed",
            b"--timeout",
            b"--batch",
            b"--backoff",
            b"--crossover",
            b"--connects",
        ):
            assert option in done.stdout
    bad = run(c_client, "--no-such-option", "/etc/hostname")
    assert bad.returncode == 2 and b"usage:" in bad.stderr
    assert run(c_client, "--timeout", "soon", "/etc/hostname").returncode == 2


async def test_connects_times_new_connections_that_each_get_the_index(
    c_client: str, daemon: Daemon
) -> None:
    """`--connects N` makes N connections as a supervisor does, each given the index."""
    with trio.fail_after(30):
        done = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(daemon.socket_path), "--connects", "6", "--pause", "2")
        )
    assert done.returncode == 0, done.stderr
    got = json.loads(done.stdout)
    assert got["connects"] == 6 and got["pause_ms"] == 2
    assert got["indexed"] == 6  # this uid is the daemon's: every connection held its index
    assert 0 < got["p50"] <= got["p99"]
    before = stats(daemon)["clients_total"]
    with trio.fail_after(30):
        done = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(daemon.socket_path), "--connects", "3")
        )
    assert done.returncode == 0, done.stderr
    assert stats(daemon)["clients_total"] - before == 3 + 1  # 3, and our stats request
    # Usage: a count of at least 1, no PATH, not with another mode.
    for args in (["--connects", "0"], ["--connects", "2", "/etc/hostname"],
                 ["--connects", "2", "--latency"], ["--pause", "5"]):  # fmt: skip
        assert run(c_client, "-s", str(daemon.socket_path), *args).returncode == 2, args
    gone = run(c_client, "-s", str(daemon.socket_path) + ".none", "--connects", "2")
    assert gone.returncode == 1 and b"connection 1:" in gone.stderr


async def test_exact_bytes_a_miss_then_a_hit(c_client: str, daemon: Daemon, tmp_path: Path) -> None:
    f = make_file(tmp_path / "lib.so", os.urandom(300_001))
    settle(f)
    # -t 10000: a miss waits on the daemon's copy, which a loaded host made
    # take past the default reply timeout (250 ms) once; the hit that follows
    # is what is checked, not its speed.
    with trio.fail_after(30):
        first = await trio.to_thread.run_sync(
            lambda: run(c_client, "-v", "-t", "10000", "-s", str(daemon.socket_path), str(f))
        )
        second = await trio.to_thread.run_sync(
            lambda: run(c_client, "-v", "-t", "10000", "-s", str(daemon.socket_path), str(f))
        )
    assert first.returncode == 0, first.stderr
    assert first.stdout == f.read_bytes()
    assert first.stderr.decode() == "300001 miss\n"
    assert second.stdout == f.read_bytes()
    assert second.stderr.decode() == "300001 hit\n"
    # The label (the path) reached the daemon's stats, as the Python client's does.
    from shadowd_client import Client

    with Client(daemon.socket_path, timeout=10) as c:
        top = c.stats()["top_by_hits"]
    assert [t["path"] for t in top] == [str(f)]


async def test_refusals_and_no_daemon_are_clear(
    c_client: str, daemon: Daemon, tmp_path: Path
) -> None:
    with trio.fail_after(30):
        refused = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(daemon.socket_path), "/dev/null")
        )
        routed = await trio.to_thread.run_sync(
            lambda: run(c_client, "-r", "-s", str(daemon.socket_path), "/dev/null", str(tmp_path))
        )
        missing = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(daemon.socket_path), str(tmp_path / "nope"))
        )
        nobody = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(tmp_path / "no.sock"), "/etc/hostname")
        )
        usage = await trio.to_thread.run_sync(lambda: run(c_client))
    assert refused.returncode == 1
    assert b"only regular files are served" in refused.stderr
    assert b"(not-regular)" in refused.stderr
    # Each line names its file (a refusal's words do not: they did not, before).
    assert refused.stderr.startswith(b"shadowd-open: /dev/null: shadowd refused: only regular")
    assert routed.returncode == 1
    assert routed.stderr.decode().splitlines() == [
        f"shadowd-open: {path}: only regular files are served; this is not one"
        for path in ("/dev/null", tmp_path)
    ]
    assert missing.returncode == 1
    assert missing.stderr.decode() == (
        f"shadowd-open: {tmp_path / 'nope'}: No such file or directory\n"  # named once
    )
    assert nobody.returncode == 1
    assert b"connecting to shadowd at" in nobody.stderr and b"no.sock" in nobody.stderr
    assert usage.returncode == 2 and b"usage:" in usage.stderr


async def test_loops_for_the_benchmark_through_shadowd_and_by_copying(
    c_client: str, daemon: Daemon, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "big", os.urandom(1 << 20))
    settle(f)
    with trio.fail_after(30):
        hits = await trio.to_thread.run_sync(
            lambda: run_c_clients(c_client, 2, ["-s", str(daemon.socket_path), str(f)], 0.3)
        )
        copies = await trio.to_thread.run_sync(
            lambda: run_c_clients(c_client, 2, ["-c", str(f)], 0.3)
        )
    assert hits > 2 and copies > 2
    from shadowd_client import Client

    with Client(daemon.socket_path, timeout=10) as c:
        s = c.stats()
    # Both processes may miss at once (one copy is made); every open counted.
    assert s["misses"] in (1, 2) and s["hits"] + s["misses"] == hits


@pytest.fixture
def stand_in(tmp_path: Path) -> Iterator[tuple[Path, list[bytes]]]:
    """A daemon that answers hello, then every open with an unsealed memfd."""
    path = tmp_path / "fake.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    requests: list[bytes] = []

    def serve() -> None:
        conn, _ = listener.accept()
        with conn:
            conn.settimeout(10)
            requests.append(msgpack.packb(_greet(conn, "fake")))
            data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4))
            requests.append(data)
            for _, _, fds in anc:
                os.close(int.from_bytes(fds[:4], "little"))
            unsealed = os.memfd_create("unsealed", os.MFD_CLOEXEC)
            os.write(unsealed, b"evil")
            msg = msgpack.unpackb(data)
            conn.sendmsg(
                [msgpack.packb({"id": msg["id"], "ok": True, "size": 4, "hit": True})],
                scm_rights([unsealed]),
            )
            os.close(unsealed)
            conn.recv(1)  # until the client goes

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield path, requests
    thread.join(timeout=10)
    listener.close()


def test_an_unsealed_fd_is_refused(c_client: str, stand_in: tuple[Path, list[bytes]]) -> None:
    path, requests = stand_in
    done = run(c_client, "-s", str(path), "/etc/hostname")
    assert done.returncode == 1
    assert b"not sealed; refused it" in done.stderr
    assert done.stdout == b""
    hello, open_ = (msgpack.unpackb(r) for r in requests)
    # What the C client writes is what the protocol documents: it says
    # version 2; this stand-in answers 1, and is then spoken to in 1 (an
    # open without "wait").
    assert hello == {"op": "hello", "id": 0, "version": 2, "client": "shadowd.c/2"}
    assert open_ == {"op": "open", "id": 1, "path": "/etc/hostname"}


@pytest.fixture(scope="module")
def quick_c_client(c_client_build: Callable[..., tuple[str | None, str]]) -> str:
    """The C client built with a ceiling of 1 s on every wait instead of 30."""
    binary, why = c_client_build("-DSHADOWD_TIMEOUT_SECONDS=1")
    assert binary is not None, why
    return binary


async def test_a_daemon_restart_between_opens_is_survived(
    c_client: str, start_daemon: Any, tmp_path: Path
) -> None:
    first = await start_daemon("--racy-window", "0.05", socket_name="r.sock")
    f1 = make_file(tmp_path / "one", b"first file")
    f2 = make_file(tmp_path / "two", b"second file")
    settle(f1, f2)
    proc = subprocess.Popen(
        [c_client, "-g", "-s", str(first.socket_path), str(f1), str(f2)],
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    assert proc.stdin is not None and proc.stdout is not None
    try:
        with trio.fail_after(30):
            assert await trio.to_thread.run_sync(proc.stdout.readline) == b"ready\n"
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
            assert await trio.to_thread.run_sync(proc.stdout.readline) == b"first fileready\n"
            first.kill()
            await start_daemon("--racy-window", "0.05", socket_name="r.sock")
            out, err = await trio.to_thread.run_sync(proc.communicate, b"go\n")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert out == b"second file"


@pytest.fixture
def slow_stand_in(tmp_path: Path) -> Iterator[Path]:
    """A daemon whose first connection answers its open 1.5 s late; the next is prompt."""
    path = tmp_path / "slow.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen()
    listener.settimeout(10)

    def answer(conn: socket.socket, delay: float) -> None:
        conn.settimeout(10)
        _greet(conn, "slow")
        data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4))
        src = int.from_bytes(anc[0][2][:4], "little")
        time.sleep(delay)
        served = os.open(f"/proc/self/fd/{src}", os.O_RDONLY | os.O_CLOEXEC)
        os.close(src)
        sealed = memfd_copy(served)
        os.close(served)
        msg = msgpack.unpackb(data)
        size = os.fstat(sealed).st_size
        try:
            conn.sendmsg(
                [msgpack.packb({"id": msg["id"], "ok": True, "size": size, "hit": False})],
                scm_rights([sealed]),
            )
        except OSError:
            pass  # the client gave up on this connection
        os.close(sealed)

    def handle(conn: socket.socket, delay: float) -> None:
        with conn:
            answer(conn, delay)
            conn.recv(1)  # until the client goes

    handlers: list[threading.Thread] = []

    def serve() -> None:
        for delay in (1.5, 0.0):  # in the order the client connects
            conn, _ = listener.accept()
            handlers.append(threading.Thread(target=handle, args=(conn, delay), daemon=True))
            handlers[-1].start()

    acceptor = threading.Thread(target=serve, daemon=True)
    acceptor.start()
    yield path
    acceptor.join(timeout=10)
    for thread in handlers:
        thread.join(timeout=10)
    listener.close()


def memfd_copy(fd: int) -> int:
    from shadowd.memfd import sealed_copy
    from shadowd.source import SourceStat

    sealed = sealed_copy(fd, SourceStat.from_stat_result(os.fstat(fd)))
    try:
        return sealed.share()  # its own offset, at 0
    finally:
        sealed.release()


def test_a_late_reply_does_not_answer_the_next_open(
    c_client: str, slow_stand_in: Path, tmp_path: Path
) -> None:
    f = make_file(tmp_path / "f", b"prompt bytes")
    # No backoff: the second open tries the daemon again at once.
    done = run(c_client, "-q", "--backoff", "0", "-s", str(slow_stand_in), str(f), str(f))
    # The first open times out (250 ms) and its connection goes; the second,
    # on a new connection, gets its own reply, not the first one's late one.
    assert done.returncode == 1
    assert done.stderr.count(b"timed out") == 1, done.stderr
    assert b"answered another request" not in done.stderr
    assert done.stdout == b"prompt bytes", done.stderr


def test_a_daemon_that_does_not_accept_does_not_hold_connect(
    quick_c_client: str, tmp_path: Path
) -> None:
    path = tmp_path / "full.sock"
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(path))
    listener.listen(0)
    held = [socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET) for _ in range(2)]
    try:
        for s in held:  # fill the backlog
            s.setblocking(False)
            try:
                s.connect(str(path))
            except BlockingIOError:
                pass
        started = time.monotonic()
        # 5 s asked for; the ceiling compiled in (1 s) wins.
        done = run(quick_c_client, "-t", "5000", "-s", str(path), "/etc/hostname", timeout=20)
        assert time.monotonic() - started < 4.5
        assert done.returncode == 1
        assert b"connecting to shadowd at" in done.stderr or b"timed out" in done.stderr
    finally:
        for s in held:
            s.close()
        listener.close()


async def test_a_long_path_goes_without_its_label_under_a_small_max_request(
    c_client: str, start_daemon: Any, tmp_path: Path
) -> None:
    d = await start_daemon("--racy-window", "0.05", "--max-request", "512")
    f = deep_file(tmp_path, 600, b"deep bytes")
    with trio.fail_after(30):
        done = await trio.to_thread.run_sync(
            lambda: run(c_client, "-s", str(d.socket_path), str(f))
        )
    # With the label the request would pass 512 bytes, be refused and the
    # connection closed; without it the file is served.
    assert done.returncode == 0, done.stderr
    assert done.stdout == b"deep bytes"


# -- connecting early -----------------------------------------------------------


def test_connect_start_sends_the_hello_without_waiting(driver: Any, tmp_path: Path) -> None:
    """shadowd_connect_start returns before any answer; shadowd_connect_wait reads it."""
    silent = tmp_path / "silent.sock"
    with stand_in_daemon(silent, mute):
        d = driver()
        d("backoff", 0, 0)
        d("timeouts", 400, 100, 0)
        started = d("connect_start", silent)
        # A daemon that never answers: nothing waited for here...
        assert started["rc"] == 0 and started["protocol"] == 0, started
        assert started["us"] < 200_000, started
        # ...and the wait for its hello ends at the connect timeout, as
        # shadowd_connect's would.
        waited = d("connect_wait")
        assert waited["rc"] == -1 and waited["code"] == "unavailable", waited
        assert "no hello reply" in waited["error"], waited
        assert 0.3 <= (started["us"] + waited["us"]) / 1e6 < 5, (started, waited)
    gone = driver()
    r = gone("connect_start", tmp_path / "none.sock")
    assert r["rc"] == -1 and r["code"] == "unavailable" and "none.sock" in r["error"], r


def test_connect_start_asks_for_the_index_behind_the_hello(driver: Any, tmp_path: Path) -> None:
    """Both requests are sent before any answer: the index's comes while the caller forks."""
    path = tmp_path / "order.sock"
    seen: list[dict[str, Any]] = []

    def in_order(conn: socket.socket) -> None:
        conn.settimeout(5)
        seen.extend(msgpack.unpackb(conn.recv(4096)) for _ in range(2))  # before answering
        hello, index = seen
        reply = {"id": hello["id"], "ok": True, "version": 2, "server": "in-order", "limits": {}}
        conn.send(msgpack.packb(reply))
        refusal = {"id": index["id"], "ok": False, "code": "no-index", "message": "none here"}
        conn.send(msgpack.packb(refusal))
        while data := conn.recv(4096):  # and whatever comes after, until the client goes
            seen.append(msgpack.unpackb(data))

    with stand_in_daemon(path, in_order):
        d = driver()
        started = d("connect_start", path)
        waited = d("connect_wait")
        ready = d("indexready")
        d("close")
    assert started["rc"] == 0 and waited["rc"] == 0 and waited["protocol"] == 2, waited
    assert [m["op"] for m in seen] == ["hello", "index"], seen
    assert ready["ready"] == 0, ready  # refused: no index, and no second request for it


def test_connect_start_greets_a_daemon_of_version_1(driver: Any, tmp_path: Path) -> None:
    """A daemon of version 1 refuses the hello and closes, the index request behind it unread.

    Its refusal is still read (then the client greets it in 1, as
    shadowd_connect does), not lost to the reset the kernel reports to a
    peer that closes with a datagram unread.
    """
    hellos: list[int] = []
    sent = threading.Event()

    def v1(conn: socket.socket) -> None:
        hello = msgpack.unpackb(conn.recv(4096))
        hellos.append(hello["version"])
        if hello["version"] != 1:
            sent.wait(10)  # the index request is in our queue too
            refusal = {"id": hello["id"], "ok": False, "code": "unsupported-version",
                       "message": "this server speaks 1"}  # fmt: skip
            conn.send(msgpack.packb(refusal))
            return  # and closes the connection, as a daemon of version 1 does
        conn.send(msgpack.packb({"id": 0, "ok": True, "version": 1, "server": "v1", "limits": {}}))
        until_closed(conn)

    path = tmp_path / "v1-early.sock"
    with stand_in_daemon(path, v1):
        d = driver()
        d("log", "capture")
        # A hello timeout no loaded host reaches: the stand-in answers once this
        # test has the driver's answer, 250 ms (the default) can pass before
        # (full runs with two busy loops), and the refusal is what is tested.
        d("timeouts", 10_000, 10_000, -1)
        started = d("connect_start", path)
        sent.set()
        waited = d("connect_wait")
        counts = d("counts")
        log = d.finish()
    assert started["rc"] == 0, started
    assert waited["rc"] == 0 and waited["protocol"] == 1, (waited["code"], waited["error"])
    assert hellos == [2, 1]
    assert counts["protocol"] == 1
    assert "unavailable" not in log, log  # the breaker never opened


async def test_connect_start_then_wait_greets_a_real_daemon(
    driver: Any, daemon: Daemon, tmp_path: Path
) -> None:
    f, digest = big(tmp_path / "f")
    settle(f)
    d = driver()
    with trio.fail_after(30):
        started = await ask(d, "connect_start", daemon.socket_path)
        waited = await ask(d, "connect_wait")
        ready = await ask(d, "indexready")
        opened = await ask(d, "openfd", f)
        await ask(d, "close")
    assert started["rc"] == 0 and waited["rc"] == 0 and waited["protocol"] == 2, waited
    assert ready["ready"] == 1, ready  # the index asked for with the hello, held
    assert opened["hash"] == digest


@pytest.mark.parametrize("how", ["fork", "_fork"])
async def test_a_forked_child_opens_on_a_connection_of_its_own(
    driver: Any, daemon: Daemon, tmp_path: Path, how: str
) -> None:
    """A child given the parent's struct talks to the daemon on its own connection.

    With _Fork() no atfork handler runs: the client tells a child from its
    parent by what the kernel does at every fork. And the parent, who has not
    forked, keeps its connection through 50 opens and after its child's.
    """
    f, digest = big(tmp_path / "f")
    settle(f)
    d = driver()
    with trio.fail_after(60):
        assert (await ask(d, "connect", daemon.socket_path))["rc"] == 0
        assert (await ask(d, "open", f))["hash"] == digest
        before = stats(daemon)["clients_total"]
        for _ in range(50):
            assert (await ask(d, "open", f))["hash"] == digest
        assert stats(daemon)["clients_total"] == before + 1  # only our stats call's
        got = await ask(d, "forkopen", f, how)
        await ask(d, "close")
    assert got["child_status"] == 0 and got["child_ok"] == 1, got
    assert got["child_hash"] == digest and got["child_hit"] == 1, got
    assert got["hash"] == digest, got  # the parent's connection still answers it
    # Ours (2 stats calls) and the child's own: the parent made no new one.
    assert stats(daemon)["clients_total"] == before + 1 + 1 + 1


@requires_root
@pytest.mark.skipif(shutil.which("unshare") is None, reason="no unshare(1) here")
@pytest.mark.parametrize("how", ["copy", "ask"])
async def test_a_child_given_its_parents_pid_in_a_new_pid_namespace_gets_its_own_file(
    driver_bin: str, daemon: Daemon, tmp_path: Path, how: str
) -> None:
    """A child made with clone(CLONE_NEWPID) is pid 1 in its namespace: the pid
    its parent has when that parent is the init of its own (a container's
    entry point, `unshare -pf`, bwrap's `--as-pid-1`). Such a child is still a
    child: it copies through its own /proc/self/fd and asks the daemon on its
    own connection, and is served exactly the file it opened.

    Review 19: the client told a child from its parent by getpid() alone, so
    this child took itself for its parent: "copy" reopened its memfd's number
    through the parent's /proc/PID/fd (the parent's file at that number, not
    sealed, not a copy); "ask" sent its request on the parent's connection
    with the parent's next id and took the reply to the parent's request (a
    sealed memfd of another file)."""
    f, digest = big(tmp_path / "f")
    decoy, decoy_digest = big(tmp_path / "decoy")
    settle(f, decoy)
    argv = ["unshare", "--pid", "--fork", "--kill-child", driver_bin]
    with Driver(driver_bin, tmp_path / "driver.err", argv=argv) as d, trio.fail_after(60):
        assert (await ask(d, "connect", daemon.socket_path))["rc"] == 0
        # Both cached, and this process's /proc/self/fd opened (a local copy).
        for path in (f, decoy):
            assert (await ask(d, "requestfd", path))["fd"] >= 0
        assert (await ask(d, "copy", f))["hash"] == digest
        got = await ask(d, "nsfork", how, f, decoy)
    assert got["pid"] == 1 and got["child_pid"] == 1, got  # the same pid, in two namespaces
    assert got["child_status"] == 0 and got["child_ok"] == 1, got
    assert got["child_hash"] != decoy_digest, "the child was served its parent's other file"
    assert got["child_hash"] == digest, got


def fill_backlog(path: Path) -> list[socket.socket]:
    """Connections queued on the listener at *path* until its backlog is full."""
    queued: list[socket.socket] = []
    while True:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
        s.setblocking(False)
        try:
            s.connect(str(path))
        except BlockingIOError:  # EAGAIN: AF_UNIX says "full" at once, never EINPROGRESS
            s.close()
            return queued
        queued.append(s)


class FullListener:
    """A listener at *path* that accepts nothing yet, its backlog filled with
    connections of ours: a client's connect fails with EAGAIN at once (unix(7))."""

    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.sock.bind(str(path))
        self.sock.listen(0)
        self.queued = fill_backlog(path)
        if not self.queued:
            self.close()
            raise AssertionError("the listener took no connection at all")

    def make_room(self) -> None:
        """Accept ours and close them: the next connection taken is the client's."""
        self.sock.settimeout(10)
        for conn in [self.sock.accept()[0] for _ in self.queued]:
            conn.close()

    def close(self) -> None:
        for s in self.queued:
            s.close()
        self.sock.close()

    def __enter__(self) -> FullListener:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def test_a_routed_open_copies_while_the_backlog_is_full_and_keeps_the_breaker_shut(
    driver: Any, tmp_path: Path
) -> None:
    """The routed open's first connect finds the daemon's backlog full: this open is
    copied here without asking, the breaker stays shut, and once there is room the
    next routed open connects and greets the daemon."""
    path = tmp_path / "busy.sock"
    f, digest = big(tmp_path / "f")
    settle(f)
    seen: list[dict[str, Any]] = []

    def serve() -> None:
        try:
            listener.make_room()
            conn, _ = listener.sock.accept()
            with conn:
                conn.settimeout(10)
                for msg, fds in _requests(conn):
                    close_fds(fds)
                    seen.append(msg)
                    if msg["op"] == "hello":
                        reply = {"id": msg["id"], "ok": True, "version": 2, "limits": {}}
                    else:  # the index, opens: refused, so they are copied here
                        reply = {"id": msg["id"], "ok": False, "code": "busy", "message": "no"}
                    conn.send(msgpack.packb(reply))
        except OSError:
            pass  # no client came: the assertions below say what went wrong

    listener = FullListener(path)
    server = threading.Thread(target=serve, daemon=True)
    try:
        d = driver()
        d("log", "capture")
        d("backoff", 60_000, 60_000)  # an opened breaker would stay open
        d("socket", path)
        d("routing", 0, 0)  # nothing copied here by the rules: the daemon is asked
        busy = d("routed", f)
        counts = d("counts")
        server.start()
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            again = d("routed", f)
            assert again["hash"] == digest, again
            time.sleep(0.02)
        log = d.finish()
    finally:
        server.join(timeout=10)
        listener.close()
    assert busy["hash"] == digest and busy["route"] == "copy", busy
    assert busy["copied_why"] == "failed" and "backlog is full" in busy["error"], busy
    assert counts["available"] == 1 and counts["fast"] == 0, counts
    assert seen and seen[0]["op"] == "hello", seen  # connected once there was room
    assert "unavailable" not in log, log  # the breaker never opened


def test_pipelined_calls_meet_a_full_backlog_as_busy_and_keep_the_breaker_shut(
    driver: Any, tmp_path: Path
) -> None:
    """shadowd_submit_open refuses as busy (EAGAIN) and shadowd_submit_routed copies
    here at once while the daemon's backlog is full; neither opens the breaker."""
    path = tmp_path / "busy.sock"
    f, digest = big(tmp_path / "f")
    settle(f)
    with FullListener(path):
        d = driver()
        d("log", "capture")
        d("backoff", 60_000, 60_000)  # an opened breaker would stay open
        d("socket", path)
        d("routing", 0, 0)  # nothing copied here by the rules: the daemon is asked
        plain = d("submit", f, 1)
        routed = d("rsubmit", f, 2)
        counts = d("counts")
        log = d.finish()
    assert plain["id"] == -1 and plain["code"] == "busy" and plain["errnum"] == errno.EAGAIN
    assert "backlog is full" in plain["error"], plain
    assert routed["id"] == 0 and routed["now_hash"] == digest, routed  # copied here now
    assert counts["available"] == 1 and counts["fast"] == 0, counts
    assert "unavailable" not in log, log  # the breaker never opened


def test_connect_start_leaves_a_full_backlog_to_connect_wait(driver: Any, tmp_path: Path) -> None:
    """A daemon whose backlog is full is busy, not down: connect_wait connects once there is room.

    connect_start still returns at once, sends nothing and keeps the breaker
    shut; connect_wait's connect waits until the listener accepts (room is
    made only after it began), then sends the hello with the index request
    behind it, as connect_start would have.
    """
    path = tmp_path / "busy.sock"
    seen: list[dict[str, Any]] = []
    room = threading.Event()
    waiting: list[bool] = []
    # connect(2): 42 on x86-64, 203 on arm64 (the machines this runs on).
    connect = {"x86_64": "42", "aarch64": "203"}.get(os.uname().machine)

    def serve() -> None:
        room.wait(10)  # the driver is in connect_wait by then, or about to be
        # Room is made once the driver waits in its connect (the kernel says so).
        syscall = Path(f"/proc/{d.proc.pid}/syscall")
        deadline = time.monotonic() + 10
        while connect is not None and syscall.read_text().split()[0] != connect:
            if time.monotonic() > deadline:
                return  # (the assertions below say so)
            time.sleep(0.001)
        waiting.append(True)
        try:
            listener.make_room()
            conn, _ = listener.sock.accept()
            with conn:
                conn.settimeout(10)
                seen.extend(msgpack.unpackb(conn.recv(4096)) for _ in range(2))
                hello, index = seen
                greeting = {"id": hello["id"], "ok": True, "version": 2, "limits": {}}
                conn.send(msgpack.packb(greeting))
                refusal = {"id": index["id"], "ok": False, "code": "no-index", "message": "none"}
                conn.send(msgpack.packb(refusal))
                until_closed(conn)
        except OSError:
            pass  # no client came (or it went): the assertions below say what went wrong

    listener = FullListener(path)
    server = threading.Thread(target=serve, daemon=True)
    try:
        d = driver()
        d("log", "capture")
        d("backoff", 60_000, 60_000)  # an opened breaker would stay open
        d("timeouts", 10_000, 10_000, 0)  # room is made well within the connect timeout
        started = d("connect_start", path)
        before = d("counts")
        server.start()
        room.set()
        waited = d("connect_wait")
        ready = d("indexready")
        after = d("counts")
        log = d.finish()
    finally:
        room.set()
        server.join(15)
        listener.close()
    assert started["rc"] == 0 and started["code"] == "" and started["error"] == "", started
    assert before["available"] == 1 and before["fast"] == 0, before
    assert waiting == [True], "the driver never waited in connect(2)"
    assert waited["rc"] == 0 and waited["protocol"] == 2, (waited["code"], waited["error"])
    assert [m["op"] for m in seen] == ["hello", "index"], seen
    assert ready["ready"] == 0, ready  # refused on that connection: not asked again
    assert after["available"] == 1 and after["fast"] == 0 and after["protocol"] == 2, after
    assert "unavailable" not in log, log  # the breaker never opened


async def test_connect_start_waits_out_a_stopped_daemons_full_backlog(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """A real daemon stopped with its backlog full: connected, greeted and indexed once it runs."""
    # Its backlog (SOMAXCONN) holds thousands: the daemon accepts them all
    # before the client's, faster than it sees them closed, and would count
    # them against its per-uid limit (1024) and turn the client away.
    many = ("--max-clients", "16384", "--max-clients-per-uid", "16384")
    daemon = await start_daemon("--racy-window", "0.05", *many)
    f, digest = big(tmp_path / "f")
    settle(f)
    d = driver()
    queued: list[socket.socket] = []
    with trio.fail_after(60):
        await ask(d, "log", "capture")
        await ask(d, "timeouts", 20_000, 20_000, 0)  # the daemon accepts thousands first
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            queued = fill_backlog(daemon.socket_path)
            started = await ask(d, "connect_start", daemon.socket_path)
        finally:
            for s in queued:
                s.close()  # (the daemon accepts them, and sees them gone)
            os.kill(daemon.pid, signal.SIGCONT)
        waited = await ask(d, "connect_wait")
        ready = await ask(d, "indexready")
        opened = await ask(d, "openfd", f)
        counts = await ask(d, "counts")
        log = await trio.to_thread.run_sync(d.finish)
    assert len(queued) > 0
    assert started["rc"] == 0 and started["error"] == "", started
    assert waited["rc"] == 0 and waited["protocol"] == 2, (waited["code"], waited["error"])
    assert ready["ready"] == 1, ready
    assert opened["hash"] == digest
    assert counts["fast"] == 0 and counts["available"] == 1, counts
    assert "unavailable" not in log, log


# -- timeouts and the breaker ------------------------------------------------


def test_timeouts_are_set_at_run_time(driver: Any, tmp_path: Path) -> None:
    f, _ = big(tmp_path / "f")
    five_mib, _ = big(tmp_path / "five", 5 << 20)
    silent, greeting = tmp_path / "silent.sock", tmp_path / "greets.sock"
    with stand_in_daemon(silent, mute), stand_in_daemon(greeting, greets_only):
        d = driver()
        d("backoff", 0, 0)  # every call tries the daemon: each waits its timeout
        waits = {}
        for connect_ms in (100, 600):
            d("timeouts", connect_ms, 100, 0)
            r = d("connect", silent)
            assert r["rc"] == -1 and r["code"] == "unavailable", r
            assert "no hello reply" in r["error"] and "timed out" in r["error"]
            waits[connect_ms] = r["us"] / 1000
        d("socket", greeting)
        for reply_ms in (150, 500):
            d("timeouts", 1000, reply_ms, 0)
            r = d("openfd", f)
            assert r["fd"] == -1 and r["code"] == "unavailable", r
            assert "timed out" in r["error"]
            waits[reply_ms] = r["us"] / 1000
        # A reply may wait longer for a larger file: 100 ms + 100 ms per MiB.
        d("timeouts", 1000, 100, 100)
        waits[5] = d("openfd", five_mib)["us"] / 1000
    for asked in (100, 600, 150, 500):
        assert asked <= waits[asked] < asked + 700, waits
    assert 600 <= waits[5] < 1300, waits


async def test_the_breaker_fails_fast_tries_again_after_its_window_and_logs_twice(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    async def body() -> None:
        d_ = await start_daemon("--racy-window", "0.05")
        f, digest = big(tmp_path / "f")
        settle(f)
        d = driver()
        # Without the index (its own tests below): a stopped daemon's index still serves.
        for cmd in ("socket", d_.socket_path), ("routing", 0, 50), ("held", 0, 0), (
            "timeouts", 150, 150, 0), ("backoff", 400, 1600), ("log", "capture"), (
            "index", 0, 0):  # fmt: skip
            await ask(d, *cmd)
        await ask(d, "openfd", f)  # cached: the routed opens below are hits
        assert (await ask(d, "routed", f))["route"] == "daemon"
        os.kill(d_.pid, signal.SIGSTOP)
        try:
            first = await ask(d, "routed", f)  # waits for the reply, then copies
            fast = [await ask(d, "routed", f) for _ in range(3)]
            plain = await ask(d, "open", f)
            counts = await ask(d, "counts")
            await trio.sleep(0.45)  # the first window (400 ms) is over
            probe = await ask(d, "routed", f)  # tries the daemon: one hello timeout
            after_probe = await ask(d, "routed", f)  # the next window: 800 ms
        finally:
            os.kill(d_.pid, signal.SIGCONT)
        await trio.sleep(0.85)
        back = await ask(d, "routed", f)
        log = await trio.to_thread.run_sync(d.finish)

        for r in (first, *fast, probe, after_probe):
            assert r["route"] == "copy" and r["hash"] == digest and r["seals"] & ALL_SEALS == 15
        assert first["us"] >= 150_000 and probe["us"] >= 150_000
        for r in (*fast, after_probe):
            assert r["us"] < 50_000, r  # no waiting while the breaker is open
        assert plain["fd"] == -1 and plain["code"] == "unavailable" and plain["us"] < 50_000
        assert counts["fast"] >= 4 and counts["available"] == 0
        assert back["route"] == "daemon" and back["hash"] == digest
        lines = [ln for ln in log.splitlines() if ln.startswith("LOG ")]
        assert len(lines) == 2, log
        assert "unavailable" in lines[0] and "timed out" in lines[0]
        assert lines[1].startswith(f"LOG daemon at {d_.socket_path} is back")

    with trio.fail_after(60):
        await body()


def test_a_pipelined_open_asked_before_the_window_that_times_out_after_it_opens_nothing_more(
    driver: Any, tmp_path: Path
) -> None:
    """A failure counts against the window its request was asked in. A pipelined open
    is submitted and never answered (its deadline: the 4 s reply timeout); a routed
    open after it is answered 0.5 s late, slow (10% of the timeout, one in a row), so
    the breaker opens for its first window (300 ms), the connection kept. The pipelined
    open times out long after that window ended: asked before it, the same outage,
    it opens nothing more (the breaker available again, this window still 300 ms).
    Before, it went by when the timeout came, as a retry that failed after the window:
    the breaker opened again for 600 ms."""
    f, _ = big(tmp_path / "pending")
    g, digest = big(tmp_path / "slow")
    settle(f, g)

    def late(conn: socket.socket) -> None:
        _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
        for msg, fds in _requests(conn):
            try:
                if msg["op"] != "open":
                    _answer(conn, msg, ok=False, code="no-index", message="none")
                elif Path(os.readlink(f"/proc/self/fd/{fds[0]}")).name == "slow":
                    time.sleep(0.5)
                    said = {"hit": True, "version": _stat_version(fds[0]), "cached": True}
                    _served(conn, msg, fds[0], said)
                # (the pending one: read, never answered)
            finally:
                close_fds(fds)

    path = tmp_path / "late.sock"
    with stand_in_daemon(path, late):
        d = driver()
        for cmd in (("socket", path), ("routing", 0, 0), ("held", 0, 0), ("index", 0, 0),
                    ("cold", 0, 0), ("timeouts", 1000, 4000, 0), ("backoff", 300, 30000),
                    ("slow", 10, 1), ("log", "capture")):  # fmt: skip
            d(*cmd)
        submitted = d("submit", f, 1)
        slow = d("routed", g)
        opened = d("counts")
        collected = d("collect", 1, 10000)
        after = d("counts")
        log = d.finish()
    print(f"window {opened['backoff_ms']} ms; after the timeout: {after['backoff_ms']} ms, "
          f"available {after['available']}")  # fmt: skip
    assert submitted["id"] > 0 and (slow["route"], slow["hash"]) == ("daemon", digest), slow
    assert opened["slow"] == 1 and opened["backoff_ms"] == 300, opened  # (the breaker opened)
    (result,) = collected["results"]
    assert result["fd"] == -1 and result["code"] == "unavailable", result
    assert "timed out" in result["error"], result
    assert after["available"] == 1 and after["backoff_ms"] == 300, after
    lines = [ln for ln in log.splitlines() if ln.startswith("LOG ")]
    assert len(lines) == 1 and "answered 1 requests in a row" in lines[0], log


def test_a_daemon_that_answers_each_open_just_in_time_opens_the_breaker(
    driver: Any, tmp_path: Path
) -> None:
    """The latency breaker (shadowd_set_slow; the Python Opener's SLOW_FRACTION and
    SLOW_IN_A_ROW): a stand-in answers the hello and most opens 0.55 s late under a
    reply timeout of 1 s, every answer in time. Three slow answers in a row open the
    breaker for its window (the opens then are copied here at once); one in time
    between them ends the streak; the slow hello is not timed (only the wait for the
    request's own answer is); after the window an answer in time closes it ("is
    back"). Before: every open asked, each waiting 0.55 s, and nothing opened."""
    f, digest = big(tmp_path / "lib.so")
    settle(f)
    slow = 0.55
    # The hello, then the opens in the order asked: slow, slow, in time, slow x 3
    # (the breaker opens), and in time from then on.
    delays = [slow, slow, 0.0, slow, slow, slow]
    asked: list[float] = []

    def late(conn: socket.socket) -> None:
        time.sleep(slow)
        _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
        for msg, fds in _requests(conn):
            try:
                if msg["op"] != "open":
                    _answer(conn, msg, ok=False, code="no-index", message="none")
                    continue
                delay = delays[len(asked)] if len(asked) < len(delays) else 0.0
                asked.append(delay)
                time.sleep(delay)
                version = _stat_version(fds[0])
                _served(conn, msg, fds[0], {"hit": True, "version": version, "cached": True})
            finally:
                close_fds(fds)

    path = tmp_path / "late.sock"
    with stand_in_daemon(path, late):
        d = driver()
        for cmd in ("socket", path), ("routing", 0, 0), ("held", 0, 0), ("index", 0, 0), (
                "cold", 0, 0), ("timeouts", 1000, 1000, 0), ("backoff", 1000, 1000), (
                "log", "capture"):  # fmt: skip
            d(*cmd)
        opens = [d("routed", f) for _ in range(8)]
        counts = d("counts")
        time.sleep(1.1)  # the window (1 s) is over
        back = d("routed", f)
        log = d.finish()
    assert all(r["hash"] == digest for r in (*opens, back)), opens
    lines = [ln for ln in log.splitlines() if ln.startswith("LOG ")]
    if any("timed out" in ln for ln in lines):
        # A loaded machine made an answer later than the timeout: the breaker opened
        # at that failure, no later than the rule would have.
        assert len(asked) <= len(delays) + 1, asked
        return
    # Six asked (the sixth the third slow in a row), two copied by the breaker, then
    # the window's end: asked again, answered in time.
    assert len(asked) == 7, (asked, opens)
    assert [r["route"] for r in opens] == ["daemon"] * 6 + ["copy"] * 2, opens
    assert [r["copied_why"] for r in opens[6:]] == ["breaker", "breaker"], opens
    assert counts["slow"] == 5 and counts["fast"] == 2 and counts["available"] == 0, counts
    assert back["route"] == "daemon", back
    assert len(lines) == 2, log
    assert "answered 3 requests in a row in 50% of the reply timeout (1000 ms)" in lines[0]
    assert lines[1].startswith(f"LOG daemon at {path} is back"), lines


async def test_after_a_dropped_connection_routed_opens_keep_the_daemons_last_limits(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """A reply too late drops the connection (the breaker opens for its window). After
    the window the routed open connects without waiting for the hello, and until that
    hello answers it routes by what the last one said, not by nothing: a file above the
    daemon's --max-file-size is copied here without asking (before: the new connection
    zeroed the limits, and the file was asked for and refused file-too-large)."""

    def refused() -> int:
        return int(stats(d_)["refused_by_code"].get("file-too-large", 0))

    d_ = await start_daemon("--racy-window", "0.05", "--max-file-size", "100000")
    small, _ = big(tmp_path / "small", 50_000)
    large, digest = big(tmp_path / "large", 150_000)
    settle(small, large)
    d = driver()
    for cmd in ("socket", d_.socket_path), ("routing", 0, -1), ("held", 0, 0), (
        "timeouts", 1000, 150, 0), ("backoff", 50, 50), ("log", "quiet"), (
        "index", 0, 0):  # fmt: skip
        await ask(d, *cmd)
    with trio.fail_after(60):
        # The hello answered (and small cached): until then the limits are not
        # known, and a file younger than the default window is copied by rule.
        await until_route(d, small, "daemon")
        unasked = await ask(d, "routed", large)
        assert (unasked["route"], unasked["copied_why"]) == ("copy", "rule")
        os.kill(d_.pid, signal.SIGSTOP)
        try:
            late = await ask(d, "routed", small)  # no answer in time: dropped, breaker
        finally:
            os.kill(d_.pid, signal.SIGCONT)
        await trio.sleep(0.1)  # past the breaker's window
        before = await trio.to_thread.run_sync(refused)
        got = await ask(d, "routed", large)
        counts = await ask(d, "counts")
        after = await trio.to_thread.run_sync(refused)
    assert (late["route"], late["copied_why"]) == ("copy", "failed"), late
    assert (got["route"], got["copied_why"], got["hash"]) == ("copy", "rule", digest), got
    assert after == before, "asked the daemon for a file its last hello said it refuses"
    assert counts["max_file_size"] == 100000 and counts["racy_window_ns"] == 50_000_000


async def test_a_reply_whose_descriptor_finds_no_number_here_is_the_callers_emfile(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """At the process's fd limit the kernel drops the descriptor a reply carries
    (MSG_CTRUNC). That is the caller's own EMFILE, not a bad daemon: the call fails with
    errno EMFILE and no code, the connection stays in step (no breaker, no new
    connection, no log line), the routed open copies here when a copy finds the numbers
    it needs and fails with EMFILE when not, and the descriptors of a batch reply that
    did come are closed. Before, the reply was 'bad', the connection dropped and the
    breaker opened: the next opens were copies."""
    d_ = await start_daemon("--racy-window", "0.05")
    files = [big(tmp_path / f"lib{i}", 200_000 + i) for i in range(3)]
    settle(*(f for f, _ in files))
    (a, digest), (b, _), (c, _) = files
    d = driver()
    for cmd in ("socket", d_.socket_path), ("routing", 0, -1), ("held", 0, 0), (
        "timeouts", 1000, 1000, 0), ("log", "capture"), ("index", 0, 0):  # fmt: skip
        await ask(d, *cmd)
    with trio.fail_after(60):
        for f, _ in files:  # cached: every open below is a hit with a descriptor
            assert (await ask(d, "requestfd", f))["fd"] >= 0
        await ask(d, "copy", a)  # (the client's own /proc/self/fd handle, opened once)
        base = (await ask(d, "fds"))["fds"]
        clients = (await trio.to_thread.run_sync(stats, d_))["clients_total"]
        assert (await ask(d, "fdlimit", 1))["limited"] == 1  # the source takes the last
        asked = await ask(d, "requestfd", a)
        routed = await ask(d, "routed", a)  # the copy needs numbers too: EMFILE
        await ask(d, "fdlimit", "off")
        assert (await ask(d, "fdlimit", 5))["limited"] == 1  # 3 sources, 2 descriptors
        batch = await ask(d, "rbatch", a, b, c)
        await ask(d, "fdlimit", "off")
        after = await ask(d, "fds")
        again = await ask(d, "requestfd", a)
        counts = await ask(d, "counts")
        clients_after = (await trio.to_thread.run_sync(stats, d_))["clients_total"]
        log = await trio.to_thread.run_sync(d.finish)
    for r in (asked, routed):
        assert (r["fd"], r["errnum"], r["code"]) == (-1, errno.EMFILE, ""), r
    assert "MSG_CTRUNC" in asked["error"], asked
    # The batch: its reply's two descriptors closed, the three copied here while
    # numbers last (a copy needs two at once), then EMFILE.
    items = batch["items"]
    assert (items[0]["route"], items[0]["copied_why"], items[0]["hash"]) == (
        "copy", "failed", digest)  # fmt: skip
    assert [(i["fd"], i["errnum"], i["code"]) for i in items[1:]] == [
        (-1, errno.EMFILE, "")] * 2, items  # fmt: skip
    assert after["fds"] == base, "descriptors of the replies left open"
    # The same connection, and the daemon still asked: no breaker, no log line.
    assert (again["route"], again["hit"], again["hash"]) == ("daemon", True, digest), again
    assert counts["available"] == 1 and counts["fast"] == 0, counts
    assert clients_after == clients + 1, "a new connection (only the stats' own is new)"
    assert "LOG" not in log, log


async def test_an_index_answer_whose_descriptor_finds_no_number_here_is_asked_again(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """At the process's fd limit the kernel drops the index's descriptor from the
    daemon's answer (MSG_CTRUNC): the client holds no index then, and asks for it again
    at the next call, on the same connection, without a breaker or a log line: once
    numbers are free again, the next index open gets the index and hits."""
    d_ = await start_daemon("--racy-window", "0.05")
    f, digest = big(tmp_path / "lib.so")
    settle(f)
    d = driver()
    for cmd in ("socket", d_.socket_path), ("timeouts", 2000, 2000, 0), ("log", "capture"):
        await ask(d, *cmd)
    with trio.fail_after(60):
        await trio.to_thread.run_sync(cache_them, d_, [f])
        clients = (await trio.to_thread.run_sync(stats, d_))["clients_total"]
        # One number left: the connection's socket takes it, and the index's
        # descriptor, in the answer to the request behind the hello, finds none.
        assert (await ask(d, "fdlimit", 1))["limited"] == 1
        starved = await ask(d, "indexready")
        await ask(d, "fdlimit", "off")
        hit = await ask(d, "indexopen", f)  # the next call asks again, and hits
        again = await ask(d, "indexready")
        counts = await ask(d, "counts")
        clients_after = (await trio.to_thread.run_sync(stats, d_))["clients_total"]
        log = await trio.to_thread.run_sync(d.finish)
    assert starved["ready"] == 0 and again["ready"] == 1, (starved, again)
    assert hit["served"] == 1 and hit["hash"] == digest, hit
    assert counts["index"] == 1 and counts["available"] == 1, counts
    assert clients_after == clients + 2, "one connection of the driver's, one of the stats'"
    assert "LOG" not in log, log


def cache_them(daemon: Daemon, files: list[Path]) -> None:
    """Open *files* through *daemon* once each: cached (a miss waits for the copy)."""
    from shadowd_client import Client

    with Client(daemon.socket_path, timeout=10) as c:
        for f in files:
            os.close(c.open(f))


async def test_a_stopped_daemon_costs_five_fresh_processes_less_than_3_s(
    c_client: str, start_daemon: Any, tmp_path: Path
) -> None:
    async def body() -> None:
        d = await start_daemon("--racy-window", "0.05")
        files = [big(tmp_path / "one", 300_000)[0], big(tmp_path / "two", 500_000)[0]]
        files.append(make_file(tmp_path / "small", b"a small file"))
        settle(*files)
        expected = b"".join(p.read_bytes() for p in files)
        args = ["-r", "--young", "50", "-s", str(d.socket_path), *map(str, files)]
        # Cached first, so that a working daemon would have served them all.
        assert (await trio.to_thread.run_sync(lambda: run(c_client, *args))).stdout == expected
        os.kill(d.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            runs = [await trio.to_thread.run_sync(lambda: run(c_client, *args)) for _ in range(5)]
            took = time.monotonic() - started
        finally:
            os.kill(d.pid, signal.SIGCONT)
        for done in runs:
            assert done.returncode == 0, done.stderr
            assert done.stdout == expected
            assert done.stderr.count(b"unavailable") == 1  # one log line per process
        assert took < 3.0

    with trio.fail_after(60):
        await body()


async def test_a_daemon_killed_and_restarted_in_a_loop_of_opens(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    first = await start_daemon("--racy-window", "0.05", socket_name="k.sock")
    files = [big(tmp_path / f"f{i}") for i in range(3)]
    settle(*(f for f, _ in files))
    d = driver()
    # No cold window: the restarted daemon's three misses would start one. The
    # socket path: the index across a restart has its own test.
    for cmd in ("socket", first.socket_path), ("routing", 0, 50), ("held", 0, 0), (
        "backoff", 100, 400), ("cold", 0, 0), ("log", "capture"), ("index", 0, 0):  # fmt: skip
        await ask(d, *cmd)
    for f, _ in files:  # cached, so the first routed opens are hits
        await ask(d, "openfd", f)
    routes = []
    with trio.fail_after(60):
        for i in range(60):
            if i == 10:
                first.kill()
            if i == 20:
                second = await start_daemon("--racy-window", "0.05", socket_name="k.sock")
            f, digest = files[i % 3]
            r = await ask(d, "routed", f)
            assert r["fd"] >= 0 and r["hash"] == digest, r
            routes.append(r["route"])
            await trio.sleep(0.02)
        log = await trio.to_thread.run_sync(d.finish)
    assert set(routes[:10]) == {"daemon"}
    assert set(routes[10:20]) == {"copy"}
    # Back on the daemon within a backoff window or two, and for good.
    assert "daemon" in routes[20:40] and set(routes[40:]) == {"daemon"}, routes
    s = await trio.to_thread.run_sync(stats, second)
    assert s["hits"] + s["misses"] >= 20
    lines = [ln for ln in log.splitlines() if ln.startswith("LOG ")]
    assert len(lines) == 2 and "is back" in lines[1], log


def test_a_zero_filled_struct_is_safe(driver: Any, tmp_path: Path) -> None:
    f, digest = big(tmp_path / "f")
    nobody_there = driver(env={"SHADOWD_SOCKET": str(tmp_path / "none.sock")})
    r = nobody_there("zero")
    assert r["stdin_open"] and r["stdin_still_open"] and r["pollfd"] == -1
    r = nobody_there("zero", f)  # fails cleanly: nothing to connect to
    assert r["fd"] == -1 and r["code"] == "unavailable" and "none.sock" in r["error"]
    assert r["stdin_still_open"]
    r = nobody_there("zero", "routed", f)  # never fails because of the daemon
    assert r["hash"] == digest and r["stdin_still_open"]


async def test_shadowd_init_on_memory_of_unknown_contents_works_as_zero_filled(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    # shadowd_init zeroes all but the buffers and the arrays read only below
    # a count (the tier's entries, unreported hits, told files): with every
    # other byte 0xA5, each of those paths must still work and leak nothing.
    daemon = await start_daemon("--racy-window", "0.05")
    libs = [big(tmp_path / f"lib{i}.so") for i in range(3)]
    conf = make_file(tmp_path / "small.conf", b"x" * 3000)
    settle(conf, *(f for f, _ in libs))
    d = driver()
    with trio.fail_after(30):
        base = (await ask(d, "fds"))["fds"]
        await ask(d, "scribble")
        for cmd in ("socket", daemon.socket_path), ("cold", 1, 300):
            await ask(d, *cmd)
        ready = await ask(d, "indexready")
        cold = [await ask(d, "routed", f) for f in (libs[0][0], conf, libs[1][0])]
        await ask(d, "close")  # the files copied in the cold window, told
        while (await trio.to_thread.run_sync(stats, daemon))["entries"] < 3:
            await trio.sleep(0.02)
        await trio.sleep(0.35)  # past the cold window
        again = await ask(d, "indexready")  # (a new connection's)
        indexed = [await ask(d, "routed", f) for f in (libs[0][0], conf, libs[1][0])]
        counts = await ask(d, "counts")
        # The index hits, reported at close (its last answer not waited for:
        # asked until the daemon has read it; a count past it fails).
        await ask(d, "close")
        closed = await counted_once(daemon, "index_hits", 3)
        await ask(d, "index", 0, 0)  # the tier: the daemon's hit kept, then reopened
        held = await until_route(d, libs[2][0], "held")
        await ask(d, "close")
        after = (await ask(d, "fds"))["fds"]
    assert ready["ready"] == 1 and again["ready"] == 1
    digests = [libs[0][1], fnv(b"x" * 3000), libs[1][1]]
    assert [r["hash"] for r in cold] == digests and [r["hash"] for r in indexed] == digests
    assert [r["route"] for r in cold] == ["copy"] * 3
    assert [r["route"] for r in indexed] == ["index"] * 3
    assert counts["index"] == 3 and closed["index_hits"] == 3
    assert held[-1]["hash"] == libs[2][1] and "daemon" in [r["route"] for r in held]
    assert after == base


async def test_a_zero_filled_struct_connects_by_the_socket_rule(
    driver: Any, daemon: Daemon, tmp_path: Path
) -> None:
    f, digest = big(tmp_path / "f")
    d = driver(env={"SHADOWD_SOCKET": str(daemon.socket_path)})
    with trio.fail_after(30):
        r = await ask(d, "zero", f)
    assert r["hash"] == digest and r["socket_path"] == str(daemon.socket_path)
    assert r["stdin_still_open"] and r["seals"] & ALL_SEALS == ALL_SEALS


# -- batches ------------------------------------------------------------------


async def test_a_batch_respects_max_batch_and_says_why_per_item(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    # With more fds in one request than --max-batch, the daemon would refuse it.
    dm = await start_daemon("--racy-window", "0.05", "--max-batch", "2")
    files = [big(tmp_path / f"f{i}", 150_000 + i) for i in range(4)]
    small = make_file(tmp_path / "small", b"tiny")
    settle(small, *(f for f, _ in files))
    paths = [files[0][0], files[1][0], "/dev/null", files[2][0], tmp_path / "missing",
             small, files[3][0]]  # fmt: skip
    d = driver()
    await ask(d, "socket", dm.socket_path)
    await ask(d, "routing", -1, 50)  # the default crossover; young: the daemon's window
    await ask(d, "index", 0, 0)  # the daemon's answers and the tier (the index: below)
    with trio.fail_after(30):
        r = await ask(d, "batch", *paths)
        counts = await ask(d, "counts")
        again = await ask(d, "rbatch", *paths)
    assert counts["max_batch"] == 2
    assert r["served"] == 5
    items = r["items"]
    for i, (_, digest) in zip((0, 1, 3, 6), files, strict=True):
        assert items[i]["hash"] == digest and items[i]["route"] == "daemon"
        assert items[i]["seals"] & ALL_SEALS == ALL_SEALS
    assert items[5]["hash"] == fnv(b"tiny")
    assert items[2]["fd"] == -1 and items[2]["code"] == "not-regular"
    assert items[4]["fd"] == -1 and items[4]["errnum"] == 9  # EBADF: it could not be opened
    s = await trio.to_thread.run_sync(stats, dm)
    assert s["misses"] == 5
    # Routed: the small file copied here, the others hits (kept in the tier).
    items = again["items"]
    assert again["served"] == 5
    assert [items[i]["route"] for i in (0, 1, 3, 5, 6)] == ["daemon"] * 3 + ["copy", "daemon"]
    assert all(items[i]["hit"] for i in (0, 1, 3, 6))
    assert items[2]["code"] == "not-regular"
    third = await ask(d, "rbatch", *paths)
    assert [third["items"][i]["route"] for i in (0, 1, 3, 6)] == ["held"] * 4


# -- private files ----------------------------------------------------------------


def private(ns: str, data: bytes, ino: int = 131074) -> list[object]:
    return ["private", ns, ino, len(data), OLD_NS, OLD_NS, 0, data.decode()]


async def test_private_files_are_shared_by_one_uid(driver: Any, daemon: Daemon) -> None:
    with trio.fail_after(30):
        one, two = driver(), driver()
        for d in (one, two):
            await ask(d, "socket", daemon.socket_path)
        first = await ask(one, *private("image-sha256:ab12", b"first-bytes"))
        second = await ask(two, *private("image-sha256:ab12", b"never-used!"))
        found = await ask(two, "lookup", "image-sha256:ab12", 131074, 11, OLD_NS, OLD_NS)
        other_ns = await ask(two, "lookup", "image-sha256:cd34", 131074, 11, OLD_NS, OLD_NS)
        other_version = await ask(two, "lookup", "image-sha256:ab12", 131074, 11, OLD_NS, "none")
    assert first["filled"] == 1 and first["hash"] == fnv(b"first-bytes")
    assert second["filled"] == 0 and second["hash"] == fnv(b"first-bytes")
    assert second["hit"] and second["route"] == "daemon"
    for r in (first, second):
        assert r["seals"] & ALL_SEALS == ALL_SEALS and r["accmode"] == os.O_RDONLY
    assert found["hash"] == fnv(b"first-bytes") and not found["miss"]
    assert other_ns["miss"] and other_ns["fd"] == -1 and other_version["miss"]


@requires_root
async def test_another_uid_misses_a_private_file(
    driver_bin: str, start_daemon: Any, shared_dir: Path, tmp_path: Path
) -> None:
    d = await start_daemon("--socket-mode", "0666")
    binary = shared_dir / "c_driver"
    shutil.copy(driver_bin, binary)
    binary.chmod(0o755)
    with trio.fail_after(30):
        root = Driver(str(binary), tmp_path / "root.err")
        nobody = Driver(str(binary), tmp_path / "nobody.err", user=NOBODY)
        with root, nobody:
            for drv in (root, nobody):
                await ask(drv, "socket", d.socket_path)
            mine = await ask(root, *private("ns", b"root-bytes"))
            looked = await ask(nobody, "lookup", "ns", 131074, 10, OLD_NS, OLD_NS)
            theirs = await ask(nobody, *private("ns", b"nobody-own"))
    assert mine["filled"] == 1 and mine["hash"] == fnv(b"root-bytes")
    assert looked["miss"] and looked["fd"] == -1
    assert theirs["filled"] == 1 and theirs["hash"] == fnv(b"nobody-own")
    s = await trio.to_thread.run_sync(stats, d)
    assert s["private_entries"] == 2 and s["private_hits"] == 0


def test_a_private_file_without_the_daemon_is_sealed_here(driver: Any, tmp_path: Path) -> None:
    d = driver()
    d("socket", tmp_path / "none.sock")
    d("log", "quiet")
    r = d(*private("ns", b"made-here"))
    assert r["filled"] == 1 and r["hash"] == fnv(b"made-here") and r["route"] == "copy"
    assert r["seals"] & ALL_SEALS == ALL_SEALS and r["accmode"] == os.O_RDONLY
    wrong = d("private", "ns", 1, 99, OLD_NS, OLD_NS, 0, "short")
    assert wrong["fd"] == -1 and wrong["code"] == "size-mismatch"


# -- pipelined ----------------------------------------------------------------


def test_pipelined_replies_are_matched_by_id(driver: Any, tmp_path: Path) -> None:
    """A stand-in that answers three requests in reverse order."""

    def reverse(conn: socket.socket) -> None:
        _greet(conn, "reverse")
        ids = []
        for _ in range(3):
            data, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4))
            _drop_fds(anc)
            ids.append(msgpack.unpackb(data)["id"])
        for id in reversed(ids):
            fd = sealed_fd(f"reply to {id}".encode())
            reply = {"id": id, "ok": True, "size": len(f"reply to {id}"), "hit": True}
            conn.sendmsg([msgpack.packb(reply)], scm_rights([fd]))
            os.close(fd)
        until_closed(conn)

    f = make_file(tmp_path / "f", b"x" * 10)  # as many bytes as each reply serves
    path = tmp_path / "rev.sock"
    with stand_in_daemon(path, reverse):
        d = driver()
        d("socket", path)
        base = d("fds")["fds"]
        subs = [d("submit", f, tag) for tag in (10, 11, 12)]
        pending = d("pending")
        got = d("collect", 3, 5000)
        assert d("close")["fds"] == base
    assert [s["id"] for s in subs] == [1, 2, 3] and pending["pending"] == 3
    assert 0 < pending["poll_timeout"] <= 250 and subs[0]["pollfd"] >= 0
    assert len(got["results"]) == 3 and got["pending"] == 0
    for r in got["results"]:
        assert r["hash"] == fnv(f"reply to {r['id']}".encode())
        assert r["tag"] == 9 + r["id"]


async def test_pipelined_fds_nobody_collects_are_closed(
    driver: Any, daemon: Daemon, tmp_path: Path
) -> None:
    files = [big(tmp_path / f"f{i}") for i in range(4)]
    settle(*(f for f, _ in files))
    d = driver()
    with trio.fail_after(30):
        await ask(d, "socket", daemon.socket_path)
        for f, _ in files:  # cached first: the replies below come at once
            await ask(d, "openfd", f)
        await ask(d, "close")
        base = (await ask(d, "fds"))["fds"]
        hits = (await trio.to_thread.run_sync(stats, daemon))["hits"]
        ids = [(await ask(d, "submit", f, i))["id"] for i, (f, _) in enumerate(files)]
        one = await ask(d, "collect", 1, 5000)
        # The daemon answered all four: the other replies (hits) are in our socket.
        await counted_once(daemon, "hits", hits + len(files))
        two = await ask(d, "collect", 1, 5000)  # reads them all; hands out one
        held = await ask(d, "fds")  # the socket and two uncollected replies
        left = [i for i in ids if i not in (one["results"][0]["id"], two["results"][0]["id"])]
        assert (await ask(d, "cancel", left[0]))["rc"] == 0
        after_cancel = await ask(d, "fds")
        closed = await ask(d, "close")  # the last uncollected reply goes too
        # A request cancelled before its reply: the reply is closed when it comes.
        late = await ask(d, "submit", files[0][0], 9)
        await ask(d, "cancel", late["id"])
        await counted_once(daemon, "hits", hits + len(files) + 1)  # its reply was sent
        nothing = await ask(d, "collect", 1, 300)
        after_late = await ask(d, "fds")
        pending = await ask(d, "pending")
    for r in (one, two):  # replies come in any order; matched by id
        (got,) = r["results"]
        assert got["hash"] == files[ids.index(got["id"])][1] and got["tag"] == ids.index(got["id"])
    assert held["fds"] == base + 3
    assert after_cancel["fds"] == base + 2
    assert closed["fds"] == base
    assert nothing["results"] == [] and pending["pending"] == 0
    assert after_late["fds"] == base + 1  # the connection alone


def test_a_pipelined_request_times_out_and_a_routed_one_is_copied(
    driver: Any, tmp_path: Path
) -> None:
    f, digest = big(tmp_path / "f")
    os.utime(f, ns=(OLD_NS, OLD_NS))
    time.sleep(0.06)
    path = tmp_path / "greets.sock"
    with stand_in_daemon(path, greets_only):
        d = driver()
        for cmd in ("socket", path), ("timeouts", 1000, 200, 0), ("backoff", 0, 0), (
            "routing", 0, 50), ("log", "quiet"):  # fmt: skip
            d(*cmd)
        plain = d("submit", f, 1)
        waited = d("collect", 1, 3000)
        routed = d("rsubmit", f, 2)
        copied = d("collect", 1, 3000)
        d("backoff", 60000, 60000)
        d("rsubmit", f, 3)
        d("collect", 1, 3000)  # the breaker opens
        fast = d("rsubmit", f, 4)
    assert plain["id"] > 0 and 0 < plain["poll_timeout"] <= 200
    (r,) = waited["results"]
    assert r["fd"] == -1 and r["code"] == "unavailable" and "timed out" in r["error"]
    assert routed["id"] > 0 and routed["now_fd"] == -1
    (r,) = copied["results"]
    assert r["route"] == "copy" and r["hash"] == digest and r["tag"] == 2
    # While the breaker is open, a routed submit is served at once.
    assert fast["id"] == 0 and fast["now_hash"] == digest and fast["route"] == "copy"


# -- openat and local copies ----------------------------------------------------


async def test_openat_with_a_dirfd(driver: Any, daemon: Daemon, tmp_path: Path) -> None:
    sub = tmp_path / "lib"
    sub.mkdir()
    f, digest = big(sub / "libx.so")
    (sub / "link.so").symlink_to("libx.so")
    settle(f)
    d = driver()
    with trio.fail_after(30):
        await ask(d, "socket", daemon.socket_path)
        await ask(d, "routing", 0, 50)
        await ask(d, "cold", 0, 0)
        rel = await ask(d, "openat", tmp_path, "lib/libx.so")  # a miss: copied here
        deadline = time.monotonic() + 10
        while (await ask(d, "openat", tmp_path, "lib/libx.so"))["route"] not in ("daemon", "index"):
            assert time.monotonic() < deadline  # until the daemon filled it: a hit
            await trio.sleep(0.01)
        via_link = await ask(d, "openat", sub, "link.so")
        nofollow = await ask(d, "openat", sub, "link.so", "nofollow")
        writing = await ask(d, "openat", sub, "libx.so", "write")
        missing = await ask(d, "openat", sub, "nope.so")
        directory = await ask(d, "openat", tmp_path, "lib")
    assert rel["hash"] == digest and (rel["route"], rel["copied_why"]) == ("copy", "miss")
    assert via_link["hash"] == digest
    assert nofollow["fd"] == -1 and nofollow["errnum"] == 40  # ELOOP
    assert writing["fd"] == -1 and writing["errnum"] == 22  # EINVAL
    assert missing["fd"] == -1 and missing["errnum"] == 2  # ENOENT
    assert directory["fd"] == -1 and directory["code"] == "not-regular"
    # The label the daemon got for the relative path is the file's own path
    # (index hits count in its stats once reported: the report is not waited for).
    with trio.fail_after(10):
        await ask(d, "report")
        while True:
            s = await trio.to_thread.run_sync(stats, daemon)
            tops = s["top_by_hits"] + s["top_by_bytes"]
            if str(f) in [t["path"] for t in tops]:
                break
            await trio.sleep(0.01)


def test_local_copies_are_sealed_private_and_executable_iff_the_source(
    driver: Any, tmp_path: Path
) -> None:
    exe = make_file(tmp_path / "tool", b"#!/bin/sh\necho copied\n", 0o755)
    plain = make_file(tmp_path / "data", b"plain bytes", 0o640)
    d = driver()
    r_exe = d("copy", exe)
    r_plain = d("copy", plain)
    r_dev = d("copy", "/dev/null")
    r_nostruct = d("copy", plain, "nostruct")  # shadowd_copy_fd(NULL, src)
    for r, data in ((r_exe, exe.read_bytes()), (r_plain, b"plain bytes")):
        assert r["hash"] == fnv(data) and r["fsize"] == len(data)
        assert r["seals"] & ALL_SEALS == ALL_SEALS
        assert r["accmode"] == os.O_RDONLY and r["memfd"]
        assert r["other_offset"] == 0  # reading one copy moved no other's offset
        assert r["rw_write"] == -1  # even a read-write reopen cannot write
    assert stat.S_IMODE(r_exe["mode"]) == 0o555
    assert stat.S_IMODE(r_plain["mode"]) == 0o444
    assert r_dev["fd"] == -1 and r_dev["code"] == "not-regular"
    assert r_nostruct["hash"] == fnv(b"plain bytes")


def test_a_local_copy_runs_exactly_when_the_source_may(driver: Any, tmp_path: Path) -> None:
    """The copy's exec bit is real: the kernel executes the memfd (fexecve)."""
    true = shutil.which("true")
    assert true is not None
    runnable = make_file(tmp_path / "true", Path(true).read_bytes(), 0o755)
    not_runnable = make_file(tmp_path / "true-x", Path(true).read_bytes(), 0o644)
    d = driver()
    assert d("exec", runnable)["status"] == 0
    assert d("exec", not_runnable)["errno"] == 13  # EACCES


# -- the process-local tier ----------------------------------------------------


async def test_the_tier_reopens_hits_without_asking_the_daemon(
    driver: Any, daemon: Daemon, tmp_path: Path
) -> None:
    f, digest = big(tmp_path / "lib.so")
    settle(f)
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("routing", 0, 50), ("cold", 0, 0), (
                "index", 0, 0):  # fmt: skip
            await ask(d, *cmd)
        miss = await ask(d, "routed", f)
        # Copied here while the daemon fills its cache; then a hit, kept.
        filled = await until_route(d, f, "daemon")
        before = await trio.to_thread.run_sync(stats, daemon)
        held = [await ask(d, "routed", f) for _ in range(3)]
        twice = await ask(d, "twice", f)
        after = await trio.to_thread.run_sync(stats, daemon)
        counts = await ask(d, "counts")
    # Version 2: the miss was answered at once, without an fd, and copied here.
    assert (miss["route"], miss["hit"], miss["copied_why"]) == ("copy", False, "miss")
    assert miss["v2_miss"] and miss["filling"] and miss["hash"] == digest
    assert miss["seals"] & ALL_SEALS == ALL_SEALS and miss["accmode"] == os.O_RDONLY
    hit = filled[-1]
    assert (hit["route"], hit["hit"], hit["cached"]) == ("daemon", True, True)
    st = f.stat()
    assert hit["version"] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
    for r in filled[:-1]:  # misses while the daemon was still copying
        assert r["route"] == "copy" and r["copied_why"] == "miss" and r["hash"] == digest
    for r in held:
        assert r["route"] == "held" and r["hash"] == digest and r["hit"]
        assert r["seals"] & ALL_SEALS == ALL_SEALS and r["accmode"] == os.O_RDONLY
    assert twice["routes"] == ["held", "held"] and twice["read"] == 3
    assert twice["a_offset"] == 3 and twice["b_offset"] == 0  # each its own offset
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert counts["held"] == 5 and counts["protocol"] == 2
    assert counts["missed"] == len(filled)  # the first miss and those while filling
    assert counts["other_version"] == 0 and counts["slow"] == 0  # the real daemon's answers


@pytest.mark.parametrize("young_ms", [0, 50])
async def test_a_file_rewritten_in_place_is_never_served_stale(
    driver: Any, daemon: Daemon, tmp_path: Path, young_ms: int
) -> None:
    f, digest = big(tmp_path / "lib.so")
    settle(f)
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("routing", 0, young_ms), ("cold", 0, 0), (
                "index", 0, 0):  # fmt: skip
            await ask(d, *cmd)
        await until_route(d, f, "held")
        old = f.stat()
        new = os.urandom(old.st_size)
        with open(f, "r+b") as fh:  # same inode, same size
            fh.write(new)
        os.utime(f, ns=(old.st_atime_ns, old.st_mtime_ns))  # the old mtime put back
        now = f.stat()
        assert (now.st_ino, now.st_size, now.st_mtime_ns) == (
            old.st_ino,
            old.st_size,
            old.st_mtime_ns,
        )
        fresh = [await ask(d, "routed", f) for _ in range(2)]
        await trio.to_thread.run_sync(settle, f)
        later = await until_route(d, f, "held")  # the new version, once the daemon cached it
    for r in fresh + later:
        assert r["hash"] == fnv(new) != digest, r
    assert all(r["route"] != "held" for r in fresh)


def test_a_hit_whose_file_changed_during_the_request_is_not_kept(
    driver: Any, tmp_path: Path
) -> None:
    """The caller's fstat after the reply must equal the one before it."""
    f, digest = big(tmp_path / "lib.so")
    data = f.read_bytes()

    def changes_it(conn: socket.socket) -> None:
        _greet(conn, "changes-it")
        while True:
            msg, anc, _, _ = conn.recvmsg(4096, socket.CMSG_SPACE(4))
            if not msg:
                return
            _drop_fds(anc)
            f.chmod(0o600 if f.stat().st_mode & 0o044 else 0o644)  # a new ctime
            fd = sealed_fd(data)
            reply = {"id": msgpack.unpackb(msg)["id"], "ok": True, "size": len(data), "hit": True}
            conn.sendmsg([msgpack.packb(reply)], scm_rights([fd]))
            os.close(fd)

    path = tmp_path / "changes.sock"
    with stand_in_daemon(path, changes_it):
        d = driver()
        for cmd in ("socket", path), ("routing", 0, 0):
            d(*cmd)
        base = d("fds")["fds"]
        served = [d("routed", f) for _ in range(3)]
        after = d("fds")
        counts = d("counts")
    assert all(r["route"] == "daemon" and r["hash"] == digest and r["hit"] for r in served)
    assert after["fds"] == base + 1  # the connection; nothing held
    assert counts["held"] == 0 and counts["daemon"] == 3


async def test_the_tier_is_bounded_by_entries_and_bytes(
    driver: Any, daemon: Daemon, tmp_path: Path
) -> None:
    files = [big(tmp_path / f"f{i}", 200_000) for i in range(3)]
    settle(*(f for f, _ in files))
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("routing", 0, 50), ("held", 2, 10**9), (
                "cold", 0, 0), ("index", 0, 0):  # fmt: skip
            await ask(d, *cmd)
        base = (await ask(d, "fds"))["fds"]
        for f, _ in files:  # a miss, then a hit that is kept
            await until_route(d, f, "daemon")
        two = await ask(d, "fds")
        first_again = await ask(d, "routed", files[0][0])  # evicted: asked again
        last_again = await ask(d, "routed", files[2][0])  # still held
        await ask(d, "held", 10, 300_000)  # room for one 200 kB file
        one = await ask(d, "fds")
        closed = await ask(d, "close")
    # The connection, /proc/self/fd (for the reopens) and two held memfds; then,
    # once the tier reopened one, the number it reopens through (held_reopen).
    assert two["fds"] == base + 1 + 1 + 2
    assert first_again["route"] == "daemon" and first_again["hash"] == files[0][1]
    assert last_again["route"] == "held"
    assert one["fds"] == base + 1 + 1 + 1 + 1
    assert closed["fds"] == base


# -- the socket rule -------------------------------------------------------------


HOST_SOCKET = Path("/run/shadowd/shadowd.sock")


@requires_root
def test_the_socket_rule(
    driver_bin: str, shared_dir: Path, tmp_path: Path, host_sockets: None
) -> None:
    binary = shared_dir / "c_driver"
    shutil.copy(driver_bin, binary)
    binary.chmod(0o755)
    xdg = shared_dir / "xdg"
    (xdg / "shadowd").mkdir(parents=True)
    user_socket = xdg / "shadowd" / "shadowd.sock"
    host_there = HOST_SOCKET.exists()

    def default(env: dict[str, str], user: int | None = 1000, connect: bool = False) -> Any:
        with Driver(str(binary), tmp_path / "rule.err", env, user) as d:
            d("log", "quiet")
            return d("connect") if connect else d("default")

    assert (
        default({"SHADOWD_SOCKET": "/x/y.sock", "XDG_RUNTIME_DIR": str(xdg)})["path"] == "/x/y.sock"
    )
    if not host_there:
        # No socket anywhere: the first candidate, and the error names both.
        r = default({"SHADOWD_SOCKET": "", "XDG_RUNTIME_DIR": str(xdg)})
        assert r["path"] == str(user_socket)
        assert default({})["path"] == "/run/user/1000/shadowd/shadowd.sock"
        r = default({"XDG_RUNTIME_DIR": str(xdg)}, connect=True)
        assert r["code"] == "unavailable"
        assert f"looked at {user_socket}, {HOST_SOCKET}" in r["error"]
    # Root never looks at a user's runtime dir.
    assert default({"XDG_RUNTIME_DIR": str(xdg)}, user=None)["path"] == str(HOST_SOCKET)
    # A relative XDG_RUNTIME_DIR is ignored (the XDG spec; shadowd/paths.py too),
    # even where it names a socket from the client's cwd.
    relative = os.path.relpath(xdg)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(user_socket))
    try:
        got = default({"XDG_RUNTIME_DIR": relative})["path"]
    finally:
        listener.close()
        user_socket.unlink()
    assert got == (str(HOST_SOCKET) if host_there else "/run/user/1000/shadowd/shadowd.sock")
    # A socket in the user's place is found, a plain file there is not one.
    user_socket.touch()
    if not host_there:
        assert default({"XDG_RUNTIME_DIR": str(xdg)})["path"] == str(user_socket)
    user_socket.unlink()
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    listener.bind(str(user_socket))
    try:
        assert default({"XDG_RUNTIME_DIR": str(xdg)})["path"] == str(user_socket)
    finally:
        listener.close()


@requires_root
async def test_a_socket_that_refuses_this_user_says_whom_it_lets_in(
    driver_bin: str, shared_dir: Path, tmp_path: Path, start_daemon: Any
) -> None:
    # A bare "Permission denied" before: a new user running the C client
    # against the host daemon of `make run` as root could not tell why.
    binary = shared_dir / "c_driver"
    shutil.copy(driver_bin, binary)
    binary.chmod(0o755)
    alone = await start_daemon()  # mode 0600
    grouped = await start_daemon("--socket-mode", "0660", "--socket-group", "4242")
    # Every driver call waits at most its own 20 s.
    with Driver(str(binary), tmp_path / "denied.err", {}, 1000) as d:
        d("log", "quiet")
        d("backoff", 0, 0)  # no breaker: each connect tries the socket it names
        r = d("connect", alone.socket_path)
        assert r["rc"] == -1 and r["code"] == "unavailable", r
        assert (
            "Permission denied: the socket is 0:0, mode 0600: only uid 0 may connect"
            in (r["error"])
        )
        r = d("connect", grouped.socket_path)
        assert r["rc"] == -1, r
        assert "mode 0660: only uid 0 and the members of gid 4242 may connect" in r["error"]


# -- protocol version 2 ----------------------------------------------------------


def _served(conn: socket.socket, msg: dict[str, Any], src: int, extra: dict[str, Any]) -> None:
    """Answer open *msg* with a sealed copy of *src* and the reply keys *extra*."""
    served = os.open(f"/proc/self/fd/{src}", os.O_RDONLY | os.O_CLOEXEC)
    try:
        sealed = memfd_copy(served)
    finally:
        os.close(served)
    try:
        reply = {"id": msg["id"], "ok": True, "size": os.fstat(sealed).st_size, **extra}
        conn.sendmsg([msgpack.packb(reply)], scm_rights([sealed]))
    finally:
        os.close(sealed)


def _greet_v2(conn: socket.socket, limits: dict[str, Any]) -> None:
    """A stand-in's answer to the client's hello: version 2, with *limits*."""
    hello = msgpack.unpackb(conn.recv(4096))
    conn.send(msgpack.packb({"id": hello["id"], "ok": True, "version": 2, "limits": limits}))


def _answer(conn: socket.socket, msg: dict[str, Any], **reply: Any) -> None:
    """A stand-in's answer to request *msg*: its id, then the keys of *reply*."""
    conn.send(msgpack.packb({"id": msg["id"], **reply}))


def _requests(conn: socket.socket) -> Iterator[tuple[dict[str, Any], list[int]]]:
    """The requests on *conn* with their fds (the caller closes them), until it ends."""
    while True:
        data, anc, _, _ = conn.recvmsg(65536, socket.CMSG_SPACE(64 * 4))
        if not data:
            return
        fds = [
            int.from_bytes(d[i : i + 4], "little")
            for _, _, d in anc
            for i in range(0, len(d) - len(d) % 4, 4)
        ]
        yield msgpack.unpackb(data), fds


def test_a_daemon_that_refuses_version_2_is_greeted_in_version_1(
    driver: Any, tmp_path: Path
) -> None:
    """A stand-in daemon of protocol version 1: refused, the client says 1 and keeps v1's rules."""
    f, digest = big(tmp_path / "lib.so")
    g, g_digest = big(tmp_path / "other.so")
    time.sleep(1.05)  # older than the 1 s the client assumes without a racy window
    young = make_file(tmp_path / "young", b"just written" * 20_000)
    hellos: list[int] = []
    opens: list[dict[str, Any]] = []

    def v1(conn: socket.socket) -> None:
        hello = msgpack.unpackb(conn.recv(4096))
        hellos.append(hello["version"])
        if hello["version"] != 1:
            refusal = {"id": hello["id"], "ok": False, "code": "unsupported-version",
                       "message": "this server speaks 1"}  # fmt: skip
            conn.send(msgpack.packb(refusal))
            return  # and closes the connection, as a daemon of version 1 does
        conn.send(msgpack.packb({"id": 0, "ok": True, "version": 1, "server": "v1", "limits": {}}))
        for n, (msg, fds) in enumerate(_requests(conn)):
            opens.append(msg)
            _served(conn, msg, fds[0], {"hit": True})
            close_fds(fds)
            if n == 1:
                return  # a restart, say: the client connects again

    path = tmp_path / "v1.sock"
    with stand_in_daemon(path, v1):
        d = driver()
        for cmd in ("socket", path), ("routing", 0, -1), ("log", "capture"):
            d(*cmd)
        got = [d("routed", f) for _ in range(3)]
        counts = d("counts")
        plain = d("openfd", f)
        young_one = d("routed", young)
        other = d("routed", g)  # the stand-in closed: a new connection, greeted 2 then 1
        log = d.finish()
    assert [r["hash"] for r in got] == [digest] * 3
    # Version 1 says no version: a hit is kept when the caller's fstat did not change.
    assert [r["route"] for r in got] == ["daemon", "held", "held"]
    assert got[0]["version"] is None and not got[0]["cached"] and got[0]["hit"]
    assert counts["protocol"] == 1 and counts["racy_window_ns"] == 0 and counts["held"] == 2
    assert plain["hash"] == digest and plain["route"] == "daemon"
    # Without the daemon's racy window, the 1 s default: copied here unasked.
    assert (young_one["route"], young_one["copied_why"]) == ("copy", "rule")
    assert other["hash"] == g_digest and other["route"] == "daemon"
    assert hellos == [2, 1, 2, 1]
    assert all("wait" not in m for m in opens)  # v1 requests, as v1 defines them
    assert len(opens) == 3
    assert "LOG" not in log  # a refused version is not an outage: no breaker line


@pytest.mark.parametrize("version", [0, 3])
def test_a_daemon_speaking_a_version_this_client_does_not_is_left_alone(
    driver: Any, tmp_path: Path, version: int
) -> None:
    """A hello answered with protocol version 0, or 3 (a newer major version, to a
    client that said 2): the call fails `unavailable` saying both versions, as the Python
    client does, and the breaker opens: the routed open copies here without asking."""
    f, digest = big(tmp_path / "lib.so")
    settle(f)
    hellos: list[int] = []

    def newer(conn: socket.socket) -> None:
        hello = msgpack.unpackb(conn.recv(4096))
        hellos.append(hello["version"])
        reply = {"id": hello["id"], "ok": True, "version": version, "server": "newer"}
        conn.send(msgpack.packb({**reply, "limits": {}}))
        for _msg, fds in _requests(conn):
            close_fds(fds)  # never answered

    path = tmp_path / "newer.sock"
    with stand_in_daemon(path, newer):
        d = driver()
        for cmd in ("socket", path), ("routing", 0, -1), ("log", "quiet"):
            d(*cmd)
        plain = d("openfd", f)
        routed = d("routed", f)
    assert (plain["fd"], plain["code"]) == (-1, "unavailable"), plain
    want = f"shadowd answered hello with protocol version {version}; this client speaks 1 to 2"
    assert want in plain["error"], plain
    assert (routed["route"], routed["copied_why"], routed["hash"]) == ("copy", "breaker", digest)
    assert hellos == [2]


def close_fds(fds: list[int]) -> None:
    for fd in fds:
        os.close(fd)


def _stat_version(fd: int) -> list[int]:
    st = os.fstat(fd)
    return [st.st_size, st.st_mtime_ns, st.st_ctime_ns]


def test_version_2_replies_are_read_as_the_protocol_says(driver: Any, tmp_path: Path) -> None:
    """A stand-in of version 2 answering each file its own way; the client keeps in its
    tier only what the protocol allows, and takes a malformed reply for a broken daemon."""
    names = ["good", "other-version", "not-cached", "no-version", "bad-version",
             "cached-missing", "miss", "miss-no-filling", "miss-with-fd", "neg-1", "neg-100",
             "neg-30000", "neg-1500000000", "neg-1000000000000"]  # fmt: skip
    files = {n: big(tmp_path / n) for n in names}
    for n, (f, _) in files.items():
        mtime = -int(n[4:]) if n.startswith("neg-") else OLD_NS
        os.utime(f, ns=(OLD_NS, mtime))
    time.sleep(0.25)  # older than the racy window the stand-in says (200 ms)
    requests: list[dict[str, Any]] = []
    indexes: list[dict[str, Any]] = []
    hellos: list[dict[str, Any]] = []

    def v2(conn: socket.socket) -> None:
        hello = msgpack.unpackb(conn.recv(4096))
        assert hello["version"] == 2
        hellos.append(hello)
        limits = {"max_batch": 64, "racy_window_ns": 200_000_000}
        reply = {"id": 0, "ok": True, "version": 2, "server": "v2", "limits": limits}
        conn.send(msgpack.packb(reply))
        for msg, fds in _requests(conn):
            if msg["op"] == "index":  # a daemon that gives none: the client goes on
                _answer(conn, msg, ok=False, code="no-index", message="none")
                indexes.append(msg)
                continue
            requests.append(msg)
            name = Path(msg.get("path", "?")).name
            version = _stat_version(fds[0])
            if name == "good" or name.startswith("neg-"):
                _served(conn, msg, fds[0], {"hit": True, "version": version, "cached": True})
            elif name == "other-version":
                v = [version[0], version[1] + 1, version[2]]
                _served(conn, msg, fds[0], {"hit": True, "version": v, "cached": True})
            elif name == "not-cached":
                _served(conn, msg, fds[0], {"hit": False, "version": version, "cached": False})
            elif name in ("no-version", "older"):  # say, dated past 2262
                _served(conn, msg, fds[0], {"hit": True})
            elif name == "bad-version":
                _served(conn, msg, fds[0], {"hit": True, "version": version[:2], "cached": True})
            elif name == "cached-missing":
                _served(conn, msg, fds[0], {"hit": True, "version": version})
            elif name == "miss-with-fd":
                _served(conn, msg, fds[0], {"hit": False, "miss": True, "filling": True})
            else:
                miss: dict[str, Any] = {"id": msg["id"], "ok": True, "hit": False, "miss": True}
                if name == "miss":
                    miss["filling"] = True
                conn.send(msgpack.packb(miss))
            close_fds(fds)

    path = tmp_path / "v2.sock"
    with stand_in_daemon(path, v2):
        d = driver()
        # Long timeouts: the stand-in is a thread of this (maybe loaded) process.
        for cmd in ("socket", path), ("routing", 0, -1), ("backoff", 0, 0), ("cold", 0, 0), (
                "log", "quiet"), ("timeouts", 10000, 10000, 4):  # fmt: skip
            d(*cmd)
        just_made = make_file(tmp_path / "just-made", b"j" * 200_000)
        first = d("routed", just_made)  # connects; the 1 s default: not asked
        ready = d("indexready")  # the hello answered, and the index asked for: none
        got = {n: [d("routed", f) for _ in range(2)] for n, (f, _) in files.items()}
        plain = d("openfd", files["good"][0], files["good"][0])
        counts = d("counts")
        older = make_file(tmp_path / "older", b"o" * 200_000)
        time.sleep(0.25)  # older than the stand-in's racy window, not than 1 s
        fresh = make_file(tmp_path / "fresh", b"f" * 200_000)
        unasked = len(requests)
        young_one = d("routed", fresh)
        asked = d("routed", older)
        base = d("fds")["fds"]
        d("close")
        closed = d("fds")["fds"]
    for n, (_, digest) in files.items():
        for r in got[n]:
            assert r["fd"] >= 0 and r["hash"] == digest, (n, r)
    routes = {n: [r["route"] for r in rs] for n, rs in got.items()}
    for n in ("good", *(n for n in names if n.startswith("neg-"))):
        assert routes[n] == ["daemon", "held"], (n, got[n])  # signed times read right
        st = files[n][0].stat()
        assert got[n][0]["version"] == [st.st_size, st.st_mtime_ns, st.st_ctime_ns]
        assert got[n][0]["cached"]
    for n in ("not-cached", "no-version"):
        assert routes[n] == ["daemon", "daemon"], (n, got[n])  # served, never kept
    assert got["no-version"][0]["version"] is None and got["not-cached"][0]["cached"] is False
    # Another version than the caller's fstat saw: never handed out, copied here.
    for r in got["other-version"]:
        assert (r["route"], r["copied_why"]) == ("copy", "failed"), r
        assert "not the caller's" in r["error"], r
    # A miss answered at once: copied here, and said so.
    for r in got["miss"]:
        assert (r["route"], r["copied_why"], r["v2_miss"], r["filling"]) == (
            "copy", "miss", True, True)  # fmt: skip
    # Malformed: the daemon is taken for broken (copied here, the connection dropped).
    for n in ("bad-version", "cached-missing", "miss-no-filling", "miss-with-fd"):
        for r in got[n]:
            assert (r["route"], r["copied_why"]) == ("copy", "failed"), (n, r)
            assert "bad reply" in r["error"], (n, r)
    assert counts["protocol"] == 2 and counts["racy_window_ns"] == 200_000_000
    # The index was asked for at most once per connection, as docs/protocol.md writes it;
    # "no-index" is no error: every file above was served or copied all the same.
    assert 1 <= len(indexes) <= len(hellos), (indexes, hellos)
    assert all(list(m) == ["op", "id"] and m["op"] == "index" for m in indexes), indexes
    assert (first["route"], first["copied_why"]) == ("copy", "rule")
    assert ready["ready"] == 0 and ready["error"] == ""  # no index: no error either
    assert plain["route"] == "daemon" and plain["version"] is not None
    # The daemon's racy window (200 ms) decides what is young, not the 1 s default.
    assert (young_one["route"], young_one["copied_why"]) == ("copy", "rule")
    assert len(requests) == unasked + 1 and asked["route"] == "daemon"
    # The connection, /proc/self/fd, the tier's relay (held_reopen), and the held
    # good and neg- files.
    assert base - closed == 1 + 1 + 1 + 6
    # What the client writes: a routed open does not wait; shadowd_open_fd does.
    routed_opens = [r for r in requests if r.get("path", "").endswith("/good")]
    assert routed_opens[0] == {"op": "open", "id": routed_opens[0]["id"],
                               "path": str(files["good"][0]), "wait": False}  # fmt: skip
    assert list(routed_opens[0]) == ["op", "id", "path", "wait"]
    assert "wait" not in routed_opens[-1] and routed_opens[-1]["op"] == "open"


def greets_v2(conn: socket.socket) -> None:
    """A daemon of version 2 that answers hello, then nothing."""
    hello = msgpack.unpackb(conn.recv(4096))
    reply = {"id": hello["id"], "ok": True, "version": 2, "server": "greets-v2", "limits": {}}
    conn.send(msgpack.packb(reply))
    until_closed(conn)


def test_a_reply_that_does_not_wait_gets_no_time_per_mib(driver: Any, tmp_path: Path) -> None:
    five_mib, digest = big(tmp_path / "five", 5 << 20)
    path = tmp_path / "greets.sock"
    with stand_in_daemon(path, greets_v2):
        d = driver()
        for cmd in ("socket", path), ("timeouts", 1000, 100, 100), ("backoff", 0, 0), (
                "routing", 0, 0), ("log", "quiet"):  # fmt: skip
            d(*cmd)
        waits = d("openfd", five_mib)  # may wait for the daemon's copy: 100 + 5 x 100 ms
        routed = d("routed", five_mib)  # never waits on a copy: 100 ms
    assert waits["fd"] == -1 and "timed out" in waits["error"]
    assert 600_000 <= waits["us"] < 1_300_000, waits
    assert routed["hash"] == digest and routed["copied_why"] == "failed"
    assert 100_000 <= routed["us"] < 500_000, routed


async def test_preload_keeps_what_the_daemon_has_in_one_round_trip(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    daemon = await start_daemon("--racy-window", "0.5")
    files = [big(tmp_path / f"lib{i}.so", 150_000 + i) for i in range(4)]
    files.append((make_file(tmp_path / "small", b"a small file"), fnv(b"a small file")))
    settle(*(f for f, _ in files), window=0.5)
    paths = [f for f, _ in files]
    d = driver()
    with trio.fail_after(30):
        await ask(d, "socket", daemon.socket_path)
        cold = await ask(d, "preload", *paths, tmp_path / "missing", "/dev/null")
        deadline = time.monotonic() + 10
        warm = await ask(d, "preload", *paths)
        while warm["held"] < len(paths):  # the daemon filled its cache meanwhile
            assert time.monotonic() < deadline, warm
            await trio.sleep(0.02)
            warm = await ask(d, "preload", *paths)
        before = await trio.to_thread.run_sync(stats, daemon)
        again = await ask(d, "preloadfds", *paths)  # all held already: no request
        opened = [await ask(d, "routed", p) for p in paths]
        after = await trio.to_thread.run_sync(stats, daemon)
        young = make_file(tmp_path / "young", b"young" * 40_000)
        with_young = await ask(d, "preload", young)
        after_young = await trio.to_thread.run_sync(stats, daemon)
        counts = await ask(d, "counts")
    assert cold["held"] == 0 and cold["code"] == ""  # misses are not waited for
    assert again["held"] == len(paths)
    # Every file, the small one too, is reopened here: no request reaches the daemon.
    for r, (_, digest) in zip(opened, files, strict=True):
        assert (r["route"], r["hash"]) == ("held", digest), r
    assert (after["hits"], after["misses"]) == (before["hits"], before["misses"])
    assert with_young["held"] == 0  # younger than the racy window: not asked
    assert (after_young["hits"], after_young["misses"]) == (after["hits"], after["misses"])
    assert counts["preloaded"] == len(paths) and counts["held"] == len(paths)


# -- the process-local tier after a change stat cannot show ------------------

PAGE = 4096
MAPPED = b"a" * (4 * PAGE)  # what the file holds before the mapping's write
CHANGED = b"b" * PAGE + MAPPED[PAGE:]


async def held_c(d: Driver, f: Path) -> dict[str, Any]:
    """Preload *f* until the tier holds it (the daemon has it cached); then a routed
    open of it, which must come from the tier with MAPPED's bytes: its answer."""
    deadline = time.monotonic() + 10
    while (await ask(d, "preload", f))["held"] < 1:
        assert time.monotonic() < deadline, "the daemon never cached it"
        await trio.sleep(0.01)
    r = await ask(d, "routed", f)
    assert (r["route"], r["hash"]) == ("held", fnv(MAPPED)), r
    return dict(r)


async def changed_unseen(d: Daemon, f: Path) -> None:
    """The first page of *f* written through a mapping (stat unchanged); returns once
    the daemon counted the invalidation."""
    before = await trio.to_thread.run_sync(invalidations, d.socket_path)
    await trio.to_thread.run_sync(write_through_a_mapping, f, CHANGED[:PAGE])
    await trio.to_thread.run_sync(until_invalidated, d.socket_path, before)


@requires_root
async def test_the_tier_of_an_index_peer_serves_a_change_stat_cannot_show_at_once(
    driver: Any, start_daemon: Any, shared_dir: Path
) -> None:
    """Written through a shared mapping on tmpfs (no time changes): once the daemon
    counted the invalidation, the next routed open is not served from the tier. The
    tier's bound is an hour here: only the daemon's index can have said so."""
    daemon = await start_daemon("--racy-window", "0")
    d = driver()
    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        f = make_file(fs / "lib.so", MAPPED)
        for cmd in ("socket", daemon.socket_path), ("routing", 0, -1), ("heldrecheck", 3600_000):
            await ask(d, *cmd)
        ready = await ask(d, "indexready")
        await held_c(d, f)
        await changed_unseen(daemon, f)
        after = await ask(d, "routed", f)
    assert ready["ready"] == 1  # root, as the daemon: a peer that reads its index
    assert after["hash"] == fnv(CHANGED), f"the tier served the dropped bytes: {after}"
    assert after["route"] != "held"


@requires_root
async def test_the_tier_of_another_uid_serves_a_change_stat_cannot_show_after_its_bound(
    driver_bin: str, start_daemon: Any, shared_dir: Path, tmp_path: Path
) -> None:
    """As above for a client of another uid (no index): the first routed open past its
    bound (0.3 s here) asks the daemon again; what the daemon caches anew is held again."""
    daemon = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    binary = shared_dir / "c_driver"
    shutil.copy(driver_bin, binary)
    binary.chmod(0o755)
    bound = 0.3
    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        f = make_file(fs / "lib.so", MAPPED)
        with Driver(str(binary), tmp_path / "other.err", user=test_uid(0)) as d:
            for cmd in ("socket", daemon.socket_path), ("routing", 0, -1), (
                "heldrecheck", int(bound * 1000)):  # fmt: skip
                await ask(d, *cmd)
            ready = await ask(d, "indexready")
            await held_c(d, f)
            kept = time.monotonic()
            await changed_unseen(daemon, f)
            await trio.sleep(max(0.0, kept + bound - time.monotonic()))
            after = await ask(d, "routed", f)
            again = await until_route(d, f, "held")  # the daemon caches it anew
    assert ready["ready"] == 0  # another uid: no index to check the tier against
    assert after["hash"] == fnv(CHANGED), f"the tier served the dropped bytes: {after}"
    assert after["route"] != "held"
    assert again[-1]["hash"] == fnv(CHANGED)  # held again: the new memfd


async def test_without_the_index_the_tier_asks_again_past_its_bound_and_keeps_the_same_memfd(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """Nothing changed: past the bound (200 ms) the first routed open is the daemon's,
    which serves the memfd already held; the tier then serves it again."""
    daemon = await start_daemon("--racy-window", "0")
    f = make_file(tmp_path / "lib.so", MAPPED)
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("routing", 0, -1), ("index", 0, 0), (
            "heldrecheck", 200):  # fmt: skip
            await ask(d, *cmd)
        await held_c(d, f)
        await trio.sleep(0.25)
        got = [await ask(d, "routed", f) for _ in range(3)]
        counts = await ask(d, "counts")
    assert [r["route"] for r in got] == ["daemon", "held", "held"], got
    assert all(r["hash"] == fnv(MAPPED) for r in got)
    assert counts["held"] == 3 and counts["daemon"] == 1


@requires_root
async def test_a_restarted_daemons_index_never_vouches_for_the_old_daemons_memfd(
    driver: Any, start_daemon: Any, shared_dir: Path
) -> None:
    """Held from one daemon, which is killed; the file is changed through a mapping
    meanwhile (nobody sees it) and the next daemon caches the new bytes, in the same
    version by stat. Once the client reads the new daemon's index, that index names
    another memfd: the tier's is dropped (its bound is an hour: only the index
    decides)."""
    first = await start_daemon("--racy-window", "0", socket_name="r.sock")
    d = driver()
    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        f = make_file(fs / "lib.so", MAPPED)
        other = make_file(fs / "other.so", b"o" * len(MAPPED))
        for cmd in ("socket", first.socket_path), ("routing", 0, -1), (
            "heldrecheck", 3600_000), ("backoff", 50, 50), ("log", "quiet"):  # fmt: skip
            await ask(d, *cmd)
        await ask(d, "indexready")
        await held_c(d, f)
        first.kill()
        await trio.to_thread.run_sync(write_through_a_mapping, f, CHANGED[:PAGE])
        second = await start_daemon("--racy-window", "0", socket_name="r.sock")
        deadline = time.monotonic() + 10
        while (await trio.to_thread.run_sync(stats, second))["hits"] == 0:
            assert time.monotonic() < deadline  # the new daemon caches f anew
            os.close(await trio.to_thread.run_sync(cached_fd, second, f))
        # Another file, until the client is on the new daemon and holds its index (the
        # old daemon's stays until the client talks to the socket).
        while (await ask(d, "indexready"))["pid"] != second.pid:
            assert time.monotonic() < deadline
            await ask(d, "routed", other)
            await trio.sleep(0.05)
        after = await ask(d, "routed", f)
    assert after["hash"] == fnv(CHANGED), f"the old daemon's memfd was served: {after}"
    assert after["route"] == "index"  # the new daemon's own memfd, through its index


def cached_fd(d: Daemon, f: Path) -> int:
    """An open of *f* through *d* that waits for its copy (the daemon caches it)."""
    from shadowd_client import Client

    with Client(d.socket_path, timeout=10) as c:
        return c.open(f)


@requires_root
async def test_a_killed_daemons_index_vouches_for_nothing_past_the_bound(
    driver: Any, start_daemon: Any, shared_dir: Path
) -> None:
    """Held from a daemon that is then killed: its index stays mapped, but no longer
    changes. A change through a mapping after that is seen by nobody; the tier serves
    the memfd at most the bound (0.3 s) after it last saw the daemon alive, then the
    open is copied here."""
    daemon = await start_daemon("--racy-window", "0")
    d = driver()
    with trio.fail_after(60), tmpfs(shared_dir / "tmpfs") as fs:
        f = make_file(fs / "lib.so", MAPPED)
        await _tier_of(d, daemon)
        assert (await ask(d, "indexready"))["ready"] == 1
        after = await _held_past_the_daemons_death(d, daemon, f)
    assert after["hash"] == fnv(CHANGED), f"the tier served what the gone daemon had: {after}"
    assert after["route"] == "copy"


async def _tier_of(d: Driver, daemon: Daemon) -> None:
    """*d* on *daemon*, its tier's bound 0.3 s, every file asked for (no size or age
    rule)."""
    for cmd in ("socket", daemon.socket_path), ("routing", 0, -1), ("heldrecheck", 300), (
        "log", "quiet"):  # fmt: skip
        await ask(d, *cmd)


async def _held_past_the_daemons_death(d: Driver, daemon: Daemon, f: Path) -> Any:
    """*f* held in *d*'s tier, *daemon* killed, *f* changed through a mapping (which
    no stat shows), then opened again past the bound: that open."""
    await held_c(d, f)
    daemon.kill()
    await trio.to_thread.run_sync(write_through_a_mapping, f, CHANGED[:PAGE])
    await trio.sleep(0.35)
    return await ask(d, "routed", f)


# Run as pid 1 of a pid namespace of its own (unshare): a decoy made with the
# daemon's pid there (ns_last_pid), holding a descriptor at the number the
# index header gives for the daemon's own descriptor of it; then the driver.
_DECOY_THEN_DRIVER = """
import os, sys
dpid, index_fd, binary = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(dpid - 1))
ready_r, ready_w = os.pipe()
hold_r, hold_w = os.pipe()
if os.fork() == 0:
    os.dup2(hold_r, index_fd)
    for n in (0, 1):
        os.close(n)
    os.write(ready_w, b"x")
    os.read(hold_r, 1)  # killed when pid 1 exits
    os._exit(0)
os.read(ready_r, 1)
for n in (ready_r, ready_w, hold_r):
    os.close(n)
os.execv(binary, [binary])
"""


@requires_root
async def test_a_killed_daemons_index_does_not_vouch_through_another_process_of_its_pid(
    driver_bin: str, start_daemon: Any, shared_dir: Path, tmp_path: Path
) -> None:
    """Review 22: a client in another pid namespace reads /proc/PID of its own for
    the daemon's pid, where PID is another process. With no descriptor range in the
    index (a daemon under a low fd limit keeps none) the index was taken without
    looking whether /proc/PID is the daemon, and the daemon's life was a look at
    whether that process had *some* descriptor at the index's number: a decoy
    holding one kept a killed daemon's index vouching for the tier past the bound
    (the old bytes after a change through a mapping), in the Python client
    (tests/test_opener.py's namesake failed so). The C client was not served stale
    here even so: it reads its socket before its tier and drops the index of a
    connection that ended. Now /proc/PID must hold the index itself, when it is
    taken and at each look, in both."""
    from shadowd_client import Client

    daemon = await start_daemon("--racy-window", "0", nofile=(300, 300))
    with Client(daemon.socket_path, timeout=10) as c:
        view = c.index()
        assert view is not None and not view.header_range  # no range: the case
        index_fd = view.index_fd
        view.close()
    argv = [
        *("unshare", "--pid", "--fork", "--kill-child", sys.executable, "-c"),
        *(_DECOY_THEN_DRIVER, str(daemon.pid), str(index_fd), driver_bin),
    ]
    with (
        Driver(driver_bin, tmp_path / "driver.err", argv=argv) as d,
        trio.fail_after(60),
        tmpfs(shared_dir / "tmpfs") as fs,
    ):
        f = make_file(fs / "lib.so", MAPPED)
        await _tier_of(d, daemon)
        await ask(d, "indexready")  # held before, refused now: either way on
        after = await _held_past_the_daemons_death(d, daemon, f)
    assert after["hash"] == fnv(CHANGED), f"the tier served what the gone daemon had: {after}"
    assert after["route"] == "copy"


def test_preload_without_a_daemon_fails_nothing(driver: Any, tmp_path: Path) -> None:
    f, _ = big(tmp_path / "f")
    d = driver()
    d("socket", tmp_path / "none.sock")
    d("log", "quiet")
    d("routing", -1, 0)  # no age rule: the file just written is asked for
    r = d("preload", f, f)
    assert r["held"] == 0 and r["code"] == "" and r["us"] < 250_000
    again = d("preload", f)  # the breaker is open: not even a connect
    assert again["held"] == 0 and d("counts")["fast"] >= 1


async def test_a_cold_daemon_is_left_alone_for_a_window_and_told_later(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    daemon = await start_daemon("--racy-window", "0.05")
    files = [big(tmp_path / f"lib{i}.so") for i in range(5)]
    settle(*(f for f, _ in files))
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("routing", 0, 50), ("cold", 3, 400), (
                "index", 0, 0):  # fmt: skip
            await ask(d, *cmd)
        first = [await ask(d, "routed", f) for f, _ in files[:4]]
        s = await trio.to_thread.run_sync(stats, daemon)
        again = await ask(d, "routed", files[0][0])  # in the window: not asked either
        await ask(d, "close")  # the files copied meanwhile are told to the daemon
        deadline = time.monotonic() + 10
        while (await trio.to_thread.run_sync(stats, daemon))["entries"] < 4:
            assert time.monotonic() < deadline
            await trio.sleep(0.02)
        await trio.sleep(0.45)  # the window is over
        later = await ask(d, "routed", files[3][0])
        fresh = await ask(d, "routed", files[4][0])
    for r, (_, digest) in zip(first, files[:4], strict=True):
        assert r["hash"] == digest and r["route"] == "copy"
    # Three misses of three files it fills; then the fourth is not asked for.
    assert [r["copied_why"] for r in first] == ["miss", "miss", "miss", "cold"]
    assert (s["misses"], s["hits"]) == (3, 0)
    assert (again["copied_why"], again["hash"]) == ("cold", files[0][1])
    # Told in one batch at close: cached, so served once the window is over.
    assert (later["route"], later["hit"], later["hash"]) == ("daemon", True, files[3][1])
    assert (fresh["copied_why"], fresh["hash"]) == ("miss", files[4][1])


@contextmanager
def _daemon_runs_first(daemon: Daemon, racer: Driver) -> Iterator[None]:
    """*daemon* (every thread of it) and *racer* on one CPU, the driver at SCHED_IDLE:
    a task of any other policy that wakes up on that CPU runs before it, so the
    daemon answers a request the moment it is sent, and the driver copies only
    while the daemon has nothing to do. A race the daemon should win it then wins
    on a machine of any load, where the first done was whichever the scheduler
    happened to run (a 16 MiB copy here takes a few milliseconds: a daemon that
    waited that long for a CPU lost the race, on a busy 2-vCPU machine now and
    then). The driver is left at SCHED_IDLE (an unprivileged user could not raise
    it back): the caller uses it for that race alone, and keeps its work small (on
    a busy CPU a task at SCHED_IDLE gets a fraction of a percent of it)."""
    cpu = min(os.sched_getaffinity(daemon.pid) & os.sched_getaffinity(racer.proc.pid))
    cpus = os.sched_getaffinity(daemon.pid)
    tasks = Path(f"/proc/{daemon.pid}/task")
    pinned: set[int] = set()
    while new := {int(t.name) for t in tasks.iterdir()} - pinned:  # and any started meanwhile
        for tid in new:
            with suppress(ProcessLookupError):
                os.sched_setaffinity(tid, {cpu})
        pinned |= new
    os.sched_setaffinity(racer.proc.pid, {cpu})
    os.sched_setscheduler(racer.proc.pid, os.SCHED_IDLE, os.sched_param(0))
    try:
        yield
    finally:
        for t in tasks.iterdir():
            with suppress(ProcessLookupError):
                os.sched_setaffinity(int(t.name), cpus)


async def test_a_file_the_index_lacks_is_copied_here_and_told_later_never_asked(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """While the daemon's index is held, a file it lacks is copied here without a
    request (the daemon has no copy: asking would only start one while the program
    runs) and told to the daemon later: once the first file kept is a cold window
    old, and at close. The daemon saw no request for any of them meanwhile."""
    daemon = await start_daemon("--racy-window", "0.05")
    files = [big(tmp_path / f"lib{i}.so") for i in range(3)]
    settle(*(f for f, _ in files))
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("routing", 0, 50), ("cold", 1, 300):
            await ask(d, *cmd)
        assert (await ask(d, "indexready"))["ready"] == 1
        first = [await ask(d, "routed", f) for f, _ in files[:2]]
        s = await trio.to_thread.run_sync(stats, daemon)
        await trio.sleep(0.35)  # the first file kept is a window old now
        third = await ask(d, "routed", files[2][0])  # the two before it are told
        await counted_once(daemon, "entries", 2)
        for f, _ in files[:2]:
            await until_route(d, f, "index")
        await ask(d, "close")  # the third is told
        await counted_once(daemon, "entries", 3)
    for r, (_, digest) in zip([*first, third], files, strict=True):
        assert (r["route"], r["copied_why"], r["hash"]) == ("copy", "cold", digest), r
    assert (s["misses"], s["hits"], s["entries"]) == (0, 0, 0), s


async def _leave_a_batch_due(d: Any, daemon: Daemon, first: Path, again: Path) -> list[Any]:
    """Through driver *d*, with the daemon's index held: *first* copied here and kept
    to be told (the index lacks it), then *again* twice, which leaves the batch of
    both due; the two opens of *again*."""
    for cmd in ("socket", daemon.socket_path), ("routing", 0, 50), ("cold", 1, 60_000):
        await ask(d, *cmd)
    assert (await ask(d, "indexready"))["ready"] == 1
    await ask(d, "routed", first)
    return [await ask(d, "routed", again) for _ in range(2)]


@pytest.mark.parametrize("then", ["idle", "next-open"])
async def test_a_file_opened_again_before_it_was_told_is_told_after_that_open(
    driver: Any, start_daemon: Any, tmp_path: Path, then: str
) -> None:
    """A file copied here and kept to be told, opened again (a shell loop's next
    command, a compiler's next pass): the daemon is told of what is kept, so that the
    opens after it are index hits, not copies, long before the window ends or the
    client closes; not before that open returns but at shadowd_idle (what a
    supervisor calls once it has answered the program), or, for a caller that never
    calls it, at its next routed call, before that call's own open."""
    daemon = await start_daemon("--racy-window", "0.05")
    (first, _), (again, digest) = big(tmp_path / "first.so"), big(tmp_path / "again.so")
    other, _ = big(tmp_path / "other.so")
    settle(first, again, other)
    d = driver()
    with trio.fail_after(30):
        opens = await _leave_a_batch_due(d, daemon, first, again)
        if then == "idle":
            assert (await ask(d, "idle"))["due"] == 1  # left due by the open
        else:
            await ask(d, "routed", other)  # copied and kept itself, told later
        await counted_once(daemon, "entries", 2)  # first and again told, not asked for
        assert (await ask(d, "idle"))["due"] == 0  # nothing left due
        hit = await ask(d, "routed", again)
        await ask(d, "close")
    assert [r["copied_why"] for r in opens] == ["cold", "cold"], opens
    assert (hit["route"], hit["hash"]) == ("index", digest), hit


async def test_a_forked_child_never_tells_its_parents_due_batch(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """A batch a routed open left due is the process's that copied the files: a child
    forked meanwhile whose first call is shadowd_idle (or a routed open) sends nothing
    on its parent's connection. Its request would take the id the parent's next
    request takes too (the child has a copy of the parent's next id), and its answer
    would answer that request."""
    daemon = await start_daemon("--racy-window", "0.05")
    (first, _), (again, _) = big(tmp_path / "first.so"), big(tmp_path / "again.so")
    other, digest = big(tmp_path / "other.so")
    settle(first, again, other)
    d = driver()
    with trio.fail_after(30):
        await _leave_a_batch_due(d, daemon, first, again)
        assert (await ask(d, "forkidle"))["child_status"] == 0
        asked = await ask(d, "requestfd", other)
        assert (await ask(d, "idle"))["due"] == 1  # the parent's, still due
        await counted_once(daemon, "entries", 3)
        await ask(d, "close")
    assert asked["fd"] >= 0 and asked["hash"] == digest, (asked["error"], asked)


async def test_the_race_takes_the_first_done_and_never_waits(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    async def body() -> None:
        daemon = await start_daemon("--racy-window", "0.05")
        # 16 chunks of the race's copy; its hash (the driver's) is cheap at SCHED_IDLE.
        cached, cached_digest = big(tmp_path / "cached.so", 1 << 20)
        cold, cold_digest = big(tmp_path / "cold.so", 16 << 20)
        small, _ = big(tmp_path / "new.so", 300_000)
        settle(cached, cold, small)
        d, racer = driver(), driver()
        for cmd in ("socket", daemon.socket_path), ("routing", 0, 50), ("race", 1), (
            "cold", 0, 0), ("timeouts", 200, 200, 0), ("backoff", 5000, 5000), (
            "index", 0, 0):  # fmt: skip
            await ask(d, *cmd)
            await ask(racer, *cmd)
        await ask(d, "log", "capture")
        await ask(d, "openfd", cached)  # cached, waiting for the daemon's copy
        # Connected first: the race is its one request (with a new connection's
        # hello too, the daemon still lost it now and then, 5 times in 8 here).
        await ask(racer, "openfd", cached)
        with _daemon_runs_first(daemon, racer):
            # The daemon answers before a chunk more is copied.
            hit = await ask(racer, "routed", cached)
        miss = await ask(d, "routed", cold)  # a miss: answered at once, copied on here
        held = await until_route(d, cold, "held")  # the daemon filled it; kept
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            stopped = [await ask(d, "routed", small) for _ in range(3)]
            await trio.sleep(0.3)  # the requests sent are overdue now
            noticed = await ask(d, "routed", small)
            counts = await ask(d, "counts")
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        log = await trio.to_thread.run_sync(d.finish)
        assert (hit["route"], hit["hash"]) == ("daemon", cached_digest)
        assert miss["route"] == "copy" and miss["copied_why"] in ("miss", "first")
        assert miss["hash"] == cold_digest and held[-1]["hash"] == cold_digest
        for r in stopped:  # no routed open waits on the stopped daemon
            assert r["route"] == "copy" and r["us"] < 100_000, r
        assert noticed["copied_why"] in ("failed", "breaker") and counts["fast"] >= 1
        lines = [ln for ln in log.splitlines() if ln.startswith("LOG ")]
        assert len(lines) == 1 and "timed out" in lines[0], log

    with trio.fail_after(60):
        await body()


# -- the index: hits without a round trip ----------------------------------------


async def test_index_hits_serve_the_daemons_bytes_sealed_read_only_each_its_own_offset(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    daemon = await start_daemon("--racy-window", "0.05")
    small = make_file(tmp_path / "small.conf", os.urandom(3000))
    f, digest = big(tmp_path / "lib.so", 200_000, mode=0o755)
    settle(small, f)
    d = driver()
    with trio.fail_after(30):
        base = (await ask(d, "fds"))["fds"]
        await ask(d, "socket", daemon.socket_path)
        for p in (small, f):
            await ask(d, "openfd", p)  # cached: a miss waits for the daemon's copy
        ready = await ask(d, "indexready")
        before = await trio.to_thread.run_sync(stats, daemon)
        got = [await ask(d, "routed", p) for p in (small, f, f)]
        held = (await ask(d, "fds"))["fds"]
        twice = await ask(d, "twice", f)
        plain = await ask(d, "indexopen", f, 5)
        counts = await ask(d, "counts")
        between = await trio.to_thread.run_sync(stats, daemon)
        closed = await ask(d, "close")
        # The last report's answer is not waited for: asked until the daemon
        # has read it (a count past it fails below).
        after = await counted_once(daemon, "index_hits", before["index_hits"] + 10)
    assert ready["ready"] == 1 and ready["error"] == ""
    # The connection and the daemon's /proc/PID/fd (O_PATH), nothing else: a memfd in
    # the daemon's descriptor range is opened at once, never reopened through our own
    # /proc/self/fd (which the O_PATH step outside the range would need).
    assert held == base + 2 and closed["fds"] == base
    # Small files too: an index hit costs less than any copy.
    wants = (fnv(small.read_bytes()), digest, digest)
    for r, want, mode in zip(got, wants, (0o444, 0o555, 0o555), strict=True):
        assert (r["route"], r["hit"], r["hash"]) == ("index", True, want), r
        assert r["seals"] & ALL_SEALS == ALL_SEALS and r["accmode"] == os.O_RDONLY
        assert r["memfd"] and r["mode"] == mode and r["offset"] == 0
    assert twice["routes"] == ["index", "index"] and twice["read"] == 3
    assert twice["a_offset"] == 3 and twice["b_offset"] == 0  # each its own offset
    assert plain["served"] == 5 and plain["route"] == "index" and plain["hash"] == digest
    assert counts["index"] == 10 and counts["index_refused"] == 0 and counts["daemon"] == 2
    # No round trip for any of them; the daemon learns of them from the reports.
    for s in (between, after):
        assert (s["hits"], s["misses"]) == (before["hits"], before["misses"])
    assert after["index_hits"] - before["index_hits"] == 10  # reported at close at the latest


async def test_shadowd_open_fd_takes_an_index_hit_and_shadowd_request_fd_always_asks(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """A supervisor written before the index (shadowd_open_fd, shadowd_open) gets its
    hits without a round trip; shadowd_request_fd is the round trip, always."""
    daemon = await start_daemon("--racy-window", "0.05")
    f, digest = big(tmp_path / "lib.so", 200_000)
    settle(f)
    d = driver()
    with trio.fail_after(30):
        await ask(d, "socket", daemon.socket_path)
        first = await ask(d, "openfd", f)  # a miss: waits for the daemon's copy
        ready = await ask(d, "indexready")
        before = await trio.to_thread.run_sync(stats, daemon)
        by_index = [await ask(d, "openfd", f) for _ in range(3)]
        by_path = await ask(d, "open", f)
        asked = await ask(d, "requestfd", f)
        mid = await trio.to_thread.run_sync(stats, daemon)
        await ask(d, "index", 0, 0)  # turned off: every open_fd asks again
        unindexed = await ask(d, "openfd", f)
        counts = await ask(d, "counts")
        await ask(d, "close")
        after = await trio.to_thread.run_sync(stats, daemon)
    assert first["route"] == "daemon" and first["hit"] is False and first["hash"] == digest
    assert ready["ready"] == 1
    for r in (*by_index, by_path):
        assert (r["route"], r["hit"], r["hash"]) == ("index", True, digest), r
        assert r["seals"] & ALL_SEALS == ALL_SEALS and r["accmode"] == os.O_RDONLY
    assert (asked["route"], asked["hit"], asked["hash"]) == ("daemon", True, digest)
    assert (unindexed["route"], unindexed["hit"]) == ("daemon", True)
    assert counts["index"] == 4 and counts["held"] == 0  # never the process-local tier
    # The round trips are the daemon's hits; the index hits reach it as reports.
    assert mid["hits"] - before["hits"] == 1
    assert after["hits"] - before["hits"] == 2
    assert after["index_hits"] - before["index_hits"] == 4


async def test_the_routed_open_with_the_callers_fstat_serves_the_version_it_says(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """shadowd_open_routed_stat takes the caller's fstat instead of making one: the
    cached version is an index hit as through shadowd_open_routed_fd, and a version
    the caller says that is not the cached one (its mtime 1 ns off) is not served
    from the index, while the bytes are still the file's."""
    daemon = await start_daemon("--racy-window", "0.05")
    f, digest = big(tmp_path / "lib.so", 200_000)
    settle(f)
    d = driver()
    with trio.fail_after(30):
        await ask(d, "socket", daemon.socket_path)
        await ask(d, "openfd", f)  # a miss: waits for the daemon's copy
        assert (await ask(d, "indexready"))["ready"] == 1
        same = await ask(d, "routedstat", f)
        other = await ask(d, "routedstat", f, 1)
        await ask(d, "close")
    assert (same["route"], same["hit"], same["hash"]) == ("index", True, digest), same
    assert same["seals"] & ALL_SEALS == ALL_SEALS and same["accmode"] == os.O_RDONLY
    assert other["route"] != "index" and other["hash"] == digest, other


# -- the O_PATH source: tier hits without opening the file for reading --------


async def test_the_opath_call_gives_open_fds_bytes_and_opens_only_the_files_it_must_read(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """shadowd_open_routed_opath, given an O_PATH fd: the same bytes as shadowd_open_fd
    for an index hit, tier hits (two files in turn, each reopened through the tier's
    one relay number), a file the index lacks (copied here, told later) and a small
    file copied by rule;
    sealed, read-only, own offset. The file is opened for reading (IN_OPEN) only when
    no tier serves it; the driver's fd count is what it was after many."""
    daemon = await start_daemon("--racy-window", "0.05")
    indexed, indexed_hash = big(tmp_path / "indexed.so", 200_000)
    held, held_hash = big(tmp_path / "held.so", 150_000)
    other, other_hash = big(tmp_path / "other.so", 160_000)
    missed, missed_hash = big(tmp_path / "missed.so", 300_000)
    small = make_file(tmp_path / "small.conf", b"small " * 100)
    settle(indexed, held, other, missed, small)
    d = driver()
    got: dict[str, list[Any]] = {}
    with trio.fail_after(60), OpenWatch() as watch:
        fds0 = (await ask(d, "fds"))["fds"]
        await ask(d, "socket", daemon.socket_path)
        ref = {f: await ask(d, "openfd", f) for f in (indexed, held, other)}  # the daemon copies
        assert (await ask(d, "indexready"))["ready"] == 1
        assert (await ask(d, "preload", held, other))["held"] == 2
        for f in (indexed, held):  # the client's own fds, opened once
            await ask(d, "routedopath", f)
        fds = (await ask(d, "fds"))["fds"]
        before = await ask(d, "counts")
        for f in (indexed, held, other, missed, small):
            watch.add(f)
        got["indexed"] = [await ask(d, "routedopath", indexed, how) for how in ("", "stat") * 5]
        got["indexed opens"] = [watch.events()]
        both = [
            await ask(d, "routedopath", f, how) for how in ("", "stat") * 5 for f in (held, other)
        ]
        got["held"], got["other"] = both[::2], both[1::2]
        got["held opens"] = [watch.events()]
        fds_after = (await ask(d, "fds"))["fds"]
        for name, f in (("missed", missed), ("small", small)):
            got[name] = [await ask(d, "routedopath", f)]
            got[name + " opens"] = [watch.events()]
        after = await ask(d, "counts")
        ref[missed] = await ask(d, "openfd", missed)
        ref[small] = await ask(d, "openfd", small)
        closed = (await ask(d, "close"))["fds"]
    for name, f, digest, route in (
        ("indexed", indexed, indexed_hash, "index"),
        ("held", held, held_hash, "held"),
        ("other", other, other_hash, "held"),
        ("missed", missed, missed_hash, "copy"),
        ("small", small, fnv(small.read_bytes()), "copy"),
    ):
        for r in got[name]:
            assert (r["route"], r["hash"], r["fsize"]) == (route, digest, f.stat().st_size), r
            assert r["hash"] == ref[f]["hash"], (r, ref[f])  # shadowd_open_fd's bytes
            assert r["seals"] & ALL_SEALS == ALL_SEALS and r["memfd"], r
            assert (r["accmode"], r["offset"], r["nonblock"]) == (os.O_RDONLY, 0, False), r
    assert got["missed"][0]["copied_why"] == "cold", got["missed"]
    assert got["small"][0]["copied_why"] == "rule", got["small"]
    # Tier hits never opened the file for reading; a miss and a copy did.
    assert got["indexed opens"] == [0] and got["held opens"] == [0], got
    assert got["missed opens"][0] > 0 and got["small opens"][0] > 0, got
    assert after["read_opens"] - before["read_opens"] == 2, (before, after)
    assert after["unopened"] - before["unopened"] == 30, (before, after)
    assert fds_after == fds and closed == fds0, (fds0, fds, fds_after, closed)


async def test_the_opath_call_never_opens_a_fifo(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """A FIFO given as an O_PATH fd: refused as not regular before any open (no
    IN_OPEN; a writer waiting for a reader is not let through)."""
    daemon = await start_daemon("--racy-window", "0.05")
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    d = driver()
    with trio.fail_after(30), OpenWatch() as watch:
        await ask(d, "socket", daemon.socket_path)
        watch.add(fifo)
        got = [
            await without_hanging(fifo, lambda how=how: d("routedopath", fifo, how))
            for how in ("", "stat")
        ]
        opens = watch.events()
        await ask(d, "close")
    assert opens == 0, opens
    for r in got:
        assert (r["fd"], r["code"], r["route"]) == (-1, "not-regular", "none"), r


async def _hold_in_the_tier_alone(d: Any, socket_path: Path, *files: Path) -> None:
    """The driver *d* on *socket_path*, without the index and with the tier's bound
    a minute, preloads *files* until it holds them all."""
    for cmd in ("socket", socket_path), ("index", 0, 0), ("heldrecheck", 60_000):
        await ask(d, *cmd)
    deadline = time.monotonic() + 10
    while (await ask(d, "preload", *files))["held"] < len(files):
        assert time.monotonic() < deadline, "the daemon never cached them"
        await trio.sleep(0.01)


def _unreadable_and_readable(shared_dir: Path) -> tuple[Path, Path]:
    """Root's file of mode 000 and a readable one, both above the copy crossover,
    in a directory every user may traverse; settled."""
    secret = make_file(shared_dir / "secret.so", os.urandom(200_000), mode=0o000)
    public = make_file(shared_dir / "public.so", os.urandom(200_000))
    settle(secret, public)
    return secret, public


@requires_root
async def test_the_opath_call_serves_no_held_file_to_a_file_system_uid_that_may_not_read_it(
    driver: Any, start_daemon: Any, shared_dir: Path
) -> None:
    """Root's mode-000 file and a readable one, held in the tier: with the caller's
    file-system uid a test user's (setfsuid, as a supervisor may take its tracee's),
    the O_PATH call refuses the first (EACCES, counted nowhere) and serves the second
    from the tier; with uid 0 again, both. (faccessat2 without AT_EACCESS would ask
    as the real uid, root, and let it through. No index here: /proc/PID/fd of the
    daemon is closed to that fsuid anyway.)"""
    daemon = await start_daemon("--racy-window", "0.05")
    secret, public = _unreadable_and_readable(shared_dir)
    user = test_uid(0)
    d = driver()
    with trio.fail_after(60):
        await _hold_in_the_tier_alone(d, daemon.socket_path, secret, public)
        as_root = await ask(d, "routedopath", secret)
        assert (await ask(d, "setfsuid", user))["fsuid"] == user
        before = await ask(d, "counts")
        denied = [await ask(d, "routedopath", secret, how) for how in ("", "stat")]
        allowed = await ask(d, "routedopath", public)
        counts = await ask(d, "counts")
        await ask(d, "setfsuid", 0)
        again = await ask(d, "routedopath", secret)
        await ask(d, "close")
    assert (as_root["route"], as_root["hash"]) == ("held", fnv(secret.read_bytes())), as_root
    for r in denied:
        assert (r["fd"], r["errnum"], r["route"], r["hit"]) == (-1, errno.EACCES, "none", False)
    assert (allowed["route"], allowed["hash"]) == ("held", fnv(public.read_bytes())), allowed
    assert counts["held"] - before["held"] == 1, (before, counts)  # the readable one
    assert (again["route"], again["hash"]) == ("held", fnv(secret.read_bytes())), again


@requires_root
async def test_a_non_root_caller_gets_no_index_hit_of_a_file_it_may_not_read(
    driver_bin: str, start_daemon: Any, shared_dir: Path, tmp_path: Path
) -> None:
    """A daemon and a client of one test user; the daemon has a group the client has
    not, and root's file readable by that group alone (0040: a daemon caches only
    what its own uid and groups may read) is in its index. The client holds the
    index, and the O_PATH call still refuses that file (EACCES) while it serves the
    readable one beside it from the index."""
    from shadowd_client import Client

    user, group = test_uid(1), test_uid(3)
    run = shared_dir / "run"
    run.mkdir()
    os.chown(run, user, user)  # where it may make its socket
    daemon = await start_daemon(
        "--racy-window", "0.05", user=(user, user), groups=(group,), directory=run
    )
    secret, public = _unreadable_and_readable(shared_dir)
    os.chown(secret, 0, group)
    secret.chmod(0o040)
    settle(secret)

    def cache_as_root() -> dict[str, Any]:
        with Client(daemon.socket_path, timeout=10) as c:
            for f in (secret, public):
                os.close(c.open(str(f)))
            return c.stats()

    binary = shared_dir / "c_driver"
    shutil.copy(driver_bin, binary)
    binary.chmod(0o755)
    with trio.fail_after(60), Driver(str(binary), tmp_path / "user.err", user=user) as d:
        cached = await trio.to_thread.run_sync(cache_as_root)
        await ask(d, "socket", daemon.socket_path)
        assert (await ask(d, "indexready"))["ready"] == 1  # the daemon's uid
        denied = [await ask(d, "routedopath", secret, how) for how in ("", "stat")]
        allowed = await ask(d, "routedopath", public)
        counts = await ask(d, "counts")
        await ask(d, "close")
    assert cached["entries"] == 2, cached  # both in the daemon's index
    for r in denied:
        assert (r["fd"], r["errnum"], r["route"], r["hit"]) == (-1, errno.EACCES, "none", False), r
    assert (allowed["route"], allowed["hash"]) == ("index", fnv(public.read_bytes())), allowed
    assert counts["index"] == 1 and counts["unopened"] == 1, counts


@requires_root
async def test_a_process_that_became_another_user_gets_no_held_file_it_may_not_read(
    driver: Any, start_daemon: Any, shared_dir: Path
) -> None:
    """Root holds its mode-000 file and a readable one in the tier (no index: the
    tier alone), then becomes a test user for good: the O_PATH call refuses the first
    (EACCES), serves the second from the tier."""
    daemon = await start_daemon("--racy-window", "0.05", "--socket-mode", "0666")
    secret, public = _unreadable_and_readable(shared_dir)
    user = test_uid(2)
    d = driver()
    with trio.fail_after(60):
        await _hold_in_the_tier_alone(d, daemon.socket_path, secret, public)
        as_root = await ask(d, "routedopath", secret)
        dropped = await ask(d, "dropuid", user)
        denied = await ask(d, "routedopath", secret)
        allowed = await ask(d, "routedopath", public)
        await ask(d, "close")
    assert (as_root["route"], as_root["hash"]) == ("held", fnv(secret.read_bytes())), as_root
    assert dropped == {"rc": 0, "euid": user}, dropped
    assert (denied["fd"], denied["errnum"], denied["route"]) == (-1, errno.EACCES, "none"), denied
    assert (allowed["route"], allowed["hash"]) == ("held", fnv(public.read_bytes())), allowed


async def test_the_daemon_counts_the_index_hits_reported_in_batches(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    daemon = await start_daemon("--racy-window", "0.05")
    f, _ = big(tmp_path / "lib.so")
    settle(f)
    d = driver()
    with trio.fail_after(30):
        await ask(d, "socket", daemon.socket_path)
        await ask(d, "openfd", f, f)  # cached, labelled
        await ask(d, "indexopen", f, 600)  # reported at 256 and 512 hits
        counts = await ask(d, "counts")
        # The reports went on the driver's connection, the stats come on ours:
        # asked until the daemon has read them (a count past the reports fails).
        mid = await counted_once(daemon, "index_hits", 512)
        await ask(d, "indexopen", f, 10)
        await ask(d, "report")  # the rest, now
        reported = await counted_once(daemon, "index_hits", 610)
        await ask(d, "indexopen", f, 7)
        await ask(d, "close")  # and at close (its answer not waited for)
        closed = await counted_once(daemon, "index_hits", 617)
    assert counts["index"] == 600 and counts["reported"] == 512
    assert mid["index_hits"] == 512
    assert reported["index_hits"] == 610 and closed["index_hits"] == 617
    assert closed["hits"] == 0  # (the openfd waited for the copy: a miss)
    assert [t["path"] for t in closed["top_by_hits"]] == [str(f)]  # the LRU and top files too


async def test_close_sends_the_last_report_without_waiting_for_its_answer(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """A supervisor's exit costs no round trip for its statistics: with the daemon
    stopped and a reply timeout of 20 s, shadowd_close returns at once after
    sending the last report (nothing else waits for an answer), and the daemon,
    continued, counts every hit of it (the report was queued before the close, and
    the client's socket held no unread answer to reset the connection with)."""
    daemon = await start_daemon("--racy-window", "0.05")
    f, _ = big(tmp_path / "lib.so")
    settle(f)
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("timeouts", 20_000, 20_000, 0):
            await ask(d, *cmd)
        await ask(d, "openfd", f, f)  # cached
        assert (await ask(d, "indexready"))["ready"] == 1
        await ask(d, "indexopen", f, 7)  # fewer than a report's 256: none sent yet
        before = await trio.to_thread.run_sync(stats, daemon)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            with trio.fail_after(10):  # the old close waited out the 20 s
                await ask(d, "close")
            counts = await ask(d, "counts")
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        after = await counted_once(daemon, "index_hits", before["index_hits"] + 7)
    assert counts["index"] == counts["reported"] == 7, counts
    assert after["index_hits"] == before["index_hits"] + 7


def _small_files(directory: Path, n: int) -> Path:
    """*directory* with *n* small files of their own bytes (100 + i), past the racy window."""
    directory.mkdir()
    for i in range(n):
        make_file(directory / str(i), os.urandom(100 + i))
    settle(*directory.iterdir())
    return directory


def _cache_all(daemon: Daemon, directory: Path) -> None:
    """Every file of *directory* cached by *daemon* (a Python client's miss waits for its copy)."""
    from shadowd_client import Client

    with Client(daemon.socket_path, timeout=10) as c:
        for f in directory.iterdir():
            os.close(c.open(f))


async def test_a_close_in_several_reports_while_the_daemon_is_stopped_loses_none(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """The last reports of a close fill three requests under a small --max-request (35
    files each). The daemon is stopped: the close waits its reply timeout for their
    answers, then closes its socket with all three queued. Continued, the daemon's
    answer to the first fails (its client is gone), and it still counts every hit of
    the three: the reports queued behind a failed answer are read at the connection's
    end and counted (before, only the first was)."""
    daemon = await start_daemon("--racy-window", "0.05", "--max-request", "1024")
    files = _small_files(tmp_path / "files", 100)

    d = driver()
    with trio.fail_after(60):
        await trio.to_thread.run_sync(_cache_all, daemon, files)
        for cmd in ("socket", daemon.socket_path), ("timeouts", 10_000, 300, 0), ("log", "quiet"):
            await ask(d, *cmd)
        assert (await ask(d, "indexready"))["ready"] == 1
        before = await trio.to_thread.run_sync(stats, daemon)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            # 100 files, one hit each: fewer than a report's 256 hits, none sent yet
            hit = await ask(d, "indexround", 100, files, 100)
            await ask(d, "close")  # three reports, their answers waited for 0.3 s
            counts = await ask(d, "counts")
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        want = before["index_hits"] + 100
        deadline = time.monotonic() + 5
        while (after := await trio.to_thread.run_sync(stats, daemon))["index_hits"] < want:
            if time.monotonic() > deadline:
                break
            await trio.sleep(0.01)
    assert hit["served"] == 100 and counts["reported"] == 100, (hit, counts)
    assert after["index_hits"] == want, (after["index_hits"], want)


async def test_index_hits_while_the_daemon_reads_nothing_are_all_reported_later(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """The daemon stopped (SIGSTOP) while two clients hit files through its index: one
    file 17,920 times (its 70 reports of one file find every request slot waiting for an
    answer), and 300 files 80 times each (their reports of 256 files fill the socket:
    EAGAIN; then the table of 256 files fills with hits not reported). None is lost:
    once the daemon reads again, each close reports the rest, and the daemon counts
    exactly every hit."""
    daemon = await start_daemon("--racy-window", "0.05")
    files = _small_files(tmp_path / "files", 300)

    one, many = driver(), driver()
    with trio.fail_after(60):
        await trio.to_thread.run_sync(_cache_all, daemon, files)
        for d in one, many:
            # Timeouts no stop below reaches: a late answer would open the breaker.
            for cmd in ("socket", daemon.socket_path), ("timeouts", 10_000, 10_000, 0), (
                    "log", "quiet"):  # fmt: skip
                await ask(d, *cmd)
            assert (await ask(d, "indexready"))["ready"] == 1
        before = await trio.to_thread.run_sync(stats, daemon)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            hits = [
                await ask(one, "indexopen", files / "0", 256 * 70),
                await ask(many, "indexround", 300 * 80, files, 300),
            ]
            counts = [await ask(d, "counts") for d in (one, many)]
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        closed = []
        for d in one, many:
            await ask(d, "close")  # the last reports, as room is made (the last not awaited)
            closed.append(await ask(d, "counts"))
        after = await counted_once(daemon, "index_hits", before["index_hits"] + 256 * 70 + 300 * 80)
    assert [r["served"] for r in hits] == [256 * 70, 300 * 80], hits
    for mid, end in zip(counts, closed, strict=True):
        assert mid["reported"] < mid["index"], mid  # the stopped daemon did hold them up
        assert end["reported"] == end["index"] == mid["index"], end
    assert after["index_hits"] - before["index_hits"] == 256 * 70 + 300 * 80


async def test_index_hits_not_reported_when_the_breaker_opens_go_to_the_same_daemon(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """A stopped daemon answers a request late: the connection is dropped and the
    breaker opens with 100 index hits not reported yet. They are kept, and reported on
    the next connection to that same daemon (its pid, its index's generation)."""
    daemon = await start_daemon("--racy-window", "0.05")
    f, _ = big(tmp_path / "lib.so")
    g, _ = big(tmp_path / "other.so")
    settle(f, g)
    d = driver()
    with trio.fail_after(60):
        for cmd in ("socket", daemon.socket_path), ("timeouts", 10_000, 300, 0), (
                "backoff", 50, 50), ("log", "quiet"):  # fmt: skip
            await ask(d, *cmd)
        await ask(d, "openfd", f)  # cached (a miss waits for the daemon's copy)
        assert (await ask(d, "indexready"))["ready"] == 1
        before = await trio.to_thread.run_sync(stats, daemon)
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            hits = await ask(d, "indexopen", f, 100)  # fewer than a report's 256
            late = await ask(d, "requestfd", g)  # not answered within 300 ms
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
        await trio.sleep(0.1)  # past the breaker's window
        again = await ask(d, "indexopen", f)  # a new connection, the daemon's index again
        counts = await ask(d, "counts")
        await ask(d, "close")  # the last report's answer not waited for
        after = await counted_once(daemon, "index_hits", before["index_hits"] + 101)
    assert hits["served"] == 100 and late["fd"] == -1 and late["code"] == "unavailable", late
    assert again["served"] == 1 and counts["index"] == 101, (again, counts)
    assert after["index_hits"] - before["index_hits"] == 101


@requires_root
async def test_a_peer_of_another_uid_gets_no_index_and_keeps_the_socket(
    driver_bin: str, start_daemon: Any, shared_dir: Path, tmp_path: Path
) -> None:
    daemon = await start_daemon("--racy-window", "0.05", "--socket-mode", "0666")
    binary = shared_dir / "c_driver"
    shutil.copy(driver_bin, binary)
    binary.chmod(0o755)
    f, digest = big(shared_dir / "lib.so")
    f.chmod(0o644)
    settle(f)
    with Driver(str(binary), tmp_path / "nobody.err", None, NOBODY) as d, trio.fail_after(30):
        await ask(d, "socket", daemon.socket_path)
        await ask(d, "routing", 0, 50)
        await ask(d, "cold", 0, 0)
        ready = await ask(d, "indexready")  # not-permitted: none, and no error
        plain = await ask(d, "indexopen", f)
        served = await until_route(d, f, "held")  # the socket: a miss, a hit (kept), the tier
        counts = await ask(d, "counts")
        nothing = await ask(d, "indextamper")
    assert ready["ready"] == 0 and ready["error"] == "" and ready["code"] == ""
    assert plain["fd"] == -1 and "no index" in plain["error"]
    assert all(r["hash"] == digest for r in served)
    assert "daemon" in [r["route"] for r in served] and "index" not in [r["route"] for r in served]
    assert counts["index"] == 0 and counts["daemon"] >= 1
    assert nothing["mprotect"] == -2 and nothing["opened_rw"] is False  # no index mapped


async def test_a_c_client_cannot_write_or_grow_the_index(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    daemon = await start_daemon("--racy-window", "0.05")
    d = driver()
    with trio.fail_after(30):
        await ask(d, "socket", daemon.socket_path)
        assert (await ask(d, "indexready"))["ready"] == 1
        r = await ask(d, "indextamper")
    # Its mapping cannot be made writable (a read-only fd's shared mapping).
    assert r["mprotect"] == -1 and r["mprotect_errno"] == 13  # EACCES
    # Root may open the daemon's index read-write, but the seals hold.
    assert r["opened_rw"] is True
    assert r["write"] == -1 and r["write_errno"] == 1  # EPERM: F_SEAL_FUTURE_WRITE
    assert r["grow"] == -1 and r["grow_errno"] == 1  # F_SEAL_GROW
    assert r["shrink"] == -1 and r["shrink_errno"] == 1  # F_SEAL_SHRINK
    assert r["mmap_rw"] is False and r["mmap_errno"] == 1
    assert r["size_after"] == r["size_before"]


async def test_ten_thousand_c_index_hits_while_files_change_serve_no_wrong_byte(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """Another client replaces files (new inodes) while a cache of 3 entries evicts and refills.

    The driver asks for each change after every churn.HITS_PER_CHANGE index hits
    (tests/churn.py): the same mix on a loaded host as on an idle one. No racy window:
    no two versions share a key (tests/test_index.py's twin says why)."""
    daemon = await start_daemon("--racy-window", "0", "--max-entries", "3")
    names = churn.library(tmp_path)
    rewriter = churn.Rewriter(names, *churn.fifos(tmp_path))
    d = driver()
    # Timeouts no loaded host reaches: a reply 250 ms late (the default) opens
    # the breaker, and the opens of its window are copies, not index hits.
    for cmd in ("socket", daemon.socket_path), ("routing", 0, -1), ("held", 0, 0), (
            "cold", 0, 0), ("timeouts", 10_000, 10_000, 0), ("log", "quiet"):  # fmt: skip
        d(*cmd)
    rewriter.start()
    try:
        # A bound for a hang only: seconds on an idle host.
        with trio.fail_after(120):
            r = await trio.to_thread.run_sync(
                lambda: d("churn", 10_000, churn.HITS_PER_CHANGE, churn.HOT, churn.HITS_PER_COLD,
                          rewriter.asks, rewriter.dones, *names, timeout=110)
            )  # fmt: skip
    finally:
        rewriter.join()  # ended by the driver's closing its FIFO (or its end)
    changes = rewriter.changes
    assert r["wrong"] == 0 and r["unsealed"] == 0 and r["failed"] == 0, r
    assert r["index"] == 10_000, (r, changes)
    assert changes == r["asked"] == 10_000 // churn.HITS_PER_CHANGE, (r, changes)
    assert r["routes"]["daemon"] + r["routes"]["copy"] > 0, r  # the cache did change under it
    with trio.fail_after(30):
        await ask(d, "close")  # its last report (its answer not waited for)
        counts = await ask(d, "counts")
        s = await counted_once(daemon, "index_hits", counts["reported"])
    # The daemon counted every hit: what a report could not carry (no request
    # slot free, the socket full) went with a later one, the rest at close.
    assert s["index_hits"] == counts["reported"] == counts["index"], (counts, s["index_hits"])
    assert s["evictions"] > 0 and s["invalidations"] > 0, s


# A stand-in "daemon" in this very process: it answers hello (version 2), index
# and report, and its index is shadowd/index.py's over a cache of real memfds,
# so that a test can change what its descriptor numbers are, or a slot, under
# the C client's feet (the C client opens /proc/<this process>/fd/N).


class _Stand(IndexedCache):
    """A version 2 stand-in daemon that gives out an in-process index."""

    def __init__(self, tmp_path: Path, n: int = 4, *, ranged: bool = False) -> None:
        super().__init__(tmp_path, n, ranged=ranged)
        self.reports: list[list[list[int]]] = []

    def slot(self, i: int) -> int:
        return self.slot_number(self.files[i][1])

    def poke(self, n: int, offset: int, value: int, width: int) -> None:
        from shadowd.index import HEADER, SLOT

        at = HEADER + n * SLOT + offset
        self.index._map[at : at + width] = value.to_bytes(width, "little", signed=value < 0)

    def serve(self, conn: socket.socket) -> None:
        for msg, fds in _requests(conn):
            close_fds(fds)
            self.serve_one(conn, msg)

    def serve_one(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        answer_one(self, conn, msg, self.reports)


@pytest.fixture
def stand(tmp_path: Path) -> Iterator[tuple[_Stand, Path]]:
    s = _Stand(tmp_path)
    path = tmp_path / "stand.sock"
    try:
        with stand_in_daemon(path, s.serve):
            yield s, path
    finally:
        s.close()


def test_a_reused_descriptor_number_is_detected_every_time(
    driver: Any, stand: tuple[_Stand, Path], tmp_path: Path
) -> None:
    """The daemon's fd N closed and N reused by something else: never served, no side effect."""
    from shadowd.memfd import sealed_from_bytes

    s, path = stand
    d = driver()
    d("socket", path)
    for f, _ in s.files:
        r = d("indexopen", f)
        assert r["route"] == "index" and r["hash"] == fnv(f.read_bytes()), r
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    plain = make_file(tmp_path / "plain", b"x" * 3001)
    look_alike = sealed_from_bytes(s.files[1][0].read_bytes())  # same bytes, size and mode
    others = [
        os.open(fifo, os.O_RDONLY | os.O_NONBLOCK),  # a real open would block, or wake a writer
        os.open(plain, os.O_RDONLY),
        look_alike.fd,
        os.open("/dev/null", os.O_RDONLY),
    ]
    try:
        for i, other in enumerate(others):
            f, _ = s.files[i]
            refused = d("counts")["index_refused"]
            with standing_in(s.entry(i).file.fd, other):
                r = d("indexopen", f, 50, timeout=10)
                counts = d("counts")
            assert r["served"] == 0 and r["fd"] == -1, (i, r)
            assert counts["index_refused"] == refused + 50, (i, counts)  # every time
            again = d("indexopen", f)  # and the right one again
            assert again["served"] == 1 and again["hash"] == fnv(f.read_bytes())
    finally:
        for fd in (others[0], others[1], others[3]):
            os.close(fd)
        look_alike.release()
    assert d("close")["fds"] >= 0
    # The close sends the last report without waiting for its answer: the
    # stand-in's thread may read it after close returned.
    deadline = time.monotonic() + 10
    while sum(n for hits in s.reports for _, _, n in hits) < 8 and time.monotonic() < deadline:
        time.sleep(0.01)
    assert sum(n for hits in s.reports for _, _, n in hits) == 4 + 4  # reported at close


class _SilentOnOpens(_Stand):
    """A stand-in that answers its hello, the index and reports, and no open ever."""

    def serve(self, conn: socket.socket) -> None:
        for msg, fds in _requests(conn):
            close_fds(fds)
            if msg["op"] in ("hello", "index", "report"):
                self.serve_one(conn, msg)


def test_index_hits_are_reported_while_raced_opens_go_unanswered(
    driver: Any, tmp_path: Path
) -> None:
    """Raced opens the daemon never answers do not take every request slot: the
    index's hits counted meanwhile are still reported, to the last one."""
    s = _SilentOnOpens(tmp_path)
    path = tmp_path / "stand.sock"
    other = make_file(tmp_path / "not-indexed", os.urandom(50_000))
    try:
        with stand_in_daemon(path, s.serve):
            d = driver()
            for cmd in ("socket", path), ("timeouts", 10000, 10000, 0), ("routing", 0, -1), (
                    "cold", 0, 0), ("log", "quiet"):  # fmt: skip
                d(*cmd)
            f, _ = s.files[0]
            assert d("indexopen", f)["route"] == "index"
            for _ in range(100):  # raced: sent, copied here, never answered
                r = d("routed", other)
                assert r["fd"] >= 0 and r["hash"] == fnv(other.read_bytes()), r
            hits = d("indexopen", f, 300)
            assert hits["served"] == 300, hits
            assert d("counts")["index"] == 301
            d("close")
    finally:
        s.close()
    assert sum(n for hits in s.reports for _, _, n in hits) == 301


def test_in_the_daemons_range_another_memfd_at_n_is_refused_every_time(
    driver: Any, tmp_path: Path
) -> None:
    """A number of the daemon's descriptor range is opened read-only at once (it holds a
    memfd at every instant) and then checked: a memfd of the same bytes, size and mode
    but another inode, or the range's stand-in, is refused every time, nothing kept; the
    served fd needs no reopen through our own /proc/self/fd."""
    from shadowd.memfd import sealed_from_bytes

    s = _Stand(tmp_path, ranged=True)
    path = tmp_path / "stand.sock"
    fd_range = s.index.fd_range
    assert fd_range is not None
    look_alike = sealed_from_bytes(s.files[0][0].read_bytes())
    try:
        with stand_in_daemon(path, s.serve):
            d = driver()
            base = d("fds")["fds"]
            d("socket", path)
            for f, _ in s.files:
                r = d("indexopen", f)
                assert r["route"] == "index" and r["hash"] == fnv(f.read_bytes()), r
                assert not r["nonblock"], r  # opened O_NONBLOCK, served without it
            # The connection and the daemon's /proc/PID/fd: no /proc/self/fd was needed.
            assert d("fds")["fds"] == base + 2
            f, _ = s.files[0]
            memfd = s.entry(0).file.fd
            assert memfd in fd_range
            standin = fd_range.base + fd_range.size - 1  # (the 4 files take the lowest)
            for other in (look_alike.fd, standin):
                refused = d("counts")["index_refused"]
                with standing_in(memfd, other):
                    r = d("indexopen", f, 50, timeout=10)
                    counts = d("counts")
                assert r["served"] == 0 and r["fd"] == -1, (other, r)
                assert counts["index_refused"] == refused + 50, (other, counts)
                assert d("fds")["fds"] == base + 2
                again = d("indexopen", f)
                assert again["served"] == 1 and again["hash"] == fnv(f.read_bytes())
            assert d("close")["fds"] == base
    finally:
        look_alike.release()
        s.close()


def test_a_changed_slot_a_changed_memfd_and_another_version_are_not_served(
    driver: Any, stand: tuple[_Stand, Path]
) -> None:
    from shadowd.cache import HostKey

    s, path = stand
    d = driver()
    d("socket", path)
    (f0, st0), (f1, _), (f2, _), (f3, st3) = s.files
    assert d("indexopen", f1)["route"] == "index"
    n = s.slot(1)
    seq = int.from_bytes(s.index._map[4096 + n * 128 : 4096 + n * 128 + 4], "little")
    s.poke(n, 0, seq + 1, 4)  # odd: being written
    odd = d("indexopen", f1)
    s.poke(n, 0, seq + 2, 4)  # written again: trusted again
    even = d("indexopen", f1)
    # The slot now names file 2's memfd (a slot changed behind our back).
    s.poke(n, 48, s.entry(2).file.fd, 4)
    swapped = d("indexopen", f1)
    s.poke(n, 48, s.entry(1).file.fd, 4)
    # A holder of file 2's memfd changed it (its times): its stamp moved.
    held = os.open(f"/proc/self/fd/{s.entry(2).file.fd}", os.O_RDONLY)
    os.utime(held, ns=(1, 1))
    os.close(held)
    changed = d("indexopen", f2)
    # The caller sees another version (a new mtime) than the one cached.
    os.utime(f3, ns=(st3.st_atime_ns, st3.st_mtime_ns + 1))
    other_version = d("indexopen", f3)
    # An entry the cache dropped: its slot went before its memfd could close.
    s.cache.remove(HostKey(st0.st_dev, st0.st_ino))
    removed = d("indexopen", f0)
    counts = d("counts")
    assert odd["fd"] == -1 and even["hash"] == fnv(f1.read_bytes())
    for r in (swapped, changed, other_version, removed):
        assert r["fd"] == -1 and r["served"] == 0, r
    # The inode checks refused the swapped slot and the changed memfd; the
    # version and the removed slot were never tried.
    assert counts["index_refused"] == 2 and counts["index"] == 2, counts


async def test_after_a_daemon_restart_the_new_daemons_index_serves(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """The old index names a pid that is gone: dropped with its connection; the new one asked."""
    first = await start_daemon("--racy-window", "0.05", socket_name="r.sock")
    f, digest = big(tmp_path / "lib.so")
    settle(f)
    d = driver()
    with trio.fail_after(60):
        for cmd in ("socket", first.socket_path), ("routing", 0, 50), ("cold", 0, 0), (
                "held", 0, 0), ("log", "quiet"):  # fmt: skip
            await ask(d, *cmd)
        before = await until_route(d, f, "index")
        assert await first.terminate() == 0
        second = await start_daemon("--racy-window", "0.05", socket_name="r.sock")
        after = await until_route(d, f, "index")  # a miss the new daemon fills, then its index
        counts = await ask(d, "counts")
        await ask(d, "close")
        s = await trio.to_thread.run_sync(stats, second)
    assert all(r["hash"] == digest for r in before + after)
    assert after[0]["route"] == "copy" and after[0]["copied_why"] in ("miss", "failed", "first")
    assert counts["index_refused"] == 0  # the old daemon's slots led nowhere, not to a wrong file
    assert s["index_hits"] == 1 and s["misses"] >= 1


# Pid 1 of a new pid namespace: forks a process that gets the daemon's pid
# number here and holds a FIFO (with a writer: nothing blocks) at number N,
# then becomes the driver.
_IMPOSTOR_THEN_DRIVER = """
import os, sys
driver, fifo, dpid, n = sys.argv[1], sys.argv[2], int(sys.argv[3]), int(sys.argv[4])
with open("/proc/sys/kernel/ns_last_pid", "w") as f:
    f.write(str(dpid - 1))
ready_r, ready_w = os.pipe()
hold_r, hold_w = os.pipe()
if os.fork() == 0:
    os.dup2(os.open(fifo, os.O_RDWR), n)
    os.write(ready_w, b"x")
    os.read(hold_r, 1)  # killed when pid 1 exits
    os._exit(0)
os.read(ready_r, 1)
os.execv(driver, [driver])
"""


@requires_root
async def test_a_process_of_another_pid_namespace_at_the_daemons_pid_is_never_opened(
    driver_bin: str, start_daemon: Any, shared_dir: Path, tmp_path: Path
) -> None:
    """The C client in another pid namespace, where the daemon's pid names another
    process: a number of the daemon's range there may be a FIFO, never opened for real
    (no IN_OPEN); the index is not taken (/proc/PID is not the daemon)."""
    daemon = await start_daemon("--racy-window", "0.05")
    f = make_file(shared_dir / "lib.so", os.urandom(5000))
    settle(f)
    fifo = shared_dir / "fifo"
    os.mkfifo(fifo)

    with OpenWatch() as watch:
        with trio.fail_after(60):
            n = await trio.to_thread.run_sync(range_number_of, daemon.socket_path, f)
            d = Driver(
                "unshare",
                tmp_path / "ns.err",
                argv=["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-c",
                      _IMPOSTOR_THEN_DRIVER, driver_bin, str(fifo), str(daemon.pid), str(n)],
            )  # fmt: skip
            with d:
                await ask(d, "socket", daemon.socket_path)  # the impostor is ready
                watch.add(fifo)
                await ask(d, "indexready")
                got = await ask(d, "indexopen", f, 3)
        opens = watch.events()
    assert opens == 0 and got["served"] == 0, (opens, got)


@requires_root
@planting_cases
async def test_a_fifo_at_a_number_of_the_range_is_opened_only_from_a_daemon_of_our_uid(
    uid: int, manager: bool, driver: Any, shared_dir: Path
) -> None:
    """A daemon (a stand-in, in a process of its own) holds at a number of its range,
    where file 0's slot points, an O_PATH descriptor of a FIFO that its user may name
    but not open (root's, 0600). The C client, as root, takes its index:

    - of another uid (the connection's SO_PEERCRED), the range is not taken at its
      word: the FIFO is never opened (no IN_OPEN, nothing waits for a writer), file 0
      is refused, file 1 served through O_PATH;
    - of our uid, on a socket another process listened on (a service manager's:
      SO_PEERCRED names that process, not the daemon): the same;
    - of our own uid, listening itself (a daemon bug could put a FIFO there), the
      number is opened at once (IN_OPEN: a real open), yet nonblocking: it does not
      wait for a writer, and it is refused. File 1 is served, without O_NONBLOCK."""
    fifo, work = fifo_to_plant(shared_dir, uid)
    d = driver()
    with OpenWatch() as watch:
        with trio.fail_after(60):
            with planting_daemon(uid, work, fifo, manager=manager) as said:
                f0, f1 = (Path(x) for x in said["files"])
                await ask(d, "socket", said["socket"])
                ready = await ask(d, "indexready")
                watch.add(fifo)
                first = await without_hanging(fifo, lambda: d("indexopen", f0))
                second = await ask(d, "indexopen", f1)
                counts = await ask(d, "counts")
                await ask(d, "close")
        opens = watch.events()
    assert ready["ready"] == 1, ready
    assert first["served"] == 0 and first["fd"] == -1, first
    assert second["served"] == 1 and second["hash"] == fnv(f1.read_bytes()), second
    assert not second["nonblock"] and second["accmode"] == os.O_RDONLY, second
    assert counts["index_refused"] == 1, counts
    if uid == os.geteuid() and not manager:
        assert ready["direct"] == said["range"][1] and opens > 0  # a real open, no wait
    else:
        assert ready["direct"] == 0 and opens == 0  # never opened for real


def test_an_index_never_answered_opens_the_breaker_for_the_opens_after(
    driver: Any, tmp_path: Path
) -> None:
    """A daemon that answers the hello and then nothing (hung after it): the supervisor's
    shadowd_index_ready waits out its reply timeout for the index, and that is the one
    timeout of the breaker's window: the routed open right after copies at once
    (copied_why breaker), where it waited out a second timeout of its own before."""
    f, digest = big(tmp_path / "lib.so")
    path = tmp_path / "greets.sock"
    with stand_in_daemon(path, greets_v2):
        d = driver()
        for cmd in ("socket", path), ("timeouts", 1000, 300, 0), ("backoff", 5000, 5000), (
                "routing", 0, 0), ("log", "quiet"):  # fmt: skip
            d(*cmd)
        assert d("connect", path)["rc"] == 0
        ready = d("indexready")
        routed = d("routed", f)
        counts = d("counts")
    assert ready["ready"] == 0 and ready["us"] >= 300_000, ready
    assert routed["hash"] == digest and routed["copied_why"] == "breaker", routed
    assert routed["us"] < 150_000, routed
    assert counts["available"] == 0, counts


class _Shrinkable(_Stand):
    """A stand-in whose index is a memfd it may still shrink: the bytes of its real
    index (the header naming this memfd as the daemon's own descriptor of it), with no
    seal at all."""

    def __init__(self, tmp_path: Path) -> None:
        super().__init__(tmp_path)
        self.shrinkable = -1

    def serve_one(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        if msg["op"] != "index":
            return super().serve_one(conn, msg)
        data = bytearray(self.index._map)
        fd = self.shrinkable = os.memfd_create("shadowd-index", os.MFD_CLOEXEC)
        data[56:60] = fd.to_bytes(4, "little")  # "the daemon's own descriptor of it"
        os.pwrite(fd, bytes(data), 0)
        reply = {"id": msg["id"], "ok": True, "pid": os.getpid(), "slots": self.index.slots}
        conn.sendmsg([msgpack.packb(reply)], scm_rights([fd]))
        return None


class _Relabelled(_Stand):
    """A stand-in whose index header says one field otherwise: *poke* is (offset,
    struct format, value), or None for the header as it is. It keeps the ops it was
    asked."""

    def __init__(self, tmp_path: Path, poke: tuple[int, str, int] | None) -> None:
        super().__init__(tmp_path)
        self.ops: list[str] = []
        if poke is not None:
            offset, fmt, value = poke
            struct.pack_into(fmt, self.index._map, offset, value)

    def serve_one(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        self.ops.append(msg["op"])
        super().serve_one(conn, msg)


@pytest.mark.parametrize(
    "header", ["as-is", "layout-1", "layout-next", "memfd-dev-of-a-disk", "memfd-dev-plus-one"]
)
def test_an_index_of_another_layout_or_memfd_device_is_not_used_and_the_socket_is(
    driver: Any, tmp_path: Path, header: str
) -> None:
    """The C client maps an index only when its header's layout is the one it reads
    (a client of layout 1 places files unkeyed: it refuses today's index the same way)
    and its memfd device is the kernel's, as a memfd of the client's own says (a
    hostile daemon's header may name its own FUSE mount's device: docs/security.md
    attack 45). Refused, the index is not used, and the open goes to the socket (the
    stand-in is asked, and answers busy: a local copy, right bytes). Before, the C
    client took the header's memfd device at its word: that index was mapped."""
    from shadowd.index import LAYOUT_VERSION

    fd = os.memfd_create("probe", os.MFD_CLOEXEC)
    memfd_dev = os.fstat(fd).st_dev
    os.close(fd)
    pokes: dict[str, tuple[int, str, int] | None] = {
        "as-is": None,
        "layout-1": (8, "<I", 1),
        "layout-next": (8, "<I", LAYOUT_VERSION + 1),
        "memfd-dev-of-a-disk": (24, "<Q", tmp_path.stat().st_dev),
        "memfd-dev-plus-one": (24, "<Q", memfd_dev + 1),
    }
    s = _Relabelled(tmp_path, pokes[header])
    f, _ = s.files[0]
    path = tmp_path / "relabelled.sock"
    try:
        with stand_in_daemon(path, s.serve):
            d = driver()
            for cmd in ("socket", path), ("routing", 0, 0), ("held", 0, 0), ("log", "quiet"):
                d(*cmd)
            ready = d("indexready")
            plain = d("indexopen", f)
            asked = len(s.ops)
            routed = d("routed", f)
            counts = d("counts")
            ops = s.ops[asked:]
    finally:
        s.close()
    assert routed["hash"] == fnv(f.read_bytes()), routed
    if header == "as-is":  # the control: the stand-in's index serves
        assert ready["ready"] == 1 and plain["served"] == 1 and routed["route"] == "index"
        assert counts["index"] == 2, counts
        return
    assert ready["ready"] == 0 and plain["fd"] == -1, (ready, plain)
    assert routed["route"] != "index" and counts["index"] == 0, (routed, counts)
    assert [op for op in ops if op not in ("hello", "index", "report")], ops  # the socket


class _SlowBatches(_Stand):
    """A stand-in with an index that answers every open_batch 0.3 s late, all misses."""

    def serve_one(self, conn: socket.socket, msg: dict[str, Any]) -> None:
        if msg["op"] != "open_batch":
            return super().serve_one(conn, msg)
        time.sleep(0.3)
        miss = {"ok": True, "hit": False, "miss": True, "filling": False}
        reply = {"id": msg["id"], "ok": True, "results": [miss] * len(msg["paths"])}
        conn.send(msgpack.packb(reply))
        return None


def test_the_latency_breakers_window_takes_no_index_hit(driver: Any, tmp_path: Path) -> None:
    """Three preloads answered 0.3 s late under a reply timeout of 0.5 s open the
    latency breaker, which keeps the connection and its index: while its window runs
    the index serves no hit (the file the index holds is copied here, as after any
    failure, docs/protocol.md; shadowd_index_open says the breaker is open), and after
    it, it does again. Before: no breaker, and the index hit went on."""
    s = _SlowBatches(tmp_path)
    g, _ = big(tmp_path / "g")
    settle(g)
    f0, _ = s.files[0]
    path = tmp_path / "slow-batches.sock"
    try:
        with stand_in_daemon(path, s.serve):
            d = driver()
            for cmd in ("socket", path), ("routing", 0, 0), ("held", 0, 0), (
                    "timeouts", 1000, 500, 0), ("backoff", 1000, 1000), (
                    "log", "capture"):  # fmt: skip
                d(*cmd)
            assert d("indexready")["ready"] == 1
            first = d("routed", f0)
            for _ in range(3):
                d("preload", g)
            during = d("routed", f0)
            plain_during = d("indexopen", f0)
            counts = d("counts")
            time.sleep(1.1)  # the window (1 s) is over
            after = d("routed", f0)
            plain_after = d("indexopen", f0)
            log = d.finish()
    finally:
        s.close()
    assert first["route"] == "index", first
    lines = [ln for ln in log.splitlines() if ln.startswith("LOG ")]
    if any("timed out" in ln for ln in lines):
        return  # a loaded machine made an answer late: the breaker opened all the same
    assert (during["route"], during["copied_why"]) == ("copy", "breaker"), during
    assert plain_during["fd"] == -1 and plain_during["code"] == "unavailable", plain_during
    assert counts["slow"] == 3 and counts["index"] == 1, counts
    assert after["route"] == "index" and plain_after["route"] == "index", (after, plain_after)
    assert "answered 3 requests in a row" in lines[0], lines


def test_an_index_the_daemon_could_shrink_is_never_mapped(driver: Any, tmp_path: Path) -> None:
    """An index memfd without F_SEAL_SHRINK (a hostile or broken daemon) is not
    taken: once mapped, the daemon could cut it short, and the supervisor's next
    read of a slot would die of SIGBUS (before: the driver was killed at its first
    index hit after the stand-in truncated the memfd). The open goes on without it."""
    s = _Shrinkable(tmp_path)
    path = tmp_path / "shrink.sock"
    try:
        with stand_in_daemon(path, s.serve):
            d = driver()
            d("socket", path)
            ready = d("indexready")
            if s.shrinkable >= 0:
                os.ftruncate(s.shrinkable, 0)
            f, _ = s.files[0]
            try:
                hit = d("indexopen", f)
            except EOFError:
                raise AssertionError(f"the driver died: {d.proc.wait()}") from None  # -7: SIGBUS
            counts = d("counts")
            if s.shrinkable >= 0:
                os.close(s.shrinkable)
    finally:
        s.close()
    assert ready["ready"] == 0, ready
    assert hit["fd"] == -1 and counts["index"] == 0, (hit, counts)


async def test_a_close_that_waits_out_a_stopped_daemon_opens_the_breaker(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """shadowd_close with an index hit to report and a small file to tell the daemon
    of waits for the report's answer (up to the reply timeout) before it sends the
    told batch. The daemon is stopped: the close waits out that timeout, and that is
    the one timeout of the breaker's window: the routed open after it copies at once
    (copied_why breaker); before, it connected again and waited out a second timeout
    on the hello."""
    daemon = await start_daemon("--racy-window", "0.05")
    f, digest = big(tmp_path / "lib.so")
    small = make_file(tmp_path / "small.conf", b"small" * 100)
    settle(f, small)
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("timeouts", 1000, 300, 0), (
                "backoff", 5000, 5000), ("log", "quiet"):  # fmt: skip
            await ask(d, *cmd)
        await ask(d, "openfd", f)  # cached
        assert (await ask(d, "indexready"))["ready"] == 1
        assert (await ask(d, "indexopen", f))["route"] == "index"  # a hit to report
        told = await ask(d, "routed", small)  # not in the index: copied here, to be told
        assert told["copied_why"] == "rule", told
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            closed = await ask(d, "close")
            after = await ask(d, "routed", f)
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
    assert 250_000 <= closed["us"] < 1_000_000, closed  # the one timeout
    assert after["hash"] == digest and after["copied_why"] == "breaker", after
    assert after["us"] < 150_000, after


def test_a_send_that_finds_a_stopped_daemons_socket_full_waits_one_timeout_and_opens_the_breaker(
    driver: Any, tmp_path: Path
) -> None:
    """A daemon that answered the hello and then reads nothing (SIGSTOPped, say):
    pipelined requests with long labels fill the connection's socket, and fail at
    once (EAGAIN) when it is full, never waiting in sendmsg. The blocking open then
    waits for room at most its reply timeout, and that timeout opens the breaker:
    the routed open after it copies at once. (Review of the Python client's stall on
    a full socket: the C client sends with MSG_DONTWAIT and polls to its deadline.)"""
    f, digest = big(tmp_path / "lib.so")
    deep = tmp_path
    while len(str(deep)) < 3700:
        deep = deep / ("d" * 200)
    deep.mkdir(parents=True)
    long_named = make_file(deep / "f", b"x" * 5000)
    stop = threading.Event()

    def greets_then_stops(conn: socket.socket) -> None:
        _greet(conn, "stopped")
        stop.wait(30)

    path = tmp_path / "stopped.sock"
    with stand_in_daemon(path, greets_then_stops):
        try:
            d = driver()
            for cmd in ("socket", path), ("timeouts", 1000, 300, 0), ("backoff", 5000, 5000), (
                    "routing", 0, 0), ("log", "quiet"):  # fmt: skip
                d(*cmd)
            assert d("connect", path)["rc"] == 0  # the hello's max_request lets labels go
            submitted = [d("submit", long_named, i) for i in range(1, 64)]
            blocking = d("openfd", f)
            after = d("routed", f)
        finally:
            stop.set()
    full = [s for s in submitted if s["id"] == -1]
    assert full and all(s["errnum"] == errno.EAGAIN for s in full), submitted[-1]
    assert max(s["us"] for s in submitted) < 100_000, submitted
    assert blocking["fd"] == -1 and blocking["code"] == "unavailable", blocking
    assert 250_000 <= blocking["us"] < 1_000_000, blocking
    assert after["hash"] == digest and after["copied_why"] == "breaker", after
    assert after["us"] < 150_000, after


def test_replies_with_descriptors_other_than_promised_leave_none_open(
    driver: Any, tmp_path: Path
) -> None:
    """A hostile daemon's replies, each with descriptors other than its request's
    due: a served open with two memfds, with none, with a pipe; a refusal with a
    memfd; a reply with an id nothing waits for carrying a memfd; a batch of two
    with three. Each open fails (or the connection goes), and once closed the
    client holds exactly the descriptors it held before it connected."""
    f = make_file(tmp_path / "f", b"the file's bytes")
    g = make_file(tmp_path / "g", b"another file")
    script = ["two", "none", "pipe", "refused", "stranger", "batch"]
    seen: list[tuple[str, str]] = []

    def hostile(conn: socket.socket) -> None:
        _greet_v2(conn, {"max_batch": 8})
        for msg, fds in _requests(conn):
            try:
                if msg["op"] != "open" and msg["op"] != "open_batch":
                    _answer(conn, msg, ok=False, code="unknown-op", message="no")
                    continue
                how = script.pop(0)
                seen.append((msg["op"], how))
                sealed = [sealed_fd(b"the file's bytes") for _ in range(3)]
                r, w = os.pipe()
                try:
                    served = {"id": msg["id"], "ok": True, "size": 16, "hit": True,
                              "version": _stat_version(fds[0]), "cached": True}  # fmt: skip
                    if how == "two":
                        conn.sendmsg([msgpack.packb(served)], scm_rights(sealed[:2]))
                    elif how == "none":
                        conn.send(msgpack.packb(served))
                    elif how == "pipe":
                        conn.sendmsg([msgpack.packb(served)], scm_rights([r]))
                    elif how == "refused":
                        no = {"id": msg["id"], "ok": False, "code": "busy", "message": "no"}
                        conn.sendmsg([msgpack.packb(no)], scm_rights(sealed[:1]))
                    elif how == "stranger":
                        served["id"] = msg["id"] + 1000
                        conn.sendmsg([msgpack.packb(served)], scm_rights(sealed[:1]))
                    else:
                        item = {k: v for k, v in served.items() if k != "id"}
                        reply = {"id": msg["id"], "ok": True, "results": [item, item]}
                        conn.sendmsg([msgpack.packb(reply)], scm_rights(sealed))
                finally:
                    close_fds([*sealed, r, w])
            finally:
                close_fds(fds)

    path = tmp_path / "hostile.sock"
    with stand_in_daemon(path, hostile):
        d = driver()
        before = d("fds")["fds"]
        for cmd in ("socket", path), ("timeouts", 1000, 1000, 0), ("backoff", 0, 0), (
                "index", 0, 0), ("log", "quiet"):  # fmt: skip
            d(*cmd)
        opens = [d("openfd", f) for _ in range(5)]
        batch = d("batch", f, g)
        closed = d("close")
    assert [how for _, how in seen] == ["two", "none", "pipe", "refused", "stranger", "batch"]
    assert [o["fd"] for o in opens] == [-1] * 5, opens
    assert all(o["code"] in ("", "busy", "unavailable") and o["error"] for o in opens), opens
    assert [i["fd"] for i in batch["items"]] == [-1, -1], batch
    assert closed["fds"] == before, (closed, before)


def test_a_forked_child_never_tells_the_daemon_of_its_parents_copied_files(
    driver: Any, tmp_path: Path
) -> None:
    """Files copied here while the daemon was cold are told to it later, by the
    process that copied them: a child forked meanwhile lets go of its copies of
    those sources (as of the index hits its parent reports), so the daemon is told
    of each once, by the parent. Before, the child's close told them too."""
    f1, _ = big(tmp_path / "one")
    f2, _ = big(tmp_path / "two")
    f3 = make_file(tmp_path / "three", b"the child's own")
    settle(f1, f2, f3)
    told: list[str] = []

    def cold(conn: socket.socket) -> None:
        _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
        for msg, fds in _requests(conn):
            close_fds(fds)
            if msg["op"] == "open" and msg.get("wait") is False:
                _answer(conn, msg, ok=True, miss=True, filling=True)
            elif msg["op"] == "open_batch":
                told.extend(str(label) for label in msg["paths"])
                results = [{"ok": True, "miss": True, "filling": True}] * len(msg["paths"])
                _answer(conn, msg, ok=True, results=results)
            else:
                _answer(conn, msg, ok=False, code="busy", message="a stand-in")

    path = tmp_path / "cold.sock"
    with stand_in_daemon(path, cold):
        d = driver()
        for cmd in ("socket", path), ("routing", 0, 0), ("cold", 1, 60_000), ("log", "quiet"):
            d(*cmd)
        assert d("routed", f1)["copied_why"] == "miss"  # cold from now on
        assert d("routed", f2)["copied_why"] == "cold"  # to be told later
        child = d("forkopen", f3, "fork")
        d("close")  # the parent tells the daemon of f2
        deadline = time.monotonic() + 10
        while str(f2) not in told and time.monotonic() < deadline:
            time.sleep(0.01)
        time.sleep(0.2)  # and a second telling, had there been one
    assert child["child_status"] == 0, child
    assert told.count(str(f2)) == 1, told


def test_a_close_reads_the_answer_to_a_raced_open_before_it_goes(
    driver: Any, tmp_path: Path
) -> None:
    """A routed open whose local copy won the race leaves its request with the
    daemon, which fills its cache from it (a miss that does not wait). The close
    reads that request's answer before the socket goes: closed with an answer
    unread, or before the daemon answered, the daemon's reply fails on a connection
    reset and it reads nothing more the client sent (a raced open behind it, never
    filled). Before, a close that had no told batch to send left such answers owed:
    under load, one file in four of a cold run of three was never cached
    (test_shadowd_init_on_memory_of_unknown_contents_works_as_zero_filled)."""
    f, digest = big(tmp_path / "lib.so", 4 << 20)
    settle(f)
    seen: list[str] = []

    def late(conn: socket.socket) -> None:
        _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
        for msg, fds in _requests(conn):
            close_fds(fds)
            if msg["op"] != "open":
                _answer(conn, msg, ok=False, code="no-index", message="none")
                continue
            time.sleep(0.4)  # the local copy wins the race meanwhile
            # Readable now: the client's end is closed (it sends nothing more).
            gone = bool(select.select([conn], [], [], 0)[0])
            seen.append("closed first" if gone else "answered")
            _answer(conn, msg, ok=True, miss=True, filling=True)

    path = tmp_path / "late.sock"
    with stand_in_daemon(path, late):
        d = driver()
        for cmd in (("socket", path), ("routing", 0, 0), ("race", 1), ("cold", 0, 0),
                    ("timeouts", 2000, 2000, 0), ("index", 0, 0), ("log", "quiet")):  # fmt: skip
            d(*cmd)
        raced = d("routed", f)
        closed = d("close")
        deadline = time.monotonic() + 10
        while not seen and time.monotonic() < deadline:
            time.sleep(0.01)
    assert (raced["route"], raced["copied_why"], raced["hash"]) == ("copy", "first", digest)
    assert seen == ["answered"], (seen, closed)


def test_files_told_to_the_daemon_ask_for_no_descriptor(driver: Any, tmp_path: Path) -> None:
    """A told batch says "serve": false (docs/protocol.md, "Telling without being
    served"): the client reads its answer only at a later request, so a descriptor for
    a file the daemon holds would sit in its socket, counted in its uid's fd budget,
    until then. Before, the C client's told batches had "wait": false alone."""
    f1, _ = big(tmp_path / "one")
    f2, _ = big(tmp_path / "two")
    settle(f1, f2)
    told: list[dict[str, Any]] = []

    def cold(conn: socket.socket) -> None:
        _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
        for msg, fds in _requests(conn):
            close_fds(fds)
            if msg["op"] == "open" and msg.get("wait") is False:
                _answer(conn, msg, ok=True, miss=True, filling=True)
            elif msg["op"] == "open_batch":
                told.append({k: v for k, v in msg.items() if k != "paths"} | {"n": len(fds)})
                results = [{"ok": True, "hit": True, "miss": True, "filling": False}] * len(fds)
                _answer(conn, msg, ok=True, results=results)
            else:
                _answer(conn, msg, ok=False, code="busy", message="a stand-in")

    path = tmp_path / "cold.sock"
    with stand_in_daemon(path, cold):
        d = driver()
        for cmd in ("socket", path), ("routing", 0, 0), ("cold", 1, 60_000), ("log", "quiet"):
            d(*cmd)
        assert d("routed", f1)["copied_why"] == "miss"  # cold from now on
        assert d("routed", f2)["copied_why"] == "cold"  # to be told at close
        d("close")
        deadline = time.monotonic() + 10
        while not told and time.monotonic() < deadline:
            time.sleep(0.01)
    assert len(told) == 1, told
    assert told[0]["wait"] is False and told[0].get("serve") is False, told
    assert told[0]["n"] == 1, told


def test_a_served_descriptor_not_open_read_only_is_refused(driver: Any, tmp_path: Path) -> None:
    """The protocol promises a read-only descriptor of its own (the Python client
    refuses anything else, _session.check_served). A stand-in serves sealed memfds
    through the memfd's own read-write descriptor (what a daemon that sent its cache's
    own fd would send: one offset shared with it) and through a write-only one, which
    a tracee could not even read. The C client refuses both (the plain open fails and
    says why; the routed open copies here), where it handed them out before."""
    f, digest = big(tmp_path / "lib.so")
    settle(f)
    modes = ["rdwr", "wronly", "rdwr", "wronly"]

    def not_read_only(conn: socket.socket) -> None:
        _greet_v2(conn, {})
        for msg, fds in _requests(conn):
            data = os.pread(fds[0], 1 << 20, 0) if fds else b""
            close_fds(fds)
            if msg["op"] != "open":
                _answer(conn, msg, ok=False, code="no-index", message="none")
                continue
            own = os.memfd_create("shadowd", os.MFD_ALLOW_SEALING | os.MFD_CLOEXEC)
            os.write(own, data)
            fcntl.fcntl(own, fcntl.F_ADD_SEALS, 0xF)
            served = own
            if modes.pop(0) == "wronly":
                served = os.open(f"/proc/self/fd/{own}", os.O_WRONLY | os.O_CLOEXEC)
            st = os.stat(f)
            reply = {"id": msg["id"], "ok": True, "size": len(data), "hit": True,
                     "version": [st.st_size, st.st_mtime_ns, st.st_ctime_ns],
                     "cached": True}  # fmt: skip
            try:
                conn.sendmsg([msgpack.packb(reply)], scm_rights([served]))
            finally:
                close_fds(list({own, served}))

    path = tmp_path / "rw.sock"
    with stand_in_daemon(path, not_read_only):
        d = driver()
        for cmd in ("socket", path), ("routing", 0, 0), ("held", 0, 0), ("log", "quiet"):
            d(*cmd)
        plain = [d("openfd", f) for _ in range(2)]
        routed = [d("routed", f) for _ in range(2)]
    assert modes == []
    for r in plain:
        assert r["fd"] == -1 and "read-only" in r["error"], r
    for r in routed:
        assert r["route"] == "copy" and r["copied_why"] == "failed", r
        assert r["hash"] == digest and r["accmode"] == os.O_RDONLY, r


def _lying(conn: socket.socket) -> None:
    """A stand-in of version 2 that serves each file as its name says: "good" its
    bytes and version; "stale" other bytes of its size said to be an older version (its
    ctime 1 ns earlier: a cache that missed a rewrite); "short" fewer bytes said to be
    the caller's version; "unsaid" fewer bytes and no version (as version 1, or a file
    dated past 2262); "moved" its bytes and version through a read-only description
    whose offset another holder moved (a description it shares). A lookup gets 11 bytes
    for any key."""

    def fd_for(src: int) -> tuple[int, dict[str, Any]]:
        name = Path(os.readlink(f"/proc/self/fd/{src}")).name  # (labels are optional)
        data = os.pread(src, 1 << 20, 0)
        version = _stat_version(src)
        said: dict[str, Any] = {"version": version, "cached": True}
        if name == "stale":
            data = bytes(b ^ 0xFF for b in data)
            said["version"] = [version[0], version[1], version[2] - 1]
        elif name in ("short", "unsaid"):
            data = data[:-100]
            if name == "unsaid":
                said = {}
        fd = sealed_fd(data)
        if name == "moved":
            os.lseek(fd, 7, os.SEEK_SET)
        return fd, {"ok": True, "size": len(data), "hit": True, **said}

    _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
    for msg, fds in _requests(conn):
        served: list[int] = []
        try:
            if msg["op"] == "open":
                fd, item = fd_for(fds[0])
                served.append(fd)
                reply = {"id": msg["id"], **item}
            elif msg["op"] == "open_batch":
                items = []
                for src in fds:
                    fd, item = fd_for(src)
                    served.append(fd)
                    items.append(item)
                reply = {"id": msg["id"], "ok": True, "results": items}
            elif msg["op"] == "lookup":
                served.append(sealed_fd(b"eleven byte"))
                reply = {"id": msg["id"], "ok": True, "size": 11, "hit": True}
            else:
                reply = {"id": msg["id"], "ok": False, "code": "no-index", "message": "none"}
            conn.sendmsg([msgpack.packb(reply)], scm_rights(served) if served else [])
        finally:
            close_fds([*fds, *served])


def test_a_served_descriptor_of_another_version_is_never_handed_out(
    driver: Any, tmp_path: Path
) -> None:
    """Every tier checks the version against the caller's own fstat (DESIGN.md, "The
    open path"); the socket's now does too. A stand-in (_lying) serves stale bytes said
    to be an older version, too few bytes said to be the caller's version or said to be
    no version at all, and a description another holder moved. The routed calls copy
    the file here instead (its bytes as they are now), the others fail "unstable" (the
    moved description: refused as not its own); only the good file is served, and the
    breaker stays shut. Before: each was handed out, stale and short bytes included."""
    names = ["good", "stale", "short", "unsaid", "moved"]
    files = {n: big(tmp_path / n) for n in names}
    settle(*(f for f, _ in files.values()))
    bad = names[1:]
    path = tmp_path / "lying.sock"
    with stand_in_daemon(path, _lying):
        d = driver()
        # Long timeouts: the stand-in is a thread of this (maybe loaded) process.
        for cmd in ("socket", path), ("routing", 0, 0), ("held", 0, 0), ("index", 0, 0), (
                "cold", 0, 0), ("timeouts", 10000, 10000, 4), ("log", "capture"):  # fmt: skip
            d(*cmd)
        routed = {n: d("routed", f) for n, (f, _) in files.items()}
        plain = {n: d("openfd", f) for n, (f, _) in files.items()}
        batch = d("batch", *(f for f, _ in files.values()))
        rbatch = d("rbatch", *(f for f, _ in files.values()))
        d("rsubmit", files["stale"][0], 1)
        d("submit", files["short"][0], 2)
        collected = d("collect", 2, 10000)
        lookup = d("lookup", "ns", 5, 5, OLD_NS, OLD_NS)
        counts = d("counts")
        log = d.finish()
    for n, (_, digest) in files.items():
        r = routed[n]
        assert r["hash"] == digest, (n, r)  # never the stand-in's wrong bytes
        if n == "good":
            assert r["route"] == "daemon", r
            continue
        assert (r["route"], r["copied_why"]) == ("copy", "failed"), (n, r)
        want = "offset is not 0" if n == "moved" else "refused it"
        assert want in r["error"], (n, r)
    assert routed["stale"]["version"] is None  # a copy: no version said
    for n, (_, digest) in files.items():
        r = plain[n]
        if n == "good":
            assert (r["route"], r["hash"]) == ("daemon", digest), r
        else:
            assert r["fd"] == -1 and r["code"] == ("" if n == "moved" else "unstable"), (n, r)
    assert "not the caller's [" in plain["stale"]["error"], plain["stale"]
    assert "bytes for a file of 200000" in plain["unsaid"]["error"], plain["unsaid"]
    assert [i["fd"] >= 0 for i in batch["items"]] == [True] + [False] * len(bad), batch
    assert [i["code"] for i in batch["items"][1:]] == ["unstable"] * 3 + [""], batch
    for i, (n, (_, digest)) in zip(rbatch["items"], files.items(), strict=True):
        assert i["hash"] == digest, (n, i)
        assert i["route"] == ("daemon" if n == "good" else "copy"), (n, i)
    by_tag = {r["tag"]: r for r in collected["results"]}
    assert (by_tag[1]["route"], by_tag[1]["hash"]) == ("copy", files["stale"][1]), by_tag
    assert by_tag[2]["fd"] == -1 and by_tag[2]["code"] == "unstable", by_tag
    assert lookup["fd"] == -1 and lookup["code"] == "unstable", lookup
    # stale, short and unsaid: routed, plain, batch, routed batch; two submits; the lookup.
    assert counts["other_version"] == 3 * 4 + 2 + 1, counts
    assert "LOG" not in log  # nothing of the daemon's is broken: no breaker


def test_a_source_whose_own_fstat_fails_is_refused_before_any_request(
    driver: Any, tmp_path: Path
) -> None:
    """A served fd is checked against the caller's own fstat of the source; with no
    fstat there is nothing to check it against, so it is never handed out unchecked.
    A file on a FUSE mount that opens but whose every getattr fails (EIO), asked of a
    stand-in that serves an empty sealed memfd, no version said, for anything: every
    call refuses it before asking, as the routed calls did already (errnum EIO, "fstat
    of the file"), and the stand-in is asked nothing. Before: shadowd_open_fd,
    shadowd_request_fd and shadowd_submit_open asked and handed out the stand-in's
    empty fd unchecked, and shadowd_open_batch checked it against a version of zeros
    (an empty fd passed)."""
    asked: list[str] = []

    def serves_empty(conn: socket.socket) -> None:
        _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
        for msg, fds in _requests(conn):
            asked.append(msg["op"])
            served = [sealed_fd(b"") for _ in fds]
            try:
                item = {"ok": True, "size": 0, "hit": True}
                reply = (
                    {"id": msg["id"], "ok": True, "results": [item] * len(fds)}
                    if msg["op"] == "open_batch"
                    else {"id": msg["id"], **item}
                )
                conn.sendmsg([msgpack.packb(reply)], scm_rights(served) if served else [])
            finally:
                close_fds([*fds, *served])

    broken = FuseFile(b"b" * 200_000, ino=4242, getattr_errno=errno.EIO)
    with mounted(tmp_path / "mnt", files={"broken": broken}, hanging=0):
        f = tmp_path / "mnt" / "broken"
        with open(f, "rb") as probe, pytest.raises(OSError) as failed:
            os.fstat(probe.fileno())
        assert failed.value.errno == errno.EIO  # (the setup: it opens, its fstat fails)
        path = tmp_path / "empty.sock"
        with stand_in_daemon(path, serves_empty):
            d = driver()
            for cmd in (("socket", path), ("routing", 0, 0), ("held", 0, 0), ("cold", 0, 0),
                        ("timeouts", 10000, 10000, 0), ("log", "capture")):  # fmt: skip
                d(*cmd)
            plain = {cmd: d(cmd, f) for cmd in ("openfd", "requestfd")}
            d("index", 0, 0)  # shadowd_open_fd without the index goes as request_fd
            plain["openfd without the index"] = d("openfd", f)
            submitted = d("submit", f, 1)
            collected = d("collect", 1, 10000) if submitted["id"] > 0 else {"results": []}
            batch = d("batch", f)
            routed = d("routed", f)
            log = d.finish()
    got = {**plain, "submit": submitted, "batch": batch["items"][0], "routed": routed}
    print({n: (r.get("fd", r.get("id")), r["errnum"]) for n, r in got.items()}, "(fd or id, errno)")
    print("collected", [r["fd"] for r in collected["results"]], "asked", asked)
    for name, r in plain.items():
        assert r["fd"] == -1 and r["errnum"] == errno.EIO, (name, r)
        assert "fstat of the file" in r["error"], (name, r)
    assert submitted["id"] == -1 and submitted["errnum"] == errno.EIO, (submitted, collected)
    assert "fstat of the file" in submitted["error"], submitted
    (item,) = batch["items"]
    assert batch["served"] == 0 and item["fd"] == -1 and item["errnum"] == errno.EIO, batch
    assert routed["fd"] == -1 and routed["errnum"] == errno.EIO, routed
    assert [op for op in asked if op != "index"] == [], asked
    assert "LOG" not in log  # nothing of the daemon's is broken: no breaker


async def test_the_index_turned_off_while_its_answer_is_on_the_way_is_not_taken(
    driver: Any, daemon: Daemon, tmp_path: Path
) -> None:
    """shadowd_connect_start asks for the index behind the hello; the caller then
    turns the index off (shadowd_set_index(c, 0, ...)) before the answer came. The
    answer is read and let go of: no index is mapped, no open is an index hit, and
    the client keeps no descriptor of the daemon's /proc/PID/fd (before, the late
    answer was taken and used as if the index were on)."""
    f, digest = big(tmp_path / "lib.so")
    settle(f)
    with trio.fail_after(30):
        warm = driver()
        await ask(warm, "socket", daemon.socket_path)
        await ask(warm, "openfd", f)  # cached, so in the daemon's index
        d = driver()
        await ask(d, "connect_start", daemon.socket_path)
        await ask(d, "index", 0, 0)
        assert (await ask(d, "connect_wait"))["rc"] == 0
        opened = await ask(d, "routed", f)
        fds = await ask(d, "fds", "list")
    assert opened["hash"] == digest and opened["route"] != "index", opened
    assert not any(f"/proc/{daemon.pid}/fd" in t for t in fds["targets"]), fds


async def test_a_forked_child_turning_the_index_off_never_speaks_on_its_parents_connection(
    driver: Any, start_daemon: Any, tmp_path: Path
) -> None:
    """A child whose first call is shadowd_set_index(c, 0, ...) sends the index hits
    not reported yet before it drops the index: those are its parent's, on its
    parent's connection. It must not: the daemon would count them twice, and its
    answer, under the id the parent's next request takes too (the child has a copy
    of the parent's next id), would answer that request. Before, the parent's next
    request got the report's answer (no descriptor) and the daemon counted 10 hits
    for 5."""
    daemon = await start_daemon("--racy-window", "0.05")
    f, _ = big(tmp_path / "lib.so")
    g, digest = big(tmp_path / "other.so")
    settle(f, g)
    d = driver()
    with trio.fail_after(30):
        for cmd in ("socket", daemon.socket_path), ("log", "quiet"):
            await ask(d, *cmd)
        for path in f, g:
            await ask(d, "requestfd", path)  # cached
        assert (await ask(d, "indexready"))["ready"] == 1
        before = await trio.to_thread.run_sync(stats, daemon)
        assert (await ask(d, "indexopen", f, 5))["served"] == 5  # not reported yet
        assert (await ask(d, "forkindex", 0, 0))["child_status"] == 0
        asked = await ask(d, "requestfd", g)
        await ask(d, "close")  # the parent reports its 5
        after = await counted_once(daemon, "index_hits", before["index_hits"] + 5)
        await trio.sleep(0.2)  # and any hit counted twice
        again = await trio.to_thread.run_sync(stats, daemon)
    assert asked["fd"] >= 0 and asked["hash"] == digest, (asked["error"], asked)
    assert after["index_hits"] == again["index_hits"] == before["index_hits"] + 5, (after, again)


def test_a_close_tells_the_daemon_of_files_only_once_no_answer_is_owed(
    driver: Any, tmp_path: Path
) -> None:
    """The files copied in a cold window are told in the connection's last request,
    at close. Sent while an answer is still owed (here a pipelined open not collected),
    that answer may land in the socket just before it is closed: closed with a reply
    unread, the socket resets the connection, and the daemon never reads the told
    batch queued behind it (the daemon counts a closing connection's reports, never
    its told batches). So the close reads every answer owed before it tells (up to the
    reply timeout), as the Python client does: a stand-in that holds its answer to the
    open for 0.5 s sees nothing more from the client meanwhile, then the told batch.
    Before, the told batch came at once, with the answer still owed."""
    f1, _ = big(tmp_path / "one")
    f2, _ = big(tmp_path / "two")
    f3, _ = big(tmp_path / "three")
    settle(f1, f2, f3)
    told: list[str] = []
    early: list[bool] = []

    def holds_an_answer(conn: socket.socket) -> None:
        _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
        for msg, fds in _requests(conn):
            close_fds(fds)
            if msg["op"] == "open" and msg.get("wait") is False:
                _answer(conn, msg, ok=True, miss=True, filling=True)
            elif msg["op"] == "open":  # the pipelined open: held 0.5 s
                readable, _, _ = select.select([conn], [], [], 0.5)
                early.append(bool(readable))  # the client sent more meanwhile
                _answer(conn, msg, ok=False, code="busy", message="a stand-in")
            elif msg["op"] == "open_batch":
                told.extend(str(label) for label in msg["paths"])
                results = [{"ok": True, "miss": True, "filling": True}] * len(msg["paths"])
                _answer(conn, msg, ok=True, results=results)
            else:
                _answer(conn, msg, ok=False, code="no-index", message="none")

    path = tmp_path / "holds.sock"
    with stand_in_daemon(path, holds_an_answer):
        d = driver()
        for cmd in ("socket", path), ("timeouts", 1000, 2000, 0), ("routing", 0, 0), (
                "cold", 1, 60_000), ("log", "quiet"):  # fmt: skip
            d(*cmd)
        assert d("routed", f1)["copied_why"] == "miss"  # cold from now on
        assert d("routed", f2)["copied_why"] == "cold"  # told at close
        assert d("submit", f3, 1)["id"] > 0  # its answer owed at close
        closed = d("close")
        deadline = time.monotonic() + 10
        while not told and time.monotonic() < deadline:
            time.sleep(0.01)
    assert early == [False], early
    assert told == [str(f2)], told
    assert 400_000 <= closed["us"] < 2_000_000, closed


def test_a_close_waits_for_an_owed_answer_its_own_deadline_not_the_reply_timeout(
    driver: Any, tmp_path: Path
) -> None:
    """A pipelined open that may wait on the daemon's copy (submitted, not collected)
    has the reply timeout plus time per MiB of its file (shadowd.h): a daemon still
    copying a large file is not a hung one. The close that reads every answer owed
    waits for that one up to the same deadline: a stand-in that answers after 0.6 s,
    under a 300 ms reply timeout and a deadline of 300 ms + 8 x 200 ms, is read, and
    the breaker stays shut (the routed open after the close asks the daemon again).
    Before, the close gave up after the bare reply timeout, its socket closed with
    the answer still owed, and took the healthy daemon for a hung one: the breaker
    opened and the routed open after it copied ('breaker')."""
    f, _ = big(tmp_path / "large.bin", 8 << 20)
    g, _ = big(tmp_path / "next.bin")
    settle(f, g)
    seen: list[str] = []

    def copies_slowly(conn: socket.socket) -> None:
        _greet_v2(conn, {"max_batch": 64, "racy_window_ns": 0})
        for msg, fds in _requests(conn):
            close_fds(fds)
            if msg["op"] == "open" and msg.get("wait") is not False:
                time.sleep(0.6)  # copying the 8 MiB file
                gone = bool(select.select([conn], [], [], 0)[0])
                seen.append("closed first" if gone else "answered")
            _answer(conn, msg, ok=False, code="busy", message="a stand-in")

    path = tmp_path / "slow.sock"
    with stand_in_daemon(path, copies_slowly):
        d = driver()
        for cmd in (("socket", path), ("timeouts", 1000, 300, 200), ("backoff", 5000, 5000),
                    ("routing", 0, 0), ("index", 0, 0), ("log", "quiet")):  # fmt: skip
            d(*cmd)
        assert d("submit", f, 1)["id"] > 0  # its answer owed at close
        closed = d("close")
        after = d("routed", g)
    assert seen[:1] == ["answered"], (seen, closed)
    assert 550_000 <= closed["us"] < 2_000_000, closed
    assert after["copied_why"] != "breaker", after


_DATED_C = r"""
#include <fcntl.h>
#include <stdio.h>
#include <unistd.h>
#include "shadowd.h"

int main(int argc, char **argv)
{
    struct shadowd c;
    shadowd_init(&c);
    shadowd_connect(&c, argv[2]); /* nobody listens: the calls below fail */
    int src = open(argv[1], O_RDONLY | O_CLOEXEC);
    if (src < 0)
        return 2;
    int a = shadowd_open_fd(&c, src, "dated");
    int b = shadowd_request_fd(&c, src, "dated");
    int items_src[1] = {src};
    const char *labels[1] = {"dated"};
    struct shadowd_item items[1];
    shadowd_open_batch(&c, items_src, labels, 1, items);
    printf("%d %d %d\n", a, b, items[0].fd);
    close(src);
    shadowd_close(&c);
    return 0;
}
"""


def test_a_file_dated_past_2262_is_asked_for_without_undefined_behaviour(
    tmp_path: Path,
) -> None:
    # Its mtime in ns does not fit an int64: the client's version of it (what a
    # served fd is checked against, before every request) was computed with a
    # signed overflow, which the C standard leaves undefined (an optimiser may
    # assume it never happens). Built with UBSan that aborts on it.
    cc = c_compiler()
    assert cc is not None
    src = tmp_path / "dated.c"
    src.write_text(_DATED_C)
    binary = tmp_path / "dated"
    done = subprocess.run(
        [cc, "-std=gnu99", "-O1", "-fsanitize=signed-integer-overflow",
         "-fno-sanitize-recover=all", "-I", str(C_DIR), "-o", str(binary), str(src),
         str(C_DIR / "shadowd.c"), "-pthread"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    if done.returncode != 0:
        pytest.skip(f"no UBSan here: {done.stderr[-200:]}")
    dated = tmp_path / "f"
    dated.write_bytes(b"x" * 100)
    year_2300_ns = 10_413_792_000 * 10**9
    try:
        os.utime(dated, ns=(year_2300_ns, year_2300_ns))
    except OSError as exc:
        pytest.skip(f"this file system cannot date a file in 2300: {exc}")
    if dated.stat().st_mtime_ns != year_2300_ns:
        pytest.skip("this file system cannot date a file in 2300")
    ran = run(str(binary), str(dated), str(tmp_path / "nobody.sock"))
    assert b"runtime error" not in ran.stderr, ran.stderr.decode(errors="replace")
    assert ran.returncode == 0, ran.stderr.decode(errors="replace")
    assert ran.stdout.split() == [b"-1", b"-1", b"-1"]
