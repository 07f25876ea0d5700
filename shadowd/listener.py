# The listening socket: created safely, found again at shutdown, removed only
# if it is still the one we created; or adopted from the service manager
# (socket activation), and then never removed.
#
# Must never: exist for an instant with a wider mode than asked (the mode is
# set on the socket before bind, and the file appears by an atomic rename);
# replace a socket another server is answering on, or a path that is not a
# socket; unlink a socket it did not create; follow a link someone else
# planted next to it (the lock file), or create anything in a directory
# others may write to unless it is sticky.
from __future__ import annotations

import contextlib
import errno
import fcntl
import grp
import logging
import os
import socket
import stat

import attrs

from .errors import ConfigError
from .fds import FdHolder

logger = logging.getLogger(__name__)


def resolve_group(group: str | int | None) -> int | None:
    if group is None or isinstance(group, int):
        return group
    if group.isdigit():
        return int(group)
    try:
        return grp.getgrnam(group).gr_gid
    except KeyError:
        raise ConfigError(f"--socket-group: no such group: {group!r}") from None


def check_directory(directory: str) -> None:
    """Refuse a directory where others could plant or swap what we create in it.

    It must belong to this user or root, and no one else may write to it
    unless it is sticky (as /tmp is: then no one can remove or rename what
    we created there, and the lock file is opened without following links).
    """
    try:
        st = os.stat(directory)
    except OSError as exc:
        raise ConfigError(f"cannot inspect {directory}: {exc.strerror}") from exc
    if not stat.S_ISDIR(st.st_mode):
        raise ConfigError(f"{directory} is not a directory")
    if st.st_uid not in (0, os.geteuid()):
        raise ConfigError(
            f"{directory} belongs to uid {st.st_uid}, not to this user or root; "
            "choose a socket path in a directory of your own"
        )
    if st.st_mode & 0o022 and not st.st_mode & stat.S_ISVTX:
        raise ConfigError(
            f"{directory} is writable by others (mode {stat.S_IMODE(st.st_mode):04o}) and not "
            "sticky: anyone could replace the socket; choose a directory of your own"
        )


def make_directories(directory: str) -> list[str]:
    """Create *directory* and whichever of its parents are missing (0755, less the
    umask), as `serve --socket` promises; log one line naming those it created, so an
    operator who mistyped a path sees where the socket went. The ones created,
    outermost first."""
    missing = []
    here = os.path.abspath(directory)
    while not os.path.lexists(here):
        missing.append(here)
        parent = os.path.dirname(here)
        if parent == here:
            break
        here = parent
    if not missing:
        return []
    try:
        os.makedirs(directory, mode=0o755, exist_ok=True)
    except OSError as exc:
        raise ConfigError(
            f"cannot create the socket's directory {missing[0]}: {exc.strerror}"
            + _not_this_users(os.path.dirname(missing[-1]), exc)
        ) from exc
    missing.reverse()
    logger.info(
        "created the socket's directory %s (mode %04o)",
        ", ".join(missing),
        stat.S_IMODE(os.stat(missing[-1]).st_mode),
    )
    return missing


def check_writable(directory: str) -> None:
    """Refuse a directory this user may not create the socket in, naming it (not the
    lock file, the first thing made there): a user's daemon asked for the host's
    socket (/run/shadowd) must be told to choose a socket of its own."""
    if os.access(directory, os.W_OK | os.X_OK, effective_ids=True):
        return
    try:
        read_only = bool(os.statvfs(directory).f_flag & os.ST_RDONLY)
    except OSError:
        read_only = False
    if read_only:  # access(2) says no to root too there
        raise ConfigError(f"cannot create the socket in {directory}: {os.strerror(errno.EROFS)}")
    error = PermissionError(errno.EACCES, os.strerror(errno.EACCES))
    raise ConfigError(
        f"cannot create the socket in {directory}: {error.strerror}"
        + _not_this_users(directory, error)
    )


def _not_this_users(directory: str, exc: OSError) -> str:
    """What a user refused *directory* (EACCES) can do instead."""
    if exc.errno not in (errno.EACCES, errno.EPERM):
        return ""
    try:
        st = os.stat(directory)
        whose = f" (owner uid {st.st_uid}, mode {stat.S_IMODE(st.st_mode):04o})"
    except OSError:
        whose = ""
    return (
        f"; uid {os.geteuid()} may not write to {directory}{whose}: run shadowd as a user "
        "who may, or give --socket a path in a directory of this user's (without "
        "--socket, a user's daemon serves on $XDG_RUNTIME_DIR/shadowd/shadowd.sock)"
    )


def _probe(path: str) -> bool:
    """True when a server answers on the socket at *path*."""
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC)
    probe.settimeout(1.0)
    try:
        probe.connect(path)
    except (ConnectionRefusedError, FileNotFoundError):
        return False
    except OSError as exc:
        # EPROTOTYPE: something is listening there, with another socket type.
        return exc.errno == errno.EPROTOTYPE
    else:
        return True
    finally:
        probe.close()


