# The reference supervisor (contrib/supervisor/shadowd-supervise.c) with real
# programs as tracees, a real seccomp listener and, for shadowd mode, the
# daemon as a subprocess: outputs identical to passthrough in every mode,
# the shadow fds as promised (sealed, read-only, own offsets, O_CLOEXEC as
# asked), what must pass through passing through, forks and relative paths
# followed, no daemon no problem, and the real-program benchmark end to end.
# Built with the host's C compiler; skipped where there is none.
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from benchmarks.programs import find_programs
from benchmarks.supervisor import (
    MODES,
    SOURCE,
    Run,
    build_supervisor,
    real_python3,
    run_supervised,
)
from shadowd.bench import c_compiler

from .conftest import REPO, Daemon, in_thread, make_file, repo_env, requires_root, settle

pytestmark = pytest.mark.skipif(c_compiler() is None, reason="no C compiler here")

SEALS = 0xF  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
SIZE = 100_000


def pattern(n: int) -> bytes:
    return bytes(i % 251 for i in range(n))


@pytest.fixture(scope="module")
def built(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    binary, warnings = build_supervisor(tmp_path_factory.mktemp("supervisor"))
    assert binary is not None, warnings
    return binary, warnings


@pytest.fixture(scope="module")
def supervisor(built: tuple[str, str]) -> str:
    binary = built[0]
    trial = subprocess.run(
        [binary, "--mode", "passthrough", "--", "true"],
        capture_output=True,
        timeout=30,
        check=False,
    )
    if trial.returncode == 125 and b"seccomp" in trial.stderr:
        pytest.skip(f"no seccomp user notification here: {trial.stderr.decode().strip()}")
    assert trial.returncode == 0, trial.stderr
    return binary


def checked(run: Run) -> dict[str, Any]:
    """*run*'s stats, after the checks every run must pass."""
    s = run.stats
    assert s["mode"] == run.mode
    assert s["fds_before"] == s["fds_after"], s
    assert s["exit_status"] == run.returncode
    assert s["notifications"] == s["shadowed"] + s["continued"] + s["gone"]
    assert s["shadowed"] == len(s["files"]) and s["files_dropped"] == 0
    assert s["hits"] + s["misses"] + s["fallbacks"] == (
        s["shadowed"] if run.mode == "shadowd" else 0
    )
    if run.mode == "passthrough":
        assert s["shadowed"] == 0 and s["continued_by_reason"]["passthrough"] == s["continued"]
    return s


def test_builds_without_warnings(built: tuple[str, str]) -> None:
    binary, warnings = built
    assert os.access(binary, os.X_OK)
    assert SOURCE.name not in warnings, warnings


@in_thread(60)
def test_usage_and_exit_statuses(supervisor: str) -> None:
    def run(*args: str) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([supervisor, *args], capture_output=True, timeout=20, check=False)

    assert run().returncode == 2
    assert run("--mode", "nope", "true").returncode == 2
    helped = run("--help")
    assert helped.returncode == 0 and b"not a\nsandbox" in helped.stdout
    for mode in MODES:
        assert run("--mode", mode, "--", "sh", "-c", "exit 7").returncode == 7
        # Killed by a signal: 128 + its number, as a shell says it.
        assert run("--mode", mode, "sh", "-c", "kill -TERM $$").returncode == 128 + 15
    missing = run("--mode", "copy", "--", "/nonexistent/program")
    assert missing.returncode == 127 and b"/nonexistent/program" in missing.stderr


async def test_real_programs_behave_the_same_in_every_mode(
    supervisor: str, start_daemon: Any, tmp_path: Path
) -> None:
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    await in_thread(90)(_same_in_every_mode)(supervisor, str(daemon.socket_path), tmp_path)


def _same_in_every_mode(supervisor: str, socket_path: str, tmp_path: Path) -> None:
    programs, skipped = find_programs(str(tmp_path), quick=True)
    wanted = {"python3-imports", "sh-ls-loop", "cc-c", "git-log", "perl-modules"}
    assert wanted <= {p.name for p in programs}, skipped
    for program in (p for p in programs if p.name in wanted):
        direct = subprocess.run(
            program.argv,
            cwd=program.cwd,
            env=program.env,
            capture_output=True,
            timeout=60,
            check=False,
        )
        runs = {
            mode: run_supervised(
                supervisor, mode, program.argv, socket=socket_path, cwd=program.cwd, env=program.env
            )
            for mode in MODES
        }
        reference = runs["passthrough"]
        assert (reference.returncode, reference.stdout, reference.stderr) == (
            direct.returncode,
            direct.stdout,
            direct.stderr,
        ), program.name
        for mode, run in runs.items():
            s = checked(run)
            assert (run.returncode, run.stdout, run.stderr) == (
                reference.returncode,
                reference.stdout,
                reference.stderr,
            ), (program.name, mode, run.stderr)
            assert s["notifications"] > 0, program.name
            if mode != "passthrough":
                assert s["shadowed"] > 0, (program.name, mode, s)
                assert s["continued_by_reason"]["shadow"] == 0, s["last_error"]
            if mode == "shadowd":
                assert s["shadowd_connected"] and s["fallbacks"] == 0, s["last_error"]


# A tracee that opens one regular file in every way there is and says what it got.
SHADOW_PROBE = r"""
import ctypes, errno, fcntl, json, os, platform, sys, threading
d = sys.argv[1]
path, exe = os.path.join(d, "data.bin"), os.path.join(d, "tool.sh")
libc = ctypes.CDLL(None, use_errno=True)
libc.syscall.restype = ctypes.c_long

class OpenHow(ctypes.Structure):
    _fields_ = [("flags", ctypes.c_uint64), ("mode", ctypes.c_uint64), ("resolve", ctypes.c_uint64)]

def openat2(dirfd, name, flags, resolve=0):
    how = OpenHow(flags, 0, resolve)
    fd = libc.syscall(ctypes.c_long(437), ctypes.c_long(dirfd), name.encode(), ctypes.byref(how),
                      ctypes.c_long(ctypes.sizeof(how)))
    return fd if fd >= 0 else -ctypes.get_errno()

def info(fd):
    if fd < 0:
        return {"errno": errno.errorcode[-fd]}
    try:
        seals = fcntl.fcntl(fd, 1034)  # F_GET_SEALS
    except OSError:
        seals = None
    return {
        "memfd": os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"),
        "seals": seals,
        "rdonly": fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY,
        "nonblock": bool(fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_NONBLOCK),
        "cloexec": bool(fcntl.fcntl(fd, fcntl.F_GETFD) & fcntl.FD_CLOEXEC),
        "exec_bits": bool(os.fstat(fd).st_mode & 0o111),
        "bytes_ok": os.pread(fd, 2 * SIZE, 0) == bytes(i % 251 for i in range(SIZE)),
    }

SIZE = int(sys.argv[2])
out = {}
a = os.open(path, os.O_RDONLY)  # Python asks O_CLOEXEC
b = libc.open(path.encode(), os.O_RDONLY)  # glibc: openat, without O_CLOEXEC
out["cloexec"], out["inherit"] = info(a), info(b)
first = os.read(a, 10)
out["own_offsets"] = first == os.read(b, 10) and os.read(a, 5) != first[:5]
try:
    os.write(a, b"x")
    out["write"] = "written"
except OSError as e:
    out["write"] = errno.errorcode[e.errno]
if platform.machine() == "x86_64":
    out["open_syscall"] = info(libc.syscall(ctypes.c_long(2), path.encode(), ctypes.c_long(0)))
out["openat2"] = info(openat2(-100, path, os.O_RDONLY | os.O_CLOEXEC))
out["nonblock"] = info(os.open(path, os.O_RDONLY | os.O_NONBLOCK))
exe_fd = os.open(exe, os.O_RDONLY)
out["exe_bits"] = bool(os.fstat(exe_fd).st_mode & 0o111)
out["exe_memfd"] = info(exe_fd)["memfd"]
os.chdir(os.path.join(d, "sub"))
out["cwd_dotdot"] = info(os.open("../data.bin", os.O_RDONLY))
os.chdir(d)
out["cwd"] = info(os.open("data.bin", os.O_RDONLY))
os.chdir("/")
dfd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
out["dirfd"] = info(os.open("data.bin", os.O_RDONLY, dir_fd=dfd))
out["beneath"] = info(openat2(dfd, "data.bin", os.O_RDONLY, 0x08))  # RESOLVE_BENEATH
out["beneath_escape"] = info(openat2(dfd, "sub/../../x", os.O_RDONLY, 0x08))
r, w = os.pipe()
pid = os.fork()
if pid == 0:
    os.write(w, json.dumps(info(os.open(path, os.O_RDONLY))).encode())
    os._exit(0)
os.close(w)
os.waitpid(pid, 0)
out["forked"] = json.loads(os.read(r, 65536))
got = {}
t = threading.Thread(target=lambda: got.update(info(os.open(path, os.O_RDONLY))))
t.start()
t.join()
out["thread"] = got
print(json.dumps(out))
"""


def shadow_dir(tmp_path: Path) -> Path:
    d = tmp_path / "files"
    (d / "sub").mkdir(parents=True)
    make_file(d / "data.bin", pattern(SIZE))
    make_file(d / "tool.sh", b"#!/bin/sh\necho tool\n", mode=0o755)
    settle(d / "data.bin", d / "tool.sh")
    return d


@pytest.mark.parametrize("mode", ["copy", "shadowd"])
async def test_shadow_fds_are_sealed_read_only_and_private(
    supervisor: str, start_daemon: Any, tmp_path: Path, mode: str
) -> None:
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    await in_thread(60)(_shadow_fds)(supervisor, str(daemon.socket_path), tmp_path, mode)


def _shadow_fds(supervisor: str, socket_path: str, tmp_path: Path, mode: str) -> None:
    d = shadow_dir(tmp_path)
    argv = [sys.executable, "-c", SHADOW_PROBE, str(d), str(SIZE)]
    run = run_supervised(supervisor, mode, argv, socket=socket_path)
    assert run.returncode == 0, run.stderr.decode()
    s = checked(run)
    out = json.loads(run.stdout)
    shadowed = {
        "memfd": True,
        "seals": SEALS,
        "rdonly": True,
        "nonblock": False,
        "exec_bits": False,
        "bytes_ok": True,
    }
    cases = ["cloexec", "openat2", "cwd", "cwd_dotdot", "dirfd", "beneath", "forked", "thread"]
    if "open_syscall" in out:
        cases.append("open_syscall")
    for case in cases:
        got = {k: v for k, v in out[case].items() if k != "cloexec"}
        got["seals"] = (got["seals"] or 0) & SEALS
        assert got == shadowed, (case, out[case])
    assert out["cloexec"]["cloexec"] and out["openat2"]["cloexec"]
    assert not out["inherit"]["cloexec"] and out["inherit"]["memfd"]
    assert out["inherit"]["seals"] & SEALS == SEALS
    assert not out["open_syscall"]["cloexec"] if "open_syscall" in out else True
    assert out["nonblock"]["memfd"] and out["nonblock"]["nonblock"]
    assert out["own_offsets"] is True
    assert out["write"] == "EBADF"
    assert out["exe_memfd"] and out["exe_bits"]  # executable iff the source is
    assert out["beneath_escape"] == {"errno": "EXDEV"}
    paths = [f["path"] for f in s["files"]]
    # The relative opens are recorded under the names the tracee gave.
    assert {"data.bin", "../data.bin"} <= set(paths)
    assert paths.count(str(d / "data.bin")) >= 5
    if mode == "shadowd":
        assert s["fallbacks"] == 0 and s["hits"] > 0, s["last_error"]

    # In passthrough mode the same probe gets the host files.
    plain = run_supervised(supervisor, "passthrough", argv)
    assert plain.returncode == 0, plain.stderr.decode()
    checked(plain)
    assert not any(v.get("memfd") for v in json.loads(plain.stdout).values() if isinstance(v, dict))


# A tracee whose opens must all reach the host as they are: writes, O_CREAT,
# O_TRUNC, O_PATH, directories, /proc/self, magic links, FIFOs, errors.
PASS_PROBE = r"""
import errno, json, os, sys
d = sys.argv[1]
path, target = os.path.join(d, "data.bin"), os.path.join(d, "out.txt")
fifo = os.path.join(d, "fifo")
out = {}

def link(fd):
    return os.readlink(f"/proc/self/fd/{fd}")

def attempt(name, fn):
    try:
        out[name] = fn()
    except OSError as e:
        out[name] = errno.errorcode[e.errno]

w = os.open(target, os.O_WRONLY)
os.write(w, b"written by the tracee\n")
out["wronly"] = link(w) == target
out["rdwr"] = link(os.open(target, os.O_RDWR)) == target
c = os.open(os.path.join(d, "created"), os.O_RDONLY | os.O_CREAT, 0o644)
out["creat"] = [link(c) == os.path.join(d, "created"), os.path.exists(os.path.join(d, "created"))]
t = os.open(os.path.join(d, "trunc.txt"), os.O_RDONLY | os.O_TRUNC)
out["trunc"] = [link(t).endswith("trunc.txt"), os.fstat(t).st_size]
out["o_path"] = link(os.open(path, os.O_PATH)) == path
out["dir"] = [link(os.open(d, os.O_RDONLY)) == d, sorted(os.listdir(d))]
out["o_directory_file"] = None
attempt("o_directory_file", lambda: os.open(path, os.O_RDONLY | os.O_DIRECTORY))
with open("/proc/self/status") as f:
    pid_line = [ln for ln in f if ln.startswith("Pid:")][0]
out["proc_self"] = int(pid_line.split()[1]) == os.getpid()
out["proc_self_link"] = None
s = os.open("/proc/self/stat", os.O_RDONLY)
out["proc_self_link"] = link(s) == f"/proc/{os.getpid()}/stat"
# A magic link to one of our own fds: ours, never the supervisor's.
m = os.open(f"/proc/self/fd/{w}", os.O_RDONLY)
out["magic_link"] = [link(m) == target, os.pread(m, 100, 0)]
# Relative to /proc, "self" is whoever resolves it: the supervisor's fd 3 is
# its stats file, so it must not follow that link for us.
os.dup2(w, 3)
os.chdir("/proc")
m3 = os.open("self/fd/3", os.O_RDONLY)
out["relative_magic_link"] = [link(m3) == target, os.pread(m3, 100, 0).decode()]
os.chdir(d)
cwd_link = os.open(f"/proc/self/cwd/out.txt", os.O_RDONLY) if os.getcwd() == d else None
out["cwd_link"] = cwd_link is not None and link(cwd_link) == target
os.mkfifo(fifo)
pid = os.fork()
if pid == 0:
    fw = os.open(fifo, os.O_WRONLY)
    os.write(fw, b"through the fifo")
    os._exit(0)
fr = os.open(fifo, os.O_RDONLY)
out["fifo"] = [link(fr) == fifo, os.read(fr, 100)]
os.waitpid(pid, 0)
out["fifo_nonblock"] = link(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK)) == fifo
out["dev_null"] = link(os.open("/dev/null", os.O_RDONLY))
os.symlink(path, os.path.join(d, "link"))
attempt("nofollow", lambda: os.open(os.path.join(d, "link"), os.O_RDONLY | os.O_NOFOLLOW))
attempt("missing", lambda: os.open(os.path.join(d, "nope"), os.O_RDONLY))
attempt("bad_dirfd", lambda: os.open("data.bin", os.O_RDONLY, dir_fd=999))
attempt("file_dirfd", lambda: os.open("data.bin", os.O_RDONLY, dir_fd=os.open(path, os.O_RDONLY)))
out["magic_link"][1] = out["magic_link"][1].decode()
out["fifo"][1] = out["fifo"][1].decode()
print(json.dumps(out, sort_keys=True))
"""


def pass_dir(base: Path) -> Path:
    d = base
    d.mkdir(parents=True)
    make_file(d / "data.bin", pattern(1000))
    make_file(d / "out.txt", b"")
    make_file(d / "trunc.txt", b"to be truncated")
    return d


@pytest.mark.parametrize("mode", ["copy", "shadowd"])
async def test_what_must_pass_through_behaves_as_without_the_supervisor(
    supervisor: str, start_daemon: Any, tmp_path: Path, mode: str
) -> None:
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    await in_thread(60)(_pass_through)(supervisor, str(daemon.socket_path), tmp_path, mode)


def _pass_through(supervisor: str, socket_path: str, tmp_path: Path, mode: str) -> None:
    plain_dir, traced_dir = pass_dir(tmp_path / "plain"), pass_dir(tmp_path / "traced")

    def argv(d: Path) -> list[str]:
        return [sys.executable, "-c", PASS_PROBE, str(d)]

    direct = subprocess.run(
        argv(plain_dir), cwd=plain_dir, capture_output=True, timeout=30, check=False
    )
    assert direct.returncode == 0, direct.stderr.decode()
    run = run_supervised(supervisor, mode, argv(traced_dir), socket=socket_path, cwd=traced_dir)
    assert run.returncode == 0, run.stderr.decode()
    s = checked(run)
    want, got = json.loads(direct.stdout), json.loads(run.stdout)
    assert got == want
    # Not a check of nothing: the probe did what it says, with and without us.
    assert got["magic_link"] == [True, "written by the tracee\n"]
    assert got["relative_magic_link"] == got["magic_link"]
    assert got["fifo"] == [True, "through the fifo"] and got["cwd_link"] is True
    assert got["nofollow"] == "ELOOP" and got["bad_dirfd"] == "EBADF"
    assert got["trunc"] == [True, 0] and got["proc_self"] and got["proc_self_link"]
    assert (traced_dir / "out.txt").read_bytes() == b"written by the tracee\n"
    reasons = s["continued_by_reason"]
    assert reasons["flags"] >= 6 and reasons["not_regular"] >= 2 and reasons["pseudo_fs"] >= 2
    assert reasons["open"] >= 4  # the magic links, the missing file, the bad dirfds
    assert str(traced_dir / "out.txt") not in [f["path"] for f in s["files"]]


@requires_root
@in_thread(60)
def test_a_chrooted_tracee_gets_its_own_files(supervisor: str, tmp_path: Path) -> None:
    """An absolute path is resolved in the tracee's root, not the supervisor's."""
    host = make_file(tmp_path / "same.txt", b"the host's file\n")
    jail = tmp_path / "jail"
    (jail / str(tmp_path).lstrip("/")).mkdir(parents=True)
    make_file(jail / str(host).lstrip("/"), b"the jail's file\n")
    code = (
        f"import os, fcntl; os.chroot({str(jail)!r}); fd = os.open({str(host)!r}, os.O_RDONLY);"
        " print(os.read(fd, 100).decode(), fcntl.fcntl(fd, 1034) & 15, end='')"  # F_GET_SEALS
    )
    run = run_supervised(supervisor, "copy", [sys.executable, "-c", code])
    assert run.returncode == 0, run.stderr.decode()
    assert run.stdout == b"the jail's file\n 15"  # shadowed, all four seals
    checked(run)


async def test_shadowd_mode_misses_then_hits_on_a_second_run(
    supervisor: str, start_daemon: Any, tmp_path: Path
) -> None:
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    await in_thread(60)(_misses_then_hits)(supervisor, str(daemon.socket_path), tmp_path)


def _misses_then_hits(supervisor: str, socket_path: str, tmp_path: Path) -> None:
    f = make_file(tmp_path / "data.bin", pattern(300_001))
    settle(f)
    cat = shutil.which("cat")
    assert cat is not None

    def hows(run: Run) -> list[str]:
        return [r["how"] for r in checked(run)["files"] if r["path"] == str(f)]

    first = run_supervised(supervisor, "shadowd", [cat, str(f)], socket=socket_path)
    second = run_supervised(supervisor, "shadowd", [cat, str(f)], socket=socket_path)
    for run in (first, second):
        assert run.returncode == 0 and run.stdout == f.read_bytes(), run.stderr
    assert hows(first) == ["miss"] and hows(second) == ["hit"]
    assert second.stats["hits"] == second.stats["shadowed"] > 1  # libc and the rest too
    assert second.stats["misses"] == 0 and second.stats["shadowd_connected"] is True


@in_thread(60)
def test_shadowd_mode_without_a_daemon_copies_locally(supervisor: str, tmp_path: Path) -> None:
    f = make_file(tmp_path / "data.bin", pattern(5000))
    python = real_python3() or sys.executable
    argv = [
        python,
        "-c",
        f"import json, decimal; print(open({str(f)!r}, 'rb').read() == {pattern(5000)!r})",
    ]
    run = run_supervised(supervisor, "shadowd", argv, socket=str(tmp_path / "no.sock"))
    assert (run.returncode, run.stdout) == (0, b"True\n"), run.stderr
    assert run.stderr == b""  # quiet without --verbose
    s = checked(run)
    assert s["shadowed"] > 5 and s["fallbacks"] == s["shadowed"] and s["hits"] == 0
    assert s["shadowd_connected"] is False and "no.sock" in s["last_error"]
    assert {r["how"] for r in s["files"]} == {"fallback"}


@pytest.mark.slow
async def test_the_real_program_benchmark_runs_and_its_outputs_agree(supervisor: str) -> None:
    # *supervisor*: skipped with the rest where seccomp user notification is missing.
    await in_thread(150)(_benchmark)()


def _benchmark() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "programs.py"),
            "--rounds",
            "1",
            "--quick",
            "--json",
        ],
        capture_output=True,
        text=True,
        timeout=140,
        env=repo_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    names = [p["name"] for p in report["programs"]]
    assert {"python3-imports", "sh-ls-loop", "cc-c", "git-log", "perl-modules"} <= set(names)
    for p in report["programs"]:
        m = p["modes"]
        assert m["passthrough"]["shadowed"] == 0 and m["passthrough"]["wall_ms"] > 0
        assert m["copy"]["shadowed"] > 0 and m["copy"]["us_per_file"] > 0, p
        assert m["shadowd"]["hits"] + m["shadowd"]["misses"] == m["shadowd"]["shadowed"] > 0, p
        assert m["shadowd"]["fallbacks"] == 0, p
        assert p["ratios"]["shadowd/copy wall"] > 0
    assert "programs: round 1/1 done" in done.stderr
    helped = subprocess.run(
        [sys.executable, str(REPO / "benchmarks" / "programs.py"), "--help"],
        capture_output=True,
        text=True,
        timeout=30,
        env=repo_env(),
        check=False,
    )
    assert helped.returncode == 0 and "--cold" in helped.stdout
