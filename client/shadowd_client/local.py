# The supervisor's safety net: the same kind of fd shadowd serves (a sealed,
# read-only, private memfd copy, executable iff the source is), made in this
# process without the daemon (opener.py decides when).
#
# Must never: return an fd of the host file itself.
from __future__ import annotations

import logging
import os

from shadowd.errors import RequestError, SourceChanged
from shadowd.fds import FdHolder
from shadowd.memfd import reopen_readonly, seal, sealed_copy
from shadowd.protocol import FileKey
from shadowd.source import SourceStat

from ._session import Fill, filled_memfd, open_source
from .errors import (
    NotRegularFile,
    SourceError,
    source_error,
)

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
    read-only, its own offset), for when the daemon cannot help. A memfd that
    cannot be sealed (*fill* kept a writable mapping of it, or sealed it
    itself) is copied, as the daemon copies one: what *fill* writes later is
    not served.
    """
    with filled_memfd(key, fill, executable=executable) as memfd:
        try:
            seal(memfd.fd, executable=executable)
            return reopen_readonly(memfd.fd)
        except OSError:
            pass
        return local_copy_fd(memfd.fd, name="<private file>")
