# The reference supervisor (contrib/supervisor/shadowd-supervise.c) with real
# programs as tracees, a real seccomp listener and, for shadowd mode, the
# daemon as a subprocess: outputs identical to passthrough in every mode,
# the shadow fds as promised (sealed, read-only, own offsets, O_CLOEXEC as
# asked), what must pass through passing through, forks and relative paths
# followed, the routed open's tiers (a miss copied while the daemon fills,
# then a hit, then the supervisor's own tier; a file rewritten in place never
# served stale; preload), no daemon, a stopped daemon and a daemon killed and
# restarted under a running supervisor no problem, and the real-program
# benchmark end to end. Built with the host's C compiler; skipped where there
# is none.
from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import trio

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

from .conftest import (
    REPO,
    Daemon,
    in_thread,
    make_file,
    repo_env,
    requires_root,
    settle,
    test_uid,
)

pytestmark = pytest.mark.skipif(c_compiler() is None, reason="no C compiler here")

SEALS = 0xF  # F_SEAL_SEAL | F_SEAL_SHRINK | F_SEAL_GROW | F_SEAL_WRITE
# For the tests that assert the daemon answered every open: timeouts no loaded
# host reaches. By default (250 ms) a reply late on a loaded CI machine opened
# the breaker, and that run's opens were copies ("fallbacks"). The tests of an
# unreachable daemon keep the defaults.
STEADY = ["--timeouts", "10000,10000"]
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
    ways = ("hits", "index", "misses", "held", "local", "raced", "cold", "fallbacks")
    assert sum(s[k] for k in ways) == (s["shadowed"] if run.mode == "shadowd" else 0)
    assert s["source_ns"] + s["make_ns"] + s["inject_ns"] == s["shadow_ns"]
    for how in ("held", "local", "raced", "cold", "index"):
        assert len([f for f in s["files"] if f["how"] == how]) == s[how]
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
                supervisor,
                mode,
                program.argv,
                socket=socket_path,
                cwd=program.cwd,
                env=program.env,
                options=STEADY,
            )
            for mode in MODES
        }
        # shadowd_open_fd for every file, as before the routed open; and the
        # routed open given a source opened for reading, as before it took the
        # O_PATH descriptor.
        for name in ("open-fd", "read-open"):
            runs[name] = run_supervised(
                supervisor,
                "shadowd",
                program.argv,
                socket=socket_path,
                cwd=program.cwd,
                env=program.env,
                options=[*STEADY, f"--{name}"],
            )
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
            if run.mode == "shadowd":
                assert s["shadowd_connected"] and s["fallbacks"] == 0, s["last_error"]
                assert s["protocol"] == 2
                call = {"open-fd": "shadowd_open_fd", "read-open": "shadowd_open_routed_stat"}
                assert s["open"] == call.get(mode, "shadowd_open_routed_opath")


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
    run = run_supervised(supervisor, mode, argv, socket=socket_path, options=STEADY)
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
        # A fresh daemon: its index lacks the files, so they are copied here and
        # told to it (cold); never a fallback.
        assert s["fallbacks"] == 0 and s["shadowd_connected"], s["last_error"]
        assert s["cold"] > 0, s

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


# One path, a different file in the host's root and in a jail's: read by a
# process before and after it chroots into the jail, by its parent meanwhile,
# and by a new process given the chrooted one's pid after it ended (set with
# ns_last_pid, tried until it comes). Each read: the bytes, and whether the fd
# was a shadow (sealed: a memfd; the jail has no /proc to look at the fd in).
ROOTS_PROBE = r"""
import fcntl, json, os, sys
path, jail = sys.argv[1], sys.argv[2]

def read():
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError as e:
        return [str(e), False]
    try:
        try:
            sealed = fcntl.fcntl(fd, 1034) & 15 == 15  # F_GET_SEALS: a memfd's
        except OSError:
            sealed = False
        return [os.read(fd, 100).decode(), sealed]
    finally:
        os.close(fd)

out = {"parent": [read()]}
to_parent, from_child = os.pipe()
from_parent, to_child = os.pipe()
child = os.fork()
if child == 0:
    first = read()
    os.chroot(jail)
    reads = [first, read()]
    os.write(from_child, json.dumps(reads).encode())
    os.read(from_parent, 1)  # the parent has read meanwhile
    os.write(from_child, json.dumps(read()).encode())
    os._exit(0)
out["child"] = json.loads(os.read(to_parent, 4096))
out["parent"].append(read())
os.write(to_child, b".")
out["child"].append(json.loads(os.read(to_parent, 4096)))
os.waitpid(child, 0)
out["same_pid"] = None
for _ in range(500):
    with open("/proc/sys/kernel/ns_last_pid", "w") as f:
        f.write(str(child - 1))
    again = os.fork()
    if again == 0:
        if os.getpid() != child:
            os._exit(3)
        os.write(from_child, json.dumps(read()).encode())
        os._exit(0)
    if os.waitstatus_to_exitcode(os.waitpid(again, 0)[1]) == 0:
        out["same_pid"] = json.loads(os.read(to_parent, 4096))
        break
out["parent"].append(read())
print(json.dumps(out))
"""


