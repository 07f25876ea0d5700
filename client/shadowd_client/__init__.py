"""shadowd_client: ask the shadowd daemon for sealed, read-only copies of files.

::

    from shadowd_client import Client

    with Client() as client:
        fd = client.open("/usr/lib/x86_64-linux-gnu/libc.so.6")
        # fd is yours: a sealed memfd with its own offset; close it when done.

``Client`` is blocking and thread-safe, ``AsyncClient`` is for trio, and
``Opener`` is the helper for a supervisor's open path: it asks the daemon and
falls back to a local sealed copy (``local_copy``) whenever the daemon cannot
help. ``open_private`` (on all three) serves files the host cannot see, such
as those of an in-process kernel's disk image, shared between processes of
the same uid. Every error is a :class:`ShadowdError`.
"""

from typing import TYPE_CHECKING, Any

from shadowd.paths import default_socket_path
from shadowd.protocol import FileKey

from ._session import Answer
from .errors import (
    BadRequest,
    Busy,
    DaemonIOError,
    DaemonTimeout,
    DaemonUnavailable,
    FileTooLarge,
    FileUnstable,
    InternalError,
    NotPermitted,
    NotReadable,
    NotRegularFile,
    ProtocolViolation,
    Refused,
    ShadowdError,
    ShuttingDown,
    SizeMismatch,
    SourceError,
    TooManyOpenFiles,
    UnsealedDescriptor,
    UnsupportedProtocolVersion,
    VersionMismatch,
)
from .local import local_copy, local_copy_fd, local_private
from .opener import HeldFiles, Opener
from .sync import Client

__all__ = [
    "Answer",
    "AsyncClient",
    "BadRequest",
    "Busy",
    "Client",
    "DaemonIOError",
    "DaemonTimeout",
    "DaemonUnavailable",
    "FileKey",
    "FileTooLarge",
    "FileUnstable",
    "HeldFiles",
    "InternalError",
    "NotPermitted",
    "NotReadable",
    "NotRegularFile",
    "Opener",
    "ProtocolViolation",
    "Refused",
    "ShadowdError",
    "ShuttingDown",
    "SizeMismatch",
    "SourceError",
    "TooManyOpenFiles",
    "UnsealedDescriptor",
    "UnsupportedProtocolVersion",
    "VersionMismatch",
    "default_socket_path",
    "local_copy",
    "local_copy_fd",
    "local_private",
]

if TYPE_CHECKING:
    from .aio import AsyncClient


def __getattr__(name: str) -> Any:
    # AsyncClient needs trio; a blocking supervisor should not pay its import.
    if name == "AsyncClient":
        from .aio import AsyncClient

        return AsyncClient
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
