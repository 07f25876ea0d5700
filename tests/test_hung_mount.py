# A file on a hung mount (a FUSE file system whose reads are never answered)
# ties up only its own uid's share of the daemon's workers: another uid's
# files, on local and on FUSE file systems alike, are served meanwhile, and
# when the mount is aborted every fd the daemon received is closed.
from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import NOBODY, Daemon, make_file, requires_root, run_as
from .fusefs import HangingFS, mounted
from .wire import Raw

QUOTA = 2

VICTIM = """
from shadowd_client import Client
with Client({path!r}, timeout=10) as c:
    got = []
    for name in ({ok!r}, {local!r}):
        fd = c.open(name)
        got.append(len(os.pread(fd, 1 << 20, 0)))
    out(got)
"""


@pytest.fixture
def hanging_fs(shared_dir: Path) -> Any:
    with mounted(shared_dir / "fuse") as fs:
        yield fs


@requires_root
async def test_hung_mount_ties_up_only_its_uids_share(
    start_daemon: Any, hanging_fs: HangingFS, shared_dir: Path
) -> None:
    d: Daemon = await start_daemon(
        "--socket-mode", "0666", "--racy-window", "0", "--max-copies-per-uid", str(QUOTA)
    )
    local = make_file(shared_dir / "local", b"l" * 1000)
    mnt = hanging_fs.mountpoint

    def settled_fds() -> int:
        """The daemon's fds less one per cache entry."""
        entries = _stats(d)["entries"]
        time.sleep(0.05)  # let it notice that the stats connection closed
        return d.open_fds() - entries

    def warm() -> None:  # the daemon opens a few fds of its own on its first hit
        from shadowd_client import Client

        with Client(d.socket_path, timeout=10) as c:
            for _ in range(2):
                os.close(c.open(local))

    await trio.to_thread.run_sync(warm)
    baseline = await trio.to_thread.run_sync(settled_fds)

    def hostile() -> Raw:
        raw = Raw(d.socket_path)
        for i in range(6):  # six hung files, pipelined; more than the quota
            fd = os.open(mnt / f"hang{i}", os.O_RDONLY | os.O_NONBLOCK)
            raw.send({"op": "open", "id": i + 1}, [fd])
            os.close(fd)
        return raw

    with trio.fail_after(60):
        raw = await trio.to_thread.run_sync(hostile)
        try:
            while hanging_fs.hung() < QUOTA:
                await trio.sleep(0.05)
            await trio.sleep(0.5)
            assert hanging_fs.hung() == QUOTA  # the rest wait for the uid's own slots
            # Another uid is served meanwhile, from the same FUSE mount too.
            code = VICTIM.format(path=str(d.socket_path), ok=str(mnt / "ok"), local=str(local))
            started = time.monotonic()
            assert await trio.to_thread.run_sync(run_as, NOBODY, code) == [4096, 1000]
            assert time.monotonic() - started < 10
            assert hanging_fs.hung() == QUOTA
            s = await trio.to_thread.run_sync(_stats, d)
            assert s["limit_hits"]["max_copies_per_uid"] >= 1
            # The mount gives up: every hung request is answered with an error.
            hanging_fs.close()
            codes = [(await trio.to_thread.run_sync(raw.recv))[0].get("code") for _ in range(6)]
            assert codes == ["io-error"] * 6, codes
        finally:
            raw.close()
        with trio.move_on_after(10):
            while await trio.to_thread.run_sync(settled_fds) != baseline:
                await trio.sleep(0.05)
        assert await trio.to_thread.run_sync(settled_fds) == baseline, d.fd_targets()


def _stats(d: Daemon) -> dict[str, Any]:
    from shadowd_client import Client

    with Client(d.socket_path, timeout=10) as c:
        return c.stats()
