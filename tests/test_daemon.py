# The daemon's lifecycle in process, on a virtual clock: READY=1 once it
# serves, STATUS= every ten seconds, STOPPING=1 when it stops, and the
# variables it took from the environment gone.
from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import trio
import trio.testing

from shadowd.daemon import STATUS_INTERVAL, run
from shadowd.server import ServerConfig

from .manager import NotifyReceiver


@pytest.fixture
def idle_jump_clock() -> trio.testing.MockClock:
    """Virtual time that jumps once the loop has been idle 50 ms of real time.

    Not at once, as pytest-trio's autojump_clock does: the daemon's warm-up
    waits for worker threads before READY=1, and a clock that jumped while it
    waited would reach the test's deadline first.
    """
    return trio.testing.MockClock(autojump_threshold=0.05)


async def test_ready_status_and_stopping(
    idle_jump_clock: Any, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    rx = NotifyReceiver()
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + rx.name)
    path = tmp_path / "s.sock"
    try:
        with trio.fail_after(120):
            async with trio.open_nursery() as nursery:
                server = await nursery.start(run, ServerConfig(socket_path=str(path)))
                assert "NOTIFY_SOCKET" not in os.environ  # taken, not inherited
                ((ready, fds),) = rx.receive_all()
                assert not fds
                assert ready.splitlines()[0] == "READY=1"
                assert ready.splitlines()[1].startswith("STATUS=0 files, 0 B cached")
                await trio.sleep(2.5 * STATUS_INTERVAL)
                updates = [m for m, _ in rx.receive_all()]
                assert len(updates) == 2 and all(m.startswith("STATUS=") for m in updates)
                server.shutdown()
        assert [m for m, _ in rx.receive_all()] == ["STOPPING=1"]
        assert not path.exists()
    finally:
        rx.close()
