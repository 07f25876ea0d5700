"""Real programs under the reference supervisor, in every mode, side by side.

Finds real programs on this host (python3 importing a few modules, pip, a
shell loop of `ls`, `cc -c`, `git log --stat`, perl with a few modules, gdb
running Python), builds contrib/supervisor/shadowd-supervise, starts its own
daemon (unless --socket names one) and runs every program under the
supervisor in each mode: passthrough (trap and continue), copy (a copy per
open), shadowd-fd (shadowd_open_fd for every file), shadowd (the routed,
tiered open) and shadowd-preload (the same, with --preload of the files the
warm-up's shadowd run opened). A warm-up first, then --rounds rounds, each a
shuffled order of every (program, mode). It checks that each program's
stdout and exit status are the same in every run, and that the supervisor's
fd count is back to its start after each; then it reports per program and
mode the wall time and the supervisor's time per shadowed file (medians over
the rounds, and their quartiles), which tier served the files (the daemon's
hits and misses, the supervisor's own tier, local copies), and the ratios
against copy. With --baseline TREE (another source tree of the project,
say `git archive main` unpacked), a second supervisor is built from TREE
and every mode runs with it too, as MODE@base, in the same shuffled rounds:
an old supervisor and the new one measured side by side; with
--baseline-daemon, against a daemon of TREE too (restarted for each cold
run as this tree's is), so that a change to the daemon shows.

    .venv/bin/python benchmarks/programs.py [--rounds N] [--cold] [--json | --markdown]
                                            [--modes M,...] [--only P,...] [--socket PATH]
                                            [--baseline TREE [--baseline-daemon]]

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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

if __package__ in (None, ""):  # run as a script: make `benchmarks` importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks.supervisor import REPO, Run, build_supervisor, real_python3, run_supervised

#: The benchmark's modes: the supervisor's mode and options of each.
VARIANTS: dict[str, tuple[str, tuple[str, ...]]] = {
    "passthrough": ("passthrough", ()),
    "copy": ("copy", ()),
    "shadowd-fd": ("shadowd", ("--open-fd",)),
    "shadowd": ("shadowd", ()),
    "shadowd-preload": ("shadowd", ()),  # --preload FILE, made after the warm-up
    # Not measured unless asked for (--modes): the routed open that copies
    # while it waits for the daemon's answer and takes the first done.
    "shadowd-race": ("shadowd", ("--race",)),
    # The routed open without the daemon's index (as before it had one).
    "shadowd-noindex": ("shadowd", ("--no-index",)),
    # The routed open that also keeps index hits in the supervisor's tier.
    "shadowd-keep": ("shadowd", ("--keep-index-hits",)),
    # Preload with every source opened for reading first (--read-open), as
    # before the routed open took the O_PATH fd: what skipping that open for
    # tier hits saves, in the same supervisor.
    "shadowd-preload-readopen": ("shadowd", ("--read-open",)),
}
#: Modes only this tree's supervisor knows: not run with --baseline's.
NEW_ONLY = ("shadowd-preload-readopen",)
DEFAULT_VARIANTS = ("passthrough", "copy", "shadowd-fd", "shadowd", "shadowd-preload")
SHADOWD_VARIANTS = (
    "shadowd-fd",
    "shadowd",
    "shadowd-preload",
    "shadowd-race",
    "shadowd-noindex",
    "shadowd-keep",
    "shadowd-preload-readopen",
)
#: The suffix of a mode run with the --baseline supervisor.
BASELINE = "@base"
#: How the supervisor made each shadow (its --stats "how").
HOWS = ("copy", "hit", "index", "held", "miss", "raced", "cold", "local", "fallback")

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

    def __init__(
        self,
        workdir: str,
        *,
        prime: bool = False,
        tree: str | os.PathLike[str] | None = None,
        name: str = "shadowd",
    ):
        #: The source tree whose daemon runs (another checkout, for a baseline).
        self.tree = Path(tree) if tree is not None else REPO
        self.socket_path = os.path.join(workdir, f"{name}.sock")
        self.log_path = os.path.join(workdir, f"{name}.log")
        self.notify_path = os.path.join(workdir, f"{name}-notify.sock")
        self.notify: socket.socket | None = None
        self.proc: subprocess.Popen[bytes] | None = None
        #: A file of our own that a restarted daemon is asked for first, so that
        #: its first miss (worker threads, code paths) is not a program's.
        self.prime_path = os.path.join(workdir, f"{name}-prime.bin") if prime else None
        if self.prime_path:
            with open(self.prime_path, "wb") as f:
                f.write(os.urandom(1 << 20))

    def start(self, timeout: float = 30) -> None:
        # Ready is what the daemon tells a service manager (READY=1, after its
        # warm-up), not a socket that takes connections: it listens before it
        # serves, and a connection made then waits for the rest of its start.
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC)
        self.notify.bind(self.notify_path)
        env = dict(
            os.environ,
            PYTHONPATH=os.pathsep.join([str(self.tree), str(self.tree / "client")]),
            NOTIFY_SOCKET=self.notify_path,
        )
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "shadowd", "serve", "--socket", self.socket_path],
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                env=env,
                # `-m` puts the working directory first on sys.path, before
                # PYTHONPATH: from another checkout it would run that one's daemon.
                cwd=self.tree,
            )
        deadline = time.monotonic() + timeout
        while not self._ready(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(f"the daemon did not start; its log:\n{self.log()}")
        if self.prime_path:
            from shadowd_client import Client  # this tree's client, whichever daemon

            with Client(self.socket_path, timeout=30) as client:
                for _ in range(2):  # a miss (its copy waited for), then a hit
                    os.close(client.open(self.prime_path))

    def _ready(self, wait: float) -> bool:
        """Whether the daemon said READY=1 (waiting up to *wait* seconds for it)."""
        assert self.notify is not None
        self.notify.settimeout(wait)
        try:
            message = self.notify.recv(4096)
        except TimeoutError:
            return False
        return b"READY=1" in message.split(b"\n")

    def stop(self) -> None:
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGTERM)
                try:
                    self.proc.wait(15)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait()
            self.proc = None
        if self.notify is not None:  # after the daemon's last word (STOPPING=1)
            self.notify.close()
            self.notify = None
            os.unlink(self.notify_path)

    def restart(self) -> None:
        self.stop()
        self.start()

    def log(self) -> str:
        try:
            with open(self.log_path, errors="replace") as f:
                return f.read()[-4000:]
        except OSError:
            return ""


def build_extension(tree: str | os.PathLike[str]) -> str:
    """Build *tree*'s C extension in place unless it is there: "" or why it failed."""
    if list((Path(tree) / "shadowd").glob("_hotcalls*.so")):
        return ""
    done = subprocess.run(
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        cwd=tree,
        capture_output=True,
        text=True,
        check=False,
    )
    return "" if done.returncode == 0 else (done.stderr.strip()[-2000:] or "failed")


