# The one socket rule (shadowd/paths.py): which places a client looks at, in
# which order, and where `shadowd serve` creates its socket; then, as root, a
# real host daemon on /run/shadowd/shadowd.sock reached by a member of its
# group from `shadowd stats`, Client, AsyncClient and Opener without setting
# anything.
from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from shadowd.bench import c_compiler
from shadowd.errors import ConfigError
from shadowd.paths import (
    ROOT_SOCKET,
    client_candidates,
    daemon_socket_path,
    find_socket,
    is_socket,
)

from .conftest import NOBODY, make_file, repo_env, requires_root, run_as, settle

#: A group no one on this machine is in: the socket's group in the root test.
SOCKET_GROUP = 54321


def test_candidates_in_order() -> None:
    xdg = {"XDG_RUNTIME_DIR": "/x"}
    assert client_candidates(xdg, 1000) == ["/x/shadowd/shadowd.sock", ROOT_SOCKET]
    # su -, sudo, cron: no XDG_RUNTIME_DIR; an empty one counts as none.
    for env in ({}, {"XDG_RUNTIME_DIR": ""}):
        assert client_candidates(env, 1000) == ["/run/user/1000/shadowd/shadowd.sock", ROOT_SOCKET]
    assert client_candidates(xdg, 0) == [ROOT_SOCKET]  # root: the host daemon only


def test_a_relative_runtime_dir_is_ignored() -> None:
    # The XDG spec: a relative path there is invalid and ignored. Taken as it was,
    # `shadowd serve` made its socket below its cwd and a client in another
    # directory looked below its own.
    for relative in ("run", "./run", "relative/dir"):
        env = {"XDG_RUNTIME_DIR": relative}
        assert client_candidates(env, 1000) == ["/run/user/1000/shadowd/shadowd.sock", ROOT_SOCKET]
        uid = 4_000_000  # no /run/user/UID: serve says why it has no path
        with pytest.raises(ConfigError, match="--socket") as info:
            daemon_socket_path(env, uid)
        assert f"$XDG_RUNTIME_DIR is not an absolute path ({relative!r}, ignored)" in str(
            info.value
        )


@pytest.fixture
def listening(tmp_path: Path) -> Iterator[Any]:
    """A factory of SOCK_SEQPACKET sockets listening at a path."""
    socks: list[socket.socket] = []

    def make(path: Path) -> Path:
        path.parent.mkdir(parents=True, exist_ok=True)
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        s.bind(str(path))
        s.listen()
        socks.append(s)
        return path

    yield make
    for s in socks:
        s.close()


def test_the_first_socket_found_wins(tmp_path: Path, listening: Any, host_sockets: None) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path)}
    mine = tmp_path / "shadowd" / "shadowd.sock"
    if not is_socket(ROOT_SOCKET):
        # Nothing anywhere: the first candidate, and every place looked at.
        none = find_socket(env=env, uid=1000)
        assert none.path == str(mine) and none.source == "searched"
        assert none.looked_at == (str(mine), ROOT_SOCKET)
        assert none.describe() == f"looked at {mine}, then {ROOT_SOCKET}"
    # A file that is no socket is passed over.
    mine.parent.mkdir()
    mine.write_text("not a socket")
    assert find_socket(env=env, uid=1000).path != str(mine) or not is_socket(ROOT_SOCKET)
    mine.unlink()
    listening(mine)
    assert find_socket(env=env, uid=1000).path == str(mine)


def test_an_explicit_socket_is_the_only_place_tried(tmp_path: Path) -> None:
    env = {"XDG_RUNTIME_DIR": str(tmp_path), "SHADOWD_SOCKET": "/nowhere/s.sock"}
    choice = find_socket(env=env, uid=1000)
    assert (choice.path, choice.looked_at) == ("/nowhere/s.sock", ())
    assert choice.describe() == "from $SHADOWD_SOCKET"
    given = find_socket("/given.sock", env=env, uid=1000)
    assert (given.path, given.describe()) == ("/given.sock", "")
    with pytest.raises(ConfigError, match="empty"):
        find_socket("", env=env)
    with pytest.raises(ConfigError, match="107"):
        find_socket("/" + "x" * 200, env=env)


