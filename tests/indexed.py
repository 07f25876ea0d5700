# An in-process index over a cache of real files, with no daemon: what the
# readers of the index (IndexView in tests/test_index.py, the C client in
# tests/test_c_client.py) are tested against, slot by slot.
from __future__ import annotations

import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from shadowd_client import Client

from shadowd.cache import Cache, CacheLimits, HostKey
from shadowd.fdrange import FdRange
from shadowd.index import LIVE, Index, read_slot, slot_of
from shadowd.memfd import sealed_from_bytes

from .conftest import make_file


class IndexedCache:
    """*n* files of a directory, cached and published in an index of 64 slots.

    *ranged*: the index keeps its memfds in a descriptor range of 8 numbers
    (shadowd/fdrange.py), which readers open without the O_PATH step; else
    none, and every reader takes it.
    """

    def __init__(self, tmp_path: Path, n: int = 4, *, ranged: bool = False) -> None:
        self.cache = Cache(CacheLimits(racy_window_ns=0))
        self.index = Index(64, FdRange.reserve(8) if ranged else None)
        self.cache.add_observer(self.index)
        self.files: list[tuple[Path, os.stat_result]] = []
        for i in range(n):
            f = make_file(tmp_path / f"f{i}", os.urandom(3000 + i))
            st = f.stat()
            sealed = sealed_from_bytes(f.read_bytes())
            self.cache.insert(
                HostKey(st.st_dev, st.st_ino),
                (st.st_size, st.st_mtime_ns, st.st_ctime_ns),
                sealed,
                ctime_ns=1,
                wd=1,  # as if watched: only watched entries are published
            )
            sealed.release()
            self.files.append((f, st))

    def entry(self, i: int) -> Any:
        _, st = self.files[i]
        return self.cache.peek(HostKey(st.st_dev, st.st_ino))

    def slot_number(self, st: os.stat_result) -> int:
        """The slot that holds the file whose stat is *st*."""
        start = slot_of(st.st_dev, st.st_ino, self.index.slots)
        probes = [(start + i) % self.index.slots for i in range(16)]
        return next(k for k in probes if read_slot(self.index._map, k).ino == st.st_ino)

    def close(self) -> None:
        self.cache.clear()
        self.index.close()


@contextmanager
def standing_in(number: int, other: int) -> Iterator[None]:
    """*other*'s file at descriptor *number* for the block (what a slot names is then
    something else), and *number*'s own file put back after."""
    saved = os.dup(number)
    try:
        os.dup2(other, number)
        yield
    finally:
        os.dup2(saved, number)
        os.close(saved)


def range_number_of(socket_path: Path, f: Path) -> int:
    """*f* cached by the daemon at *socket_path* (opened twice: the first open waits for
    the copy) and the descriptor number its live slot names, checked to be in the
    daemon's descriptor range."""
    with Client(socket_path, timeout=10) as c:
        for _ in range(2):
            os.close(c.open(f))
        view = c.index()
        assert view is not None
        try:
            slots = [read_slot(view._map, k) for k in range(view.slots)]
            fds = [s.fd for s in slots if s.state == LIVE and s.ino == f.stat().st_ino]
            assert len(fds) == 1 and fds[0] in view.range, (fds, view.range)
            return fds[0]
        finally:
            view.close()
