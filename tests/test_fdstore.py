# The fd store in process: names that survive the service manager's rules,
# what comes back checked like a stranger's descriptor, and the store kept
# equal to the cache (stored on insert, removed on eviction and invalidation,
# kept at shutdown). Real memfds and a real datagram socket as the manager.
from __future__ import annotations

import os
import string
from collections.abc import Iterator
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from shadowd import memfd
from shadowd.cache import Cache, CacheLimits, HostKey
from shadowd.fdrange import FdRange
from shadowd.fds import close_all
from shadowd.fdstore import MAX_NAME, FdStore, StoredName
from shadowd.index import Index
from shadowd.source import SourceStat
from shadowd.systemd import PassedFd

from .manager import NotifyReceiver

u64 = st.integers(min_value=0, max_value=(1 << 64) - 1)
i64 = st.integers(min_value=-(1 << 63), max_value=(1 << 63) - 1)


@given(
    st.tuples(u64, u64),
    st.tuples(st.integers(min_value=0, max_value=(1 << 63) - 1), i64, i64),
    st.text(),
    u64,
)
def test_names_round_trip_within_the_managers_rules(
    key: tuple[int, int], version: tuple[int, int, int], label: str, mnt: int
) -> None:
    stored = StoredName(HostKey(*key), version, label or None, mnt)
    name = stored.format()
    assert len(name) <= MAX_NAME
    assert name.isascii() and ":" not in name
    assert all(c.isprintable() for c in name)
    back = StoredName.parse(name)
    assert back is not None
    assert (back.key, back.version, back.mnt) == (stored.key, stored.version, stored.mnt)
    # The label comes back when it fit (it is only for stats).
    assert back.label in (stored.label, None)


def test_a_path_label_stays_readable() -> None:
    name = StoredName(
        HostKey(2049, 7), (10, 1, 2), "/usr/lib/x86_64-linux-gnu/libc.so.6", mnt=5
    ).format()
    assert name == "shadowd/v2/2049/7/5/10/1/2//usr/lib/x86_64-linux-gnu/libc.so.6"
    odd = StoredName(HostKey(1, 1), (1, 1, 1), "/a:b/100%/\n").format()
    assert odd.endswith("/a%3Ab/100%25/%0A")
    assert StoredName.parse(odd).label == "/a:b/100%/\n"  # type: ignore[union-attr]
    long = StoredName(HostKey(1, 1), (1, 1, 1), "/" + "x" * 300).format()
    assert long == "shadowd/v2/1/1/0/1/1/1/"


@pytest.mark.parametrize(
    "name",
    [
        "stored",
        "unknown",
        "shadowd/v3/1/1/1/1/1/1/",
        "shadowd/v1/1/1/1/1/1/",  # the format before mount IDs: not vouched for, dropped
        "shadowd/v2/1/1/1/1/1/",
        "shadowd/v2/1/1/1/1/1/x/",
        "shadowd/v2/-1/1/1/1/1/1/",
        "shadowd/v2/1/1/-1/1/1/1/",
        "shadowd/v2/1/1/1/-1/1/1/",
        f"shadowd/v2/{1 << 64}/1/1/1/1/1/",
        f"shadowd/v2/1/1/{1 << 64}/1/1/1/",
        "shadowd/v2/1/1/1/1/1/1 /",
        "shadowd/v2/1/1/1/1/1/1/" + "x" * 300,
        "shadowd/v2/\u0661/1/1/1/1/1/",  # a digit, but not an ASCII one
    ],
)
def test_names_this_format_does_not_write_are_not_parsed(name: str) -> None:
    assert StoredName.parse(name) is None


class Manager:
    """The service manager's end of NOTIFY_SOCKET, and the daemon's notifier for it."""

    def __init__(self) -> None:
        self.receiver = NotifyReceiver()
        self.notifier = self.receiver.notifier()

    def messages(self) -> list[tuple[dict[str, str], int]]:
        return self.receiver.fields()

    def close(self) -> None:
        self.notifier.close()
        self.receiver.close()


@pytest.fixture
def manager() -> Iterator[Manager]:
    m = Manager()
    try:
        yield m
    finally:
        m.close()


def sealed_fd(data: bytes, *, executable: bool = False) -> int:
    return memfd.sealed_from_bytes(data, executable=executable).holder.detach()


def name_of(ino: int, size: int, label: str | None = None) -> str:
    return StoredName(HostKey(1, ino), (size, 100, 200), label).format()


def is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