@requires_root
@in_thread(60)
def test_each_open_is_resolved_in_the_callers_root_of_that_moment(
    supervisor: str, tmp_path: Path
) -> None:
    """The supervisor keeps each thread's /proc directory, never its root: a
    process's open after its chroot is resolved in the jail, its parent's at the
    same time in the host's root, and a new process given the chrooted one's pid
    after it ended in its own (the host's) root. A root kept per thread would give
    the chrooted child the host's file after its chroot; one kept per pid and
    followed through chroot, the new process the jail's."""
    host = make_file(tmp_path / "same.txt", b"the host's file")
    jail = tmp_path / "jail"
    (jail / str(tmp_path).lstrip("/")).mkdir(parents=True)
    make_file(jail / str(host).lstrip("/"), b"the jail's file")
    argv = [sys.executable, "-c", ROOTS_PROBE, str(host), str(jail)]
    run = run_supervised(supervisor, "copy", argv)
    assert run.returncode == 0, run.stderr.decode()
    s = checked(run)
    out = json.loads(run.stdout)
    hosts, jails = ["the host's file", True], ["the jail's file", True]
    assert out["parent"] == [hosts] * 3
    assert out["child"] == [hosts, jails, jails]
    assert out["same_pid"] == hosts, "no process got the ended one's pid: nothing tested"
    # The directories were kept: one per process (and python's own start),
    # not one per open.
    assert s["task_dirs_opened"] < s["notifications"] / 4, s


# Mounts a tmpfs on a directory, opens a file there, unmounts it, mounts a procfs
# there (whose anonymous st_dev is then most often the tmpfs's, freed just before)
# and opens its "version"; until the st_dev was the same. Run in a mount namespace
# of its own (unshare -m), so nothing is left mounted on the host.
REMOUNT_PROBE = r"""
import ctypes, json, os, sys
libc = ctypes.CDLL(None, use_errno=True)
d = sys.argv[1]

def mount(source, fstype):
    if libc.mount(source.encode(), d.encode(), fstype.encode(), 0, None) != 0:
        raise OSError(ctypes.get_errno(), f"mount {fstype}")

def umount():
    if libc.umount2(d.encode(), 0) != 0:
        raise OSError(ctypes.get_errno(), "umount")

def opened(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith("/memfd:"), os.read(fd, 64).decode()
    finally:
        os.close(fd)

tries = []
for _ in range(8):
    mount("none", "tmpfs")
    with open(os.path.join(d, "f"), "w") as f:
        f.write("on the tmpfs")
    tmpfs_dev = os.stat(d).st_dev
    tmpfs = [opened(os.path.join(d, "f")) for _ in range(20)]
    umount()
    mount("proc", "proc")
    proc_dev = os.stat(d).st_dev
    proc = opened(os.path.join(d, "version"))
    umount()
    tries.append({"same_dev": tmpfs_dev == proc_dev, "tmpfs": tmpfs, "proc": proc})
    if tmpfs_dev == proc_dev:
        break
print(json.dumps(tries))
"""


@requires_root
@in_thread(60)
def test_pseudo_file_systems_are_judged_per_mount_never_by_st_dev(
    supervisor: str, tmp_path: Path
) -> None:
    """The supervisor judges a file system once per mount (by its unique mount id),
    not by st_dev: a procfs mounted where a tmpfs was, with the tmpfs's st_dev used
    again, still passes through. A judgement kept by st_dev would shadow /proc's
    "version" as a tmpfs file here."""
    unshare = shutil.which("unshare")
    if unshare is None:
        pytest.skip("no unshare(1)")
    point = tmp_path / "point"
    point.mkdir()
    argv = [unshare, "-m", "--propagation", "private", "--"]
    argv += [sys.executable, "-c", REMOUNT_PROBE, str(point)]
    run = run_supervised(supervisor, "copy", argv)
    assert run.returncode == 0, run.stderr.decode()
    s = checked(run)
    tries = json.loads(run.stdout)
    assert tries[-1]["same_dev"], "the procfs never got the tmpfs's st_dev: nothing tested"
    for t in tries:
        assert t["tmpfs"] == [[True, "on the tmpfs"]] * 20  # shadowed
        assert t["proc"][0] is False and t["proc"][1].startswith("Linux version")
    assert s["continued_by_reason"]["pseudo_fs"] >= len(tries)
    if tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (6, 8):
        # Unique mount ids: the tmpfs judged once per mount, not once per file
        # (each procfs, the program's own files' mounts, once each too).
        assert s["statfs_calls"] < s["shadowed"] / 4, s


