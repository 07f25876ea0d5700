# The daemon's exception family, and the one place that turns OS errors met
# while serving a request into refusals with stable codes.
#
# Must never: let an OSError reach a client as anything but a RequestError
# with a code from protocol.ErrorCode, or hide an error that is a bug of ours
# (those become ErrorCode.INTERNAL and are logged with their traceback).
from __future__ import annotations

import errno
import os
from collections.abc import Iterator
from contextlib import contextmanager

from .protocol import ErrorCode


class DaemonError(Exception):
    """Root of the daemon's own errors."""


class ConfigError(DaemonError):
    """The daemon cannot start as configured (bad flag, socket in use, ...)."""


class RequestError(DaemonError):
    """A request is refused; ``code`` and ``message`` go into the error reply."""

    def __init__(self, code: ErrorCode, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message

    def __repr__(self) -> str:
        return f"RequestError({self.code!s}, {self.message!r})"


class SourceChanged(DaemonError):
    """The source file changed while it was being copied; the copy is discarded."""


_CODES: dict[int, ErrorCode] = {
    errno.EBADF: ErrorCode.NOT_READABLE,
    errno.EACCES: ErrorCode.NOT_READABLE,
    errno.EPERM: ErrorCode.NOT_READABLE,
    errno.EISDIR: ErrorCode.NOT_REGULAR,
    errno.EINVAL: ErrorCode.NOT_REGULAR,
    errno.ENOMEM: ErrorCode.BUSY,
    errno.ENOSPC: ErrorCode.BUSY,
    errno.EMFILE: ErrorCode.BUSY,
    errno.ENFILE: ErrorCode.BUSY,
}


def request_error_from_os(exc: OSError, what: str) -> RequestError:
    """The refusal that reports *exc*, met while doing *what*."""
    code = _CODES.get(exc.errno or 0, ErrorCode.IO_ERROR)
    reason = os.strerror(exc.errno) if exc.errno else str(exc)
    return RequestError(code, f"{what}: {reason}")


@contextmanager
def refusing_os_errors(what: str) -> Iterator[None]:
    """Turn an OSError raised in the block into a :class:`RequestError`."""
    try:
        yield
    except OSError as exc:
        raise request_error_from_os(exc, what) from exc