@contextmanager
def daemon_for(args: argparse.Namespace, workdir: str) -> Iterator[tuple[str, OwnDaemon | None]]:
    """The socket to use, and the daemon we started (None with --socket)."""
    if args.socket:
        yield args.socket, None
        return
    own = OwnDaemon(workdir, prime=args.prime)
    own.start()
    try:
        yield own.socket_path, own
    finally:
        own.stop()


# -- running and checking ----------------------------------------------------------


def base_variant(variant: str) -> str:
    """The mode of *variant* without the baseline's suffix ("copy@base": "copy")."""
    return variant.split("@", 1)[0]


def suffix(variant: str) -> str:
    """The baseline's suffix of *variant*, or ""."""
    return variant[len(base_variant(variant)) :]


class Mismatch(Exception):
    """Runs of one program disagreed (output, exit status) or leaked an fd."""


@dataclass
class Results:
    program: Program
    runs: dict[str, list[Run]] = field(default_factory=dict)
    preload: str | None = None  # the --preload file of shadowd-preload


def check(program: Program, variant: str, reference: Run, run: Run) -> None:
    """Fail loudly when *run* differs from *reference* or its supervisor leaked fds."""
    where = f"{program.name} ({' '.join(program.argv)})"
    if (run.returncode, run.stdout) != (reference.returncode, reference.stdout):
        raise Mismatch(
            f"{where}: {variant} gave exit {run.returncode} and {len(run.stdout)} bytes of"
            f" stdout, the first run gave exit {reference.returncode} and"
            f" {len(reference.stdout)} bytes\n--- first stdout:\n"
            f"{reference.stdout[-2000:].decode(errors='replace')}\n--- {variant} stdout:\n"
            f"{run.stdout[-2000:].decode(errors='replace')}\n--- {variant} stderr:\n"
            f"{run.stderr[-2000:].decode(errors='replace')}"
        )
    s = run.stats
    if not s or s.get("fds_before") != s.get("fds_after"):
        raise Mismatch(
            f"{where}: the supervisor's fd count went from {s.get('fds_before')} to"
            f" {s.get('fds_after')} in {variant} mode (or it wrote no stats)"
        )
    ways = ("hits", "index", "misses", "held", "local", "raced", "cold", "fallbacks")
    if sum(s.get(k, 0) for k in ways) != (s["shadowed"] if run.mode == "shadowd" else 0):
        raise Mismatch(f"{where}: {variant}: the ways files were served do not add up: {s}")


