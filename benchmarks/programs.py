"""Real programs under the reference supervisor, in every mode, side by side.

Finds real programs on this host (python3 importing a few modules, pip, a
shell loop of `ls`, `cc -c`, `git log --stat`, perl with a few modules, gdb
running Python), builds contrib/supervisor/shadowd-supervise, starts its own
daemon (unless --socket names one) and runs every program under the
supervisor in each mode (passthrough, copy, shadowd): a warm-up first, then
--rounds rounds, each a shuffled order of every (program, mode). It checks
that each program's stdout and exit status are the same in every run, and
that the supervisor's fd count is back to its start after each; then it
reports per program the wall-time medians per mode, the files shadowed, the
supervisor's time per shadowed file (from its own open of the source to the
injected fd), the daemon's hits and misses, and the ratios.

    .venv/bin/python benchmarks/programs.py [--rounds N] [--cold] [--json] [--socket PATH]

A plain timing benchmark, not a test. Must never: report figures from runs
whose outputs differ (it fails instead); leave its daemon, files or
directories behind; print anything but the report on stdout.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.supervisor import MODES, REPO, Run, build_supervisor, real_python3, run_supervised

HELLO_C = '#include <stdio.h>\nint main(void) { puts("hello"); return 0; }\n'
PERL = (
    "use POSIX qw(floor strftime); use List::Util qw(sum max first); use Data::Dumper;"
    " use File::Spec; use Storable qw(dclone);"
    " $Data::Dumper::Sortkeys = 1; $Data::Dumper::Indent = 1;"
    " my %h = (sum => sum(1..100), max => max(3, 9, 4), floor => floor(2.7),"
    "   first => first { $_ > 3 } (1..9));"
    " print Dumper(dclone(\\%h)), File::Spec->catfile('a', 'b'), qq(\\n),"
    " strftime('%Y-%m-%d', gmtime(0)), qq(\\n);"
)


@dataclass
class Program:
    """A real program to run: its name, command line, directory and environment."""

    name: str
    argv: list[str]
    cwd: str
    env: dict[str, str]


@dataclass
class Skipped:
    name: str
    why: str


def _env(home: str) -> dict[str, str]:
    """The programs' environment: ours, with a home of their own and a fixed locale."""
    env = dict(os.environ, HOME=home, LC_ALL="C", LANG="C")
    for name in ("PYTHONPATH", "PYTHONHOME", "GIT_DIR", "GIT_WORK_TREE"):
        env.pop(name, None)
    return env


def _git_repo(path: str, commits: int, env: dict[str, str]) -> None:
    """A repository with *commits* commits touching a few files, made in one fast-import."""
    subprocess.run(["git", "init", "-q", path], check=True, env=env)
    stream = []
    for i in range(commits):
        when = 1_700_000_000 + 3600 * i
        message = f"change {i}\n"
        stream.append("commit refs/heads/main\n")
        stream.append(f"committer Bench <bench@example.org> {when} +0000\n")
        stream.append(f"data {len(message)}\n{message}")
        for name in (f"src/file{i % 5}.txt", f"docs/note{i % 3}.md"):
            body = "".join(f"line {j} of {name} at {i}\n" for j in range(i % 7 + 3))
            stream.append(f"M 644 inline {name}\ndata {len(body)}\n{body}")
        stream.append("\n")
    subprocess.run(
        ["git", "fast-import", "--quiet"],
        input="".join(stream).encode(),
        cwd=path,
        check=True,
        env=env,
    )
    subprocess.run(
        ["git", "symbolic-ref", "HEAD", "refs/heads/main"], cwd=path, check=True, env=env
    )


