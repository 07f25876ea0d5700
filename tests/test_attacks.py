# The twelve attacks of issue 14, each reproduced end to end against the
# daemon as a real subprocess, each asserting the safe outcome the issue
# demands. Today's daemon loses every one of them, so each is marked
# xfail(strict): the fix that makes one pass turns it into an XPASS, which
# fails the suite until its marker is removed.
#
# Only the attack's own outcome may fail with AssertionError (xfail is told
# raises=AssertionError): a setup that goes wrong raises SetupError, so the
# test fails loudly instead of passing as an expected failure.
#
# Must never: leave a mount, a userfaultfd stall or a child process behind;
# wait on a hung mount without a deadline; pass for a reason other than the
# defence it names.
from __future__ import annotations

import base64
import contextlib
import errno
import hashlib
import mmap
import os
import signal
import socket
import stat
import statistics
import struct
import subprocess
import sys
import textwrap
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import (
    NOBODY,
    REPO,
    Daemon,
    make_file,
    repo_env,
    requires_root,
    run_as,
    spawn_as,
)
from .fusefs import FuseFile, HangingFS
from .mounts import detach, ext4, is_mounted, mount_tmpfs, tmpfs, umount
from .uffd import PAGE, StalledWrite
from .wire import Raw, read_all

pytestmark = requires_root

#: Users of the attacks (need not exist in /etc/passwd).
ALICE, BOB, CAROL = 1000, 1001, 1002


# pytest-trio hands a test's exception on inside an ExceptionGroup.
_ATTACK_LOST: Any = (
    pytest.RaisesGroup(AssertionError, allow_unwrapped=True, flatten_subgroups=True)
    if hasattr(pytest, "RaisesGroup")
    else (AssertionError, BaseExceptionGroup)  # pytest < 8.4: any group will do
)


def attack(reason: str) -> pytest.MarkDecorator:
    """The marker of a test that today's daemon fails: an expected AssertionError."""
    return pytest.mark.xfail(strict=True, raises=_ATTACK_LOST, reason=f"issue 14: {reason}")


class SetupError(Exception):
    """The test could not set its attack up: a failure, never an expected one."""


def require(condition: object, message: str) -> None:
    if not condition:
        raise SetupError(message)


def child(uid: int, code: str, **kwargs: Any) -> Any:
    """run_as, with a crashed child reported as a SetupError (not an AssertionError)."""
    try:
        return run_as(uid, code, **kwargs)
    except AssertionError as exc:
        raise SetupError(str(exc)) from None


async def call(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    return await trio.to_thread.run_sync(lambda: fn(*args, **kwargs), abandon_on_cancel=True)


def stats(d: Daemon) -> dict[str, Any]:
    from shadowd_client import Client

    with Client(d.socket_path, timeout=10) as c:
        return c.stats()


def open_raw(raw: Raw, path: Path, id: int = 1) -> tuple[dict[str, Any], bytes | None]:
    """One open on the wire: the reply and the served bytes (None when refused)."""
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        reply, fds = raw.call({"op": "open", "id": id, "path": str(path)}, [fd])
    finally:
        os.close(fd)
    if not fds:
        return reply, None
    try:
        return reply, read_all(fds[0])
    finally:
        for got in fds:
            os.close(got)


def open_once(d: Daemon, path: Path) -> tuple[dict[str, Any], bytes | None]:
    with Raw(d.socket_path) as raw:
        return open_raw(raw, path)


def cache(d: Daemon, path: Path) -> None:
    """Have *path* cached: opened until an open is a hit (a SetupError if it never is)."""
    with Raw(d.socket_path) as raw:
        for i in range(20):
            reply, data = open_raw(raw, path, i + 1)
            require(reply.get("ok"), f"cannot open {path}: {reply}")
            if reply.get("hit"):
                return
            time.sleep(0.02)
    raise SetupError(f"{path} never became a hit")


def mkdir_owned(path: Path, uid: int, mode: int = 0o755) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    os.chown(path, uid, uid)
    path.chmod(mode)
    return path


@pytest.fixture(params=["tmpfs", "ext4"])
def fs_dir(request: pytest.FixtureRequest, shared_dir: Path) -> Iterator[Path]:
    """A directory on a fresh tmpfs, or on an ext4 loop image."""
    mount = tmpfs if request.param == "tmpfs" else ext4
    with mount(shared_dir / request.param) as path:
        yield path


# -- 11: the lock file -------------------------------------------------------


@pytest.mark.parametrize("where", ["sticky", "group-writable"])
@attack("the lock file is opened with O_CREAT through a planted symlink: target truncated")
async def test_11_lock_file_never_follows_a_symlink(
    start_daemon: Any, shared_dir: Path, where: str
) -> None:
    pub = shared_dir / "pub"
    pub.mkdir()
    group = 4242
    if where == "sticky":
        if Path("/proc/sys/fs/protected_symlinks").read_text().strip() != "0":
            pytest.skip("fs.protected_symlinks: the kernel refuses to follow it in a sticky dir")
        pub.chmod(0o1777)
    else:  # a directory shared by a group (no sticky bit: protected_symlinks does not apply)
        os.chown(pub, 0, group)
        pub.chmod(0o2775)
    secret = b"root's secret, mode 0600\n"
    target = make_file(shared_dir / "secret", secret, 0o600)
    lock = pub / "s.sock.lock"
    child(NOBODY, f"os.symlink({str(target)!r}, {str(lock)!r})\nout(1)", groups=(group,))
    require(lock.is_symlink(), "the planted symlink is not there")
    with contextlib.suppress(RuntimeError):  # refusing to start is a fine answer
        await start_daemon("--racy-window", "0", socket_name="s.sock", directory=pub)
    after = target.read_bytes(), stat.S_IMODE(target.stat().st_mode)
    assert after == (secret, 0o600)


# -- 12: labels ----------------------------------------------------------------

LABEL_OPEN = """
from shadowd_client import Client
with Client({sock!r}, timeout=10) as c:
    for _ in range(3):
        os.close(c.open({path!r}))
out(1)
"""

LABEL_STATS = """
from shadowd_client import Client
with Client({sock!r}, timeout=10) as c:
    s = c.stats()
top = list(s["top_by_hits"]) + list(s["top_by_bytes"])
out(sorted({{e["label"] if isinstance(e, dict) else e[0] for e in top}}))
"""


@attack("every admitted uid reads every other uid's path labels in the stats top lists")
async def test_12_labels_of_one_uid_are_not_listed_to_another(
    start_daemon: Any, shared_dir: Path
) -> None:
    d = await start_daemon("--socket-mode", "0666", "--racy-window", "0")
    home = mkdir_owned(shared_dir / "home", 0)
    alice = mkdir_owned(home / "alice", ALICE, 0o755)
    private = mkdir_owned(alice / "private", ALICE, 0o700)
    f = make_file(private / "payroll-2026.xlsx", b"salaries\n" * 1000, 0o600)
    os.chown(f, ALICE, ALICE)
    sock = str(d.socket_path)
    await call(child, ALICE, LABEL_OPEN.format(sock=sock, path=str(f)))
    seen_by_bob = await call(child, BOB, LABEL_STATS.format(sock=sock))
    seen_by_root = await call(child, 0, LABEL_STATS.format(sock=sock))
    require(str(f) in seen_by_root, f"the label never reached the top lists: {seen_by_root}")
    assert str(f) not in seen_by_bob