def test_where_the_daemon_creates_its_socket(tmp_path: Path) -> None:
    assert daemon_socket_path({"SHADOWD_SOCKET": "/s.sock"}, 1000) == "/s.sock"
    assert daemon_socket_path({"XDG_RUNTIME_DIR": "/x"}, 0) == ROOT_SOCKET
    runtime = str(tmp_path)
    expected = f"{runtime}/shadowd/shadowd.sock"
    assert daemon_socket_path({"XDG_RUNTIME_DIR": runtime}, 1000) == expected
    # One that does not exist is not made (the login manager makes it, private):
    # the refusal names it, where creating its parents failed with "Permission
    # denied" on /run/user.
    for missing in ("/run/user/4000000", str(tmp_path / "gone")):
        with pytest.raises(ConfigError, match="--socket") as info:
            daemon_socket_path({"XDG_RUNTIME_DIR": missing}, 4_000_000)
        assert f"$XDG_RUNTIME_DIR is {missing}, which is not a directory" in str(info.value)
    # No XDG_RUNTIME_DIR and no /run/user/UID of that user: say what to pass.
    uid = 4_000_000  # no such user, no such directory
    with pytest.raises(ConfigError, match="--socket") as info:
        daemon_socket_path({}, uid)
    assert f"/run/user/{uid}" in str(info.value)
    # The way that clients follow too comes first: --socket alone, they do not find.
    assert "set $SHADOWD_SOCKET (clients read it too) or pass --socket PATH" in str(info.value)


# -- as root: a real host daemon, and users who set nothing ---------------------


@contextlib.contextmanager
def host_daemon(*args: str) -> Iterator[subprocess.Popen[bytes]]:
    """`shadowd serve` as root with no --socket (so on /run/shadowd/shadowd.sock), removed after."""
    if os.path.lexists(ROOT_SOCKET):
        pytest.skip(f"something already lives on {ROOT_SOCKET}")
    directory = os.path.dirname(ROOT_SOCKET)
    made_dir = not os.path.exists(directory)
    env = repo_env()
    env.pop("SHADOWD_SOCKET", None)
    proc = subprocess.Popen(
        [sys.executable, "-m", "shadowd", "serve", *args],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
    )
    try:
        yield proc
    finally:
        if proc.poll() is None:
            proc.terminate()
        proc.communicate(timeout=30)
        with contextlib.suppress(FileNotFoundError):
            os.unlink(ROOT_SOCKET + ".lock")
        if made_dir:
            shutil.rmtree(directory, ignore_errors=True)


async def wait_for_socket(proc: subprocess.Popen[bytes], path: str) -> None:
    with trio.fail_after(30):
        while not is_socket(path):
            if proc.poll() is not None:
                raise AssertionError(f"daemon exited: {proc.communicate()[1]!r}")
            await trio.sleep(0.02)


#: As the user: a Client, an Opener and `shadowd stats` with nothing set.
AS_USER = """
import contextlib, io, json, os
import trio
import shadowd.cli, shadowd.report, shadowd.stats
from shadowd_client import Client, Opener, DaemonUnavailable
from shadowd_client.aio import AsyncClient
with Client(timeout=10) as c:
    fd = c.open({path!r})
    client = {{"socket": c.socket_path, "size": os.fstat(fd).st_size}}
    os.close(fd)
async def aio():
    async with AsyncClient(timeout=10) as ac:
        fd = await ac.open({path!r})
        os.close(fd)
        return ac.socket_path
client["async_socket"] = trio.run(aio)
with Opener(timeout=10) as o:
    os.close(o.open({path!r}))
    opener = {{"daemon_opens": o.daemon_opens, "local_opens": o.local_opens}}
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    code = shadowd.cli.main(["stats", "--json"])
c_client = None
if {c_client!r}:
    import subprocess
    run = subprocess.run([{c_client!r}, "-v", {path!r}], capture_output=True, env=os.environ)
    c_client = {{"status": run.returncode, "size": len(run.stdout),
                "said": run.stderr.decode().split()}}
out({{"client": client, "opener": opener, "stats_code": code,
      "stats": json.loads(buf.getvalue()), "c_client": c_client}})
"""


def user_env(xdg: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in ("SHADOWD_SOCKET", "XDG_RUNTIME_DIR")}
    if xdg is not None:
        env["XDG_RUNTIME_DIR"] = xdg
    return env


