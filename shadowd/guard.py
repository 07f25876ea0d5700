# Keeping the cache's host entries honest: each cached host file is watched
# (an inotify watch on its inode, watches.py) and its entry dropped at the
# first event; every hit is checked first, its memfd untouched by the holders
# it was served to; an entry restored at start is vouched for only through
# the mount it was copied from, which lends the fd to watch it; every memfd
# the daemon made is tracked until the kernel frees it (its bytes charged to
# a uid, or to all uids together once another uid's request found it,
# pins.py). The index of the cache (index.py) publishes an entry only once
# it is watched.
#
# Must never: let a hit be served from an entry whose inode had an event or
# whose memfd a holder changed; vouch for an unwatched entry through any
# mount but its own; release a watch another entry still holds; leave a
# memfd it made untracked while a uid is charged for it; keep charging for a
# memfd whose watch the kernel removed while events were lost (attack 36).
from __future__ import annotations

import logging

import attrs

from .cache import Cache, DropReason, Entry, HostKey, Shareable
from .index import Index
from .memfd import SealedFile
from .pins import Pins
from .source import SourceStat
from .watches import Watches

# Logged as before these lines moved here from opens.py: the name operators know.
logger = logging.getLogger("shadowd.opens")


@attrs.define(eq=False)
class EntryGuard:
    """Watches cached host files and memfds; says whether a hit may be served."""

    cache: Cache
    pins: Pins
    #: Cached memfds found changed by a holder (mode, ACL, times) and replaced.
    tampered: int = 0
    watches: Watches = attrs.field(init=False)
    #: Which entry each inotify watch belongs to.
    _by_wd: dict[int, HostKey] = attrs.field(factory=dict, init=False)
    #: The memfds tracked (by their watch), until the kernel frees them.
    _memfds: dict[int, SealedFile] = attrs.field(factory=dict, init=False)
    #: The watch of each of those memfds, by (st_dev, st_ino).
    _inodes: dict[tuple[int, int], int] = attrs.field(factory=dict, init=False)
    #: The index of the cache, while the daemon publishes one.
    index: Index | None = None

    def __attrs_post_init__(self) -> None:
        self.watches = Watches(
            on_event=self._changed,
            on_overflow=self._lost_events,
            on_freed=self._freed,
            on_attrib=self._attrib,
        )
        self.cache.add_observer(self)

    def track(
        self,
        sealed: SealedFile,
        uid: int | None,
        *,
        cached: bool,
        reserved: int | None = None,
        wd: int = -1,
        shared: bool = False,
    ) -> None:
        """Watch a memfd we made until it is freed (pins.py); takes over *uid*'s reservation
        of *reserved* bytes (None: none was made). *shared*: another uid's request
        joined its copy (charged to no uid then, pins.py).

        *wd*: its watch, when a worker added it already (Copied.memfd_wd). Its events
        can only have been the kernel's removal of it, which the memfd, held until
        now, has not let happen; any other event needs a holder of the memfd, and
        nobody else has had it yet."""
        try:
            if wd < 0:
                wd = self.watches.add_memfd(sealed.fd)
        except OSError:
            # Nothing would tell when it is freed: it is not charged.
            if uid is not None and reserved is not None:
                self.pins.unreserve(uid, reserved)
            return
        sealed.pin_wd = wd
        self._memfds[wd] = sealed
        self._inodes[sealed.inode] = wd
        self.watches.memfds.add(wd)
        self.pins.track(wd, sealed.size, uid, cached=cached, reserved=reserved, shared=shared)
        sealed.sole_uid = None if shared else uid

    def found(self, file: Shareable, uid: int) -> None:
        """A peer of *uid* was given *file* from the cache (a hit through the socket, or
        index hits it reported): if another uid is charged for it, none is from now on,
        all uids together are (pins.py, attack 41)."""
        if isinstance(file, SealedFile) and file.sole_uid is not None and file.sole_uid != uid:
            file.sole_uid = None
            self.pins.found(file.pin_wd, uid)

    def track_unwatched_entries(self) -> None:
        """Track the memfds the cache holds that no one tracks yet (restored at start)."""
        for entry in list(self.cache.index.values()):
            file = entry.file
            if isinstance(file, SealedFile) and file.pin_wd < 0:
                self.track(file, None, cached=True)

    # -- the watches' side ------------------------------------------------

    def _changed(self, wd: int) -> None:
        """An event on a cached file's inode: the entry goes (watches.py says why)."""
        key = self._by_wd.get(wd)
        if key is not None:
            self.cache.invalidate(key)

    def _lost_events(self) -> None:
        for key in list(self._by_wd.values()):
            self.cache.invalidate(key)
        for sealed in self._memfds.values():
            sealed.attr_changed = True  # an IN_ATTRIB may be among the lost
        # So may the IN_IGNORED of a memfd freed meanwhile: its uid would stay
        # charged for it for good (attack 36). The kernel says which are left.
        alive = self.watches.alive()
        if alive is not None:
            for wd in [wd for wd in self._memfds if wd not in alive]:
                self._freed(wd)

    def _attrib(self, wd: int) -> None:
        """A memfd's mode, owner, ACL or times changed: its next hit checks its stamp."""
        sealed = self._memfds.get(wd)
        if sealed is not None:
            sealed.attr_changed = True

    def made_here(self, dev: int, ino: int) -> bool:
        """Whether the inode (*dev*, *ino*) is a memfd the daemon made that is alive."""
        return (dev, ino) in self._inodes

    def _freed(self, wd: int) -> None:
        sealed = self._memfds.pop(wd, None)
        if sealed is not None and self._inodes.get(sealed.inode) == wd:
            del self._inodes[sealed.inode]
        self.watches.memfds.discard(wd)
        self.pins.freed(wd)

    def inserted(self, entry: Entry) -> None:
        if entry.wd >= 0 and not entry.private:
            self._by_wd[entry.wd] = entry.key  # type: ignore[assignment]

    def dropped(self, entry: Entry, reason: DropReason) -> None:
        if entry.wd >= 0 and self._by_wd.get(entry.wd) == entry.key:
            del self._by_wd[entry.wd]
            self.watches.release(entry.wd)
        file = entry.file
        if isinstance(file, SealedFile) and file.pin_wd >= 0:
            self.pins.left_cache(file.pin_wd)

    def usable(self, entry: Entry, fd: int, st: SourceStat, *, remote: bool) -> bool:
        """Whether a hit may be served: its memfd untouched, its source vouched for.

        An entry restored at start has no watch yet: it is kept only for a
        request through the very mount it was copied from (unique mount IDs
        are never reused, so that is its file system), which lends the fd to
        watch it from now on.
        """
        if not entry.file.intact():
            self.tampered += 1
            logger.warning("a cached memfd was changed by one of its holders; replacing it")
            return False
        if entry.wd >= 0:
            return True
        if remote or not st.mnt or st.mnt != entry.mnt:
            return False
        try:
            wd = self.watches.add(fd)
        except OSError:
            return False
        self.watches.hold(wd)
        entry.wd = wd
        self._by_wd[wd] = entry.key  # type: ignore[assignment]
        if self.index is not None:
            self.index.put(entry)  # watched now: it may be published
        return True
