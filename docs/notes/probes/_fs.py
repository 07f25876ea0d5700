# Shared by the probes: fresh file systems to try a kernel behaviour on
# (tmpfs, ext4 on a loop image, overlayfs over tmpfs, the tests' FUSE file
# system), each mounted under a temporary directory and gone afterwards.
#
# Run the probes as root from the repository root, with the project's
# interpreter: `.venv/bin/python docs/notes/probes/NAME.py`.
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

REPO = Path(__file__).resolve().parents[3]
sys.path.insert(0, str(REPO))

from tests.fusefs import FuseFile, HangingFS  # noqa: E402
from tests.mounts import detach, ext4, mount, tmpfs  # noqa: E402

FUSE_FILE = b"fuse file bytes\n" * 256


@contextlib.contextmanager
def overlay(base: Path) -> Iterator[Path]:
    """overlayfs whose lower and upper layers are on one tmpfs."""
    with tmpfs(base / "ovl-backing") as backing:
        for d in ("lower", "upper", "work"):
            (backing / d).mkdir()
        target = base / "overlay"
        target.mkdir()
        opts = f"lowerdir={backing}/lower,upperdir={backing}/upper,workdir={backing}/work"
        mount("overlay", target, "overlay", 0, opts)
        try:
            yield target
        finally:
            detach(target)


@contextlib.contextmanager
def fuse(base: Path) -> Iterator[tuple[Path, HangingFS]]:
    """The tests' FUSE file system with one file, ``f`` (root's, mode 0644)."""
    target = base / "fuse"
    target.mkdir()
    fs = HangingFS(target, files={"f": FuseFile(FUSE_FILE, ino=77, mode=0o644)})
    try:
        yield target, fs
    finally:
        fs.close()


@contextlib.contextmanager
def writable_filesystems() -> Iterator[list[tuple[str, Path]]]:
    """(name, directory) of a fresh tmpfs, ext4 (loop image) and overlayfs over tmpfs."""
    with tempfile.TemporaryDirectory(prefix="probe-") as tmp, contextlib.ExitStack() as stack:
        base = Path(tmp)
        base.chmod(0o755)
        found = [("tmpfs", stack.enter_context(tmpfs(base / "tmpfs")))]
        found.append(("ext4", stack.enter_context(ext4(base / "ext4"))))
        found.append(("overlay", stack.enter_context(overlay(base))))
        yield found


def run(cmd: list[str]) -> str:
    return subprocess.run(cmd, capture_output=True, text=True, check=False).stdout.strip()


def show(fact: str, value: object) -> None:
    print(f"{fact}: {value}", flush=True)


def errno_name(exc: OSError) -> str:
    import errno

    return errno.errorcode.get(exc.errno or 0, str(exc.errno))


def attempt(fn: object, *args: object) -> str:
    """'ok' (and the result when not None), or the errno name of the OSError."""
    try:
        result = fn(*args)  # type: ignore[operator]
    except OSError as exc:
        return errno_name(exc)
    return "ok" if result in (None, 0) else f"ok ({result})"


def kernel() -> str:
    return os.uname().release
