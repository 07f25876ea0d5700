# What the loop may touch: files of local filesystems yes, FUSE no, decided
# by the mount's unique ID where the kernel gives one (so a device number
# reused by a new mount cannot borrow an old mount's verdict), by the mount
# table elsewhere. Real mounts (tmpfs, FUSE) where root may make them.
from __future__ import annotations

import ctypes
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from shadowd.source import MountTrust, SourceStat, stat_nosync, statmount_magic

from .conftest import repo_env, requires_root
from .fusefs import HangingFS, mounted


def _stat(path: Path) -> SourceStat:
    fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    try:
        st = stat_nosync(fd)
    finally:
        os.close(fd)
    assert st is not None
    return st


def _has_unique_mount_ids(tmp_path: Path) -> bool:
    f = tmp_path / "probe"
    f.write_bytes(b"x")
    st = _stat(f)
    return bool(st.mnt) and statmount_magic(st.mnt) is not None


def test_files_here_are_local_by_mount_and_by_device(tmp_path: Path) -> None:
    f = tmp_path / "f"
    f.write_bytes(b"local")
    st = _stat(f)
    assert MountTrust().is_local(st.dev, st.mnt)
    assert MountTrust().is_local(st.dev)  # the mount table's way


def test_a_mount_this_process_cannot_see_is_not_local(tmp_path: Path) -> None:
    if not _has_unique_mount_ids(tmp_path):
        pytest.skip("no unique mount IDs (statx STATX_MNT_ID_UNIQUE, statmount) here")
    with pytest.raises(OSError):
        statmount_magic((1 << 62) + 12345)  # no such mount
    assert not MountTrust().is_local(os.makedev(0, 999), (1 << 62) + 12345)


def test_stat_without_a_mount_id_compares_equal_to_one_with(tmp_path: Path) -> None:
    """The copy's check (fstat after it) must not see a change in the mount ID alone."""
    f = tmp_path / "f"
    f.write_bytes(b"same")
    st = _stat(f)
    assert st.same_file_as(st._replace(mnt=0))
    assert not st.same_file_as(st._replace(size=st.size + 1))


@pytest.fixture
def fuse_dir(tmp_path: Path) -> Iterator[HangingFS]:
    with mounted(tmp_path / "fuse") as fs:
        yield fs


@requires_root
def test_fuse_is_not_local_even_when_its_device_number_looks_like_tmpfs(
    fuse_dir: HangingFS, tmp_path: Path
) -> None:
    """A device number freed by a tmpfs and taken by a FUSE mount within the
    table's refresh interval: the stale table says tmpfs; the mount ID says FUSE.
    """
    if not _has_unique_mount_ids(tmp_path):
        pytest.skip("no unique mount IDs (statx STATX_MNT_ID_UNIQUE, statmount) here")
    st = _stat(fuse_dir.mountpoint / "ok")
    assert os.major(st.dev) == 0 and st.mnt
    trust = MountTrust()
    assert not trust.is_local(st.dev, st.mnt)
    assert not trust.is_local(st.dev)  # the table knows it as fuse too
    stale = MountTrust()
    stale.refresh()
    stale._devs[st.dev] = "tmpfs"  # what the table said before the reuse
    assert stale.is_local(st.dev)  # the device number alone is fooled
    assert not stale.is_local(st.dev, st.mnt)  # the mount ID is not


@requires_root
def test_a_tmpfs_mounted_here_is_local_by_its_mount_id(tmp_path: Path) -> None:
    if not _has_unique_mount_ids(tmp_path):
        pytest.skip("no unique mount IDs (statx STATX_MNT_ID_UNIQUE, statmount) here")
    mnt = tmp_path / "tmpfs"
    mnt.mkdir()
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.mount(b"shadowd-test", os.fsencode(mnt), b"tmpfs", 0, b"size=1m"):
        pytest.skip(f"cannot mount a tmpfs here: {os.strerror(ctypes.get_errno())}")
    try:
        f = mnt / "f"
        f.write_bytes(b"in tmpfs")
        st = _stat(f)
        assert os.major(st.dev) == 0
        assert MountTrust().is_local(st.dev, st.mnt)
    finally:
        libc.umount2(os.fsencode(mnt), 2)  # MNT_DETACH


@requires_root
def test_a_mount_of_another_namespace_falls_back_to_the_device_number(tmp_path: Path) -> None:
    """The shipped unit gives the daemon its own mount namespace (PrivateTmp=...):
    statmount cannot see the host's mounts there, and their files must stay local."""
    f = tmp_path / "f"
    f.write_bytes(b"host file")
    code = f"""
import ctypes, os
from shadowd.source import MountTrust, stat_nosync
fd = os.open({str(f)!r}, os.O_RDONLY)
st = stat_nosync(fd)
if ctypes.CDLL(None, use_errno=True).unshare(0x20000):  # CLONE_NEWNS
    raise SystemExit("unshare: " + os.strerror(ctypes.get_errno()))
print(MountTrust().is_local(st.dev, st.mnt), bool(st.mnt))
"""
    env = repo_env()
    proc = subprocess.run(
        [sys.executable, "-c", code],
        check=False,
        capture_output=True,
        text=True,
        timeout=30,
        env=env,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot make a mount namespace here: {proc.stderr.strip()}")
    assert proc.stdout.split()[0] == "True", proc.stdout


@requires_root
def test_a_device_number_reused_by_fuse_right_after_an_unmount_is_never_trusted(
    tmp_path: Path,
) -> None:
    """The mount table is re-read as soon as the kernel says it changed: no window
    in which a freed anonymous device number still counts as the old tmpfs."""
    libc = ctypes.CDLL(None, use_errno=True)
    trust = MountTrust()
    try:
        for attempt in range(5):
            mnt = tmp_path / f"tmpfs{attempt}"
            mnt.mkdir()
            if libc.mount(b"shadowd-test", os.fsencode(mnt), b"tmpfs", 0, b"size=1m"):
                pytest.skip(f"cannot mount a tmpfs here: {os.strerror(ctypes.get_errno())}")
            (mnt / "f").write_bytes(b"x")
            dev = _stat(mnt / "f").dev
            assert trust.is_local(dev)  # by the device number, as an old kernel does
            libc.umount2(os.fsencode(mnt), 2)
            with mounted(tmp_path / f"fuse{attempt}") as fs:
                st = _stat(fs.mountpoint / "ok")
                if st.dev != dev:
                    continue  # the number went elsewhere this time: try again
                assert not trust.is_local(st.dev)
                assert not trust.is_local(st.dev, st.mnt)
                return
        pytest.skip("the freed device number was never reused by the FUSE mount")
    finally:
        trust.close()