# 100 times: mount a tmpfs, write a file there, open it read-only (shadowed),
# read and close it, and unmount the tmpfs at once. Prints the failures.
UNMOUNT_PROBE = r"""
import ctypes, os, sys
libc = ctypes.CDLL(None, use_errno=True)
d = sys.argv[1]
failed = []
for i in range(100):
    if libc.mount(b"none", d.encode(), b"tmpfs", 0, None) != 0:
        raise OSError(ctypes.get_errno(), "mount")
    with open(os.path.join(d, "f"), "w") as f:
        f.write(str(i))
    fd = os.open(os.path.join(d, "f"), os.O_RDONLY)
    assert os.read(fd, 10) == str(i).encode()
    os.close(fd)
    while libc.umount2(d.encode(), 0) != 0:
        failed.append(os.strerror(ctypes.get_errno()))
print(len(failed), sorted(set(failed)))
"""


@requires_root
@pytest.mark.parametrize("mode", ["copy", "shadowd"])
@in_thread(60)
def test_a_program_unmounts_a_file_system_right_after_closing_a_file_there(
    supervisor: str, tmp_path: Path, mode: str
) -> None:
    """Every fd the supervisor opened on the program's file systems is closed
    before the program has its answer, so the program's own unmount right after
    its close never finds the file system busy. Before, the source's fd was
    closed after the injection: with the supervisor and the program on one CPU
    and the program of higher priority (so that the answer's wake-up runs the
    program first), its umount failed with EBUSY thousands of times in 100
    rounds. (Shadowd mode without a daemon: its local copies; a daemon that
    fills its cache from the file holds its own fd of it while it copies.)"""
    unshare, nice = shutil.which("unshare"), shutil.which("nice")
    if unshare is None or nice is None:
        pytest.skip("no unshare(1) or nice(1)")
    point = tmp_path / "point"
    point.mkdir()
    argv = [nice, "-n", "-10", unshare, "-m", "--propagation", "private", "--"]
    argv += [sys.executable, "-c", UNMOUNT_PROBE, str(point)]
    # This thread's CPU and priority are what the supervisor starts with.
    cpus, priority = os.sched_getaffinity(0), os.getpriority(os.PRIO_PROCESS, 0)
    os.sched_setaffinity(0, {min(cpus)})
    os.setpriority(os.PRIO_PROCESS, 0, priority + 5)
    try:
        run = run_supervised(supervisor, mode, argv, socket=str(tmp_path / "no.sock"))
    finally:
        os.setpriority(os.PRIO_PROCESS, 0, priority)
        os.sched_setaffinity(0, cpus)
    assert (run.returncode, run.stdout) == (0, b"0 []\n"), run.stderr.decode()
    s = checked(run)
    assert len([f for f in s["files"] if f["path"] == str(point / "f")]) == 100


