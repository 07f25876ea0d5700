# A hit without a round trip: the daemon's index of its cache, mapped
# read-only, and the checks that make a reopen of the daemon's memfd through
# /proc/PID/fd/N exactly the file the slot promises (docs/protocol.md, "The
# index"; shadowd/index.py writes it).
#
# Must never: return an fd that is not a sealed, read-only memfd of the slot's
# identity, size, mode and stamp; trust a slot that changed while it was read
# (its seq); open a descriptor of the daemon in a way that has side effects
# (a number in the daemon's descriptor range, which holds memfds only at
# every instant, is opened read-only at once, and only when the daemon runs
# as our own uid; any other number O_PATH first, which runs no driver's
# open, and its inode is checked before a real open of that very inode);
# take a daemon of another uid at its word about its range (what it holds
# there, root would open for real: a FIFO, a device); reopen through another
# process's descriptor table (after a fork, the child's view opens its own
# /proc/self/fd again: the one it inherited names the parent's); say it holds
# a memfd a client keeps (holds) unless the file's slot names that memfd in
# that version, read while the slot held still; take /proc/PID for the
# daemon, or the daemon for alive, unless /proc/PID/fd/index_fd is the very
# index it maps (another process of that pid, in our pid namespace, is not);
# take the header's memfd device at its word (a hostile daemon would name its
# own FUSE mount's, whose file's close then waits on its server: it must be
# the device of a memfd of our own, docs/security.md attack 45).
#
# The whole lookup and reopen runs in one call of the C extension
# (shadowd/_hotcalls.c, index_open) when shadowd.hotcalls has it; the Python
# path here is the fallback (no extension, SHADOWD_NO_C=1) and the reference
# the C follows check for check (tests/test_index.py runs both).
from __future__ import annotations

import fcntl
import functools
import mmap
import os
import stat
import struct
import time
import weakref
from collections.abc import Callable

from shadowd import hotcalls
from shadowd.fds import FdHolder
from shadowd.index import HEADER, LAYOUT_VERSION, LIVE, MAGIC, SLOT, slot_of
from shadowd.memfd import REQUIRED_SEALS, proc_fd_dir_again

_HEADER = struct.Struct("<8sIIIIQII Q II I I Q")
_SLOT = struct.Struct("<IIQQQqqiIQq")
_SEQ = struct.Struct("<I")
_PATH_FLAGS = os.O_PATH | os.O_CLOEXEC
_OPEN_FLAGS = os.O_RDONLY | os.O_CLOEXEC
# In the range: a memfd at every instant, by the daemon's promise. Should a
# daemon bug break it (a number closed, then given to a FIFO it received),
# O_NONBLOCK keeps a FIFO's open from waiting for a writer and O_NOCTTY a
# terminal's from becoming ours; the fstat then refuses either. O_NOCTTY is
# not kept in the open file description; O_NONBLOCK is (F_GETFL shows it,
# a tracee would too), so a served fd has it cleared (_CLEAR_FLAGS).
_RANGE_FLAGS = os.O_RDONLY | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
_CLEAR_FLAGS = 0  # F_SETFL: no O_NONBLOCK, O_APPEND, O_ASYNC, O_DIRECT or O_NOATIME
_DIR_FLAGS = os.O_PATH | os.O_DIRECTORY | os.O_CLOEXEC
_F_GET_SEALS = fcntl.F_GET_SEALS
_F_SETFL = fcntl.F_SETFL
_FD_MAX = 2**31 - 1

#: The arguments of the C calls this module passes (shadowd/_hotcalls.c's
#: INDEX_CALLS): 2, the view's `direct` before the file's.
_C_CALLS_VERSION = 2

