# A fresh daemon's warm-up, run once before it says it is ready: what a
# first request would otherwise pay for on top of a later one's work is paid
# here, with nobody waiting. Measured on a fresh daemon (docs/performance.md,
# "Cold cache"): starting the worker threads (the loop waits for each new
# thread to run), the first sealed copy (memfd, sendfile, seals, the reopen
# through /proc/self/fd), the first statmount through ctypes, the first
# parse and encoding of each kind of message, and the kernel's charge for
# each length of reply (inflight.truesize, measured on a socket pair the
# first time a length is seen). The worker threads stay in trio's thread
# cache while they find work at least every 10 s (its idle timeout): a
# daemon idle for longer starts them again on its next miss, as it did
# before this warm-up existed.
#
# A shutdown cancels it (server.py): a worker that has no thread yet gives
# up and breaks the barrier, so the threads already started stop waiting for
# it. A running thread is waited for (the sample copy, or at most THREAD_WAIT
# at the barrier), never abandoned: it may hold a memfd. The daemon then
# never says READY=1 (daemon.py).
#
# For tests only, $SHADOWD_TEST_WARMUP_DELAY (seconds) makes the last worker
# start that much late, as a thread the host is slow to run would: the
# others wait for it at the barrier, and the daemon stays in its warm-up,
# where a test can stop it. It is logged as a warning, never used otherwise.
#
# Must never: touch the cache, the index, a counter or anything else that
# stats show (a warmed daemon's stats are a fresh one's); open a path a
# client could name, or any file but memfds of its own; leave an fd open;
# fail the start (a warm-up that cannot run leaves the daemon as cold as
# before, and says so at debug level).
from __future__ import annotations

import logging
import math
import os
import threading
from collections.abc import Callable

import trio

from . import __version__, hotcalls, inflight
from .copier import _yield_to_the_loop
from .memfd import sealed_copy
from .protocol import (
    PROTOCOL_VERSION,
    BatchOpened,
    ErrorCode,
    ErrorReply,
    Hello,
    HelloReply,
    IndexReply,
    IndexRequest,
    Missed,
    MissedItem,
    Open,
    OpenBatch,
    Opened,
    Reply,
    Request,
    ServerConnection,
    WireLimits,
    encode_request,
)
from .source import stat_sync, statmount_magic

__all__ = ["warm_up"]

logger = logging.getLogger(__name__)

#: Bytes of the warm-up's own file: a few pages, so that the copy takes the
#: same path (sendfile, then the check for one more byte) as a real one.
SAMPLE_BYTES = 3 * 4096
#: How long the worker threads wait for each other before giving up.
THREAD_WAIT = 5.0
#: For tests only: seconds the last worker starts late (see the top).
DELAY_VARIABLE = "SHADOWD_TEST_WARMUP_DELAY"


async def warm_up(
    *,
    workers: int,
    limiter: trio.CapacityLimiter,
    wire: WireLimits,
    hello_limits: dict[str, int],
) -> None:
    """Warm what a first request would pay for; never raises an Exception.

    Cancelling it (a shutdown) ends it once the threads already started
    return; those that have none yet give up at once (see the top).

    *workers* threads are started under *limiter* (the copier's limiter for
    local files) and left idle in trio's thread cache, where later copies
    find them. *wire* and *hello_limits* are the server's, so the messages
    encoded here are those it will send.
    """
    try:
        await _start_workers(workers, limiter)
        _messages(wire, hello_limits)
    except Exception as exc:  # a daemon that could not warm up is still a daemon
        logger.debug("warm-up skipped: %s", exc, exc_info=True)
    except BaseException:
        # Cancelled (in a group, from the workers' nursery): a shutdown.
        logger.debug("warm-up cut short: the daemon is stopping")
        raise


