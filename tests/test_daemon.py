# The daemon's lifecycle in process, on a virtual clock: READY=1 once it
# serves, STATUS= every ten seconds, STOPPING=1 when it stops, and the
# variables it took from the environment gone. Stopped in its warm-up (held
# there by the test knob of shadowd/warmup.py): never READY=1, nothing left
# open.
from __future__ import annotations

import logging
import os
import signal
import socket
from pathlib import Path

import pytest
import trio
import trio.testing

from shadowd.daemon import STATUS_INTERVAL, run
from shadowd.server import Server, ServerConfig
from shadowd.warmup import DELAY_VARIABLE

from .manager import NotifyReceiver

#: Longer than any test here runs: only a shutdown ends such a warm-up.
HELD = "3600"


@pytest.fixture
def stepped_clock() -> trio.testing.MockClock:
    """Virtual time that runs as real time until the test stops it (rate 0) and
    moves it on by hand (jump).

    Never a clock that jumps by itself when the loop is idle (autojump): the
    daemon's start and stop wait for worker threads, and a thread the host is
    slow to run (a loaded machine, the suite on every core) left the loop idle
    long enough for such a clock to jump to the test's deadline.
    """
    return trio.testing.MockClock(rate=1.0)


async def test_ready_status_and_stopping(
    stepped_clock: trio.testing.MockClock, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
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
                # Two intervals and a half, a step at a time (each sleep of the
                # status task begins when it woke), from when every task of the
                # daemon waits: STATUS= twice, not a third time.
                stepped_clock.rate = 0
                await trio.testing.wait_all_tasks_blocked()
                for step in (1.0, 1.0, 0.5):
                    stepped_clock.jump(step * STATUS_INTERVAL)
                    await trio.testing.wait_all_tasks_blocked()
                updates = [m for m, _ in rx.receive_all()]
                assert len(updates) == 2 and all(m.startswith("STATUS=") for m in updates)
                stepped_clock.rate = 1.0  # the stop in real time, as the start
                server.shutdown()
        assert [m for m, _ in rx.receive_all()] == ["STOPPING=1"]
        assert not path.exists()
    finally:
        rx.close()


def _fds() -> dict[str, str]:
    out = {}
    for name in os.listdir("/proc/self/fd"):
        try:
            out[name] = os.readlink(f"/proc/self/fd/{name}")
        except OSError:
            pass  # the directory's own descriptor, closed by now
    return out


async def _in_the_warm_up(caplog: pytest.LogCaptureFixture) -> None:
    """Until the held warm-up says so: from then on signals are the daemon's."""
    while f"{DELAY_VARIABLE}={HELD}" not in caplog.text:
        await trio.sleep(0.01)


async def test_sigterm_during_the_warm_up_never_says_ready_and_leaves_nothing_open(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="shadowd.daemon")
    rx = NotifyReceiver()
    monkeypatch.setenv("NOTIFY_SOCKET", "@" + rx.name)
    monkeypatch.setenv(DELAY_VARIABLE, HELD)
    path = tmp_path / "s.sock"
    before = _fds()
    try:
        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                # A grace as long as the hold: only cutting the warm-up short
                # ends run() within the test's bound.
                config = ServerConfig(socket_path=str(path), shutdown_grace=float(HELD))
                nursery.start_soon(run, config)
                await _in_the_warm_up(caplog)
                os.kill(os.getpid(), signal.SIGTERM)  # to run()'s own receiver
        assert [m for m, _ in rx.receive_all()] == [
            "STOPPING=1\nSTATUS=stopping: finishing in-flight requests"
        ]
        assert not path.exists()
        assert "never served on" in caplog.text and "serving on" not in caplog.text
        # Nothing left open but what the memfd module keeps for the process's
        # life (its /proc/self/fd, opened by the warm-up's first reopen).
        added = {fd: t for fd, t in _fds().items() if fd not in before}
        assert set(added.values()) <= {f"/proc/{os.getpid()}/fd"}, added
        assert len(added) <= 1
    finally:
        rx.close()


async def test_stop_now_during_the_warm_up_still_returns_from_start(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    """stop_now() (a second signal, or the grace running out) cancels the serve
    task itself, before it said started: start() returns all the same, draining."""
    monkeypatch.setenv(DELAY_VARIABLE, HELD)
    server = Server(ServerConfig(socket_path=""))
    with socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC) as sock:
        sock.bind(b"")  # an autobound abstract address: nothing on disk
        sock.listen()

        async def stop_in_the_warm_up() -> None:
            await _in_the_warm_up(caplog)
            server.stop_now()

        with trio.fail_after(30):
            async with trio.open_nursery() as nursery:
                nursery.start_soon(stop_in_the_warm_up)
                await nursery.start(server.serve, sock)
                assert server.draining
