"""Build and run the reference supervisor (contrib/supervisor/shadowd-supervise.c).

Shared by tests/test_supervisor.py and benchmarks/programs.py, so both run
the same binary the same way. `build_supervisor` compiles it with the C
client (client/c/shadowd.c) into a directory of the caller's;
`run_supervised` runs a program under it in one mode and returns what the
program printed, its exit status, the wall time and the supervisor's
counters (its --stats JSON).

Must never: write into the source tree (binaries and stats files go to the
caller's directory or the system's temporary one); leave a stats file
behind; hide a failure to build (the reason comes back to the caller).
"""

from __future__ import annotations

import json
import os
import subprocess
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from shadowd.bench import c_compiler

REPO = Path(__file__).resolve().parent.parent
SOURCE = REPO / "contrib" / "supervisor" / "shadowd-supervise.c"
C_CLIENT = REPO / "client" / "c"
#: The supervisor's modes: trap and continue, copy per open, ask shadowd.
MODES = ("passthrough", "copy", "shadowd")


def build_supervisor(
    workdir: str | os.PathLike[str],
    *flags: str,
    tree: str | os.PathLike[str] | None = None,
    name: str = "shadowd-supervise",
) -> tuple[str | None, str]:
    """Compile shadowd-supervise into *workdir*: (its path, warnings) or (None, why not).

    The second element is the compiler's output on success: empty when the
    build was clean. *flags* go to the compiler. *tree*: another source tree
    of the project to build it from (say an export of an older commit), the
    binary then called *name*.
    """
    root = Path(tree) if tree is not None else REPO
    c_client = root / C_CLIENT.relative_to(REPO)
    sources = [root / SOURCE.relative_to(REPO), c_client / "shadowd.c"]
    missing = [str(s) for s in sources if not s.exists()]
    if missing:
        return None, f"no supervisor sources ({', '.join(missing)}): not a source checkout"
    cc = c_compiler()
    if cc is None:
        return None, "no C compiler (cc, gcc or $CC)"
    binary = os.path.join(workdir, name)
    done = subprocess.run(
        [cc, "-O2", "-Wall", "-Wextra", "-pthread", f"-I{c_client}", *flags, "-o", binary]
        + [str(s) for s in sources],
        capture_output=True,
        text=True,
        check=False,
    )
    if done.returncode != 0:
        return None, f"the supervisor did not compile: {done.stderr.strip()[:2000]}"
    return binary, done.stderr.strip()


@dataclass
class Run:
    """One program run under the supervisor."""

    mode: str
    returncode: int
    stdout: bytes
    stderr: bytes
    #: Wall time of the whole run (supervisor and program), in seconds.
    seconds: float
    #: The supervisor's --stats object ({} when it wrote none).
    stats: dict[str, Any]


def supervised_command(
    binary: str,
    mode: str,
    argv: list[str],
    *,
    socket: str | None = None,
    stats: str | None = None,
    options: list[str] | tuple[str, ...] = (),
) -> list[str]:
    """The command line that runs *argv* under the supervisor in *mode*.

    *options* go to the supervisor (say ``--open-fd``, ``--preload FILE``).
    """
    command = [binary, "--mode", mode, *options]
    if socket is not None:
        command += ["--socket", socket]
    if stats is not None:
        command += ["--stats", stats]
    return [*command, "--", *argv]


def run_supervised(
    binary: str,
    mode: str,
    argv: list[str],
    *,
    socket: str | None = None,
    cwd: str | os.PathLike[str] | None = None,
    env: dict[str, str] | None = None,
    timeout: float = 60,
    stdin: int | None = subprocess.DEVNULL,
    options: list[str] | tuple[str, ...] = (),
) -> Run:
    """Run *argv* under the supervisor in *mode*; its output, status, time and counters."""
    fd, stats_path = tempfile.mkstemp(prefix="shadowd-supervise-", suffix=".json")
    os.close(fd)
    try:
        command = supervised_command(
            binary, mode, argv, socket=socket, stats=stats_path, options=options
        )
        start = time.perf_counter()
        done = subprocess.run(
            command,
            cwd=cwd,
            env=env,
            capture_output=True,
            timeout=timeout,
            stdin=stdin,
            check=False,
        )
        seconds = time.perf_counter() - start
        with open(stats_path, encoding="utf-8") as f:
            text = f.read()
        stats: dict[str, Any] = json.loads(text) if text else {}
    finally:
        os.unlink(stats_path)
    return Run(mode, done.returncode, done.stdout, done.stderr, seconds, stats)


def real_python3() -> str | None:
    """The python3 interpreter itself, not a wrapper (pyenv's shims are shell scripts)."""
    try:
        done = subprocess.run(
            ["python3", "-c", "import sys; print(sys.executable)"],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    path = done.stdout.strip()
    return path if done.returncode == 0 and os.path.isabs(path) else None