def preload_list(program: Program, run: Run) -> list[str]:
    """The files *run* shadowed, as absolute paths (relative ones from the
    program's directory), each once, in the order first opened."""
    seen: dict[str, None] = {}
    for f in run.stats.get("files", []):
        path = os.path.normpath(os.path.join(program.cwd, f["path"]))
        if path not in seen and os.path.isfile(path):
            seen[path] = None
    return list(seen)


def run_all(
    binary: str,
    programs: list[Program],
    *,
    variants: list[str],
    rounds: int,
    socket_path: str,
    daemon: OwnDaemon | None,
    cold: bool,
    workdir: str,
    baseline: str | None = None,
    base_daemon: OwnDaemon | None = None,
    timeouts: str | None = None,
) -> list[Results]:
    """A warm-up, then *rounds* shuffled rounds of every (program, mode); checked.

    A mode named with the BASELINE suffix runs the *baseline* binary, against
    *base_daemon* when there is one (the baseline tree's daemon)."""
    results = [Results(p, {v: [] for v in variants}) for p in programs]
    reference: dict[str, Run] = {}

    def one(r: Results, variant: str) -> Run:
        name = base_variant(variant)
        serving, path = daemon, socket_path
        if suffix(variant) and base_daemon is not None:
            serving, path = base_daemon, base_daemon.socket_path
        if cold and name in SHADOWD_VARIANTS and serving is not None:
            serving.restart()
        mode, options = VARIANTS[name]
        if name.startswith("shadowd-preload"):
            assert r.preload is not None
            options = (*options, "--preload", r.preload)
        chosen = binary if not suffix(variant) else baseline
        assert chosen is not None, variant
        if timeouts and mode == "shadowd" and not suffix(variant):
            options = (*options, "--timeouts", timeouts)
        run = run_supervised(
            chosen,
            mode,
            r.program.argv,
            cwd=r.program.cwd,
            env=r.program.env,
            timeout=300,
            options=options,
            socket=path,
        )
        ref = reference.setdefault(r.program.name, run)
        check(r.program, variant, ref, run)
        return run

    # The warm-up: caches, page cache, pyc files; not counted. The preload
    # list is what the warm-up's run in shadowd mode (a previous run) opened.
    # Both supervisors (with --baseline) preload the same list.
    for r in results:
        source = None
        for variant in variants:
            if base_variant(variant).startswith("shadowd-preload") and r.preload is None:
                first = source or one(r, "shadowd")
                r.preload = os.path.join(workdir, f"preload-{r.program.name}.txt")
                with open(r.preload, "w") as f:
                    f.writelines(f"{path}\n" for path in preload_list(r.program, first))
            run = one(r, variant)
            if variant == "shadowd":
                source = run
    for i in range(rounds):
        order = [(r, v) for r in results for v in variants]
        random.shuffle(order)
        for r, v in order:
            r.runs[v].append(one(r, v))
        print(f"programs: round {i + 1}/{rounds} done", file=sys.stderr, flush=True)
    return results


