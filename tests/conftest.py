# Shared test fixtures: the daemon as a real subprocess, files with settled
# ctimes, fd counting, and running code as another user.
from __future__ import annotations

import contextlib
import fcntl
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import AsyncIterator, Callable, Coroutine, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from . import forkserver

REPO = Path(__file__).resolve().parent.parent
#: PYTHONPATH for a subprocess that imports shadowd and shadowd_client from this tree.
REPO_PATH = os.pathsep.join([str(REPO), str(REPO / "client")])


def repo_env(base: dict[str, str] | None = None) -> dict[str, str]:
    """*base* (default: our environment) with PYTHONPATH set to this tree."""
    return dict(os.environ if base is None else base, PYTHONPATH=REPO_PATH)


NOBODY = 65534

# Unprivileged uids of this run: the kernel counts descriptors in flight per
# uid (ETOOMANYREFS past the sender's RLIMIT_NOFILE), so two suites on one
# machine that both set up daemons and clients as uid 1000 failed each
# other's tests. Each run takes 100 uids of its own, chosen by its pid.
_UID_BASE = 10_000 + (os.getpid() % 500) * 100


def test_uid(slot: int) -> int:
    """The unprivileged uid *slot* (0-99) of this test run."""
    assert 0 <= slot < 100
    return _UID_BASE + slot


test_uid.__test__ = False  # type: ignore[attr-defined]  # not a test for pytest
#: How often a wait for a daemon to answer or to exit looks again: each of
#: the suite's ~300 daemon starts waited half of it on average, for nothing.
POLL = 0.005

# `shadowd serve` as another user: import every module of shadowd while still
# root, drop to argv[1]:argv[2] with the supplementary groups of argv[3] (a
# comma-separated list, maybe empty; no capabilities), then serve with the rest
# of argv, in this same process (its pid is the daemon's). A process that
# changed its uids is left non-dumpable by the kernel: its /proc/PID/fd
# root's, so a client of its uid could not open its descriptors (its index
# would be unusable). A daemon started as its user (by a service manager, by
# hand) is dumpable: so is this one again.
_DROP_AND_SERVE = textwrap.dedent(
    """
    import ctypes, importlib, os, pkgutil, sys
    import shadowd, shadowd.cli
    for _m in pkgutil.iter_modules(shadowd.__path__):
        if _m.name != "__main__":  # that one would serve at once
            importlib.import_module("shadowd." + _m.name)
    import concurrent.futures, grp, pwd, traceback, linecache, encodings.idna
    libc = ctypes.CDLL(None, use_errno=True)
    uid, gid = int(sys.argv[1]), int(sys.argv[2])
    os.setgroups([int(g) for g in sys.argv[3].split(",") if g])
    os.setresgid(gid, gid, gid)
    os.setresuid(uid, uid, uid)
    assert libc.prctl(4, 1, 0, 0, 0) == 0  # PR_SET_DUMPABLE
    sys.exit(shadowd.cli.main(sys.argv[4:]))
    """
)

# A daemon with a small inotify watch limit of its own, the host's untouched: it
# runs in a user namespace that maps every uid and gid to itself (so peers and
# files look as outside), whose /proc/sys/user/max_inotify_watches is argv[1]. The
# map is written by a child left in the host's namespace (only a writer there may
# map ids other than its own); the process then becomes the daemon (same pid).
_WATCH_LIMITED = textwrap.dedent(
    """
    import ctypes, os, sys
    libc = ctypes.CDLL(None, use_errno=True)
    me = os.getpid()
    r, w = os.pipe()
    r2, w2 = os.pipe()
    helper = os.fork()
    if helper == 0:
        os.read(r, 1)
        for name in ("uid_map", "gid_map"):
            with open(f"/proc/{me}/{name}", "w") as f:
                f.write("0 0 4294967295\\n")
        os.write(w2, b"x")
        os._exit(0)
    if libc.unshare(0x10000000) != 0:  # CLONE_NEWUSER
        raise OSError(ctypes.get_errno(), "unshare(CLONE_NEWUSER)")
    os.write(w, b"x")
    os.read(r2, 1)
    os.waitpid(helper, 0)
    with open("/proc/sys/user/max_inotify_watches", "w") as f:
        f.write(sys.argv[1])
    for fd in (r, w, r2, w2):
        os.close(fd)
    os.execv(sys.argv[2], sys.argv[2:])
    """
)


