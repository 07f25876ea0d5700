# File systems that tests mount for themselves (needs root): a fresh tmpfs,
# whose anonymous device number is freed again by its unmount, and an ext4
# file system on a loop-mounted image in a temporary directory.
#
# Must never: leave a mount or a loop device behind when a test ends, fails
# or is skipped; mount anywhere but under the directory the test gave it.
from __future__ import annotations

import contextlib
import ctypes
import os
import shutil
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

MNT_DETACH = 2
_libc = ctypes.CDLL(None, use_errno=True)


def mount(source: str, target: Path, fstype: str, flags: int = 0, data: str = "") -> None:
    """mount(2); raises OSError."""
    if _libc.mount(
        source.encode(), os.fsencode(target), fstype.encode(), flags, data.encode() or None
    ):
        err = ctypes.get_errno()
        raise OSError(err, f"mount {fstype} on {target}: {os.strerror(err)}")


def umount(target: Path, *, attempts: int = 50) -> None:
    """Unmount *target*, waiting a little while it is busy (a daemon closing its fds)."""
    for _ in range(attempts):
        if _libc.umount2(os.fsencode(target), 0) == 0:
            return
        err = ctypes.get_errno()
        if err == 16:  # EBUSY
            time.sleep(0.02)
            continue
        raise OSError(err, f"umount {target}: {os.strerror(err)}")
    raise OSError(16, f"umount {target}: still busy")


def detach(target: Path) -> None:
    """A lazy unmount that never fails (for cleanup)."""
    _libc.umount2(os.fsencode(target), MNT_DETACH)


def is_mounted(target: Path) -> bool:
    return os.path.ismount(target)


def mount_tmpfs(target: Path, *, size: str = "64m", mode: int = 0o755) -> int:
    """A fresh tmpfs on *target* (made if needed); returns its device number."""
    target.mkdir(exist_ok=True)
    mount("tmpfs", target, "tmpfs", 0, f"size={size},mode={mode:o}")
    return os.stat(target).st_dev


@contextlib.contextmanager
def tmpfs(target: Path, *, size: str = "64m") -> Iterator[Path]:
    """A tmpfs on *target* for the block; skips the test where it cannot be mounted."""
    try:
        mount_tmpfs(target, size=size)
    except OSError as exc:  # pragma: no cover - depends on the machine
        pytest.skip(f"cannot mount a tmpfs here: {exc}")
    try:
        yield target
    finally:
        if is_mounted(target):
            detach(target)


@contextlib.contextmanager
def ext4(target: Path, *, size_mib: int = 64) -> Iterator[Path]:
    """An ext4 file system on a loop-mounted image next to *target*; skips where impossible."""
    mkfs = shutil.which("mkfs.ext4") or shutil.which("mke2fs")
    if mkfs is None:
        pytest.skip("no mkfs.ext4 here")
    image = target.parent / f"{target.name}.img"
    with open(image, "wb") as f:
        f.truncate(size_mib << 20)
    made = subprocess.run(
        [mkfs, "-q", "-F", "-t", "ext4", "-E", "lazy_itable_init=0,lazy_journal_init=0", image],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        image.unlink()
        pytest.skip(f"cannot make an ext4 image: {made.stderr.decode(errors='replace')}")
    target.mkdir(exist_ok=True)
    attached = subprocess.run(
        ["mount", "-o", "loop", "-t", "ext4", str(image), str(target)],
        capture_output=True,
        check=False,
    )
    if attached.returncode != 0:
        image.unlink()
        pytest.skip(f"cannot loop-mount an ext4 image: {attached.stderr.decode(errors='replace')}")
    try:
        target.chmod(0o755)
        yield target
    finally:
        # umount(8) frees the loop device it set up (autoclear).
        subprocess.run(["umount", str(target)], capture_output=True, check=False)
        if is_mounted(target):
            subprocess.run(["umount", "-l", str(target)], capture_output=True, check=False)
        image.unlink(missing_ok=True)