def find_programs(workdir: str, *, quick: bool = False) -> tuple[list[Program], list[Skipped]]:
    """The programs this host has, set up under *workdir*, each checked to run as is.

    *quick* makes the loops shorter (3 `ls`, 5 commits), for a test.
    """
    home = os.path.join(workdir, "home")
    os.makedirs(home, exist_ok=True)
    env = _env(home)
    found: list[Program] = []
    skipped: list[Skipped] = []

    def add(name: str, argv: list[str] | None, why: str = "", cwd: str = workdir) -> None:
        if argv is None:
            skipped.append(Skipped(name, why))
            return
        try:
            done = subprocess.run(
                argv, cwd=cwd, env=env, capture_output=True, timeout=60, check=False
            )
        except (OSError, subprocess.TimeoutExpired) as exc:
            skipped.append(Skipped(name, f"{argv[0]} did not run: {exc}"))
            return
        if done.returncode != 0:
            tail = done.stderr.decode(errors="replace").strip()[-200:]
            skipped.append(Skipped(name, f"exits {done.returncode} as is: {tail}"))
            return
        found.append(Program(name, argv, cwd, env))

    python = real_python3()
    add(
        "python3-imports",
        [python, "-c", "import json, ssl, sqlite3, decimal, asyncio"] if python else None,
        "no python3",
    )
    has_pip = (
        python is not None
        and subprocess.run(
            [python, "-c", "import pip"], capture_output=True, env=env, check=False
        ).returncode
        == 0
    )
    add("pip-version", [python, "-m", "pip", "--version"] if python and has_pip else None, "no pip")
    sh = shutil.which("sh")
    loops = 3 if quick else 30
    add(
        "sh-ls-loop",
        [sh, "-c", f"for i in $(seq {loops}); do ls /; done"]
        if sh and shutil.which("ls")
        else None,
        "no sh or ls",
    )
    cc = shutil.which("cc") or shutil.which("gcc")
    cc_dir = os.path.join(workdir, "cc")
    os.makedirs(cc_dir)
    with open(os.path.join(cc_dir, "hello.c"), "w") as f:
        f.write(HELLO_C)
    add("cc-c", [cc, "-c", "hello.c", "-o", "hello.o"] if cc else None, "no cc", cwd=cc_dir)
    git = shutil.which("git")
    repo = os.path.join(workdir, "repo")
    if git:
        try:
            _git_repo(repo, 5 if quick else 40, env)
        except (OSError, subprocess.CalledProcessError) as exc:
            git = None
            skipped.append(Skipped("git-log", f"could not make a repository: {exc}"))
    if git:
        add("git-log", [git, "log", "-n", "5" if quick else "30", "--stat"], cwd=repo)
    elif not any(s.name == "git-log" for s in skipped):
        skipped.append(Skipped("git-log", "no git"))
    perl = shutil.which("perl")
    add("perl-modules", [perl, "-e", PERL] if perl else None, "no perl")
    gdb = shutil.which("gdb")
    add("gdb-python", [gdb, "-batch", "-ex", "python print(1)"] if gdb else None, "no gdb")
    return found, skipped


# -- the daemon ----------------------------------------------------------------


class OwnDaemon:
    """`python -m shadowd serve` in a subprocess, on a socket of its own."""

    def __init__(self, workdir: str):
        self.socket_path = os.path.join(workdir, "shadowd.sock")
        self.log_path = os.path.join(workdir, "shadowd.log")
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 30) -> None:
        env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), str(REPO / "client")]))
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shadowd", "serve", "--socket", self.socket_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
            )
        deadline = time.monotonic() + timeout
        while not self._answers():
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the daemon did not start; its log:\n{self.log()}")
            time.sleep(0.02)

    def _answers(self) -> bool:
        s = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        try:
            s.connect(self.socket_path)
        except OSError:
            return False
        finally:
            s.close()
        return True

    def stop(self) -> None:
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""


@contextmanager
def daemon_for(args: argparse.Namespace, workdir: str) -> Iterator[tuple[str, OwnDaemon | None]]:
    """The socket to use, and the daemon we started (None with --socket)."""
    if args.socket:
        yield args.socket, None
        return
    own = OwnDaemon(workdir)
    own.start()
    try:
        yield own.socket_path, own
    finally:
        own.stop()


# -- running and checking ----------------------------------------------------------


class Mismatch(Exception):
    """Runs of one program disagreed (output, exit status) or leaked an fd."""


@dataclass
class Results:
    program: Program
    runs: dict[str, list[Run]] = field(default_factory=lambda: {m: [] for m in MODES})