#: The C versions of IndexView.open and open_fd, when the extension is in use,
#: reads this very layout and takes these arguments; None: every view takes
#: the Python path. A view takes what this is when it is made.
C_CALLS: tuple[Callable[..., int | None], Callable[..., int | None]] | None = (
    (hotcalls.index_open, hotcalls.index_open_fd)
    if hotcalls.index_open is not None
    and hotcalls.index_open_fd is not None
    and hotcalls.INDEX_LAYOUT == (LAYOUT_VERSION, HEADER, SLOT)
    and hotcalls.INDEX_CALLS == _C_CALLS_VERSION
    else None
)
#: IndexView.holds in C, under the same conditions (None: the Python path).
C_HOLDS: Callable[..., bool] | None = (
    hotcalls.index_holds
    if hotcalls.index_holds is not None and hotcalls.INDEX_LAYOUT == (LAYOUT_VERSION, HEADER, SLOT)
    else None
)

#: What the process-local tier asks a view about a memfd it keeps: the file's
#: (dev, ino, size, mtime_ns, ctime_ns), then the kept memfd's (st_dev,
#: st_ino, st_ctime_ns).
Held = tuple[int, int, int, int, int, int, int, int]


#: Every open view, so that a forked child can point each at its own fds.
_VIEWS: weakref.WeakSet[IndexView] = weakref.WeakSet()


def _after_fork_in_child() -> None:
    for view in list(_VIEWS):
        view._own_fds_again()


os.register_at_fork(after_in_child=_after_fork_in_child)


def _release(index: mmap.mmap, daemon_fds: FdHolder, own_fds: FdHolder) -> None:
    """What a view holds, released: by :meth:`IndexView.close`, or when a view
    nobody closed is collected (its finaliser; it must not refer to the view)."""
    index.close()
    daemon_fds.close()
    own_fds.close()


def _same_file(fds_dir: int, n: int, fd: int) -> bool:
    """Whether descriptor *n* of the process whose /proc/PID/fd is *fds_dir* is the
    file *fd* is (looked at through O_PATH: no side effect whatever it is)."""
    try:
        path = os.open(str(n), _PATH_FLAGS, dir_fd=fds_dir)
    except OSError:
        return False
    try:
        theirs, ours = os.fstat(path), os.fstat(fd)
    except OSError:
        return False
    finally:
        os.close(path)
    return (theirs.st_dev, theirs.st_ino) == (ours.st_dev, ours.st_ino)


class BadIndex(Exception):
    """The index is not one this client can read (wrong magic, layout, sizes)."""


@functools.cache
def own_memfd_dev() -> int:
    """The device every memfd of this kernel is on, from a memfd of our own (made,
    fstat'd and closed once a process; OSError, and tried again next time, when it
    cannot be made). A forked child keeps it: the same kernel."""
    fd = os.memfd_create("shadowd-probe", os.MFD_CLOEXEC)
    try:
        return os.fstat(fd).st_dev
    finally:
        os.close(fd)


def trusts_range(peer: tuple[int, int] | None, pid: int) -> bool:
    """Whether a view may open the daemon's descriptor range at once: *peer*, the
    (pid, uid) SO_PEERCRED gave for the connection the index came on, is the daemon
    of pid *pid* itself, running as our effective uid.

    The kernel lets root open /proc/PID/fd/N of a process of any uid. A daemon of
    another uid could hold at a number of its "range" an O_PATH descriptor of a
    FIFO or a device its user may name but not open; a direct open would open it
    with our credentials (a FIFO blocks, a driver's open runs). Of our own uid,
    it could open that itself. SO_PEERCRED gives the credentials of the process
    that called listen(): the daemon's own only when that is the daemon (its pid),
    not a service manager that made the socket for it.
    """
    return peer is not None and peer == (pid, os.geteuid())


