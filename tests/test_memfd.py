# memfd.py on real memfds: exact copies, seals, modes, private offsets.
from __future__ import annotations

import errno
import fcntl
import mmap
import os
import threading
from pathlib import Path

import pytest

from shadowd import memfd
from shadowd.errors import SourceChanged
from shadowd.source import SourceStat


def stat_of(fd: int) -> SourceStat:
    return SourceStat.from_stat_result(os.fstat(fd))


def copy_of(path: Path) -> memfd.SealedFile:
    fd = os.open(path, os.O_RDONLY)
    try:
        return memfd.sealed_copy(fd, stat_of(fd))
    finally:
        os.close(fd)


def test_copy_is_exact_and_sealed(tmp_path: Path) -> None:
    data = os.urandom(3 * 1024 * 1024 + 17)
    src = tmp_path / "blob"
    src.write_bytes(data)
    sealed = copy_of(src)
    fd = sealed.share()
    try:
        assert os.pread(fd, len(data) + 1, 0) == data
        seals = memfd.seals_of(fd)
        assert seals & memfd.REQUIRED_SEALS == memfd.REQUIRED_SEALS
        assert fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
        assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:blob (deleted)"
    finally:
        os.close(fd)
        sealed.release()
    assert sealed.closed


def test_empty_file(tmp_path: Path) -> None:
    src = tmp_path / "empty"
    src.write_bytes(b"")
    sealed = copy_of(src)
    fd = sealed.share()
    assert os.fstat(fd).st_size == 0 and memfd.is_sealed(fd)
    os.close(fd)
    sealed.release()


def test_shares_have_independent_offsets() -> None:
    sealed = memfd.sealed_from_bytes(b"0123456789")
    a, b = sealed.share(), sealed.share()
    try:
        assert os.read(a, 4) == b"0123"
        assert os.read(b, 2) == b"01"  # b's offset did not move with a's
        assert os.read(a, 2) == b"45"
        assert os.lseek(a, 0, os.SEEK_CUR) == 6 and os.lseek(b, 0, os.SEEK_CUR) == 2
        # A dup would share the offset; that is why shares are reopens.
        d = os.dup(a)
        assert os.lseek(d, 0, os.SEEK_CUR) == 6
        os.close(d)
    finally:
        os.close(a)
        os.close(b)
        sealed.release()


def test_writes_refused_even_through_a_read_write_reopen() -> None:
    sealed = memfd.sealed_from_bytes(b"hello")
    fd = sealed.share()
    try:
        with pytest.raises(OSError) as info:
            os.write(fd, b"x")
        assert info.value.errno == errno.EBADF
        with pytest.raises(OSError):
            os.ftruncate(fd, 0)
        try:
            rw = os.open(f"/proc/self/fd/{fd}", os.O_RDWR)
        except PermissionError:
            rw = None  # mode 0444 already stops non-root here
        if rw is not None:  # root passes the mode check; the seals still hold
            try:
                for attempt in (
                    lambda: os.write(rw, b"x"),
                    lambda: os.pwrite(rw, b"x", 0),
                    lambda: os.ftruncate(rw, 0),
                    lambda: os.ftruncate(rw, 100),
                    lambda: mmap.mmap(rw, 5, mmap.MAP_SHARED, mmap.PROT_WRITE),
                ):
                    with pytest.raises(OSError) as info2:
                        attempt()
                    assert info2.value.errno == errno.EPERM
                with pytest.raises(OSError):
                    fcntl.fcntl(rw, fcntl.F_ADD_SEALS, 0)  # F_SEAL_SEAL
            finally:
                os.close(rw)
        assert os.pread(fd, 10, 0) == b"hello"
    finally:
        os.close(fd)
        sealed.release()


@pytest.mark.parametrize(("mode", "exec_expected"), [(0o755, True), (0o644, False), (0o744, True)])
def test_exec_bit_follows_source(tmp_path: Path, mode: int, exec_expected: bool) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"#!/bin/sh\n")
    src.chmod(mode)
    sealed = copy_of(src)
    fd = sealed.share()
    try:
        st = os.fstat(fd)
        assert bool(st.st_mode & 0o111) is exec_expected
        assert st.st_mode & 0o222 == 0
        # The exec bits are frozen where the kernel knows F_SEAL_EXEC.
        if memfd.seals_of(fd) & memfd.F_SEAL_EXEC:
            with pytest.raises(OSError):
                os.fchmod(fd, 0o777 if not exec_expected else 0o444)
    finally:
        os.close(fd)
        sealed.release()


