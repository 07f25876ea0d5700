# `shadowd bench` from the command line: the bench (shadowd/bench/) run in a
# child process group of its own, its output relayed, so that Ctrl-C or
# SIGTERM stops every part of it cleanly.
#
# Must never: leave a daemon, worker or file of the bench behind when
# interrupted (the whole group gets SIGINT, then SIGKILL after
# INTERRUPT_GRACE seconds or a second Ctrl-C); show what interrupted parts
# print meanwhile; end an interrupted run with anything but one line and
# exit status 130.
from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from typing import TextIO, cast


def run_bench(args: argparse.Namespace) -> int:
    """`shadowd bench`, run in a child process group (see run_interruptible)."""
    procs: tuple[int, ...] = args.procs  # checked by the parser (cli_flags._process_counts)
    progress_tty = sys.stderr.isatty()

    def body() -> int:
        from .bench import Bench, format_json, format_result

        bench = Bench(
            socket_path=args.socket,
            rounds=args.rounds,
            procs=procs,
            seconds=args.seconds,
            memory_procs=args.memory_procs,
            connections=args.connections,
            progress=cast(TextIO, _Progress(sys.stderr, progress_tty)),
        )
        try:
            result = bench.run()
        except RuntimeError as exc:
            print(f"shadowd bench: {exc}", file=sys.stderr)
            return 1
        print(format_json(result) if args.json else format_result(result))
        return 0

    return run_interruptible("shadowd bench", body, tty=progress_tty)


class _Progress:
    """The bench's progress stream, which says it is a terminal when ours is (see below)."""

    def __init__(self, stream: TextIO, tty: bool) -> None:
        self._stream = stream
        self._tty = tty

    def write(self, text: str) -> int:
        return self._stream.write(text)

    def flush(self) -> None:
        self._stream.flush()

    def isatty(self) -> bool:
        return self._tty


#: Seconds an interrupted child gets to clean up before it is killed.
INTERRUPT_GRACE = 20.0


def run_interruptible(name: str, body: Callable[[], int], *, tty: bool = False) -> int:
    """Run *body* in a child process; Ctrl-C makes one line and exit status 130.

    The child (and every process it starts: daemons, workers, compilers) runs
    in a process group of its own, with its output relayed through pipes.
    On SIGINT or SIGTERM to us, the whole group gets SIGINT, so each part
    cleans up (the bench removes its daemon and its files) while what they
    print meanwhile, tracebacks of interrupted workers included, is
    dropped; then ``NAME: interrupted`` and 130. A second Ctrl-C, or a
    group still running after INTERRUPT_GRACE seconds, gets SIGKILL.
    """
    import selectors
    import signal
    import time

    out_r, out_w = os.pipe()
    err_r, err_w = os.pipe()
    sys.stdout.flush()
    sys.stderr.flush()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child; its exit status is checked by the tests
        code = 1
        try:
            os.setpgid(0, 0)
            null = os.open(os.devnull, os.O_RDONLY)
            os.dup2(null, 0)
            os.dup2(out_w, 1)
            os.dup2(err_w, 2)
            for fd in (null, out_r, out_w, err_r, err_w):
                os.close(fd)
            code = body()
        except KeyboardInterrupt:
            code = 130
        except BaseException:
            import traceback

            traceback.print_exc()  # a bug of ours: show it
        finally:
            try:
                sys.stdout.flush()
                sys.stderr.flush()
            finally:
                os._exit(code)
    try:
        os.setpgid(pid, pid)  # also here: no signal may reach the group before it exists
    except OSError:
        pass  # the child did it first, or already exited
    os.close(out_w)
    os.close(err_w)
    relay = {out_r: sys.stdout, err_r: sys.stderr}

    def interrupt(signum: int, frame: object) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGTERM, interrupt)
    interrupted = False
    piped_out = False  # our own reader went away (`shadowd bench | head`)
    deadline = float("inf")

    def stop(signum: int) -> None:
        nonlocal deadline
        deadline = min(deadline, time.monotonic() + INTERRUPT_GRACE)
        _signal_group(pid, signum)

    try:
        with selectors.DefaultSelector() as sel:
            for fd in relay:
                sel.register(fd, selectors.EVENT_READ)
            while sel.get_map():
                try:
                    ready = sel.select(timeout=max(0.0, min(deadline - time.monotonic(), 1.0)))
                    if time.monotonic() >= deadline:
                        _signal_group(pid, signal.SIGKILL)
                        break
                    for key, _ in ready:
                        fd = int(key.fd)
                        data = os.read(fd, 65536)
                        if not data:
                            sel.unregister(fd)
                        elif not (interrupted or piped_out):
                            _relay(relay[fd], data)
                except KeyboardInterrupt:
                    if interrupted:  # the second time: no more waiting
                        _signal_group(pid, signal.SIGKILL)
                        break
                    interrupted = True
                    stop(signal.SIGINT)
                except BrokenPipeError:
                    piped_out = True
                    stop(signal.SIGINT)
        while True:
            try:
                _, status = os.waitpid(pid, 0)
                break
            except KeyboardInterrupt:
                _signal_group(pid, signal.SIGKILL if interrupted else signal.SIGINT)
                interrupted = True
    finally:
        signal.signal(signal.SIGTERM, previous)
        os.close(out_r)
        os.close(err_r)
    if piped_out:
        raise BrokenPipeError
    if interrupted:
        line = f"{name}: interrupted"
        # On a terminal: over the last progress line and the echoed ^C.
        print("\r" + line.ljust(72) if tty else line, file=sys.stderr)
        return 130
    code = os.waitstatus_to_exitcode(status)
    return 128 - code if code < 0 else code


def _relay(stream: TextIO, data: bytes) -> None:
    buffer = getattr(stream, "buffer", None)
    if buffer is not None:
        stream.flush()
        buffer.write(data)
        buffer.flush()
    else:
        stream.write(data.decode(errors="replace"))
        stream.flush()


def _signal_group(pgid: int, signum: int) -> None:
    try:
        os.killpg(pgid, signum)
    except ProcessLookupError:
        pass
