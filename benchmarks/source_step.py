"""What each system call of the reference supervisor's source step costs.

Builds benchmarks/source_step.c and the supervisor, runs a real program under
the supervisor once (copy mode, `python3 -m pip --version` unless told
otherwise) to learn the absolute paths it opens, then times the source step's
calls over those paths (benchmarks/source_step.c says which sequences), in a
tight loop and again with memory written over between files (as a program
running between its opens evicts the kernel's data from the caches).

    .venv/bin/python benchmarks/source_step.py [--rounds N] [--thrash KIB]
                                               [-- PROGRAM ARGS...]

A plain timing benchmark, not a test. Must never: leave its binaries or
files behind; print anything but the report on stdout.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
from pathlib import Path

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.supervisor import REPO, build_supervisor, real_python3, run_supervised
from shadowd.bench import c_compiler


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/source_step.py",
        description="Each system call of the supervisor's source step, timed over the"
        " paths a real program opened.",
    )
    parser.add_argument("--rounds", type=int, default=10, help="rounds of the loop (10)")
    parser.add_argument(
        "--thrash",
        type=int,
        default=2048,
        metavar="KIB",
        help="KiB of memory written between files in the second run (2048; 0: no second run)",
    )
    parser.add_argument("program", nargs="*", help="the program whose paths to use")
    args = parser.parse_args(argv)
    program = args.program or [real_python3() or sys.executable, "-m", "pip", "--version"]
    cc = c_compiler()
    if cc is None:
        print("source_step: no C compiler", file=sys.stderr)
        return 1
    with tempfile.TemporaryDirectory(prefix="shadowd-source-step-") as workdir:
        binary = os.path.join(workdir, "source_step")
        subprocess.run(
            [cc, "-O2", "-Wall", "-o", binary, str(REPO / "benchmarks" / "source_step.c")],
            check=True,
        )
        supervisor, why = build_supervisor(workdir)
        if supervisor is None:
            print(f"source_step: {why}", file=sys.stderr)
            return 1
        run = run_supervised(supervisor, "copy", program, cwd=workdir)
        paths = [f["path"] for f in run.stats.get("files", []) if f["path"].startswith("/")]
        if not paths:
            print(f"source_step: {' '.join(program)} opened no file", file=sys.stderr)
            return 1
        listed = os.path.join(workdir, "paths.txt")
        with open(listed, "w") as f:
            f.writelines(f"{p}\n" for p in paths)
        print(f"paths: the {len(paths)} absolute paths {' '.join(program)} opened")
        for thrash in [0] + ([args.thrash] if args.thrash else []):
            print(flush=True)
            subprocess.run([binary, listed, str(args.rounds), str(thrash)], check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
