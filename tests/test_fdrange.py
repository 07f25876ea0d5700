# The index's descriptor range: every number in it holds a memfd at every
# step (a cached one, or the stand-in), none is handed out twice, and a
# sealed file moved into it keeps its holder and goes back to the stand-in
# when released. Real descriptors, looked at through /proc/self/fd.
from __future__ import annotations

import errno
import fcntl
import json
import os
import random
import resource
import subprocess
import sys

import pytest

from shadowd.fdrange import LIMIT_SHARE, FdRange
from shadowd.memfd import REQUIRED_SEALS, sealed_from_bytes


def _what(n: int) -> str:
    return os.readlink(f"/proc/self/fd/{n}")


def _all_memfds(r: FdRange) -> None:
    for n in range(r.base, r.base + r.size):
        assert _what(n).startswith("/memfd:"), (n, _what(n))
        assert fcntl.fcntl(n, fcntl.F_GETFD) & fcntl.FD_CLOEXEC, n


@pytest.fixture
def fd_range() -> FdRange:
    r = FdRange.reserve(16)
    assert r is not None
    yield r
    r.close()


def test_a_range_is_all_stand_ins_above_every_open_descriptor(fd_range: FdRange) -> None:
    assert fd_range.size == 16 and fd_range.used == 0
    _all_memfds(fd_range)
    standin = os.fstat(fd_range.base)
    for n in range(fd_range.base, fd_range.base + fd_range.size):
        st = os.fstat(n)
        assert (st.st_ino, st.st_size) == (standin.st_ino, 0)
        assert fcntl.fcntl(n, fcntl.F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
    fresh = os.open("/dev/null", os.O_RDONLY)
    try:
        assert fresh not in fd_range  # the kernel gives the lowest free number
    finally:
        os.close(fresh)


def test_every_number_holds_a_memfd_through_takes_and_give_backs(fd_range: FdRange) -> None:
    rng = random.Random(7)
    standin = os.fstat(fd_range.base).st_ino
    files = [sealed_from_bytes(os.urandom(100 + i)) for i in range(24)]
    taken: dict[int, int] = {}  # number -> the memfd's inode
    try:
        for _ in range(400):
            if taken and (rng.random() < 0.45 or fd_range.used == fd_range.size):
                n = rng.choice(sorted(taken))
                del taken[n]
                fd_range.give_back(n)
                assert os.fstat(n).st_ino == standin  # the stand-in, at once
            else:
                file = rng.choice(files)
                n = fd_range.take(file.fd)
                if fd_range.used == fd_range.size and n < 0:
                    continue
                assert n in fd_range and n not in taken  # never handed out twice
                taken[n] = os.fstat(file.fd).st_ino
            _all_memfds(fd_range)
            for n, ino in taken.items():
                assert os.fstat(n).st_ino == ino
            assert fd_range.used == len(taken)
    finally:
        for n in taken:
            fd_range.give_back(n)
        for file in files:
            file.release()


def test_a_full_range_takes_nothing_and_foreign_numbers_are_not_given_back(
    fd_range: FdRange,
) -> None:
    file = sealed_from_bytes(b"x")
    try:
        numbers = [fd_range.take(file.fd) for _ in range(fd_range.size)]
        assert sorted(numbers) == list(range(fd_range.base, fd_range.base + fd_range.size))
        assert fd_range.take(file.fd) == -1
        with pytest.raises(ValueError):
            fd_range.give_back(file.fd)  # not one of ours: never closed or replaced
        assert _what(file.fd).startswith("/memfd:")
        for n in numbers:
            fd_range.give_back(n)
        assert fd_range.used == 0
    finally:
        file.release()


def test_a_sealed_file_moved_in_keeps_its_holder_and_goes_back_on_release(
    fd_range: FdRange,
) -> None:
    data = os.urandom(5000)
    file = sealed_from_bytes(data)
    holder, old = file.holder, file.fd
    ino = os.fstat(old).st_ino
    assert file.move_into(fd_range)
    n = file.fd
    assert file.holder is holder and n in fd_range and n != old
    with pytest.raises(OSError) as exc:
        fcntl.fcntl(old, fcntl.F_GETFD)  # the old number was closed
    assert exc.value.errno == errno.EBADF
    assert not file.move_into(fd_range)  # once
    served = file.share()
    try:
        assert os.pread(served, 10_000, 0) == data and os.fstat(served).st_ino == ino
    finally:
        os.close(served)
    file.release()
    assert file.closed and fd_range.used == 0
    assert os.fstat(n).st_ino != ino and os.fstat(n).st_size == 0  # the stand-in again
    _all_memfds(fd_range)


def test_after_close_free_numbers_are_closed_and_taken_ones_close_when_given_back() -> None:
    r = FdRange.reserve(4)
    assert r is not None
    file = sealed_from_bytes(b"abc")
    try:
        assert file.move_into(r)
        n = file.fd
        free = [m for m in range(r.base, r.base + r.size) if m != n]
        r.close()
        for m in free:
            with pytest.raises(OSError):
                fcntl.fcntl(m, fcntl.F_GETFD)
        assert _what(n).startswith("/memfd:")
        assert r.take(file.fd) == -1
    finally:
        file.release()
    with pytest.raises(OSError):
        fcntl.fcntl(n, fcntl.F_GETFD)


def test_the_range_takes_at_most_its_share_of_the_fd_limit() -> None:
    code = """
import json, resource
resource.setrlimit(resource.RLIMIT_NOFILE, (1024, resource.getrlimit(resource.RLIMIT_NOFILE)[1]))
from shadowd.fdrange import FdRange
r = FdRange.reserve(100_000)
print(json.dumps([r.base, r.size] if r else None))
"""
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    )
    base, size = json.loads(done.stdout)
    assert base >= 256 and 0 < size <= 1024 // LIMIT_SHARE
    assert base + size <= 1024 - 1024 // LIMIT_SHARE  # room left above it, too


def test_a_give_back_the_fd_limit_now_forbids_keeps_the_memfd_and_the_range_whole(
    fd_range: FdRange,
) -> None:
    """The soft fd limit lowered below the range from outside (prlimit): dup3 there fails,
    and the number keeps its memfd rather than fall free for anything else."""
    file = sealed_from_bytes(b"kept")
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    try:
        assert file.move_into(fd_range)
        n, ino = file.fd, os.fstat(file.fd).st_ino
        resource.setrlimit(resource.RLIMIT_NOFILE, (fd_range.base, hard))
        try:
            file.release()
        finally:
            resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
        assert os.fstat(n).st_ino == ino and fd_range.used == 1
        _all_memfds(fd_range)
        other = sealed_from_bytes(b"other")
        taken = [fd_range.take(other.fd) for _ in range(fd_range.size - 1)]
        try:
            assert n not in taken and -1 not in taken  # n is never handed out again
            assert fd_range.take(other.fd) == -1
        finally:
            for m in taken:
                fd_range.give_back(m)
            other.release()
            fd_range.close()
            fd_range.give_back(n)  # (closed now: the test leaves no fd)
    finally:
        if not file.closed:
            file.release()