@functools.cache
def watch_limits_work() -> bool:
    """Whether a daemon can be given a watch limit of its own here (_WATCH_LIMITED:
    user namespaces allowed, /proc/sys/user/max_inotify_watches writable in one)."""
    true = shutil.which("true") or "/bin/true"
    proc = subprocess.run(
        [sys.executable, "-c", _WATCH_LIMITED, "100", true], capture_output=True, check=False
    )
    return proc.returncode == 0


def pytest_sessionfinish() -> None:
    """The fork servers of this process end with it (their daemons are gone by then)."""
    forkserver.close_all()


requires_root = pytest.mark.skipif(os.geteuid() != 0, reason="needs root to switch uids")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """The tests marked slow first, the others in their order: `make test` runs the
    suite on every core (pytest-xdist), and a long test handed out last would keep
    one worker busy on its own after the others ran out of work."""
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)


@contextlib.contextmanager
def host_lock(name: str) -> Iterator[None]:
    """Hold the host-wide lock *name* (an flock in the temporary directory) for the block.

    For tests that use a fixed place of the host: they must not overlap one
    another, whichever pytest process runs them (the other xdist worker of
    `make test`, or another suite run on the same host).
    """
    path = os.path.join(tempfile.gettempdir(), f"shadowd-tests-{name}.lock")
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except FileNotFoundError:
        # Readable by all: flock needs no write access, so every user's suite can take it.
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_CLOEXEC, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        os.close(fd)  # and with it the lock


@pytest.fixture
def host_sockets() -> Iterator[None]:
    """The host's own socket places to this test alone: /run/shadowd/shadowd.sock
    (the host daemon's) and /run/user/UID/shadowd (a user's), for a test that serves
    there, makes such a directory, or asserts what is (not) there."""
    with host_lock("host-sockets"):
        yield