@requires_root
def test_the_supervisor_never_opens_a_fifo_the_program_names(
    supervisor: str, tmp_path: Path
) -> None:
    """The supervisor looks at what a path names without opening it (O_PATH), so
    only the program's own open can be a FIFO's reader. Before, it opened the FIFO
    for reading (O_NONBLOCK) to see what it was: a writer's open returned then,
    before the program's, and the supervisor's close left that writer with no
    reader (the pass-through FIFO test read nothing, now and then). Here the
    program may not open the FIFO at all (it runs as nobody; the FIFO is root's,
    0600): a writer's open must still be waiting when the program has ended."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo, 0o600)
    tmp_path.chmod(0o755)
    code = (
        "import os; os.setgroups([]); os.setgid(65534); os.setuid(65534)\n"
        "try:\n"
        f"    os.open({str(fifo)!r}, os.O_RDONLY | os.O_NONBLOCK)\n"
        "except PermissionError:\n"
        "    print('refused')\n"
    )
    opened = threading.Event()

    def writer() -> None:
        fd = os.open(fifo, os.O_WRONLY)  # waits for a reader
        opened.set()
        os.close(fd)

    thread = threading.Thread(target=writer, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    # In its open (openat is 257 on x86-64, 56 on arm64) before the program runs.
    syscall = Path(f"/proc/self/task/{thread.native_id}/syscall")
    while syscall.read_text().split()[0] not in ("257", "56"):
        assert time.monotonic() < deadline
        time.sleep(0.005)
    try:
        run = run_supervised(supervisor, "copy", [sys.executable, "-c", code])
        assert (run.returncode, run.stdout) == (0, b"refused\n"), run.stderr
        assert not opened.is_set()  # nobody read the FIFO: the writer still waits
    finally:
        os.close(os.open(fifo, os.O_RDONLY | os.O_NONBLOCK))  # let the writer go
        thread.join(10)
    checked(run)


@pytest.mark.parametrize("call", ["routed", "no-index", "open-fd"])
async def test_shadowd_mode_misses_then_hits_on_a_second_run(
    supervisor: str, start_daemon: Any, tmp_path: Path, call: str
) -> None:
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    await in_thread(60)(_misses_then_hits)(supervisor, str(daemon.socket_path), tmp_path, call)


def _misses_then_hits(supervisor: str, socket_path: str, tmp_path: Path, call: str) -> None:
    f = make_file(tmp_path / "data.bin", pattern(300_001))
    settle(f)
    cat = shutil.which("cat")
    assert cat is not None
    # No cold window: libc's miss in the first run would start one.
    options = [*STEADY, "--open-fd"] if call == "open-fd" else [*STEADY, "--cold", "0"]
    if call == "no-index":
        options.append("--no-index")
    # With the index, a file the daemon holds needs no round trip: "index".
    # shadowd_open_fd asks for the index with its first request (not before
    # the program starts, as a supervisor written before the index does):
    # its first files are hits through the socket, the rest index hits.
    served = {"routed": ["index"], "no-index": ["hit"], "open-fd": ["hit", "index"]}[call]

    def hows(run: Run) -> list[str]:
        return [r["how"] for r in checked(run)["files"] if r["path"] == str(f)]

    def cat_it() -> Run:
        run = run_supervised(
            supervisor, "shadowd", [cat, str(f)], socket=socket_path, options=options
        )
        assert run.returncode == 0 and run.stdout == f.read_bytes(), run.stderr
        return run

    first = cat_it()
    # Routed with the index: the index lacks it, so it is copied here at once
    # while the daemon's answer (a miss it fills) is on its way ("raced"; a
    # "miss" when that answer came during the copy). Without the index the
    # answer is waited for (a miss answered at once), and shadowd_open_fd
    # waits for the daemon's copy.
    assert hows(first) in ([["raced"], ["miss"]] if call == "routed" else [["miss"]])

    def settled(run: Run) -> bool:
        """Whether every file the run opened was served as a file the daemon holds is."""
        s = run.stats
        if hows(run)[0] not in served:
            return False
        if call == "routed":
            return s["index"] + s["local"] == s["shadowed"]
        if call == "no-index":
            return s["hits"] + s["local"] == s["shadowed"]
        return s["hits"] + s["index"] == s["shadowed"]

    second = cat_it()
    deadline = time.monotonic() + 10
    # The daemon fills in the background, at most a few files at once (its
    # per-uid copy quota), the files the first run told it of queued with its
    # misses: a file not filled yet is a miss again in a later run, or, routed
    # with the index, "raced" when the daemon's "miss" came after the copy (as
    # it may on a loaded machine). A file whose fill ends during a run is a
    # round trip's hit in it: the index had no slot for it yet when the routed
    # open looked. Run again until the daemon holds every file.
    while not settled(second):
        assert call != "open-fd" and hows(second)[0] in ["miss", "raced", "hit", *served], hows(
            second
        )
        assert time.monotonic() < deadline
        time.sleep(0.02)
        second = cat_it()
    s = second.stats
    assert s["misses"] == 0 and s["shadowd_connected"] is True and s["fallbacks"] == 0
    if call == "open-fd":
        assert s["hits"] + s["index"] == s["shadowed"] > 1  # libc and the rest too
        assert s["hits"] >= 1 and s["index"] >= 1 and not s["index_ready"]
        assert s["client"]["index"] == s["index"] and s["client"]["index_refused"] == 0
    elif call == "no-index":
        # ld.so.cache and the other small files are copied here without asking.
        assert s["hits"] + s["local"] == s["shadowed"] and s["hits"] > 1 and s["local"] >= 1
        small = [r for r in s["files"] if r["how"] == "local"]
        assert all(r["size"] < 128 * 1024 for r in small), small
        assert s["index"] == 0 and not s["index_ready"]
    else:
        # libc and the rest from the index, fetched before the program started;
        # small files the daemon does not hold yet are copied here (and told to it).
        assert s["index_ready"] and s["index"] > 1 and s["hits"] == 0
        assert s["index"] + s["local"] == s["shadowed"]
        assert s["client"]["index"] == s["index"] and s["client"]["index_refused"] == 0


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
            "--timeouts",
            STEADY[1],
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
        for mode in ("shadowd-fd", "shadowd", "shadowd-preload"):
            mm = m[mode]
            ways = ("hits", "index", "misses", "held", "local", "raced", "cold", "fallbacks")
            assert sum(mm[k] for k in ways) == mm["shadowed"] > 0, (mode, p)
            assert mm["fallbacks"] == 0, (mode, p)
            assert p["ratios"][f"{mode}/copy wall"] > 0
        fd = m["shadowd-fd"]  # shadowd_open_fd: an index hit, else a request
        assert fd["hits"] + fd["index"] + fd["misses"] == fd["shadowed"], p
        # The warm-up's shadowd-fd run filled the daemon: the routed open's files
        # come from its index (the young ones, a fresh git repository's, copied).
        assert m["shadowd"]["index"] > 0, p
        assert m["shadowd-preload"]["preload_files"] > 0, p
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


@pytest.mark.slow
async def test_the_benchmark_runs_a_baseline_supervisor_beside_its_own(supervisor: str) -> None:
    await in_thread(150)(_baseline_benchmark)()


def _baseline_benchmark() -> None:
    """--baseline TREE builds a second supervisor from TREE (here the tree itself)
    and runs every mode with it too, each against its own supervisor's copy."""
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "programs.py"),
            *("--rounds", "1", "--quick", "--json", "--only", "git-log,perl-modules"),
            *("--modes", "copy,shadowd-preload", "--baseline", str(REPO)),
        ],
        capture_output=True,
        text=True,
        timeout=140,
        env=repo_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["modes"] == ["copy", "shadowd-preload", "copy@base", "shadowd-preload@base"]
    assert report["baseline"] == str(REPO)
    for p in report["programs"]:
        m, q = p["modes"], p["ratios"]
        for suffix in ("", "@base"):
            copy, pre = m["copy" + suffix], m["shadowd-preload" + suffix]
            assert copy["shadowed"] > 0 and pre["held"] > 0 and pre["preload_files"] > 0, p
            assert copy["cpu_us_per_file"] > 0, p  # the supervisor says its CPU time
            ratio = q[f"shadowd-preload{suffix}/copy per file"]
            assert ratio == pre["us_per_file"] / copy["us_per_file"], p


