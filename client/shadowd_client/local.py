# The supervisor's safety net: the same kind of fd shadowd serves (a sealed,
# read-only, private memfd copy, executable iff the source is), made in this
# process; and Opener, which asks the daemon and falls back to it.
#
# Must never: return an fd of the host file itself; let shadowd being down,
# restarting or full break a supervisor's open path.
from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable

from shadowd.errors import RequestError, SourceChanged
from shadowd.fds import FdHolder
from shadowd.memfd import reopen_readonly, seal, sealed_copy
from shadowd.protocol import FileKey
from shadowd.source import SourceStat

from ._session import Fill, filled_memfd, label_for, open_source
from .errors import (
    Busy,
    DaemonUnavailable,
    FileTooLarge,
    FileUnstable,
    NotPermitted,
    NotRegularFile,
    SourceError,
    source_error,
)
from .sync import Client

logger = logging.getLogger(__name__)


def local_copy_fd(fd: int, *, name: str = "<fd>") -> int:
    """A sealed, read-only memfd copy of the regular file open at *fd* (not closed)."""
    try:
        st = SourceStat.from_stat_result(os.fstat(fd))
    except OSError as exc:
        raise source_error(exc, name) from None
    if not st.is_regular:
        # The same refusal the daemon gives, so callers handle one exception.
        raise NotRegularFile(f"only regular files are served; {name} is not one")
    for _attempt in range(3):
        try:
            sealed = sealed_copy(fd, st)
        except RequestError as exc:
            raise SourceError(f"cannot copy {name}: {exc.message}", filename=name) from None
        except SourceChanged:
            # The file changed under the copy; stat again and retry.
            try:
                st = SourceStat.from_stat_result(os.fstat(fd))
            except OSError as exc:
                raise source_error(exc, name) from None
            continue
        except OSError as exc:
            raise source_error(exc, name) from None
        try:
            return sealed.share()
        except OSError as exc:
            raise source_error(exc, name) from None
        finally:
            sealed.release()
    raise SourceError(f"{name} kept changing while it was copied", filename=name)


def local_copy(path: str | os.PathLike[str]) -> int:
    """A sealed, read-only memfd copy of *path*, made here without the daemon.

    The fd has the properties of one served by shadowd: all four seals, its
    own offset, mode r-x iff the source is executable. The caller owns it.
    """
    with FdHolder(open_source(path)) as src:
        return local_copy_fd(src.fd, name=os.fsdecode(path))


def local_private(key: FileKey, fill: Fill, *, executable: bool = False) -> int:
    """A private file made here without the daemon: *fill* writes it, we seal it.

    The same kind of fd as :meth:`Client.open_private` returns (sealed,
    read-only, its own offset), for when the daemon cannot help.
    """
    with filled_memfd(key, fill, executable=executable) as memfd:
        try:
            seal(memfd.fd, executable=executable)
            return reopen_readonly(memfd.fd)
        except OSError as exc:
            raise source_error(exc, "<private file>") from None


#: Below this size Opener copies locally instead of asking the daemon: the
#: crossover `shadowd bench` measured on the 2-vCPU machines this project is
#: developed on (a hit costs about the same as copying 256 KiB; see
#: docs/performance.md). Re-measure on your hosts and pass local_below.
DEFAULT_LOCAL_BELOW = 256 * 1024


class Opener:
    """What a supervisor calls on its open path; never fails because of shadowd.

    Asks the daemon for files of at least *local_below* bytes and copies
    smaller ones here (below some size a local copy is faster than any round
    trip). When the daemon is down, it copies locally and asks the daemon
    again after *retry_after* seconds. Files the daemon will not cache (above
    its --max-file-size, or changing) are copied locally too. Thread-safe.
    """

    def __init__(
        self,
        socket_path: str | os.PathLike[str] | None = None,
        *,
        local_below: int = DEFAULT_LOCAL_BELOW,
        retry_after: float = 1.0,
        timeout: float | None = 5.0,
    ) -> None:
        self.local_below = local_below
        self.retry_after = retry_after
        self._client: Client | None
        try:
            self._client = Client(socket_path, timeout=timeout)
        except DaemonUnavailable as exc:
            logger.warning("shadowd not usable (%s); copying locally", exc)
            self._client = None
        self._down_until = 0.0
        self._lock = threading.Lock()
        self.daemon_opens = 0
        self.local_opens = 0

    def open(self, path: str | os.PathLike[str]) -> int:
        """A sealed, read-only fd with the bytes of *path*; the caller owns it."""
        with FdHolder(open_source(path)) as src:
            return self.open_fd(src.fd, label=label_for(path), name=os.fsdecode(path))

    def open_fd(self, fd: int, *, label: str | None = None, name: str = "<fd>") -> int:
        """Like :meth:`open` for a file the caller already opened (it stays theirs)."""
        if self._daemon_usable():
            try:
                size = os.fstat(fd).st_size
            except OSError as exc:
                raise source_error(exc, name) from None
            if size >= self.local_below:
                served = self._ask(lambda client: client.open_fd(fd, label=label))
                if served is not None:
                    return served
        copy = local_copy_fd(fd, name=name)
        with self._lock:
            self.local_opens += 1
        return copy

    def open_private(
        self, namespace: str, key: FileKey, fill: Fill, *, executable: bool = False
    ) -> int:
        """:meth:`Client.open_private`, or the same kind of fd made here when the daemon
        cannot help (then *fill* may run a second time, into a memfd of our own)."""
        if self._daemon_usable():
            served = self._ask(
                lambda client: client.open_private(namespace, key, fill, executable=executable)
            )
            if served is not None:
                return served
        fd = local_private(key, fill, executable=executable)
        with self._lock:
            self.local_opens += 1
        return fd

    def _daemon_usable(self) -> bool:
        return self._client is not None and time.monotonic() >= self._down_until

    def _ask(self, request: Callable[[Client], int]) -> int | None:
        """The daemon's answer, or None when the caller should make the fd itself."""
        assert self._client is not None
        try:
            served = request(self._client)
        except (DaemonUnavailable, NotPermitted) as exc:
            # Down, or it will not serve this uid: ask again only after a while.
            with self._lock:
                self._down_until = time.monotonic() + self.retry_after
            logger.warning("shadowd unavailable (%s); copying locally", exc)
            return None
        except (FileTooLarge, FileUnstable, Busy):
            return None
        with self._lock:
            self.daemon_opens += 1
        return served

    def close(self) -> None:
        if self._client is not None:
            self._client.close()

    def __enter__(self) -> Opener:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