class Daemon:
    """`shadowd serve` in a subprocess, on a socket of its own."""

    def __init__(
        self,
        socket_path: Path,
        args: list[str],
        env: dict[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
        user: tuple[int, int] | None = None,
        *,
        groups: tuple[int, ...] = (),
        watches: int | None = None,
    ):
        self.socket_path = socket_path
        self.args = args
        self.env = env
        self.nofile = nofile
        #: (uid, gid) the daemon drops to before it serves, when not None (it
        #: stays dumpable, as a daemon started as that user is: _DROP_AND_SERVE),
        #: with the supplementary *groups*.
        self.user = user
        self.groups = groups
        #: The daemon's inotify watch limit (_WATCH_LIMITED), when not None.
        self.watches = watches
        self.proc: subprocess.Popen[bytes] | forkserver.ForkedProc | None = None
        self.log_path = socket_path.parent / f"{socket_path.name}.log"

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def command(self) -> list[str]:
        if self.user is not None:
            # The interpreter and its library may not be readable by that
            # user: everything is imported first, then the uid is dropped
            # (with every capability) in the process that then serves.
            groups = ",".join(map(str, self.groups))
            start = [sys.executable, "-c", _DROP_AND_SERVE, *map(str, self.user), groups]
        else:
            start = [sys.executable, "-m", "shadowd"]
        return [
            *start,
            "serve",
            "--socket",
            str(self.socket_path),
            "--log-level",
            "debug",
            *self.args,
        ]

    async def start(self, timeout: float = 15.0) -> None:
        env = repo_env(self.env)
        self._log = open(self.log_path, "ab")  # noqa: SIM115
        command = self.command()
        if self.nofile is not None:
            # Set the limit in a tiny wrapper that then becomes the daemon
            # (exec keeps the pid): no preexec_fn in a threaded test process.
            soft, hard = self.nofile
            command = [
                sys.executable,
                "-c",
                "import os, resource, sys; "
                f"resource.setrlimit(resource.RLIMIT_NOFILE, ({soft}, {hard})); "
                "os.execv(sys.argv[1], sys.argv[1:])",
                *command,
            ]
        if self.watches is not None:
            command = [sys.executable, "-c", _WATCH_LIMITED, str(self.watches), *command]
        plain = self.user is None and self.nofile is None and self.watches is None
        server = forkserver.server_for(env) if plain else None
        if server is not None:
            # `python -m shadowd serve ...`, forked from an interpreter that has
            # shadowd imported (tests/forkserver.py).
            self.proc = server.spawn(command[3:], env, self._log.fileno())
        else:
            self.proc = subprocess.Popen(
                command, stdout=self._log, stderr=subprocess.STDOUT, env=env
            )
        with trio.fail_after(timeout):
            while not self.answers():
                if self.proc.poll() is not None:
                    raise RuntimeError(f"daemon exited with {self.proc.returncode}:\n{self.log()}")
                await trio.sleep(POLL)

    def answers(self) -> bool:
        """Whether it answers a hello, or turns the connection away: either way its
        accept loop runs. A connect alone is not enough: the daemon listens before it
        serves, and its start (the index's descriptor range, the warm-up) must be
        over before a test takes its fd count as a baseline."""
        import socket

        import msgpack

        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.settimeout(5)
        try:
            s.connect(str(self.socket_path))
        except OSError:
            s.close()
            return False
        try:
            s.send(msgpack.packb({"op": "hello", "id": 0, "version": 1}))
            s.recv(65536)  # a reply, or b"" when it closed the connection
        except TimeoutError:
            return False
        except OSError:
            pass  # reset: turned away
        finally:
            s.close()
        return True

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def open_fds(self) -> int:
        return len(os.listdir(f"/proc/{self.pid}/fd"))

    def connections(self) -> int:
        """The client connections it holds: its SOCK_SEQPACKET sockets that are not
        listening (/proc/net/unix), whether their peers are there or gone."""
        inodes = set()
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                target = os.readlink(f"/proc/{self.pid}/fd/{name}")
            except OSError:
                continue  # closed meanwhile
            if target.startswith("socket:["):
                inodes.add(int(target[len("socket:[") : -1]))
        with open("/proc/net/unix", encoding="ascii") as f:
            next(f)  # Num RefCount Protocol Flags Type St Inode Path
            rows = [line.split() for line in f]
        return sum(
            1
            for row in rows
            if int(row[6]) in inodes and row[4] == "0005" and not int(row[3], 16) & 0x10000
        )  # SOCK_SEQPACKET, without __SO_ACCEPTCON

    def quiet_fds(self, timeout: float = 10.0) -> int:
        """Its open fds once it holds no client connection: a baseline to come back to
        (it closes a connection soon after its peer left, not at once)."""
        deadline = time.monotonic() + timeout
        while self.connections():
            assert time.monotonic() < deadline, f"connections still held: {self.fd_targets()}"
            time.sleep(POLL)
        return self.open_fds()

    def settled_fds(self) -> tuple[int, int]:
        """Its open fds less one per cache entry outside its index's descriptor range
        (an entry in it takes no descriptor of its own), and its entry count: asked
        through a connection of our own, counted once it holds no client connection."""
        from shadowd_client import Client

        with Client(self.socket_path, timeout=10) as c:
            s = c.stats()
        return self.quiet_fds() - s["entries"] + s["index_fd_range_used"], s["entries"]

    def fd_targets(self) -> list[str]:
        out = []
        for name in os.listdir(f"/proc/{self.pid}/fd"):
            try:
                out.append(os.readlink(f"/proc/{self.pid}/fd/{name}"))
            except OSError:
                pass
        return sorted(out)

    async def terminate(self, sig: int = signal.SIGTERM, timeout: float = 15.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        with trio.fail_after(timeout):
            while self.proc.poll() is None:
                await trio.sleep(POLL)
        self._log.close()
        return self.proc.returncode

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        if hasattr(self, "_log"):
            self._log.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory every user may traverse (tmp_path is root-only)."""
    path = Path(tempfile.mkdtemp(prefix="shadowd-test-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="session")
def c_client_build() -> Iterator[Callable[..., tuple[str | None, str]]]:
    """``c_client_build(*flags)``: shadowd.bench's build_c_client, run once per session
    for each set of compiler flags: (the binary, "") or (None, why not).

    Compiling client/c takes seconds; a test only runs the binary, never changes
    it. The binary (0755) is in a directory every user may traverse, for tests
    that run it as another user.
    """
    from shadowd.bench import build_c_client

    top = Path(tempfile.mkdtemp(prefix="shadowd-cclient-"))
    top.chmod(0o755)
    built: dict[tuple[str, ...], tuple[str | None, str]] = {}

    def build(*flags: str) -> tuple[str | None, str]:
        if flags not in built:
            where = top / str(len(built))
            where.mkdir()
            where.chmod(0o755)
            binary, why = build_c_client(str(where), *flags)
            if binary is not None:
                os.chmod(binary, 0o755)
            built[flags] = (binary, why)
        return built[flags]

    try:
        yield build
    finally:
        shutil.rmtree(top, ignore_errors=True)


@pytest.fixture
async def start_daemon(shared_dir: Path) -> AsyncIterator[Any]:
    """A factory: ``await start_daemon("--max-entries", "3")`` returns a running Daemon."""
    daemons: list[Daemon] = []

    async def start(
        *args: str,
        socket_name: str | None = None,
        env: dict[str, str] | None = None,
        nofile: tuple[int, int] | None = None,
        user: tuple[int, int] | None = None,
        groups: tuple[int, ...] = (),
        directory: Path | None = None,
        watches: int | None = None,
    ) -> Daemon:
        """*user*: (uid, gid) to serve as, with the supplementary *groups*;
        *directory*: where the socket goes (shared_dir); *watches*: the daemon's
        own inotify watch limit (it then serves in a user namespace of its own)."""
        name = socket_name or f"d{len(daemons)}.sock"
        d = Daemon(
            (directory or shared_dir) / name,
            list(args),
            env,
            nofile,
            user,
            groups=groups,
            watches=watches,
        )
        daemons.append(d)
        await d.start()
        return d

    try:
        yield start
    finally:
        for d in daemons:
            d.kill()
            # Shown by pytest only when the test failed.
            print(f"--- log of the daemon on {d.socket_path} ---\n{d.log()}")


@pytest.fixture(params=["c", "python"])
async def daemon(start_daemon: Any, request: pytest.FixtureRequest) -> Daemon:
    """One daemon that caches files as soon as they are 50 ms old.

    Twice: with the hit path in the C extension, and all in Python
    (SHADOWD_NO_C), as on a host where the extension could not be built.
    """
    env = None if request.param == "c" else dict(os.environ, SHADOWD_NO_C="1")
    d: Daemon = await start_daemon("--racy-window", "0.05", env=env)
    return d


@pytest.fixture
async def one_daemon(start_daemon: Any) -> Daemon:
    """The daemon fixture's daemon with the hit path in C, and not a second one
    all in Python: for a test of what the hit path's system calls never touch
    (the fd count, the CLI's own drawing and parsing, the socket's mode), where
    the second would run the very same code again."""
    d: Daemon = await start_daemon("--racy-window", "0.05")
    return d


def settle(*paths: Path, window: float = 0.05) -> None:
    """Wait until the ctimes of *paths* are older than the racy window."""
    newest = max(p.stat().st_ctime for p in paths)
    delay = newest + window + 0.02 - time.time()
    if delay > 0:
        time.sleep(delay)


def make_file(path: Path, data: bytes, mode: int = 0o644) -> Path:
    path.write_bytes(data)
    path.chmod(mode)
    return path


def deep_file(base: Path, length: int, data: bytes) -> Path:
    """A settled file under *base* whose path is at least *length* bytes long."""
    deep = base
    while len(str(deep)) < length:
        deep = deep / ("d" * 50)
    deep.mkdir(parents=True)
    f = make_file(deep / "lib.so", data)
    settle(f)
    return f


async def until_unpinned(server: Any) -> None:
    """Until the in-process *server* tracks no memfd as pinned: the kernel said (through
    its watches) that every holder let go. Within 5 s."""
    deadline = time.monotonic() + 5
    while server.opens.pins.used:
        assert time.monotonic() < deadline
        server.opens.watches.drain()
        await trio.sleep(0.01)


def read_fd(fd: int) -> bytes:
    size = os.fstat(fd).st_size
    return os.pread(fd, size, 0) if size else b""


PRELUDE = textwrap.dedent(
    """
    import json, os, sys
    sys.path[:0] = {paths!r}
    {imports}
    os.setgroups({groups!r})
    os.setresgid({gid}, {gid}, {gid})
    os.setresuid({uid}, {uid}, {uid})
    def out(obj):
        print(json.dumps(obj))
    """
)


def run_as(
    uid: int,
    code: str,
    *,
    gid: int | None = None,
    groups: tuple[int, ...] = (),
    imports: str = "",
    timeout: float = 30,
    env: dict[str, str] | None = None,
) -> Any:
    """Run *code* in a child that drops to *uid* after its imports; return its JSON line.

    Top-level import lines of *code* run before the drop. The child has
    primary group *gid* (default: *uid*) and supplementary *groups*, and the
    environment *env* (default: ours).
    """
    gid = uid if gid is None else gid
    # Everything is imported before the drop: the interpreter's own files may
    # not be readable by the target user.
    lines = textwrap.dedent(code).splitlines()
    hoisted = [ln for ln in lines if ln.startswith(("import ", "from "))]
    body = [ln for ln in lines if not ln.startswith(("import ", "from "))]
    prelude = PRELUDE.format(
        paths=[str(REPO), str(REPO / "client")],
        imports="\n".join([imports, *hoisted]),
        uid=uid,
        gid=gid,
        groups=list(groups),
    )
    proc = subprocess.run(
        [sys.executable, "-c", prelude + "\n".join(body)],
        capture_output=True,
        timeout=timeout,
        text=True,
        check=False,
        env=env,
    )
    if proc.returncode != 0:
        raise AssertionError(f"child failed ({proc.returncode}):\n{proc.stderr}")
    lines = [line for line in proc.stdout.splitlines() if line.strip()]
    return json.loads(lines[-1])


def _child_command(uid: int, code: str, gid: int | None, groups: tuple[int, ...]) -> list[str]:
    gid = uid if gid is None else gid
    lines = textwrap.dedent(code).splitlines()
    hoisted = [ln for ln in lines if ln.startswith(("import ", "from "))]
    body = [ln for ln in lines if not ln.startswith(("import ", "from "))]
    prelude = PRELUDE.format(
        paths=[str(REPO), str(REPO / "client")],
        imports="\n".join(hoisted),
        uid=uid,
        gid=gid,
        groups=list(groups),
    )
    return [sys.executable, "-c", prelude + _CHILD_IO + "\n".join(body)]


# What a spawned child adds to PRELUDE: flushed output, and recv() for input.
_CHILD_IO = textwrap.dedent(
    """
    def out(obj):
        print(json.dumps(obj), flush=True)
    def recv():
        line = sys.stdin.readline()
        return json.loads(line) if line else None
    """
)


class Child:
    """A long-lived child running as another user, spoken to in JSON lines.

    The child's code gets ``out(obj)`` (one line to the test) and ``recv()``
    (the next object the test sent, None once the test closed its input).
    """

    def __init__(self, proc: subprocess.Popen[str], stderr_path: Path) -> None:
        self.proc = proc
        self._stderr_path = stderr_path

    def send(self, obj: Any) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(obj) + "\n")
        self.proc.stdin.flush()

    def recv(self, timeout: float = 30) -> Any:
        """The child's next JSON line (blocking; call from a worker thread)."""
        import select

        assert self.proc.stdout is not None
        deadline = time.monotonic() + timeout
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError(f"no word from the child in {timeout}s:\n{self.stderr()}")
            if select.select([self.proc.stdout], [], [], left)[0]:
                line = self.proc.stdout.readline()
                if not line:
                    self.proc.wait(5)
                    raise RuntimeError(f"child exited ({self.proc.returncode}):\n{self.stderr()}")
                if line.strip():
                    return json.loads(line)

    def stderr(self) -> str:
        try:
            return self._stderr_path.read_text(errors="replace")
        except OSError:
            return ""

    def close(self, timeout: float = 10) -> int:
        """Close its input (recv() gets None), wait for it to exit; kill it if it does not."""
        if self.proc.stdin is not None and not self.proc.stdin.closed:
            try:
                self.proc.stdin.close()
            except OSError:
                pass
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self._stderr_path.unlink(missing_ok=True)
        return self.proc.returncode

    def __enter__(self) -> Child:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def spawn_as(uid: int, code: str, *, gid: int | None = None, groups: tuple[int, ...] = ()) -> Child:
    """Start *code* in a child that drops to *uid* as run_as does, and keep talking to it."""
    fd, name = tempfile.mkstemp(prefix="shadowd-child-", suffix=".err")
    try:
        proc = subprocess.Popen(
            _child_command(uid, code, gid, groups),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=fd,
            text=True,
        )
    finally:
        os.close(fd)
    return Child(proc, Path(name))


def in_thread(
    timeout: float = 30,
) -> Callable[[Callable[..., None]], Callable[..., Coroutine[Any, Any, None]]]:
    """Run a blocking test body in a worker thread, as a trio test under fail_after.

    The daemon fixtures are trio fixtures; blocking client code must not run
    on the trio thread.
    """

    def wrap(fn: Callable[..., None]) -> Callable[..., Coroutine[Any, Any, None]]:
        @functools.wraps(fn)
        async def test(*args: Any, **kwargs: Any) -> None:
            with trio.fail_after(timeout):
                await trio.to_thread.run_sync(
                    functools.partial(fn, *args, **kwargs), abandon_on_cancel=True
                )

        return test

    return wrap
