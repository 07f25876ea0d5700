# A file on a hung mount (a FUSE file system whose reads are never answered)
# ties up only its own uid's share of the daemon's workers: another uid's
# files, on local and on FUSE file systems alike, are served meanwhile, and
# when the mount is aborted every fd the daemon received is closed.
from __future__ import annotations

import contextlib
import os
import time
from pathlib import Path
from typing import Any

import pytest
import trio

from .conftest import NOBODY, Daemon, make_file, requires_root, run_as
from .fusefs import FuseFile, HangingFS, mounted
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
        return d.settled_fds()[0]

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


@requires_root
async def test_fds_of_a_hung_mount_sent_with_refused_requests_are_bounded(
    start_daemon: Any, shared_dir: Path
) -> None:
    """Requests the daemon refuses, each carrying fds of a file whose close hangs
    (a FUSE mount that never answers FLUSH): the daemon closes them in workers of
    the sender's uid, counted in its --max-fds-per-uid until closed, and does not
    read its connection past that bound, so the daemon's fd table stays bounded."""
    bound, per_request = 64, 8
    d: Daemon = await start_daemon(
        "--racy-window", "0", "--max-copies-per-uid", str(QUOTA), "--max-fds-per-uid", str(bound)
    )
    baseline = d.open_fds()
    stuck = FuseFile(b"s" * 100, ino=7, hang_flush=True)
    with mounted(shared_dir / "fuse", files={"stuck": stuck}) as fs:
        # Kept open until the mount is aborted: our own close would hang too.
        fds = [
            os.open(fs.mountpoint / "stuck", os.O_RDONLY | os.O_NONBLOCK)
            for _ in range(per_request)
        ]

        def flood() -> tuple[Raw, int]:
            raw = Raw(d.socket_path)
            raw.sock.setblocking(False)
            sent = 0
            for i in range(200):  # 1,600 fds offered, as fast as the daemon reads
                try:
                    raw.send({"op": "open", "id": i + 1}, fds)  # 8 fds for an open: bad-fds
                except BlockingIOError:
                    break  # the daemon stopped reading us
                sent += 1
            return raw, sent

        try:
            with trio.fail_after(60):
                raw, sent = await trio.to_thread.run_sync(flood)
                try:
                    assert sent >= bound // per_request  # enough to reach the bound
                    await trio.sleep(1.0)  # what the daemon would still read, it reads now
                    assert fs.hung_flushes == QUOTA  # closes hang in the uid's own slots
                    held = d.open_fds() - baseline
                    # The uid's bound, one request's fds past it (read before it
                    # was reached), and the connection itself.
                    assert held <= bound + per_request + 1, (sent, held)
                    fs.close()  # the mount gives up: every waiting close ends
                finally:
                    raw.close()
                with trio.move_on_after(20):
                    while d.open_fds() > baseline:
                        await trio.sleep(0.05)
                assert d.open_fds() <= baseline, d.fd_targets()
        finally:
            fs.close()
            for fd in fds:
                with contextlib.suppress(OSError):  # ENOTCONN: the flush failed, the fd is gone
                    os.close(fd)