@attrs.define
class Listener:
    """A listening SOCK_SEQPACKET socket and what we need to clean up after it."""

    sock: socket.socket
    path: str
    created: bool
    identity: tuple[int, int] | None = None
    lock: FdHolder | None = None

    @classmethod
    def bind(
        cls,
        path: str,
        *,
        mode: int = 0o600,
        group: str | int | None = None,
        backlog: int = socket.SOMAXCONN,
    ) -> Listener:
        """Create, bind and listen on *path*, replacing a stale socket there."""
        gid = resolve_group(group)
        directory = os.path.dirname(path) or "."
        make_directories(directory)
        check_directory(directory)
        check_writable(directory)
        lock = cls._take_lock(path)
        try:
            cls._check_existing(path)
            # Short: a socket address holds 107 bytes, and this name must fit
            # wherever the final one does (".PID~" is at most 9 bytes).
            tmp = os.path.join(directory, f".{os.getpid()}~")
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            sock = socket.socket(
                socket.AF_UNIX, socket.SOCK_SEQPACKET | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
            )
            try:
                # The socket file takes the socket inode's mode at bind: owner
                # only until its group is right, so it is never wider than
                # asked (not even for the daemon's own group), and it appears
                # at its real path only by the rename, complete.
                os.fchmod(sock.fileno(), mode & 0o600)
                sock.bind(tmp)
                try:
                    if gid is not None:
                        os.chown(tmp, -1, gid)
                    os.chmod(tmp, mode & 0o777)
                    os.rename(tmp, path)
                except BaseException:
                    with contextlib.suppress(OSError):
                        os.unlink(tmp)
                    raise
                sock.listen(backlog)
                st = os.stat(path)
            except OSError as exc:
                sock.close()
                raise ConfigError(f"cannot create socket {path}: {exc.strerror or exc}") from exc
            except BaseException:
                sock.close()
                raise
        except BaseException:
            lock.close()
            raise
        return cls(sock=sock, path=path, created=True, identity=(st.st_dev, st.st_ino), lock=lock)

    @classmethod
    def adopt(cls, sock: socket.socket, path: str) -> Listener:
        """A socket the service manager created and passed: ours to close, never to unlink.

        It is listened on again here: a client's SO_PEERCRED gives the
        credentials of whoever last called listen() on it, and a client of the
        index takes the daemon's descriptor range at its word only when they are
        the daemon's own (its pid and uid; client/shadowd_client/index.py,
        trusts_range). Connections already waiting keep the manager's and are
        served all the same (their index reopens through O_PATH). The backlog
        asked is the most the kernel grants (it caps the manager's too).
        """
        sock.setblocking(False)
        try:
            sock.listen(socket.SOMAXCONN)
        except OSError as exc:
            logger.warning(
                "cannot listen again on the passed socket %s (%s): index clients will "
                "reopen through O_PATH",
                path,
                exc.strerror,
            )
        return cls(sock=sock, path=path, created=False)

    @staticmethod
    def _take_lock(path: str) -> FdHolder:
        lock_path = path + ".lock"
        try:
            # Never through a link someone planted: O_NOFOLLOW refuses a
            # symlink, and the checks below a hard link or another's file.
            fd = os.open(
                lock_path,
                os.O_RDWR | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NOCTTY,
                0o600,
            )
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise ConfigError(
                    f"lock file {lock_path} is a symbolic link; refusing to follow it"
                ) from None
            raise ConfigError(f"cannot open lock file {lock_path}: {exc.strerror}") from exc
        holder = FdHolder(fd)
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode) or st.st_uid != os.geteuid() or st.st_nlink != 1:
                raise ConfigError(
                    f"lock file {lock_path} is not a file of this user's with one link; "
                    "refusing to use it"
                )
        except BaseException:
            holder.close()
            raise
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            holder.close()
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise ConfigError(
                    f"another shadowd is already serving {path} (lock {lock_path} is held)"
                ) from None
            raise ConfigError(f"cannot lock {lock_path}: {exc.strerror}") from exc
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
        return holder

    @staticmethod
    def _check_existing(path: str) -> None:
        try:
            st = os.lstat(path)
        except FileNotFoundError:
            return
        if not stat.S_ISSOCK(st.st_mode):
            raise ConfigError(f"{path} exists and is not a socket; refusing to replace it")
        if _probe(path):
            raise ConfigError(f"another server is answering on {path}; refusing to replace it")
        logger.info("replacing stale socket %s", path)

    def withdraw(self) -> None:
        """Remove the socket file now, if it is still ours; keep listening on what is queued.

        At SIGTERM: from then on a new client's connect fails at once (and
        it copies locally) instead of waiting in a backlog that nobody will
        accept from while in-flight requests drain. A socket the service
        manager passed stays: it holds new connections for the next start.
        """
        self._unlink()

    def close(self) -> None:
        """Stop listening; remove the socket file if it is still ours."""
        self.sock.close()
        self._unlink()
        if self.lock is not None:
            self.lock.close()
            self.lock = None

    def _unlink(self) -> None:
        if self.created and self.identity is not None:
            try:
                st = os.lstat(self.path)
                if (st.st_dev, st.st_ino) == self.identity:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
            except OSError as exc:
                logger.warning("cannot remove %s: %s", self.path, exc)
            self.identity = None
