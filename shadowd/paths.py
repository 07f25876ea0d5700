# Where the daemon's socket lives: the one rule shared by the daemon and the
# client library, so both find the same socket without being told.
#
# Must never: import trio or anything heavy (the client imports this), or
# guess a world-writable location such as /tmp.
from __future__ import annotations

import os
from collections.abc import Mapping

from .errors import ConfigError

ENV_SOCKET = "SHADOWD_SOCKET"
ROOT_SOCKET = "/run/shadowd/shadowd.sock"
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107


def default_socket_path(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """``$SHADOWD_SOCKET``, else the per-user runtime dir, else /run for root."""
    env = os.environ if env is None else env
    uid = os.geteuid() if uid is None else uid
    explicit = env.get(ENV_SOCKET)
    if explicit:
        return explicit
    if uid == 0:
        return ROOT_SOCKET
    runtime = env.get("XDG_RUNTIME_DIR")
    if runtime:
        return os.path.join(runtime, "shadowd", "shadowd.sock")
    raise ConfigError("no socket path: pass --socket, or set $SHADOWD_SOCKET or $XDG_RUNTIME_DIR")


def resolve_socket_path(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> str:
    """*path* when given, else :func:`default_socket_path`; checked for length."""
    resolved = os.fspath(path) if path is not None else default_socket_path(env, uid)
    if len(os.fsencode(resolved)) > MAX_SOCKET_PATH:
        raise ConfigError(
            f"socket path is {len(os.fsencode(resolved))} bytes, longer than the "
            f"{MAX_SOCKET_PATH} a Unix socket address holds: {resolved}"
        )
    return resolved