def check(program: Program, reference: Run, run: Run) -> None:
    """Fail loudly when *run* differs from *reference* or its supervisor leaked fds."""
    where = f"{program.name} ({' '.join(program.argv)})"
    if (run.returncode, run.stdout) != (reference.returncode, reference.stdout):
        raise Mismatch(
            f"{where}: {run.mode} gave exit {run.returncode} and {len(run.stdout)} bytes of"
            f" stdout, {reference.mode} gave exit {reference.returncode} and"
            f" {len(reference.stdout)} bytes\n--- {reference.mode} stdout:\n"
            f"{reference.stdout[-2000:].decode(errors='replace')}\n--- {run.mode} stdout:\n"
            f"{run.stdout[-2000:].decode(errors='replace')}\n--- {run.mode} stderr:\n"
            f"{run.stderr[-2000:].decode(errors='replace')}"
        )
    s = run.stats
    if not s or s.get("fds_before") != s.get("fds_after"):
        raise Mismatch(
            f"{where}: the supervisor's fd count went from {s.get('fds_before')} to"
            f" {s.get('fds_after')} in {run.mode} mode (or it wrote no stats)"
        )


def run_all(
    binary: str,
    programs: list[Program],
    *,
    rounds: int,
    socket_path: str,
    daemon: OwnDaemon | None,
    cold: bool,
) -> list[Results]:
    """A warm-up, then *rounds* shuffled rounds of every (program, mode); checked."""
    results = [Results(p) for p in programs]
    reference: dict[str, Run] = {}

    def one(r: Results, mode: str) -> Run:
        if cold and mode == "shadowd" and daemon is not None:
            daemon.restart()
        run = run_supervised(
            binary,
            mode,
            r.program.argv,
            socket=socket_path,
            cwd=r.program.cwd,
            env=r.program.env,
            timeout=300,
        )
        ref = reference.setdefault(r.program.name, run)
        check(r.program, ref, run)
        return run

    for r in results:  # the warm-up: caches, page cache, pyc files; not counted
        for mode in MODES:
            one(r, mode)
    for i in range(rounds):
        order = [(r, mode) for r in results for mode in MODES]
        random.shuffle(order)
        for r, mode in order:
            r.runs[mode].append(one(r, mode))
        print(f"programs: round {i + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


# -- the report ----------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(r: Results) -> dict[str, Any]:
    """The figures of one program: medians over its rounds, per mode."""
    out: dict[str, Any] = {"name": r.program.name, "argv": r.program.argv, "modes": {}}
    for mode in MODES:
        runs = r.runs[mode]
        per_run_us = [
            run.stats["shadow_ns"] / run.stats["shadowed"] / 1000
            for run in runs
            if run.stats.get("shadowed")
        ]
        all_files_us = [f["ns"] / 1000 for run in runs for f in run.stats.get("files", [])]
        out["modes"][mode] = {
            "wall_ms": _median([run.seconds * 1000 for run in runs]),
            "notifications": _median([run.stats["notifications"] for run in runs]),
            "shadowed": _median([run.stats["shadowed"] for run in runs]),
            # The mean of each run (what the supervisor paid in all, per file),
            # then the median over the rounds; and the median single file.
            "us_per_file": _median(per_run_us),
            "us_median_file": _median(all_files_us),
            "hits": _median([run.stats["hits"] for run in runs]),
            "misses": _median([run.stats["misses"] for run in runs]),
            "fallbacks": _median([run.stats["fallbacks"] for run in runs]),
        }
    m = out["modes"]
    out["ratios"] = {
        "shadowd/copy wall": _ratio(m["shadowd"]["wall_ms"], m["copy"]["wall_ms"]),
        "shadowd/copy per file": _ratio(m["shadowd"]["us_per_file"], m["copy"]["us_per_file"]),
        "copy/passthrough wall": _ratio(m["copy"]["wall_ms"], m["passthrough"]["wall_ms"]),
        "shadowd/passthrough wall": _ratio(m["shadowd"]["wall_ms"], m["passthrough"]["wall_ms"]),
    }
    return out


def machine() -> dict[str, Any]:
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            model = next(
                (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), ""
            )
    except OSError:
        pass
    return {"cpus": os.cpu_count(), "cpu": model, "kernel": platform.release()}


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def table(report: dict[str, Any]) -> str:
    lines = [
        f"real programs under shadowd-supervise: medians of {report['rounds']} rounds"
        f" ({'cold: a fresh daemon per shadowd run' if report['cold'] else 'warm cache'});"
        f" {report['machine']['cpus']} CPUs, {report['machine']['cpu'] or 'unknown CPU'},"
        f" Linux {report['machine']['kernel']}",
        "",
        f"{'program':<17}{'files':>6}  {'pass ms':>8}{'copy ms':>8}{'shd ms':>8}"
        f"  {'copy us/f':>9}{'shd us/f':>9}  {'hits':>5}{'miss':>5}{'fall':>5}"
        f"  {'shd/copy':>8}{'f shd/copy':>11}{'copy/pass':>10}{'shd/pass':>9}",
    ]
    for p in report["programs"]:
        m, q = p["modes"], p["ratios"]
        cells = [
            f"{p['name']:<17}",
            f"{_fmt(m['copy']['shadowed'], '.0f'):>6}  ",
            *(f"{_fmt(m[mode]['wall_ms'], '.1f'):>8}" for mode in MODES),
            "  ",
            *(f"{_fmt(m[mode]['us_per_file'], '.1f'):>9}" for mode in ("copy", "shadowd")),
            "  ",
            *(f"{_fmt(m['shadowd'][k], '.0f'):>5}" for k in ("hits", "misses", "fallbacks")),
            "  ",
            f"{_fmt(q['shadowd/copy wall'], '.2f'):>8}",
            f"{_fmt(q['shadowd/copy per file'], '.2f'):>11}",
            f"{_fmt(q['copy/passthrough wall'], '.2f'):>10}",
            f"{_fmt(q['shadowd/passthrough wall'], '.2f'):>9}",
        ]
        lines.append("".join(cells))
    for s in report["skipped"]:
        lines.append(f"skipped {s['name']}: {s['why']}")
    lines += [
        "",
        "files: shadowed per run; us/f: the supervisor's time per shadowed file (its own open",
        "of the source to the injected fd; each run's mean, median over rounds); hits, miss,",
        "fall: the daemon's hits and misses and the local copies made when it could not answer",
        "(per run); shd/copy, copy/pass, shd/pass: ratios of wall-time medians; f shd/copy:",
        "of the time per file.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/programs.py",
        description="Real programs under the reference supervisor (contrib/supervisor), "
        "in modes passthrough, copy and shadowd: wall times, time per shadowed file, "
        "hits and misses, checked for identical outputs.",
    )
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (default 10)")
    parser.add_argument(
        "--cold", action="store_true", help="restart the daemon before each shadowd-mode run"
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    parser.add_argument(
        "--socket", help="use the daemon on this socket instead of starting one of our own"
    )
    parser.add_argument(
        "--only", help="comma-separated program names (python3-imports, pip-version, ...)"
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter loops (3 ls, 5 commits): for a test"
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.cold and args.socket:
        parser.error("--cold restarts our own daemon: it cannot go with --socket")

    def say(msg: str) -> None:
        print(f"programs: {msg}", file=sys.stderr, flush=True)

    with tempfile.TemporaryDirectory(prefix="shadowd-programs-") as workdir:
        binary, why = build_supervisor(workdir)
        if binary is None:
            say(f"cannot build the supervisor: {why}")
            return 1
        programs, skipped = find_programs(workdir, quick=args.quick)
        if args.only:
            wanted = {n.strip() for n in args.only.split(",") if n.strip()}
            unknown = wanted - {p.name for p in programs} - {s.name for s in skipped}
            if unknown:
                parser.error(f"--only: no such program: {', '.join(sorted(unknown))}")
            programs = [p for p in programs if p.name in wanted]
            skipped = [s for s in skipped if s.name in wanted]
        if not programs:
            say("no program to run")
            return 1
        for s in skipped:
            say(f"skipping {s.name}: {s.why}")
        say(f"{len(programs)} programs x {len(MODES)} modes, a warm-up and {args.rounds} rounds")
        try:
            with daemon_for(args, workdir) as (socket_path, daemon):
                results = run_all(
                    binary,
                    programs,
                    rounds=args.rounds,
                    socket_path=socket_path,
                    daemon=daemon,
                    cold=args.cold,
                )
        except Mismatch as exc:
            say(f"FAILED: {exc}")
            return 1
    report = {
        "machine": machine(),
        "rounds": args.rounds,
        "cold": args.cold,
        "programs": [summarize(r) for r in results],
        "skipped": [{"name": s.name, "why": s.why} for s in skipped],
    }
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