@requires_root
async def test_a_member_of_the_socket_group_reaches_the_host_daemon(
    shared_dir: Path, c_client_build: Callable[..., tuple[str | None, str]], host_sockets: None
) -> None:
    lib = make_file(shared_dir / "libbig.so", os.urandom(300 * 1024))  # above local_below
    settle(lib, window=1.0)  # older than the daemon's racy window: the Client's open caches it
    empty_runtime = shared_dir / "xdg"  # set, but holds no socket
    empty_runtime.mkdir(mode=0o755)
    c_client, why = c_client_build()  # the C client follows the same rule (any user runs it)
    # Without a compiler the C part cannot run; with one, it must (never silently skipped).
    assert c_client is not None or c_compiler() is None, why
    with host_daemon("--socket-mode", "0660", "--socket-group", str(SOCKET_GROUP)) as proc:
        await wait_for_socket(proc, ROOT_SOCKET)
        for xdg in (None, str(empty_runtime)):
            got = await trio.to_thread.run_sync(
                lambda xdg=xdg: run_as(
                    NOBODY,
                    AS_USER.format(path=str(lib), c_client=c_client or ""),
                    groups=(SOCKET_GROUP,),
                    env=user_env(xdg),
                )
            )
            assert got["client"] == {
                "socket": ROOT_SOCKET,
                "size": 300 * 1024,
                "async_socket": ROOT_SOCKET,
            }, xdg
            assert got["opener"] == {"daemon_opens": 1, "local_opens": 0}, xdg
            assert got["stats_code"] == 0 and got["stats"]["clients_total"] >= 2, xdg
            if c_client is not None:
                assert got["c_client"]["status"] == 0 and got["c_client"]["size"] == 300 * 1024
                assert got["c_client"]["said"][-1] in ("hit", "miss"), got["c_client"]
    # The daemon is gone: the user's error names every place looked at.
    looked = await trio.to_thread.run_sync(
        lambda: run_as(
            NOBODY,
            """
            from shadowd_client import Client, DaemonUnavailable
            try:
                Client(timeout=5).stats()
            except DaemonUnavailable as exc:
                out(str(exc))
            """,
            groups=(SOCKET_GROUP,),
            env=user_env(None),
        )
    )
    assert f"looked at /run/user/{NOBODY}/shadowd/shadowd.sock, then {ROOT_SOCKET}" in looked


@pytest.fixture
def nobody_runtime(host_sockets: None) -> Iterator[str]:
    """/run/user/NOBODY, made for the test as a login would, removed after."""
    runtime = f"/run/user/{NOBODY}"
    if os.path.lexists(runtime):
        pytest.skip(f"{runtime} exists already")
    made_parent = not os.path.exists("/run/user")
    os.makedirs(runtime, mode=0o700)
    os.chown(runtime, NOBODY, NOBODY)
    try:
        yield runtime
    finally:
        shutil.rmtree("/run/user" if made_parent else runtime, ignore_errors=True)


@requires_root
async def test_a_user_without_xdg_runtime_dir_serves_in_run_user(
    shared_dir: Path, nobody_runtime: str
) -> None:
    """`make run` by a user under su or cron: /run/user/UID, where that user's clients look."""
    runtime = nobody_runtime
    lib = make_file(shared_dir / "libbig.so", os.urandom(300 * 1024))
    got = await trio.to_thread.run_sync(
        lambda: run_as(
            NOBODY,
            f"""
            import signal, subprocess, sys, time
            import trio, shadowd.cli, shadowd.daemon, shadowd.server
            from shadowd_client import Client
            pid = os.fork()
            if pid == 0:
                os._exit(shadowd.cli.main(["serve", "--log-level", "warning"]))
            path = "/run/user/{NOBODY}/shadowd/shadowd.sock"
            for _ in range(500):
                if os.path.exists(path):
                    break
                time.sleep(0.02)
            with Client(timeout=10) as c:
                fd = c.open({str(lib)!r})
                found = c.socket_path
                os.close(fd)
            os.kill(pid, signal.SIGTERM)
            _, status = os.waitpid(pid, 0)
            out({{"found": found, "status": os.waitstatus_to_exitcode(status)}})
            """,
            env=user_env(None),
        )
    )
    assert got == {"found": f"/run/user/{NOBODY}/shadowd/shadowd.sock", "status": 0}
    # Without the directory: one line naming --socket, exit 2.
    shutil.rmtree(runtime)
    refused = await trio.to_thread.run_sync(
        lambda: run_as(
            NOBODY,
            """
            import contextlib, io
            import trio, shadowd.cli, shadowd.daemon, shadowd.server
            err = io.StringIO()
            with contextlib.redirect_stderr(err):
                code = shadowd.cli.main(["serve"])
            out({"code": code, "err": err.getvalue()})
            """,
            env=user_env(None),
        )
    )
    assert refused["code"] == 2
    assert refused["err"].count("\n") == 1 and "--socket" in refused["err"]