class IndexView:
    """A read-only mapping of the daemon's index; :meth:`open` serves a hit from it.

    *peer*: the (pid, uid) SO_PEERCRED gave for the connection the index came
    on (:func:`trusts_range`); None, or any other process or uid: every
    descriptor of the daemon is looked at through O_PATH first.
    """

    def __init__(
        self, fd: int, pid: int, slots: int, *, peer: tuple[int, int] | None = None
    ) -> None:
        # Checked before it is mapped: cut short under our mapping, its next read
        # would kill this process with SIGBUS; a file that is no memfd (F_GET_SEALS
        # fails) could be one on a FUSE mount, whose page faults wait on its server.
        # Its size is read after: until sealed it can be cut short at any time.
        try:
            seals = fcntl.fcntl(fd, _F_GET_SEALS)
        except OSError:
            seals = 0
        if not seals & fcntl.F_SEAL_SHRINK:
            raise BadIndex("the index is not a memfd sealed against shrinking")
        own = os.fstat(fd)
        size = own.st_size
        if slots < 1 or slots & (slots - 1) or size != HEADER + slots * SLOT:
            raise BadIndex(f"an index of {slots} slots cannot be {size} bytes")
        self._map = mmap.mmap(fd, size, mmap.MAP_SHARED, mmap.PROT_READ)
        (magic, layout, slot_size, n, header_pid, memfd_dev, probes, _, generation, base, count,
         index_fd, _, key) = _HEADER.unpack_from(self._map, 0)  # fmt: skip
        if (magic, layout, slot_size, n, header_pid) != (MAGIC, LAYOUT_VERSION, SLOT, slots, pid):
            self._map.close()
            raise BadIndex("not an index this client reads (magic, layout or sizes differ)")
        # The device the slots' memfds must be on is the kernel's, never the
        # sender's word: a file of another device (its FUSE mount) could pass
        # every other check of a slot, and its close wait on that mount.
        try:
            ours = own_memfd_dev()
        except OSError as exc:
            self._map.close()
            raise BadIndex(f"cannot learn the memfd device: {exc.strerror}") from None
        if memfd_dev != ours:
            self._map.close()
            raise BadIndex(f"the index's memfd device {memfd_dev} is not this kernel's ({ours})")
        self.pid = pid
        #: The daemon's own descriptor of this index (the header says it): while
        #: /proc/PID/fd has it, the daemon that writes this index is alive.
        self.index_fd = index_fd
        #: When the daemon was last seen alive (monotonic): now, since it just
        #: sent this index; :meth:`alive` looks again.
        self.alive_at = time.monotonic()
        self.slots = slots
        self.memfd_dev = memfd_dev
        self.probes = probes
        self.generation = generation
        #: What keys slot_of in this index (the header's slot key).
        self.key = key
        #: The daemon's descriptor range as the header says (shadowd/fdrange.py):
        #: numbers it keeps memfds at, at every instant.
        self.header_range = (
            range(base, base + count) if base > 0 and base + count <= _FD_MAX else range(0)
        )
        #: Whether the header's range is taken at its word (:func:`trusts_range`).
        self.direct = trusts_range(peer, pid)
        #: The numbers opened without the O_PATH step: the header's range, when
        #: the daemon is of our uid; else none.
        self.range = self.header_range if self.direct else range(0)
        # The daemon's /proc/PID/fd and ours, opened once: a reopen then walks
        # one component instead of three.
        try:
            daemon_fds = os.open(f"/proc/{pid}/fd", _DIR_FLAGS)
        except OSError as exc:
            self._map.close()
            raise BadIndex(f"cannot see the daemon's descriptors: {exc.strerror}") from None
        #: The index memfd's (st_dev, st_ino): what the daemon's own descriptor of it is.
        self._index_file = (own.st_dev, own.st_ino)
        if not _same_file(daemon_fds, index_fd, fd):
            # /proc/PID is not the daemon (another process of that pid, in
            # our pid namespace): a number of its "range" may be anything,
            # and whether it is alive says nothing of the daemon's life.
            os.close(daemon_fds)
            self._map.close()
            raise BadIndex(f"/proc/{pid} is not the daemon that sent this index")
        try:
            own_fds = os.open("/proc/self/fd", _DIR_FLAGS)
        except OSError:
            os.close(daemon_fds)
            self._map.close()
            raise
        # Owned from here on: by close(), or, for a view nobody closes, by its
        # finaliser when it is collected (a closed holder's fd is -1: a use
        # after close fails with EBADF, never reaches a reused number).
        self._daemon_fds = FdHolder(daemon_fds)
        self._own_fds = FdHolder(own_fds)
        self._finalizer = weakref.finalize(
            self, _release, self._map, self._daemon_fds, self._own_fds
        )
        self._c_open: Callable[[os.stat_result], int | None] | None = None
        self._c_open_fd: Callable[[int], int | None] | None = None
        self._c_holds: Callable[[Held], bool] | None = None
        if C_HOLDS is not None:
            self._c_holds = functools.partial(C_HOLDS, self._map, slots, probes, memfd_dev)
        #: holds(held) -> bool: whether the index still has *held*'s file, in its
        #: version, as the memfd *held* names (its device, inode and ctime): the
        #: daemon still serves exactly that memfd for that version. Read with the
        #: index hit's seq discipline (a slot being written is not the file's);
        #: opens nothing. The C call itself where there is one (the process-local
        #: tier asks it on every hit), else :meth:`_holds_py`.
        self.holds: Callable[[Held], bool] = self._c_holds or self._holds_py
        if C_CALLS is not None:
            state = (
                self._map, daemon_fds, own_fds, slots, probes, memfd_dev, self.direct
            )  # fmt: skip
            self._c_open = functools.partial(C_CALLS[0], *state)
            self._c_open_fd = functools.partial(C_CALLS[1], *state)
        self._closed = False
        self._gone = False
        _VIEWS.add(self)

    @property
    def in_c(self) -> bool:
        """Whether this view's hits run in the C extension (else in Python)."""
        return self._c_open is not None

    def close(self) -> None:
        """Unmap the index and close the view's descriptors; it serves nothing after."""
        if self._closed:
            return
        self._closed = True
        self._c_open = self._c_open_fd = None  # to _open_py, which serves nothing now
        self._c_holds = None
        self.holds = self._holds_py  # which holds nothing now
        _VIEWS.discard(self)
        self._finalizer()

    @property
    def closed(self) -> bool:
        """Whether :meth:`close` ran (then it serves and holds nothing)."""
        return self._closed

    def alive(self) -> bool:
        """Whether the daemon that writes this index is still there: its descriptor of
        the index is still in its /proc/PID/fd and is this very index (a stat through
        the link: the file's inode, never an open of it; a number alone may have been
        given to another file). A dead daemon's index stays mapped but no longer
        changes, so it would vouch for entries the daemon can no longer drop. Sets
        :attr:`alive_at` when it is."""
        if self._closed or self._gone:
            return False
        try:
            st = os.stat(str(self.index_fd), dir_fd=self._daemon_fds.fd)
        except OSError:
            st = None
        if st is None or (st.st_dev, st.st_ino) != self._index_file:
            self._gone = True  # (a process that exited never comes back)
            return False
        self.alive_at = time.monotonic()
        return True

    def _holds_py(self, held: Held) -> bool:
        """:attr:`holds` in Python: the reference the C version follows."""
        if self._closed:
            return False
        dev, ino, size, mtime_ns, ctime_ns, memfd_dev, memfd_ino, memfd_ctime_ns = held
        if memfd_dev != self.memfd_dev:
            return False
        found = self._live_slot(dev, ino)
        if found is None:
            return False
        offset, (seq, _, _, _, s_size, mtime, ctime, _fd, _mode, m_ino, m_ctime) = found
        same = (s_size, mtime, ctime, m_ino, m_ctime) == (
            size, mtime_ns, ctime_ns, memfd_ino, memfd_ctime_ns
        )  # fmt: skip
        return same and _SEQ.unpack_from(self._map, offset)[0] == seq

    def _live_slot(self, dev: int, ino: int) -> tuple[int, tuple[int, ...]] | None:
        """The offset and fields of the live slot of (*dev*, *ino*) as read now, or
        None: not in its probe run. The caller checks the seq again after its use."""
        view = self._map
        start = slot_of(dev, ino, self.slots, self.key)
        mask = self.slots - 1
        for i in range(self.probes):
            offset = HEADER + ((start + i) & mask) * SLOT
            fields = _SLOT.unpack_from(view, offset)
            seq, state, s_dev, s_ino = fields[:4]
            if seq == 0:
                return None  # never used: the file is not further on
            if seq & 1 or state != LIVE or s_dev != dev or s_ino != ino:
                continue
            return offset, fields
        return None

    def _own_fds_again(self) -> None:
        """In a forked child: /proc/self/fd of this process, at the same number (the
        C calls were bound to it), in place of the parent's, which it inherited.
        A child that cannot open it (its parent forked at the fd limit) closes the
        view rather than reopen through its parent's descriptors."""
        if not self._closed:
            try:
                proc_fd_dir_again(self._own_fds.fd)
            except OSError:
                self._own_fds.detach()  # closed already
                self.close()

    def open(self, st: os.stat_result) -> int | None:
        """A fresh read-only fd of the cached version *st* (the caller's own fstat of
        the source) says, or None: not indexed, another version, or any check failed."""
        c_open = self._c_open
        if c_open is not None:
            return c_open(st)
        return self._open_py(st)

    def open_fd(self, src: int) -> int | None:
        """:meth:`open` for the file open at *src* (it stays the caller's), whose fstat
        this takes itself (OSError when that fails)."""
        c_open_fd = self._c_open_fd
        if c_open_fd is not None:
            return c_open_fd(src)
        return self._open_py(os.fstat(src))

    def _open_py(self, st: os.stat_result) -> int | None:
        """:meth:`open` in Python: the reference the C version follows."""
        if self._closed:
            return None
        found = self._live_slot(st.st_dev, st.st_ino)
        if found is None:
            return None
        offset, (seq, _, _, _, size, mtime, ctime, fd, mode, m_ino, m_ctime) = found
        if (size, mtime, ctime) != (st.st_size, st.st_mtime_ns, st.st_ctime_ns):
            return None  # another version is cached: ask the daemon
        return self._reopen(offset, seq, (fd, size, mode, m_ino, m_ctime))

    def _is_slots(self, fd: int, memfd: tuple[int, int, int, int, int]) -> bool:
        """Whether *fd* is the memfd the slot names: a regular file of the daemon's
        memfd device with the slot's inode, size, mode and ctime."""
        _, size, mode, m_ino, m_ctime = memfd
        try:
            pst = os.fstat(fd)
        except OSError:
            return False
        return (
            stat.S_ISREG(pst.st_mode)
            and pst.st_dev == self.memfd_dev
            and pst.st_ino == m_ino
            and pst.st_size == size
            and pst.st_mode == mode
            and pst.st_ctime_ns == m_ctime
        )

    def _reopen(self, offset: int, seq: int, memfd: tuple[int, int, int, int, int]) -> int | None:
        """The memfd slot *offset* names (its fd, size, mode, inode, ctime), checked."""
        fd = memfd[0]
        if fd in self.range:
            # The range of a daemon of our uid: a memfd, whatever N holds by
            # now, whose open has no side effects.
            try:
                served = os.open(str(fd), _RANGE_FLAGS, dir_fd=self._daemon_fds.fd)
            except OSError:
                return None  # the daemon is gone
            if not self._is_slots(served, memfd):
                os.close(served)  # another memfd is at N now
                return None
            try:
                fcntl.fcntl(served, _F_SETFL, _CLEAR_FLAGS)  # as a plain O_RDONLY open
            except OSError:
                os.close(served)
                return None
        else:
            # O_PATH first: no driver's open runs, whatever fd N is now.
            try:
                path = os.open(str(fd), _PATH_FLAGS, dir_fd=self._daemon_fds.fd)
            except OSError:
                return None  # the daemon is gone, or N was closed meanwhile
            try:
                if not self._is_slots(path, memfd):
                    return None  # N is something else now, or a holder changed the memfd
                served = os.open(str(path), _OPEN_FLAGS, dir_fd=self._own_fds.fd)
            except OSError:
                return None
            finally:
                os.close(path)
        try:
            sealed = fcntl.fcntl(served, _F_GET_SEALS) & REQUIRED_SEALS == REQUIRED_SEALS
        except OSError:
            sealed = False
        if not sealed or _SEQ.unpack_from(self._map, offset)[0] != seq:
            os.close(served)  # not sealed, or the slot changed while we looked
            return None
        return served
