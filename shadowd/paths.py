# Where the daemon's socket lives: the one rule by which every client (the
# Python clients, `shadowd stats`) finds the daemon without being told, and
# the rule by which `shadowd serve` picks where to create it. The C client
# follows the same rule; docs/protocol.md ("Finding the daemon") states it.
#
# Must never: import trio or anything heavy (the client imports this); guess
# a world-writable location such as /tmp; try anything else once
# $SHADOWD_SOCKET or an explicit path names the socket.
from __future__ import annotations

import os
import stat
from collections.abc import Mapping
from typing import NamedTuple

from .errors import ConfigError

ENV_SOCKET = "SHADOWD_SOCKET"
#: The host daemon's socket (the system units, `shadowd serve` as root).
ROOT_SOCKET = "/run/shadowd/shadowd.sock"
#: A user's socket, below their runtime directory.
USER_SOCKET = os.path.join("shadowd", "shadowd.sock")
# sun_path holds 108 bytes including the terminating NUL.
MAX_SOCKET_PATH = 107
#: SocketChoice.source of a path taken from $SHADOWD_SOCKET.
ENV_SOCKET_SOURCE = f"${ENV_SOCKET}"


class SocketChoice(NamedTuple):
    """The socket a client uses, and how it came to it."""

    path: str
    #: Where the path came from: "given" (an argument or --socket),
    #: "$SHADOWD_SOCKET", or "searched" (the first socket among *looked_at*).
    source: str
    #: The candidates looked at, in order (only when *source* is "searched").
    looked_at: tuple[str, ...] = ()

    def describe(self) -> str:
        """A clause for error messages: where this path came from; "" for a given one."""
        if self.source == "searched":
            return "looked at " + ", then ".join(self.looked_at)
        if self.source == ENV_SOCKET_SOURCE:
            return f"from ${ENV_SOCKET}"
        return ""


def _env_and_uid(env: Mapping[str, str] | None, uid: int | None) -> tuple[Mapping[str, str], int]:
    return (os.environ if env is None else env), (os.geteuid() if uid is None else uid)


def runtime_dir(env: Mapping[str, str]) -> str | None:
    """``$XDG_RUNTIME_DIR`` when it is an absolute path; None when unset, empty or relative.

    The XDG Base Directory spec says a relative path in these variables is invalid and
    is ignored: taken as it was, it named a directory below whatever the current
    directory was, so the daemon and its clients looked in different places.
    """
    runtime = env.get("XDG_RUNTIME_DIR")
    return runtime if runtime and os.path.isabs(runtime) else None