def test_restore_puts_sealed_memfds_back_and_observes_the_cache(manager: Manager) -> None:
    cache = Cache(CacheLimits(racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=10)
    a = sealed_fd(b"hello", executable=True)
    b = sealed_fd(b"world!")
    store.restore(cache, [PassedFd(a, name_of(1, 5, "/bin/hello")), PassedFd(b, name_of(2, 6))])
    assert (store.restored, store.entries, len(cache)) == (2, 2, 2)
    assert manager.messages() == []  # nothing to say: the store has them already
    entry = cache.lookup(HostKey(1, 1), (5, 100, 200))
    assert entry is not None and entry.label == "/bin/hello"
    served = entry.file.share()
    try:
        assert os.pread(served, 10, 0) == b"hello"
        assert os.fstat(served).st_mode & 0o111
    finally:
        os.close(served)

    # From now on the store follows the cache.
    c = memfd.sealed_from_bytes(b"third")
    cache.insert(HostKey(1, 3), (5, 100, 200), c, ctime_ns=200)
    c.release()
    ((fields, nfds),) = manager.messages()
    assert fields == {"FDSTORE": "1", "FDNAME": name_of(3, 5), "FDPOLL": "0"} and nfds == 1
    assert cache.lookup(HostKey(1, 2), (6, 100, 999)) is None  # changed: invalidated
    cache.remove(HostKey(1, 3))
    assert [f for f, _ in manager.messages()] == [
        {"FDSTOREREMOVE": "1", "FDNAME": name_of(2, 6)},
        {"FDSTOREREMOVE": "1", "FDNAME": name_of(3, 5)},
    ]
    # Stopping lets go of the entries, but the store keeps them for the next start.
    cache.clear()
    assert manager.messages() == [] and store.entries == 0
    assert not is_open(a)


def test_what_comes_back_is_checked_like_a_strangers_descriptor(
    manager: Manager, tmp_path: Path
) -> None:
    cache = Cache(CacheLimits(racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=10)
    unsealed = os.memfd_create("shadowd", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
    os.write(unsealed, b"12345")
    (tmp_path / "plain").write_bytes(b"12345")
    foreign = os.open(tmp_path / "plain", os.O_RDONLY | os.O_CLOEXEC)  # right size, no memfd
    wrong_size = sealed_fd(b"1234")
    r, w = os.pipe()
    unnamed = os.memfd_create("shadowd", os.MFD_CLOEXEC)
    passed = [
        PassedFd(unsealed, name_of(1, 5)),
        PassedFd(foreign, name_of(2, 5)),
        PassedFd(wrong_size, name_of(3, 5)),
        PassedFd(r, name_of(4, 0)),
        PassedFd(w, "junk"),
        PassedFd(unnamed, "unknown"),
    ]
    store.restore(cache, passed)
    assert (store.restored, store.rejected, len(cache)) == (0, 4, 0)
    assert not any(is_open(p.fd) for p in passed)
    removed = [f["FDNAME"] for f, _ in manager.messages()]
    assert sorted(removed) == sorted([name_of(i, 5) for i in (1, 2, 3)] + [name_of(4, 0), "junk"])


def test_a_memfd_named_after_its_file_comes_back(manager: Manager, tmp_path: Path) -> None:
    # What the daemon stores: copies named after their file (memfd.name_for).
    lib = tmp_path / "libfoo.so.1"
    lib.write_bytes(b"12345")
    src = os.open(lib, os.O_RDONLY | os.O_CLOEXEC)
    try:
        copy = memfd.sealed_copy(src, SourceStat.from_stat_result(os.fstat(src)))
    finally:
        os.close(src)
    fd = copy.holder.detach()
    assert os.readlink(f"/proc/self/fd/{fd}") == "/memfd:libfoo.so.1 (deleted)"
    cache = Cache(CacheLimits(racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=10)
    store.restore(cache, [PassedFd(fd, name_of(1, 5))])
    assert (store.restored, store.rejected, len(cache)) == (1, 0, 1)
    cache.clear()


def test_restore_keeps_to_the_budgets_and_forgets_the_rest(manager: Manager) -> None:
    cache = Cache(CacheLimits(max_entries=2, max_file_size=100, racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=10)
    passed = [PassedFd(sealed_fd(bytes([i]) * 10), name_of(i, 10)) for i in range(3)]
    big = PassedFd(sealed_fd(b"x" * 200), name_of(9, 200))  # above --max-file-size now
    store.restore(cache, [*passed, big])
    assert (store.restored, len(cache)) == (2, 2)
    removed = {f["FDNAME"] for f, _ in manager.messages()}
    assert removed == {name_of(0, 10), name_of(9, 200)}  # the oldest, and the too large
    assert not is_open(passed[0].fd) and not is_open(big.fd)


def test_a_second_descriptor_of_one_version_is_closed_but_not_removed(manager: Manager) -> None:
    cache = Cache(CacheLimits(racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=10)
    one, two = sealed_fd(b"same"), sealed_fd(b"same")
    store.restore(cache, [PassedFd(one, name_of(1, 4)), PassedFd(two, name_of(1, 4))])
    assert (store.restored, len(cache)) == (1, 1)
    assert is_open(one) and not is_open(two)
    # Removing by name would take the kept one out of the store too.
    assert manager.messages() == []
    cache.clear()


def test_a_bad_descriptor_under_a_good_name_does_not_cost_the_good_one(
    manager: Manager,
) -> None:
    cache = Cache(CacheLimits(racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=10)
    good = sealed_fd(b"good")
    bad = os.memfd_create("shadowd", os.MFD_CLOEXEC)
    os.write(bad, b"evil")
    store.restore(cache, [PassedFd(good, name_of(1, 4)), PassedFd(bad, name_of(1, 4))])
    # The removal takes both out of the store; the good one goes back in.
    assert [(f.get("FDSTOREREMOVE"), f.get("FDSTORE"), n) for f, n in manager.messages()] == [
        ("1", None, 0),
        (None, "1", 1),
    ]
    assert store.entries == 1
    cache.clear()


def test_the_store_holds_no_more_than_the_manager_keeps(manager: Manager) -> None:
    cache = Cache(CacheLimits(racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=2)
    store.restore(cache, [])
    for i in range(4):
        f = memfd.sealed_from_bytes(string.ascii_letters.encode()[i : i + 1])
        cache.insert(HostKey(1, i), (1, 100, 200), f, ctime_ns=200)
        f.release()
    assert store.entries == 2 and len(manager.messages()) == 2
    cache.remove(HostKey(1, 0))  # a stored one leaves: room for the next insert
    f = memfd.sealed_from_bytes(b"z")
    cache.insert(HostKey(1, 9), (1, 100, 200), f, ctime_ns=200)
    f.release()
    assert store.entries == 2
    assert [f.get("FDNAME") for f, _ in manager.messages()] == [name_of(0, 1), name_of(9, 1)]
    cache.clear()


def test_private_entries_are_never_stored(manager: Manager) -> None:
    from shadowd.cache import PrivateKey

    cache = Cache(CacheLimits(racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=10)
    store.restore(cache, [])
    f = memfd.sealed_from_bytes(b"image")
    cache.insert(PrivateKey(1000, "lkl:abc", 5), (5, 1, 2), f, private=True, ctime_ns=2)
    f.release()
    assert store.entries == 0 and manager.messages() == []
    cache.clear()


def test_a_store_that_waits_sends_the_memfd_the_index_renumbered_meanwhile(
    manager: Manager,
) -> None:
    """The fd store observes the cache before the index does (its observer is added at
    restore, the index's at serve), so a store that must wait (the manager's queue is
    full) was queued with the memfd's number from before the index moved it into its
    descriptor range and closed that number. What goes to the manager once there is
    room must be that memfd, not whatever took the old number meanwhile."""
    cache = Cache(CacheLimits(racy_window_ns=0))
    store = FdStore(manager.notifier, max_entries=10)
    store.restore(cache, [])
    index = Index(64, FdRange.reserve(4))
    cache.add_observer(index)
    other = None
    try:
        assert index.fd_range is not None
        sent = 0
        while manager.notifier.queued == 0:  # the manager reads nothing for now
            assert manager.notifier.send(f"STATUS={sent}")
            sent += 1
            assert sent < 100_000
        sealed = memfd.sealed_from_bytes(b"stored while the manager was full")
        old, ino = sealed.fd, os.fstat(sealed.fd).st_ino
        cache.insert(HostKey(1, 7), (33, 100, 200), sealed, ctime_ns=200, wd=1)
        sealed.release()
        assert sealed.fd in index.fd_range and not is_open(old)  # moved, old number free
        r, w = os.pipe()
        os.dup2(r, old)  # what the kernel may give that number to next: a client's pipe
        os.close(r)
        os.close(w)
        other = old
        got: list[tuple[str, list[int]]] = []
        for _ in range(100_000):
            got += manager.receiver.receive_all()
            manager.notifier.flush()
            if manager.notifier.queued == 0:
                break
        got += manager.receiver.receive_all()
        assert not manager.notifier.broken
        stores = [fds for text, fds in got if text.startswith("FDSTORE=1")]
        try:
            assert len(stores) == 1 and len(stores[0]) == 1
            assert os.fstat(stores[0][0]).st_ino == ino  # the memfd, not the pipe
        finally:
            close_all([fd for _, fds in got for fd in fds])
    finally:
        if other is not None:
            os.close(other)
        cache.clear()
        index.close()