async def _start_workers(workers: int, limiter: trio.CapacityLimiter) -> None:
    """Start *workers* threads at once (each waits for the others, so no thread
    runs two of these), the first of them making a sealed copy."""
    count = max(1, min(workers, int(limiter.total_tokens)))
    barrier = threading.Barrier(count)
    delay = test_knob_seconds(DELAY_VARIABLE, "the warm-up's last worker starts that late")

    def work(first: bool) -> None:
        _yield_to_the_loop()  # the priority copies run at, set once per thread
        try:
            if first:
                _copy_sample()
        finally:
            # Even when the copy failed (no fd to spare, no memfd): the others
            # wait here for this thread, and would until THREAD_WAIT.
            try:
                barrier.wait(THREAD_WAIT)
            except threading.BrokenBarrierError:
                pass  # a thread that did not start in time: fewer warm threads

    async with trio.open_nursery() as nursery:
        for i in range(count):
            late = delay if i == count - 1 else 0.0
            nursery.start_soon(_in_thread, work, i == 0, limiter, barrier, late)


def test_knob_seconds(variable: str, effect: str) -> float:
    """The seconds the test-only knob $*variable* asks for (0 when unset or not a
    number); one set is logged as a warning, with its *effect*."""
    text = os.environ.get(variable, "")
    if not text:
        return 0.0
    try:
        delay = float(text)
    except ValueError:
        delay = math.nan
    if not (math.isfinite(delay) and delay >= 0):
        logger.warning("%s=%r is not a number of seconds; ignored", variable, text)
        return 0.0
    logger.warning("%s=%s: %s (a knob for tests)", variable, text, effect)
    return delay


async def _in_thread(
    fn: Callable[[bool], None],
    first: bool,
    limiter: trio.CapacityLimiter,
    barrier: threading.Barrier,
    late: float = 0.0,
) -> None:
    try:
        if late:
            await trio.sleep(late)  # the test knob: a worker slow to start
        await trio.to_thread.run_sync(fn, first, limiter=limiter)
    except BaseException:
        # This one never reached the barrier (no thread, or cancelled while
        # waiting for one): the others stop waiting for it.
        barrier.abort()
        raise


def _copy_sample() -> None:
    """A sealed copy of a memfd of our own, as a miss's copy makes one; dropped."""
    src = os.memfd_create("shadowd-warmup", os.MFD_CLOEXEC)
    try:
        os.write(src, b"\0" * SAMPLE_BYTES)
        os.lseek(src, 0, os.SEEK_SET)
        st = stat_sync(src)
        sealed_copy(src, st).release()
        _statmount(src)
    finally:
        os.close(src)


def _statmount(fd: int) -> None:
    """The first statmount loads its ctypes call; the verdict is not kept."""
    try:
        fields = hotcalls.statx_nosync(fd)
        if fields is not None and fields[-1]:
            statmount_magic(fields[-1])
    except OSError:
        pass  # no statx or statmount here: the mount trust does without them


def _messages(wire: WireLimits, hello_limits: dict[str, int]) -> None:
    """Parse each kind of request a supervisor sends first, and encode each reply.

    On a connection state of its own (no peer); the fds the requests carry are
    a memfd of ours, read back and closed. The kernel's charge for each
    reply's length is measured now too (inflight.truesize keeps it).
    """
    fd = os.memfd_create("shadowd-warmup", os.MFD_CLOEXEC)
    try:
        conn = ServerConnection(wire)
        requests: list[Request] = [
            Hello(id=0, version=PROTOCOL_VERSION, client="shadowd-warmup"),
            IndexRequest(id=1),
            Open(id=2, fd=fd, label="/shadowd-warmup", wait=False),
            OpenBatch(id=3, fds=(fd,), labels=("/shadowd-warmup",), wait=False),
        ]
        for request in requests:
            data, _fds = encode_request(request)
            conn.receive(data, [fd] if isinstance(request, (Open, OpenBatch)) else [])
        version = (SAMPLE_BYTES, 1, 1)
        replies: list[Reply] = [
            HelloReply(
                id=0, version=PROTOCOL_VERSION, server=f"shadowd/{__version__}", limits=hello_limits
            ),
            IndexReply(id=1, fd=fd, pid=os.getpid(), slots=1 << 15),
            Missed(id=2, filling=True),
            Opened(id=2, fd=fd, size=SAMPLE_BYTES, hit=True, version=version, cached=True),
            BatchOpened(id=3, results=(MissedItem(filling=True),)),
            ErrorReply(id=4, code=ErrorCode.BUSY, message="warm-up"),
        ]
        for reply in replies:
            data, _fds = conn.send(reply)
            inflight.truesize(len(data))
    finally:
        os.close(fd)