# -- the report ----------------------------------------------------------------------


def _median(values: list[float]) -> float | None:
    return statistics.median(values) if values else None


def _quartiles(values: list[float]) -> tuple[float | None, float | None]:
    if len(values) < 2:
        return (values[0], values[0]) if values else (None, None)
    q = statistics.quantiles(values, n=4, method="inclusive")
    return q[0], q[2]


def _ratio(a: float | None, b: float | None) -> float | None:
    return a / b if a is not None and b else None


def summarize(r: Results) -> dict[str, Any]:
    """The figures of one program: medians (and quartiles) over its rounds, per mode."""
    out: dict[str, Any] = {"name": r.program.name, "argv": r.program.argv, "modes": {}}
    for variant, runs in r.runs.items():
        wall = [run.seconds * 1000 for run in runs]
        # The supervisor's time per file: each run's mean (what it paid in
        # all, per file), then the median over the rounds.
        per_file = [
            run.stats["shadow_ns"] / run.stats["shadowed"] / 1000
            for run in runs
            if run.stats.get("shadowed")
        ]
        per_file_wall = [
            run.stats["shadow_wall_ns"] / run.stats["shadowed"] / 1000
            for run in runs
            if run.stats.get("shadowed")
        ]
        # Where it goes (each run's mean, then the median): the source opened
        # and checked, the fd made by the mode's means, the injection.
        parts = {
            part: _median(
                [
                    run.stats[f"{part}_ns"] / run.stats["shadowed"] / 1000
                    for run in runs
                    if run.stats.get("shadowed") and f"{part}_ns" in run.stats
                ]
            )
            for part in ("source", "make", "inject")
        }
        by_how: dict[str, dict[str, float | None]] = {}
        for how in HOWS:
            files = [f["ns"] / 1000 for run in runs for f in run.stats["files"] if f["how"] == how]
            if files:
                by_how[how] = {
                    "files_per_run": len(files) / len(runs),
                    "us_mean": statistics.fmean(files),
                    "us_median": statistics.median(files),
                }
        out["modes"][variant] = {
            "wall_ms": _median(wall),
            "wall_ms_quartiles": _quartiles(wall),
            "notifications": _median([run.stats["notifications"] for run in runs]),
            "shadowed": _median([run.stats["shadowed"] for run in runs]),
            "us_per_file": _median(per_file),
            "us_per_file_quartiles": _quartiles(per_file),
            "us_per_file_wall": _median(per_file_wall),
            # All the supervisor's CPU time (its getrusage at the end: the
            # untimed work per open and its start-up too) per shadowed file;
            # None for a supervisor that does not say it.
            "cpu_us_per_file": _median(
                [
                    run.stats["cpu_ns"] / run.stats["shadowed"] / 1000
                    for run in runs
                    if run.stats.get("shadowed") and "cpu_ns" in run.stats
                ]
            ),
            "us_per_file_parts": parts,
            "us_median_file": _median(
                [f["ns"] / 1000 for run in runs for f in run.stats.get("files", [])]
            ),
            **{
                k: _median([run.stats.get(k, 0) for run in runs])
                for k in (
                    "hits",
                    "index",
                    "misses",
                    "held",
                    "local",
                    "raced",
                    "cold",
                    "fallbacks",
                    "preload_held",
                )
            },
            "preload_files": _median([run.stats.get("preload_files", 0) for run in runs]),
            "preload_ms": _median([run.stats.get("preload_ns", 0) / 1e6 for run in runs]),
            "by_how": by_how,
        }
    m = out["modes"]
    # Against copy and passthrough of the same supervisor (a baseline mode
    # against the baseline's copy).
    ratios: dict[str, float | None] = {}
    for v in (v for v in m if base_variant(v) in SHADOWD_VARIANTS):
        copy = m.get("copy" + suffix(v))
        if copy is None:
            continue
        ratios[f"{v}/copy wall"] = _ratio(m[v]["wall_ms"], copy["wall_ms"])
        ratios[f"{v}/copy per file"] = _ratio(m[v]["us_per_file"], copy["us_per_file"])
        ratios[f"{v}/copy per file (wall)"] = _ratio(
            m[v]["us_per_file_wall"], copy["us_per_file_wall"]
        )
    for v in (v for v in m if base_variant(v) != "passthrough"):
        plain = m.get("passthrough" + suffix(v))
        if plain is not None:
            ratios[f"{v}/passthrough wall"] = _ratio(m[v]["wall_ms"], plain["wall_ms"])
    out["ratios"] = ratios
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
    return {
        "cpus": os.cpu_count(),
        "cpu": model,
        "kernel": platform.release(),
        "loadavg": os.getloadavg(),
    }


