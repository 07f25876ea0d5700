# The cache's watch on its sources: an inotify watch on the inode of every
# cached host file. An entry dies when its file is written (write(),
# truncate, a writer that had it open for writing or mapped letting go of
# it), loses its last link, or its file system is unmounted: changes stat
# may not show, and the end of what its (dev, ino) key means (a device
# number is reused by the next mount only after every watch on the old file
# system has been told).
#
# The poller reads the events at the start of every round, before it
# answers anyone, so a request sent after such a change (and so after its
# event) never meets the entry; and a copy is cached only if its inode had
# no event since its flight began.
#
# Must never: leave an entry cached after an event for its inode was read;
# remove a watch another holder still needs; block (the inotify fd is
# non-blocking; watches are added through /proc/self/fd/N, for fds of
# untrusted file systems in worker threads).
from __future__ import annotations

import ctypes
import errno
import fcntl
import logging
import os
import re
import struct
import termios
from collections.abc import Callable

import attrs

from .fds import move_high

logger = logging.getLogger(__name__)

IN_MODIFY = 0x00000002
IN_ATTRIB = 0x00000004
IN_CLOSE_WRITE = 0x00000008
IN_DELETE_SELF = 0x00000400
IN_UNMOUNT = 0x00002000
IN_Q_OVERFLOW = 0x00004000
IN_IGNORED = 0x00008000
#: Add to the mask an inode's watch already has, never replace it: one inotify fd
#: has one watch per inode, and a memfd of ours can come back as a client's source.
IN_MASK_ADD = 0x20000000
IN_NONBLOCK = os.O_NONBLOCK
IN_CLOEXEC = os.O_CLOEXEC
#: What ends an entry. IN_UNMOUNT and IN_IGNORED come whatever is asked.
WATCHED = IN_MODIFY | IN_CLOSE_WRITE | IN_DELETE_SELF
_EVENT = struct.Struct("iIII")
_READ_SIZE = 64 * 1024
#: FIONREAD's answer when no event waits (an int, in the buffer given).
_NOTHING = bytes(4)
#: Events of watches no entry holds, kept for the copies under way, past which the
#: copies begun before are taken as changed (served uncached) and the events let go
#: of: a copy stuck on a hung mount otherwise held back every event read since it
#: began, and each round's prune went through them all (attack 43).
MAX_UNDECIDED_EVENTS = 16384
#: A watch in /proc/self/fdinfo/N of an inotify fd: "inotify wd:1a ino:... ", its
#: number in hexadecimal (fs/notify/fdinfo.c prints it with %x).
_FDINFO_WD = re.compile(rb"^inotify wd:([0-9a-f]+) ", re.MULTILINE)

_libc = ctypes.CDLL(None, use_errno=True)


def _call(result: int) -> int:
    if result < 0:
        err = ctypes.get_errno()
        raise OSError(err, os.strerror(err))
    return result


