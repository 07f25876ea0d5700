"""What a supervisor's connection costs the daemon and the client, step by step.

Builds benchmarks/connect_step.c (a C client that speaks the protocol
itself, so that each system call is timed apart) and runs it against a
daemon of this tree, and with --baseline TREE against a daemon of that tree
too, alternately (--runs times each, a fresh daemon for each run):

- connect: fresh connections --pause ms apart, each `connect()`, the hello
  and the index request sent back to back, their answers waited for, closed
  (what shadowd_connect_start and the index's wait do); the daemon's main
  thread's CPU time for each;
- told: the same, then --files fresh files (never asked for before) sent in
  one open_batch with "wait": false and the socket closed without reading
  the answer (what shadowd_close does with the files a supervisor copied in
  the cold window); the send and close as the client sees them, the
  daemon's CPU time for it (its main thread's, and all its threads' with
  the fills' copies).

Prints, per measure, the median and the 90th percentile over every round of
every run, in microseconds, side by side per tree.

    .venv/bin/python benchmarks/connect.py [--rounds N] [--pause MS] [--files N]
                                           [--runs N] [--baseline TREE] [--json]

A plain timing benchmark, not a test. Must never: leave its daemons, files
or directories behind; print anything but the report on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.programs import OwnDaemon, build_extension, machine
from benchmarks.supervisor import REPO
from shadowd.bench import c_compiler

#: Seconds a file must be older than for the daemon to cache it (its default
#: racy window, 1 s), with a margin.
RACY_WAIT = 1.2


def make_files(directory: str, n: int) -> str:
    """*n* files of 4 to 256 KiB in *directory* (sizes of a program's DSOs and
    modules, cycling); the path of their list."""
    sizes = [4096, 16384, 65536, 262144, 8192, 32768, 131072]
    paths = []
    for i in range(n):
        path = os.path.join(directory, f"f{i:05d}")
        with open(path, "wb") as f:
            f.write(os.urandom(sizes[i % len(sizes)]))
        paths.append(path)
    listed = os.path.join(directory, "files.txt")
    with open(listed, "w") as f:
        f.writelines(f"{p}\n" for p in paths)
    return listed


def run_tree(
    binary: str, tree: Path, name: str, args: argparse.Namespace, workdir: str
) -> dict[str, list[float]]:
    """One run of both modes against a fresh daemon of *tree*."""
    samples: dict[str, list[float]] = {}
    files_dir = tempfile.mkdtemp(prefix="files-", dir=workdir)
    listed = make_files(files_dir, args.rounds * args.files)
    made = time.monotonic()
    daemon = OwnDaemon(workdir, tree=tree, name=name)
    daemon.start()
    try:
        assert daemon.proc is not None
        pid = str(daemon.proc.pid)
        common = [binary, daemon.socket_path, pid]
        out = subprocess.run(
            [*common, "connect", str(args.rounds), str(args.pause), str(args.settle)],
            capture_output=True,
            text=True,
            check=True,
        )
        for k, v in json.loads(out.stdout).items():
            samples.setdefault(k, []).extend(v)
        time.sleep(max(0.0, made + RACY_WAIT - time.monotonic()))
        out = subprocess.run(
            [
                *common,
                "told",
                str(args.rounds),
                str(args.pause),
                str(args.told_settle),
                listed,
                str(args.files),
            ],
            capture_output=True,
            text=True,
            check=True,
        )
        for k, v in json.loads(out.stdout).items():
            samples.setdefault("told:" + k if not k.startswith("told") else k, []).extend(v)
    finally:
        daemon.stop()
    return samples


def summary(values: list[float]) -> dict[str, float]:
    ordered = sorted(values)
    return {
        "p50": statistics.median(ordered),
        "p90": ordered[min(len(ordered) - 1, round(0.9 * (len(ordered) - 1)))],
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/connect.py",
        description="A supervisor's connection to the daemon, step by step: the client's"
        " wall time and the daemon's CPU.",
    )
    parser.add_argument("--rounds", type=int, default=200, help="connections per run (200)")
    parser.add_argument("--pause", type=int, default=20, help="ms between connections (20)")
    parser.add_argument(
        "--settle", type=int, default=5, help="ms after a close before the daemon's CPU is read (5)"
    )
    parser.add_argument(
        "--told-settle",
        type=int,
        default=40,
        help="ms after a told batch before the daemon's CPU is read (40: its fills done)",
    )
    parser.add_argument("--files", type=int, default=20, help="files in a told batch (20)")
    parser.add_argument("--runs", type=int, default=2, help="runs per tree, alternating (2)")
    parser.add_argument("--baseline", metavar="TREE", help="another source tree of the project")
    parser.add_argument("--json", action="store_true", help="one JSON object")
    args = parser.parse_args(argv)
    if min(args.rounds, args.runs, args.files) < 1 or args.files > 64:
        parser.error("--rounds and --runs at least 1, --files 1 to 64")
    cc = c_compiler()
    if cc is None:
        print("connect: no C compiler", file=sys.stderr)
        return 1
    trees = {"this": REPO}
    if args.baseline:
        why = build_extension(args.baseline)
        if why:
            print(f"connect: cannot build the baseline's C extension: {why}", file=sys.stderr)
            return 1
        trees["base"] = Path(args.baseline)
    load_before = os.getloadavg()
    results: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    with tempfile.TemporaryDirectory(prefix="shadowd-connect-") as workdir:
        binary = os.path.join(workdir, "connect_step")
        subprocess.run(
            [cc, "-O2", "-Wall", "-o", binary, str(REPO / "benchmarks" / "connect_step.c")],
            check=True,
        )
        for i in range(args.runs):
            for name, tree in trees.items():
                got = run_tree(binary, tree, name, args, workdir)
                for k, v in got.items():
                    results[name].setdefault(k, []).extend(v)
                print(f"connect: run {i + 1}/{args.runs} of {name} done", file=sys.stderr)
    report: dict[str, Any] = {
        "machine": machine(),
        "load_before": load_before,
        "load_after": os.getloadavg(),
        "rounds": args.rounds,
        "runs": args.runs,
        "pause_ms": args.pause,
        "files": args.files,
        "baseline": args.baseline,
        "measures": {
            name: {k: summary(v) for k, v in measures.items()} for name, measures in results.items()
        },
    }
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    names = list(trees)
    print(
        f"{args.runs} runs x {args.rounds} connections, {args.pause} ms apart; told batches of"
        f" {args.files} files; load {load_before[0]:.2f} before, {report['load_after'][0]:.2f}"
        " after. us, p50 / p90:"
    )
    print()
    print("| measure | " + " | ".join(names) + " |")
    print("|---|" + "---:|" * len(names))
    for k in results["this"]:
        cells = []
        for name in names:
            s = report["measures"][name].get(k)
            cells.append("-" if s is None else f"{s['p50']:.1f} / {s['p90']:.1f}")
        print(f"| {k} | " + " | ".join(cells) + " |")
    if args.baseline:
        print()
        print(f"base: the daemon of {args.baseline}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