@pytest.mark.slow
async def test_the_source_step_benchmark_runs(supervisor: str) -> None:
    await in_thread(120)(_source_step)()


def _source_step() -> None:
    done = subprocess.run(
        [
            sys.executable,
            str(REPO / "benchmarks" / "source_step.py"),
            *("--rounds", "1", "--thrash", "64", "--", sys.executable, "-c", "import json"),
        ],
        capture_output=True,
        text=True,
        timeout=110,
        env=repo_env(),
        check=False,
    )
    assert done.returncode == 0, done.stderr
    out = done.stdout
    counts = [out.count(f"{name} (") for name in ("before", "after", "opath", "root")]
    assert counts == [2, 2, 2, 2], out
    assert "64 KiB written between files" in out and "close_range (3 fds)" in out
    assert "faccessat2 (no reopen)" in out and "close_range (2 fds)" in out
    files = [int(line.split("(")[1].split()[0]) for line in out.splitlines() if "files)" in line]
    assert files and min(files) > 0, out


def _hows(run: Run, path: Path) -> list[str]:
    return [r["how"] for r in checked(run)["files"] if r["path"] == str(path)]


def _rewrite_program(path: Path, size: int, gates: Path) -> str:
    """Python: open *path* every 10 ms until the gate *gates*/1 is there, then 10
    times more; rewrite it in place (same size, its old mtime put back) and say so
    (*gates*/rewritten); then the same with the gate *gates*/2. One line per open:
    the first bytes it read."""
    return f"""
import os, time
path, gates = {str(path)!r}, {str(gates)!r}

def opens(gate):
    more = 10
    while more:
        fd = os.open(path, os.O_RDONLY)
        print(os.pread(fd, {size} + 1, 0)[:8].decode(), flush=True)
        os.close(fd)
        if os.path.exists(os.path.join(gates, gate)):  # a stat: not an open
            more -= 1
        time.sleep(0.01)

opens("1")
st = os.stat(path)
with open(path, "r+b") as w:  # the same inode, the same size
    w.write(b"NEWBYTES" + bytes({size} - 8))
os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))  # the old mtime put back
assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_size == st.st_size
time.sleep(0.1)  # older than the daemon's racy window
os.close(os.open(os.path.join(gates, "rewritten"), os.O_WRONLY | os.O_CREAT))
opens("2")
"""


def _open_gate_once_indexed(
    socket_path: str, path: Path, gate: Path, runner: threading.Thread, deadline: float
) -> None:
    """Create *gate* once the daemon's index holds the version of *path* there is now
    (then the daemon serves it: from the index, or as a hit)."""
    from shadowd_client import Client

    with Client(socket_path, timeout=10) as c:
        view = c.index()
        assert view is not None
        try:
            while (fd := view.open(path.stat())) is None:
                assert runner.is_alive(), "the supervised program ended before the gate"
                assert time.monotonic() < deadline, f"{path} never cached"
                time.sleep(0.005)
            os.close(fd)
        finally:
            view.close()
    gate.touch()


@pytest.mark.parametrize("index", [True, False])
async def test_the_routed_open_misses_then_hits_then_holds_and_is_never_stale(
    supervisor: str, start_daemon: Any, tmp_path: Path, index: bool
) -> None:
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    await in_thread(60)(_tiers)(supervisor, str(daemon.socket_path), tmp_path, index)