def test_longer_than_stat_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"abcdef")
    fd = os.open(src, os.O_RDONLY)
    try:
        st = stat_of(fd)._replace(size=3)
        with pytest.raises(SourceChanged):
            memfd.sealed_copy(fd, st)
        with pytest.raises(SourceChanged):
            memfd.sealed_copy(fd, stat_of(fd)._replace(mtime_ns=1))
    finally:
        os.close(fd)


def test_shorter_than_stat_is_refused(tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"abc")
    fd = os.open(src, os.O_RDONLY)
    try:
        with pytest.raises(SourceChanged):
            memfd.sealed_copy(fd, stat_of(fd)._replace(size=10))
    finally:
        os.close(fd)


def test_pread_fallback_copies_exactly(tmp_path: Path) -> None:
    data = os.urandom(2_500_000)
    src = tmp_path / "f"
    src.write_bytes(data)
    s = os.open(src, os.O_RDONLY)
    d = memfd.create(executable=False)
    try:
        memfd._copy_pread(d, s, 0, len(data))
        assert os.pread(d, len(data) + 1, 0) == data
    finally:
        os.close(s)
        os.close(d)


def test_released_file_refuses_share() -> None:
    sealed = memfd.sealed_from_bytes(b"x")
    sealed.release()
    with pytest.raises(ValueError):
        sealed.share()
    with pytest.raises(ValueError):
        sealed.release()