@attrs.define(eq=False)
class Watches:
    """inotify watches on the inodes of cached host files; see the module comment.

    ``on_event(wd)`` is called on the loop for every event of a watch that
    has holders (the caller drops what it keeps under that watch), and
    ``on_overflow()`` when the kernel lost events (drop everything watched).
    """

    on_event: Callable[[int], None]
    on_overflow: Callable[[], None]
    #: Called for every watch the kernel removed (IN_IGNORED): for a memfd's
    #: watch (add_memfd), that its inode is freed (pins.py).
    on_freed: Callable[[int], None] = lambda wd: None
    #: Called for IN_ATTRIB on a memfd's watch (add_memfd): its mode, owner,
    #: ACL or times changed.
    on_attrib: Callable[[int], None] = lambda wd: None
    fd: int = -1
    #: Events read so far; a flight records it when it starts.
    seq: int = 0
    #: The seq of the last event read for each watch.
    _last: dict[int, int] = attrs.field(factory=dict)
    #: Holders of each watch (entries of its inode); removed at 0.
    _refs: dict[int, int] = attrs.field(factory=dict)
    #: The seq at which each copy still undecided began (with counts).
    _active: dict[int, int] = attrs.field(factory=dict)
    _warned_full: bool = False
    #: The seq of the last lost-events notice (or of the last time the events kept
    #: for the copies under way were let go of, _prune).
    _overflow: int = -1
    #: How many events _last may keep before the next prune (amortized: twice what
    #: the last one kept).
    _prune_at: int = 1024
    #: The watches of memfds of ours that are tracked until freed (add_memfd; kept by
    #: guard.py on the loop). A client may send such a memfd back as a host file: its
    #: source watch is then this very watch, which the kernel removes when the memfd
    #: is freed, and which release() and forget() must never remove (attack 37).
    memfds: set[int] = attrs.field(factory=set)

    def open(self) -> None:
        if self.fd < 0:
            self.fd = move_high(_call(_libc.inotify_init1(IN_NONBLOCK | IN_CLOEXEC)))

    def close(self) -> None:
        if self.fd >= 0:
            fd, self.fd = self.fd, -1
            os.close(fd)
        self._last.clear()
        self._refs.clear()
        self._active.clear()
        self.memfds.clear()

    def add(self, fd: int) -> int:
        """Watch the inode of *fd*; its watch descriptor. Safe in a worker thread.

        Raises OSError: EACCES when the daemon's uid may not read the file
        (then it is not cached), ENOSPC at the per-user watch limit.
        """
        if self.fd < 0:
            raise OSError(errno.EBADF, "the daemon is not watching files")
        path = f"/proc/self/fd/{fd}".encode()
        try:
            return _call(_libc.inotify_add_watch(self.fd, path, WATCHED | IN_MASK_ADD))
        except OSError as exc:
            if exc.errno == errno.ENOSPC and not self._warned_full:
                self._warned_full = True
                logger.warning(
                    "the inotify watch limit is reached (fs.inotify.max_user_watches): "
                    "new files are served but not cached"
                )
            raise

    def begin(self) -> int:
        """A copy starts: the seq to give :meth:`changed_since` (then call :meth:`end`)."""
        self._active[self.seq] = self._active.get(self.seq, 0) + 1
        return self.seq

    def end(self, start: int) -> None:
        """The copy that began at *start* was decided on."""
        left = self._active.get(start, 0) - 1
        if left > 0:
            self._active[start] = left
        else:
            self._active.pop(start, None)

    def add_memfd(self, fd: int) -> int:
        """Watch a memfd of ours until its inode is freed (then on_freed is called).

        Its mode, owner, ACL and times changing come as IN_ATTRIB (then
        on_attrib is called); the watch does not keep the memfd. Safe in a worker
        thread (a copy's worker adds the watch on the memfd it made).
        """
        if self.fd < 0:
            raise OSError(errno.EBADF, "the daemon is not watching files")
        path = f"/proc/self/fd/{fd}".encode()
        return _call(_libc.inotify_add_watch(self.fd, path, IN_ATTRIB | IN_MASK_ADD))

    def alive(self) -> set[int] | None:
        """The watches the kernel still has on this inotify fd (/proc/self/fdinfo):
        after lost events, what an IN_IGNORED among them would have said. None where
        it cannot be read. One line a watch: read only at IN_Q_OVERFLOW."""
        if self.fd < 0:
            return None
        try:
            with open(f"/proc/self/fdinfo/{self.fd}", "rb") as f:
                text = f.read()
        except OSError:
            return None
        return {int(m, 16) for m in _FDINFO_WD.findall(text)}

    def changed_since(self, wd: int, start: int) -> bool:
        """Whether an event of watch *wd* was read after *start* (its removal included)."""
        return self._last.get(wd, -1) > start or self._overflow > start

    def hold(self, wd: int) -> None:
        """Count one more holder of *wd* (before the entry is inserted)."""
        self._refs[wd] = self._refs.get(wd, 0) + 1

    def release(self, wd: int) -> None:
        """One holder of *wd* let go; the watch goes with the last."""
        refs = self._refs.get(wd)
        if refs is None:
            return
        if refs > 1:
            self._refs[wd] = refs - 1
            return
        del self._refs[wd]
        if self.fd >= 0 and wd not in self.memfds:
            try:
                _call(_libc.inotify_rm_watch(self.fd, wd))
            except OSError:
                pass  # gone already: its inode was dropped or unmounted

    def forget(self, wd: int) -> None:
        """A watch added for a copy that is not kept: remove it unless an entry holds it."""
        if wd not in self._refs and wd not in self.memfds and self.fd >= 0:
            try:
                _call(_libc.inotify_rm_watch(self.fd, wd))
            except OSError:
                pass

    def drain(self) -> None:
        """Read every pending event; what they end goes at once. Never blocks."""
        if self.fd < 0:
            return
        try:
            # Called for every datagram and every copy: asking how many bytes
            # wait costs a third of a read that fails with EAGAIN (its
            # exception made and caught), which is what nearly every call found.
            if fcntl.ioctl(self.fd, termios.FIONREAD, _NOTHING) == _NOTHING:
                return
        except OSError:
            pass  # read below, as if something waited
        while True:
            try:
                data = os.read(self.fd, _READ_SIZE)
            except BlockingIOError:
                return
            except InterruptedError:
                continue
            self._handle(data)
            if len(self._last) > self._prune_at:
                self._prune()
            if len(data) < _READ_SIZE - 4096:
                return  # a short read: nothing more was queued

    def _prune(self) -> None:
        """Forget events no undecided copy began before; they can answer nothing.

        A copy that never ends (a read on a hung mount) holds the floor where it
        began: past MAX_UNDECIDED_EVENTS kept for such copies, every copy under way
        is answered "changed" from then on (as after lost events: never cached),
        and only the events of watches that entries hold are kept. The next prune
        comes once as many again were read, so each event is gone through a
        bounded number of times however long a copy hangs.
        """
        floor = min(self._active, default=self.seq)
        refs = self._refs
        kept = {wd: s for wd, s in self._last.items() if s > floor or wd in refs}
        if len(kept) > len(refs) + MAX_UNDECIDED_EVENTS:
            self._overflow = self.seq
            kept = {wd: s for wd, s in kept.items() if wd in refs}
        self._last = kept
        self._prune_at = 2 * (len(kept) + len(refs)) + 1024

    def _handle(self, data: bytes) -> None:
        offset, end = 0, len(data)
        while offset + _EVENT.size <= end:
            wd, mask, _cookie, length = _EVENT.unpack_from(data, offset)
            offset += _EVENT.size + length
            self.seq += 1
            if mask & IN_Q_OVERFLOW:
                logger.warning("inotify lost events: every watched entry is dropped")
                self._overflow = self.seq  # and no copy under way is cached
                self.on_overflow()
                continue
            self._last[wd] = self.seq
            if mask & IN_IGNORED:
                # The watch is gone (its inode dropped, its file system
                # unmounted, or we removed it): nothing of it holds any more.
                if self._refs.pop(wd, None) is not None:
                    self.on_event(wd)
                self.on_freed(wd)
                continue
            if wd in self._refs:
                self.on_event(wd)
            if mask & IN_ATTRIB:  # a memfd of ours, perhaps also a client's source
                self.on_attrib(wd)

    @property
    def watched(self) -> int:
        return len(self._refs)