def _tiers(supervisor: str, socket_path: str, tmp_path: Path, index: bool) -> None:
    size = 300_000
    f = make_file(tmp_path / "conf.bin", b"OLDBYTES" + bytes(size - 8))
    gates = tmp_path / "gates"
    gates.mkdir()
    settle(f)
    python = real_python3() or sys.executable
    runs: list[Run] = []

    def supervised() -> None:
        # No cold window: a fresh daemon's misses in a row would start one (the
        # interpreter's files copied here without asking for a second).
        runs.append(
            run_supervised(
                supervisor,
                "shadowd",
                [python, "-c", _rewrite_program(f, size, gates)],
                socket=socket_path,
                options=[*STEADY, "--cold", "0"] + ([] if index else ["--no-index"]),
            )
        )

    runner = threading.Thread(target=supervised, daemon=True)
    runner.start()
    # Each version is opened until the daemon holds it, however long its fill
    # takes: the daemon's copies of a uid are a few at once, and the files the
    # interpreter opened, which the supervisor copied here and told the daemon
    # of (with the index), are queued before this one.
    deadline = time.monotonic() + 40
    try:
        _open_gate_once_indexed(socket_path, f, gates / "1", runner, deadline)
        while not (gates / "rewritten").exists():
            assert runner.is_alive() and time.monotonic() < deadline
            time.sleep(0.005)
        _open_gate_once_indexed(socket_path, f, gates / "2", runner, deadline)
    finally:
        (gates / "1").touch()
        (gates / "2").touch()
        runner.join(50)
    (run,) = runs
    assert run.returncode == 0, run.stderr.decode()
    lines = run.stdout.decode().split()
    old = lines.count("OLDBYTES")
    assert lines == ["OLDBYTES"] * old + ["NEWBYTES"] * (len(lines) - old)  # never stale
    assert old >= 10 and len(lines) - old >= 10, lines
    hows = _hows(run, f)
    assert len(hows) == len(lines)
    for version, part in enumerate((hows[:old], hows[old:]), 1):
        # Each version: a miss is copied here at once while the daemon fills its
        # cache. With the index, a file it lacks is copied here at once while
        # the daemon's answer is on its way ("raced", or "miss" when the answer
        # came during the copy); without it the answer is waited for.
        unserved = ("miss", "raced") if index else ("miss",)
        first = next(i for i, how in enumerate(part) if how not in unserved)
        # Version 2 may be in the cache before its first open when the index is
        # used: a raced open of version 1 that the daemon reads only after the
        # rewrite has it fill the version it finds (its fstat of the same inode).
        assert first >= (0 if index and version == 2 else 1), part
        rest = part[first:]
        if rest[0] == "hit":
            # Served by the daemon (kept), then the supervisor's own tier: a hit
            # comes before an index hit when the entry was not in the index yet.
            assert rest == ["hit"] + ["held"] * (len(rest) - 1), part
        else:
            # With the index: from it (not kept: measured cheaper), then from the
            # tier once the late answer of a raced open, a hit, was read.
            assert index, part
            indexed = rest.count("index")
            assert rest == ["index"] * indexed + ["held"] * (len(rest) - indexed), part
            assert indexed == len(rest) or "raced" in part[:first], part
    s = run.stats
    assert s["client"]["held"] == s["held"] and s["fallbacks"] == 0
    # The interpreter's own files count too: one it opens twice may be an index
    # hit the second time, once the daemon filled it meanwhile.
    assert s["index"] >= hows.count("index") and (index or s["index"] == 0), s
    assert s["client"]["index"] == s["index"] and s["client"]["index_refused"] == 0


async def test_preload_fills_the_tier_before_the_program_starts(
    supervisor: str, start_daemon: Any, tmp_path: Path
) -> None:
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    await in_thread(60)(_preload)(supervisor, str(daemon.socket_path), tmp_path)


def _preload(supervisor: str, socket_path: str, tmp_path: Path) -> None:
    files = [make_file(tmp_path / f"f{i}", pattern(1000 + 50_000 * i)) for i in range(5)]
    settle(*files)
    cat = shutil.which("cat")
    assert cat is not None
    argv = [cat, *map(str, files)]
    expected = b"".join(p.read_bytes() for p in files)
    first = run_supervised(supervisor, "shadowd", argv, socket=socket_path, options=STEADY)
    assert first.returncode == 0 and first.stdout == expected
    listed = [r["path"] for r in checked(first)["files"]]  # what a previous run opened
    preload = tmp_path / "preload.txt"
    preload.write_text("".join(f"{p}\n" for p in [*listed, str(tmp_path / "missing"), ""]))
    deadline = time.monotonic() + 10
    while True:
        run = run_supervised(
            supervisor,
            "shadowd",
            argv,
            socket=socket_path,
            options=[*STEADY, "--preload", str(preload)],
        )
        assert run.returncode == 0 and run.stdout == expected, run.stderr
        s = checked(run)
        if s["preload_held"] == len(listed) or time.monotonic() > deadline:
            break  # the first runs' misses were filled meanwhile
        time.sleep(0.05)
    assert s["preload_files"] == len(listed) + 1 and s["preload_held"] == len(listed)
    assert s["client"]["preloaded"] == len(listed) and s["preload_ns"] > 0
    # Every file the program opens is reopened from the tier, small ones too.
    assert s["held"] == s["shadowed"] == len(listed)
    assert s["hits"] == s["misses"] == s["local"] == s["fallbacks"] == 0