def test_sealing_a_file_busy_for_a_moment_waits_for_it() -> None:
    # A writable shared mapping makes F_ADD_SEALS fail with EBUSY, as pages
    # pinned for a moment after a sendfile do under load. seal() tries again
    # for a while; the mapping goes away part way.
    fd = memfd.create(executable=False)
    try:
        os.write(fd, b"busy")
        mapping = mmap.mmap(fd, 4, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        timer = threading.Timer(0.015, mapping.close)
        timer.start()
        memfd.seal(fd, executable=False)
        timer.join()
        assert memfd.is_sealed(fd)
        with pytest.raises(OSError):
            os.write(fd, b"x")
    finally:
        os.close(fd)


def test_sealing_a_file_that_stays_busy_fails() -> None:
    fd = memfd.create(executable=False)
    try:
        os.write(fd, b"busy")
        with (
            mmap.mmap(fd, 4, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE),
            pytest.raises(OSError) as info,
        ):
            memfd.seal(fd, executable=False)
        assert info.value.errno == errno.EBUSY
        assert not memfd.is_sealed(fd)
    finally:
        os.close(fd)


@pytest.mark.parametrize("layout", ["hole-data-hole", "data-hole", "hole-only", "dense"])
def test_holes_of_a_sparse_file_stay_holes_in_the_copy(tmp_path: Path, layout: str) -> None:
    """A sparse file's holes cost the copy no memory, and its bytes are exact."""
    size = 64 * 1024 * 1024
    path = tmp_path / "sparse"
    chunk = os.urandom(8192)
    with open(path, "wb") as f:
        if layout == "dense":
            size = 256 * 1024
            f.write(os.urandom(size))
        else:
            f.truncate(size)
            if layout == "hole-data-hole":
                f.seek(size // 2)
                f.write(chunk)
            elif layout == "data-hole":
                f.write(chunk)
    src = os.open(path, os.O_RDONLY)
    try:
        os.lseek(src, 123, os.SEEK_SET)  # the sender's offset, shared with a passed fd
        sealed = memfd.sealed_copy(src, SourceStat.from_stat_result(os.fstat(src)))
        assert os.lseek(src, 0, os.SEEK_CUR) == 123  # put back
    finally:
        os.close(src)
    try:
        st = os.fstat(sealed.fd)
        assert st.st_size == size
        if layout == "dense":
            assert st.st_blocks * 512 >= size
        else:
            assert st.st_blocks * 512 <= 64 * 1024  # the data, not the holes
        with open(path, "rb") as f:
            want = f.read()
        assert os.pread(sealed.fd, size + 1, 0) == want
    finally:
        sealed.release()


def test_a_copy_is_named_after_its_files_basename(tmp_path: Path) -> None:
    def name_of_copy(path: Path) -> str:
        sealed = copy_of(path)
        try:
            return os.readlink(f"/proc/self/fd/{sealed.fd}")
        finally:
            sealed.release()

    (tmp_path / "libssl.so.3").write_bytes(b"ssl")
    assert name_of_copy(tmp_path / "libssl.so.3") == "/memfd:libssl.so.3 (deleted)"
    # The longest name a memfd takes, cut between characters, never inside one.
    long = tmp_path / ("é" * 127)  # 254 bytes of UTF-8
    long.write_bytes(b"x")
    name = memfd.name_for(os.open(long, os.O_RDONLY | os.O_CLOEXEC))
    assert name == "é" * 124 and len(name.encode()) == 248 <= memfd.MAX_MEMFD_NAME


def test_names_come_from_the_kernel_not_from_the_path_used(tmp_path: Path) -> None:
    a = tmp_path / "old-name.so"
    a.write_bytes(b"x")
    fd = os.open(a, os.O_RDONLY | os.O_CLOEXEC)
    try:
        a.rename(tmp_path / "new-name.so")
        assert memfd.name_for(fd) == "new-name.so"
        (tmp_path / "new-name.so").unlink()
        assert memfd.name_for(fd) == "new-name.so"  # without the kernel's " (deleted)"
    finally:
        os.close(fd)
    odd = tmp_path / "really (deleted)"
    odd.write_bytes(b"x")
    fd = os.open(odd, os.O_RDONLY | os.O_CLOEXEC)
    try:
        assert memfd.name_for(fd) == "really (deleted)"  # still linked: its real name
    finally:
        os.close(fd)


def test_what_has_no_file_name_is_named_shadowd() -> None:
    other = os.memfd_create("chosen-by-a-client", os.MFD_CLOEXEC)
    r, w = os.pipe()
    try:
        assert memfd.name_for(other) == "shadowd"  # a published private file
        assert memfd.name_for(r) == "shadowd"
        assert memfd.name_for(12345) == "shadowd"  # not even open
    finally:
        for fd in (other, r, w):
            os.close(fd)


def test_a_local_copy_is_named_after_its_file(tmp_path: Path) -> None:
    from shadowd_client import local_copy

    (tmp_path / "libcrypto.so.3").write_bytes(b"crypto")
    fd = local_copy(tmp_path / "libcrypto.so.3")
    try:
        assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:libcrypto.so.3 (deleted)"
    finally:
        os.close(fd)


def test_a_forked_child_reopens_its_own_memfds_not_its_parents(tmp_path: Path) -> None:
    """A supervisor that forks: the child's copies are reopened through the child's
    /proc/self/fd, not the one it inherited (the parent's, whose fd of the same number
    is here a decoy)."""
    from shadowd_client.local import local_copy_fd

    from shadowd.fds import LONG_LIVED_BASE

    f = tmp_path / "lib.so"
    f.write_bytes(os.urandom(5000))
    want = f.read_bytes()
    src = os.open(f, os.O_RDONLY | os.O_CLOEXEC)
    os.close(local_copy_fd(src))  # /proc/self/fd is opened once, before the fork
    decoy = memfd.sealed_from_bytes(b"WRONG" * 1000)
    go_r, go_w = os.pipe()
    res_r, res_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: its copy lands on the number the parent fills below
        verdict = b"bad"
        try:
            os.read(go_r, 1)
            fd = local_copy_fd(src)
            verdict = b"ok" if os.pread(fd, len(want) + 1, 0) == want else b"wrong"
        finally:
            os.write(res_w, verdict)
            os._exit(0)
    try:
        high = fcntl.fcntl(go_r, fcntl.F_DUPFD_CLOEXEC, LONG_LIVED_BASE)
        os.dup2(decoy.fd, high)  # where the child's copy will be
        os.write(go_w, b"g")
        verdict = os.read(res_r, 16)
        os.close(high)
    finally:
        os.waitpid(pid, 0)
        for fd in (src, go_r, go_w, res_r, res_w):
            os.close(fd)
        decoy.release()
    assert verdict == b"ok"