def user_socket_path(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """A user's own socket: ``$XDG_RUNTIME_DIR/shadowd/shadowd.sock``, else the one in
    ``/run/user/<uid>`` (what the per-user units use; su, sudo and cron leave the
    variable unset; a relative one is ignored, see :func:`runtime_dir`)."""
    env, uid = _env_and_uid(env, uid)
    runtime = runtime_dir(env) or f"/run/user/{uid}"
    return os.path.join(runtime, USER_SOCKET)


def client_candidates(env: Mapping[str, str] | None = None, uid: int | None = None) -> list[str]:
    """The sockets a client tries when nothing names one, in order.

    A user's own socket first, then the host daemon's; root has only the latter.
    """
    env, uid = _env_and_uid(env, uid)
    candidates = [] if uid == 0 else [user_socket_path(env, uid)]
    candidates.append(ROOT_SOCKET)
    return candidates


def is_socket(path: str) -> bool:
    """True when *path* exists and is a socket (lstat: a symlink is not one)."""
    try:
        return stat.S_ISSOCK(os.lstat(path).st_mode)
    except (OSError, ValueError):
        return False


def find_socket(
    path: str | os.PathLike[str] | None = None,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> SocketChoice:
    """The socket a client connects to: the one rule.

    1. *path* when given; else ``$SHADOWD_SOCKET`` when set and not empty:
       that path, nothing else is tried.
    2. Otherwise the first of :func:`client_candidates` that exists and is a
       socket; when none is, the first candidate (so that errors name it,
       along with every place looked at).

    Raises ConfigError for an empty or too long path.
    """
    env, uid = _env_and_uid(env, uid)
    if path is not None:
        return SocketChoice(checked_socket_path(path, "the socket path"), "given")
    explicit = env.get(ENV_SOCKET)
    if explicit:
        return SocketChoice(checked_socket_path(explicit, f"${ENV_SOCKET}"), ENV_SOCKET_SOURCE)
    candidates = tuple(client_candidates(env, uid))
    chosen = next((c for c in candidates if is_socket(c)), candidates[0])
    return SocketChoice(checked_socket_path(chosen, "the socket path"), "searched", candidates)


def default_socket_path(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """The socket a client uses when given none (:func:`find_socket`)."""
    return find_socket(None, env, uid).path


def daemon_socket_path(env: Mapping[str, str] | None = None, uid: int | None = None) -> str:
    """Where ``shadowd serve`` creates its socket when given no ``--socket``.

    ``$SHADOWD_SOCKET``; for root ``/run/shadowd/shadowd.sock``; for a user
    ``$XDG_RUNTIME_DIR/shadowd/shadowd.sock`` when that directory exists (else a
    ConfigError: the clients look there first), else the same below
    ``/run/user/<uid>`` when that directory exists and belongs to the user; else a
    ConfigError naming --socket.
    """
    env, uid = _env_and_uid(env, uid)
    explicit = env.get(ENV_SOCKET)
    if explicit:
        return checked_socket_path(explicit, f"${ENV_SOCKET}")
    if uid == 0:
        return ROOT_SOCKET
    xdg_runtime = runtime_dir(env)
    if xdg_runtime:
        if not os.path.isdir(xdg_runtime):
            # Not made here: the login manager makes it, private to the user, and
            # a 0755 directory of ours in its place would be neither.
            raise ConfigError(
                f"no socket path: $XDG_RUNTIME_DIR is {xdg_runtime}, which is not a "
                "directory (the login manager makes it for a session; a shell without "
                f"one may carry a stale value); set ${ENV_SOCKET} (clients read it too) "
                "or pass --socket PATH"
            )
        return checked_socket_path(user_socket_path(env, uid), "the socket path")
    runtime = f"/run/user/{uid}"
    try:
        st = os.stat(runtime)
        owned = stat.S_ISDIR(st.st_mode) and st.st_uid == uid
    except OSError:
        owned = False
    if not owned:
        xdg = env.get("XDG_RUNTIME_DIR")
        why = (
            f"$XDG_RUNTIME_DIR is not an absolute path ({xdg!r}, ignored)"
            if xdg
            else "$XDG_RUNTIME_DIR is not set"
        )
        raise ConfigError(
            f"no socket path: {why} and {runtime} is not a directory "
            f"of uid {uid}; set ${ENV_SOCKET} (clients read it too) or pass --socket PATH"
        )
    return checked_socket_path(os.path.join(runtime, USER_SOCKET), "the socket path")


def checked_socket_path(path: str | os.PathLike[str], what: str = "the socket path") -> str:
    """*path* as a str, refused (ConfigError) when empty or too long for a socket address."""
    resolved = os.fspath(path)
    if not resolved:
        raise ConfigError(f"{what} is empty")
    size = len(os.fsencode(resolved))
    if size > MAX_SOCKET_PATH:
        raise ConfigError(
            f"{what} is {size} bytes, longer than the {MAX_SOCKET_PATH} a Unix socket "
            f"address holds: {resolved}"
        )
    return resolved


def resolve_socket_path(
    path: str | os.PathLike[str] | None,
    env: Mapping[str, str] | None = None,
    uid: int | None = None,
) -> str:
    """The daemon's socket: *path* when given, else :func:`daemon_socket_path`; checked."""
    if path is not None:
        return checked_socket_path(path)
    return daemon_socket_path(env, uid)