@in_thread(30)
def test_options_that_do_not_go_together_are_usage_errors(supervisor: str, tmp_path: Path) -> None:
    listing = make_file(tmp_path / "list", b"/etc/hostname\n")

    def status(*args: str) -> int:
        done = subprocess.run(
            [supervisor, *args, "true"], capture_output=True, timeout=20, check=False
        )
        return done.returncode

    assert status("--mode", "copy", "--preload", str(listing)) == 2
    assert status("--open-fd", "--preload", str(listing)) == 2
    assert status("--backoff", "soon") == 2
    assert status("--held", "10,x") == 2
    assert status("--preload", str(tmp_path / "nope"), "--socket", str(tmp_path / "s")) == 125
    assert status("--backoff", "100,400", "--held", "10,1000000") == 0


async def test_a_stopped_daemon_costs_five_runs_of_true_less_than_3_s(
    supervisor: str, start_daemon: Any, tmp_path: Path
) -> None:
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    true = shutil.which("true")
    assert true is not None
    with trio.fail_after(60):
        warm = await trio.to_thread.run_sync(
            lambda: run_supervised(supervisor, "shadowd", [true], socket=str(daemon.socket_path))
        )
        assert warm.returncode == 0 and checked(warm)["shadowd_connected"]
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            runs = [
                await trio.to_thread.run_sync(
                    lambda: run_supervised(
                        supervisor, "shadowd", [true], socket=str(daemon.socket_path)
                    )
                )
                for _ in range(5)
            ]
            took = time.monotonic() - started
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
    for run in runs:
        s = checked(run)
        assert run.returncode == 0 and run.stderr == b""
        # The hello timed out (250 ms): every file copied here at once after it.
        assert not s["shadowd_connected"] and "timed out" in s["last_error"]
        assert s["fallbacks"] == s["shadowed"] > 0 and s["hits"] == 0
    assert took < 3.0, f"{took:.2f} s"


async def test_the_supervisors_timeouts_are_settable(
    supervisor: str, start_daemon: Any, tmp_path: Path
) -> None:
    """--timeouts sets the client's connect+hello wait: a stopped daemon keeps a run
    of true at least that long (the default, 250 ms, is well under it)."""
    daemon: Daemon = await start_daemon("--racy-window", "0.05")
    true = shutil.which("true")
    assert true is not None
    with trio.fail_after(60):
        os.kill(daemon.pid, signal.SIGSTOP)
        try:
            started = time.monotonic()
            run = await trio.to_thread.run_sync(
                lambda: run_supervised(
                    supervisor,
                    "shadowd",
                    [true],
                    socket=str(daemon.socket_path),
                    options=["--timeouts", "1500"],
                )
            )
            took = time.monotonic() - started
        finally:
            os.kill(daemon.pid, signal.SIGCONT)
    s = checked(run)
    assert run.returncode == 0 and not s["shadowd_connected"] and "timed out" in s["last_error"]
    assert took >= 1.5, f"{took:.2f} s"


LOOP = """
for i in $(seq 200); do
  case $i in
    70) while [ ! -e {gates}/killed ]; do sleep 0.01; done ;;
    140) while [ ! -e {gates}/restarted ]; do sleep 0.01; done ;;
  esac
  echo "run $i"
  ls {listed}
  cksum < {big}/f$(( (i - 1) / 2 ))
done
"""