def _fmt(v: float | None, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _spread(q: tuple[float | None, float | None], spec: str) -> str:
    return f"{_fmt(q[0], spec)}-{_fmt(q[1], spec)}"


def _section(
    title: list[str],
    columns: list[str],
    programs: list[dict[str, Any]],
    cells: Callable[[dict[str, Any]], list[str]],
) -> list[str]:
    """A titled table: a row per program, its *cells* under the numeric *columns*."""
    lines = ["", *title, "", "| program | " + " | ".join(columns) + " |"]
    lines.append("|---|" + "---:|" * len(columns))
    for p in programs:
        lines.append(f"| {p['name']} | " + " | ".join(cells(p)) + " |")
    return lines


def table(report: dict[str, Any]) -> str:
    """The report as Markdown tables (readable as text too)."""
    variants = report["modes"]
    shadowd = [v for v in variants if base_variant(v) in SHADOWD_VARIANTS]
    m0 = report["machine"]
    cache = "cold: a fresh daemon before every shadowd-mode run" if report["cold"] else "warm cache"
    if report["cold"] and report.get("prime"):
        cache += ", asked for a file of the benchmark's own first"
    lines = [
        f"real programs under shadowd-supervise: medians of {report['rounds']} rounds ({cache});"
        f" {m0['cpus']} CPUs, {m0['cpu'] or 'unknown CPU'}, Linux {m0['kernel']};"
        f" load average {', '.join(f'{x:.2f}' for x in report['load_before'])} before,"
        f" {', '.join(f'{x:.2f}' for x in m0['loadavg'])} after",
    ]
    programs = report["programs"]

    def wall(p: dict[str, Any]) -> list[str]:
        m = p["modes"]
        files = m.get("copy", m.get("copy" + BASELINE, m[variants[-1]]))["shadowed"]
        return [_fmt(files, ".0f")] + [
            f"{_fmt(m[v]['wall_ms'], '.1f')} ({_spread(m[v]['wall_ms_quartiles'], '.1f')})"
            for v in variants
        ]

    lines += _section(
        ["Wall time, ms (median; quartiles in brackets):"], ["files", *variants], programs, wall
    )
    filed = [v for v in variants if base_variant(v) != "passthrough"]

    def per_file(p: dict[str, Any]) -> list[str]:
        m = p["modes"]
        return [
            f"{_fmt(m[v]['us_per_file'], '.1f')} ({_spread(m[v]['us_per_file_quartiles'], '.1f')})"
            for v in filed
        ]

    lines += _section(
        ["The supervisor's time per shadowed file, us (median of each run's mean; quartiles):"],
        filed,
        programs,
        per_file,
    )

    def parts(p: dict[str, Any]) -> list[str]:
        return [
            " + ".join(
                _fmt(p["modes"][v].get("us_per_file_parts", {}).get(k), ".1f")
                for k in ("source", "make", "inject")
            )
            for v in filed
        ]

    lines += _section(
        [
            "Where the time per file goes, us (medians of each run's means): opening and",
            "checking the source; making the fd by the mode's means; the injection:",
        ],
        filed,
        programs,
        parts,
    )

    def cpu(p: dict[str, Any]) -> list[str]:
        return [_fmt(p["modes"][v].get("cpu_us_per_file"), ".1f") for v in filed]

    lines += _section(
        [
            "The supervisor's CPU time per shadowed file, us (all of its run's, start-up",
            "and the work outside the per-file window included; median):",
        ],
        filed,
        programs,
        cpu,
    )
    against = [v for v in shadowd if "copy" + suffix(v) in variants]
    if against:

        def ratios(p: dict[str, Any]) -> list[str]:
            q = p["ratios"]
            return [
                f"{_fmt(q[f'{v}/copy wall'], '.2f')}; {_fmt(q[f'{v}/copy per file'], '.2f')};"
                f" {_fmt(q[f'{v}/copy per file (wall)'], '.2f')}"
                for v in against
            ]

        lines += _section(
            [
                "Against copy (wall; per file; per file with the wall-clock measure);"
                f" a {BASELINE} mode against copy{BASELINE}:"
            ],
            against,
            programs,
            ratios,
        )
    if shadowd:
        lines += [
            "",
            "Which tier served the files, per run (files, and the supervisor's mean us per file):",
            "",
            "| program | mode | index | hit | held | miss | raced | cold | local | fallback"
            " | preload |",
            "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
        ]
        for p in report["programs"]:
            for v in shadowd:
                mv = p["modes"][v]
                cells = []
                for how in ("index", "hit", "held", "miss", "raced", "cold", "local", "fallback"):
                    b = mv["by_how"].get(how)
                    cells.append(
                        "-"
                        if b is None
                        else f"{b['files_per_run']:.0f} ({_fmt(b['us_mean'], '.0f')})"
                    )
                pre = (
                    f"{_fmt(mv['preload_held'], '.0f')}/{_fmt(mv['preload_files'], '.0f')}"
                    f" in {_fmt(mv['preload_ms'], '.1f')} ms"
                    if mv["preload_files"]
                    else "-"
                )
                lines.append(f"| {p['name']} | {v} | " + " | ".join(cells) + f" | {pre} |")
    if report.get("baseline"):
        lines += ["", f"{BASELINE}: the supervisor built from {report['baseline']}"]
        if report.get("baseline_daemon"):
            lines[-1] += ", against a daemon of that tree"
    for s in report["skipped"]:
        lines.append(f"skipped {s['name']}: {s['why']}")
    lines += [
        "",
        "files: shadowed per run (copy mode). Per file: from the supervisor's own open of",
        "the source to its injection of the shadow, counting the injection's CPU time (the",
        "tracee it wakes may run on the supervisor's CPU before the call returns); 'wall'",
        "counts the whole wall time to the call's return. index: reopened from the",
        "daemon's memfd through its index (no round trip); hit: served by the daemon from",
        "its cache; held: reopened from the supervisor's tier; miss: the daemon had not",
        "cached it (shadowd-fd: served after its copy; routed: copied here while it fills);",
        "raced: copied here before the daemon's answer came (--race); cold: copied here",
        "without asking (a file the daemon's index lacks, or any file for a second after",
        "a miss the daemon was filling), told to it afterwards in one batch; local:",
        "copied here by the routing rules (small,",
        "young); fallback: copied here because the daemon could not answer. preload:",
        "files held / listed, and its time.",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="benchmarks/programs.py",
        description="Real programs under the reference supervisor (contrib/supervisor), "
        "in modes passthrough, copy, shadowd-fd, shadowd and shadowd-preload: wall times, "
        "time per shadowed file, which tier served the files, checked for identical outputs.",
    )
    parser.add_argument("--rounds", type=int, default=10, help="measured rounds (default 10)")
    parser.add_argument(
        "--cold",
        action="store_true",
        help="restart the daemon before each run in a shadowd mode (a cold cache)",
    )
    out = parser.add_mutually_exclusive_group()
    parser.add_argument(
        "--prime",
        action="store_true",
        help="with --cold: ask each new daemon for a file of our own first, so that the"
        " programs' files are its first misses but not its first requests",
    )
    out.add_argument("--json", action="store_true", help="print one JSON object")
    out.add_argument(
        "--markdown", action="store_true", help="the tables only (the default adds nothing else)"
    )
    parser.add_argument(
        "--socket", help="use the daemon on this socket instead of starting one of our own"
    )
    parser.add_argument(
        "--only", help="comma-separated program names (python3-imports, pip-version, ...)"
    )
    parser.add_argument(
        "--modes",
        help=f"comma-separated modes (default: {', '.join(DEFAULT_VARIANTS)}; also"
        " shadowd-race, shadowd-noindex, shadowd-keep, shadowd-preload-readopen)",
    )
    parser.add_argument(
        "--quick", action="store_true", help="shorter loops (3 ls, 5 commits): for a test"
    )
    parser.add_argument(
        "--baseline",
        metavar="TREE",
        help="another source tree of the project (say `git archive main` unpacked): its"
        f" supervisor runs every mode too, as MODE{BASELINE}, in the same rounds",
    )
    parser.add_argument(
        "--timeouts",
        metavar="MS,MS",
        help="the supervisor's --timeouts in the shadowd modes (connect+hello, reply; default"
        " the client's 250,250); not passed to --baseline's supervisor",
    )
    parser.add_argument(
        "--baseline-daemon",
        action="store_true",
        help="with --baseline: the baseline's modes talk to a daemon of that tree too (its"
        " C extension built in place if it is not), not to this tree's",
    )
    args = parser.parse_args(argv)
    if args.rounds < 1:
        parser.error("--rounds must be at least 1")
    if args.cold and args.socket:
        parser.error("--cold restarts our own daemon: it cannot go with --socket")
    if args.baseline_daemon and (not args.baseline or args.socket):
        parser.error("--baseline-daemon needs --baseline, and our own daemon (no --socket)")
    variants = list(DEFAULT_VARIANTS)
    if args.modes:
        wanted_modes = [v.strip() for v in args.modes.split(",") if v.strip()]
        unknown_modes = [v for v in wanted_modes if v not in VARIANTS]
        if unknown_modes or not wanted_modes:
            parser.error(f"--modes: not a mode: {', '.join(unknown_modes) or '(none)'}")
        variants = [v for v in VARIANTS if v in wanted_modes]
    if args.baseline:
        variants += [v + BASELINE for v in variants if v not in NEW_ONLY]

    def say(msg: str) -> None:
        print(f"programs: {msg}", file=sys.stderr, flush=True)

    load_before = os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="shadowd-programs-") as workdir:
        binary, why = build_supervisor(workdir)
        if binary is None:
            say(f"cannot build the supervisor: {why}")
            return 1
        baseline = None
        if args.baseline:
            baseline, why = build_supervisor(
                workdir, tree=args.baseline, name="shadowd-supervise-baseline"
            )
            if baseline is None:
                say(f"cannot build the baseline's supervisor: {why}")
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
        say(f"{len(programs)} programs x {len(variants)} modes, a warm-up and {args.rounds} rounds")
        base_daemon = None
        if args.baseline_daemon:
            why = build_extension(args.baseline)
            if why:
                say(f"cannot build the baseline's C extension: {why}")
                return 1
            base_daemon = OwnDaemon(workdir, prime=args.prime, tree=args.baseline, name="base")
            base_daemon.start()
        try:
            with daemon_for(args, workdir) as (socket_path, daemon):
                results = run_all(
                    binary,
                    programs,
                    variants=variants,
                    rounds=args.rounds,
                    socket_path=socket_path,
                    daemon=daemon,
                    cold=args.cold,
                    workdir=workdir,
                    baseline=baseline,
                    base_daemon=base_daemon,
                    timeouts=args.timeouts,
                )
        except Mismatch as exc:
            say(f"FAILED: {exc}")
            return 1
        finally:
            if base_daemon is not None:
                base_daemon.stop()
    report = {
        "prime": args.prime,
        "baseline": args.baseline,
        "baseline_daemon": args.baseline_daemon,
        "machine": machine(),
        "load_before": load_before,
        "rounds": args.rounds,
        "cold": args.cold,
        "modes": variants,
        "programs": [summarize(r) for r in results],
        "skipped": [{"name": s.name, "why": s.why} for s in skipped],
    }
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