async def test_a_daemon_killed_in_a_loop_of_200_runs_under_one_supervisor(
    supervisor: str, start_daemon: Any, tmp_path: Path
) -> None:
    """Every run's output as without the supervisor; back on the restarted daemon."""
    first = await start_daemon("--racy-window", "0.05", socket_name="k.sock")
    listed, big, gates = tmp_path / "listed", tmp_path / "big", tmp_path / "gates"
    for d in (listed, big, gates):
        d.mkdir()
    for name in ("alpha", "beta", "gamma"):
        make_file(listed / name, name.encode())
    files = [make_file(big / f"f{i}", os.urandom(140_000)) for i in range(100)]
    settle(*files)
    script = LOOP.format(gates=gates, listed=listed, big=big)
    sh = shutil.which("sh")
    assert sh is not None
    (gates / "killed").touch()
    (gates / "restarted").touch()
    direct = subprocess.run([sh, "-c", script], capture_output=True, timeout=60, check=True)
    (gates / "killed").unlink()
    (gates / "restarted").unlink()
    stats_path, err_path = tmp_path / "stats.json", tmp_path / "stderr"
    with open(err_path, "wb") as err_file:
        proc = subprocess.Popen(
            [supervisor, "--socket", str(first.socket_path), "--backoff", "100,400",
             "--cold", "0", "--stats", str(stats_path), "--", sh, "-c", script],
            stdout=subprocess.PIPE, stderr=err_file, stdin=subprocess.DEVNULL,
        )  # fmt: skip
    assert proc.stdout is not None
    out: list[bytes] = []
    reached = {69: threading.Event(), 139: threading.Event()}

    def read() -> None:
        assert proc.stdout is not None
        for line in proc.stdout:
            out.append(line)
            if line.startswith(b"run "):
                n = int(line.split()[1])
                if n in reached:
                    reached[n].set()

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    try:
        with trio.fail_after(60):
            await trio.to_thread.run_sync(reached[69].wait)
            first.kill()  # SIGKILL, in the middle of the loop
            (gates / "killed").touch()
            await trio.to_thread.run_sync(reached[139].wait)
            second = await start_daemon("--racy-window", "0.05", socket_name="k.sock")
            await trio.sleep(0.5)  # past the breaker's longest window (400 ms)
            (gates / "restarted").touch()
            await trio.to_thread.run_sync(lambda: proc.wait(50))
            reader.join(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        reader.join(timeout=10)
        proc.stdout.close()
    assert proc.returncode == 0, err_path.read_text()
    assert b"".join(out) == direct.stdout  # every run, the same output
    s = json.loads(stats_path.read_text())
    assert s["fds_before"] == s["fds_after"]
    # While the daemon was gone: local copies; before, its index served.
    assert s["fallbacks"] > 0 and s["index"] > 0
    # Back on the daemon without a restart of the supervisor: each file of
    # the last runs is a miss (filled meanwhile), then an index hit: the old
    # daemon's index was dropped with its connection and the new one's
    # fetched on the next (the hits reported to the new daemon, at the end).
    back = await trio.to_thread.run_sync(lambda: second_stats(second))
    assert back["index_hits"] >= 10 and back["misses"] >= 10, back
    assert "is back" in s["last_error"] or s["index"] > 0


def second_stats(d: Daemon) -> dict[str, Any]:
    from shadowd_client import Client

    with Client(d.socket_path, timeout=10) as c:
        return c.stats()


@requires_root
async def test_a_file_the_supervisor_may_not_read_is_never_served_from_the_daemons_index(
    supervisor: str, start_daemon: Any, shared_dir: Path, tmp_path: Path
) -> None:
    """The supervisor and its daemon run as one test user; the daemon has a group the
    supervisor has not, and root's file readable by that group alone is in the
    daemon's index. `cat` of it under the supervisor (which hands the routed open
    the file's O_PATH fd) gets what it gets without the supervisor: its own open
    refused (the supervisor's proof of access said no and it continued the open),
    while the readable file beside it comes from the index."""
    from shadowd_client import Client

    user, group = test_uid(7), test_uid(8)
    run = shared_dir / "run"
    run.mkdir()
    os.chown(run, user, user)
    daemon = await start_daemon(
        "--racy-window", "0.05", user=(user, user), groups=(group,), directory=run
    )
    secret = make_file(shared_dir / "secret.txt", b"not for the supervisor\n" * 9000, 0o040)
    os.chown(secret, 0, group)
    public = make_file(shared_dir / "public.txt", b"for everyone\n" * 20000)
    settle(secret, public)
    binary = shared_dir / "shadowd-supervise"
    shutil.copy(supervisor, binary)
    binary.chmod(0o755)
    stats_path = run / "stats.json"

    def cat(mode: str) -> tuple[int, bytes, bytes, dict[str, Any]]:
        done = subprocess.run(
            [str(binary), "--mode", mode, "--socket", str(daemon.socket_path), "--stats",
             str(stats_path), "--", "cat", str(secret), str(public)],
            capture_output=True, timeout=60, check=False, user=user, group=user,
            extra_groups=[], cwd=shared_dir,
        )  # fmt: skip
        return done.returncode, done.stdout, done.stderr, json.loads(stats_path.read_text())

    def supervised() -> None:
        with Client(daemon.socket_path, timeout=10) as c:  # root has the daemon cache both
            for f in (secret, public):
                os.close(c.open(str(f)))
            assert c.stats()["entries"] == 2
        plain = cat("passthrough")
        shadowed = cat("shadowd")
        assert plain[:3] == shadowed[:3], (plain[:3], shadowed[:3])
        assert plain[0] == 1 and plain[1] == public.read_bytes(), plain[:3]
        assert b"Permission denied" in plain[2], plain[2]
        s = shadowed[3]
        assert s["index_ready"] and s["open"] == "shadowd_open_routed_opath", s
        assert [(f["path"], f["how"]) for f in s["files"] if f["path"] in (str(secret),
                str(public))] == [(str(public), "index")], s["files"]  # fmt: skip
        assert s["continued_by_reason"]["open"] >= 1, s
        assert s["fds_before"] == s["fds_after"], s

    await in_thread(90)(supervised)()
