# Memory clients pin: a memfd the daemon made stays in memory as long as
# anyone holds a descriptor or a mapping of it, cached or not. While it is in
# the cache --max-bytes counts it; once out (evicted, replaced, never cached)
# it is charged, at its full size, to the uid whose request made the copy,
# until the kernel says the last holder let go (an inotify watch on the memfd
# is removed, with IN_IGNORED, when its inode is freed). Copies under way are
# charged the same. A uid at --max-pinned-bytes-per-uid gets no new copy:
# its request is refused with busy, and its clients copy for themselves.
#
# So the memfds the daemon made hold at most --max-bytes in the cache plus,
# per uid, --max-pinned-bytes-per-uid (and the one copy that evicts an entry
# it holds); sparse holes are never copied, and a holder that fills them by
# mapping the file pays for those pages itself.
#
# Each memfd is charged PIN_FLOOR at least: besides its pages it takes an
# inode and an inotify watch of the daemon's uid (fs.inotify.max_user_watches,
# shared by every cached file), so the bound is on their number too (attack 38).
#
# Must never: let a uid start a copy past its bound; forget a charge while
# the memfd may still be held; keep a watch that pins anything (an inotify
# watch does not keep a memfd's pages).
from __future__ import annotations

import logging

import attrs

from .errors import RequestError
from .protocol import ErrorCode

logger = logging.getLogger(__name__)

#: The least a memfd is charged, whatever its size: at the default bound (256 MiB)
#: a uid holds at most 4,096 memfds out of the cache, as many as it may have
#: descriptors in flight (--max-fds-per-uid). Charged by size alone, a uid held a
#: million 1-byte copies in a megabyte, each with its watch: at the watch limit no
#: file was cached any more, and no memfd the daemon could not watch was charged.
PIN_FLOOR = 64 * 1024


def cost(size: int) -> int:
    """What a memfd of *size* bytes is charged."""
    return size if size > PIN_FLOOR else PIN_FLOOR


@attrs.define(eq=False)
class Pin:
    """One memfd the daemon made, watched until it is freed."""

    wd: int
    size: int
    #: The uid charged while it is out of the cache (None: nobody's, e.g. restored).
    uid: int | None
    cached: bool


@attrs.define
class Pins:
    """Per uid, the bytes of copies under way and of memfds out of the cache still held."""

    per_uid: int
    #: How often a bound was reached, by name (the server's limit_hits).
    hits: dict[str, int] = attrs.field(factory=dict)
    #: Charged bytes per uid.
    charged: dict[int, int] = attrs.field(factory=dict)
    #: Bytes of memfds out of the cache that someone still holds (every uid).
    pinned: int = 0
    _pins: dict[int, Pin] = attrs.field(factory=dict)

    def _charge(self, uid: int | None, n: int) -> None:
        if uid is None:
            return
        left = self.charged.get(uid, 0) + n
        if left > 0:
            self.charged[uid] = left
        else:
            self.charged.pop(uid, None)

    def reserve(self, uid: int, size: int) -> None:
        """A copy of *size* bytes starts for *uid*: refused (busy) past its bound."""
        used = self.charged.get(uid, 0)
        if used + cost(size) > self.per_uid:
            self.hits["max_pinned_bytes_per_uid"] = self.hits.get("max_pinned_bytes_per_uid", 0) + 1
            raise RequestError(
                ErrorCode.BUSY,
                f"uid {uid} has {used} bytes of copies under way or held out of the cache "
                f"(at most {self.per_uid}, --max-pinned-bytes-per-uid; each memfd "
                f"counts {PIN_FLOOR} at least); copy this {size}-byte file locally",
            )
        self._charge(uid, cost(size))

    def unreserve(self, uid: int, size: int) -> None:
        """A copy reserved with :meth:`reserve` ended without a memfd to track."""
        self._charge(uid, -cost(size))

    def track(
        self, wd: int, size: int, uid: int | None, *, cached: bool, reserved: int | None
    ) -> None:
        """A memfd of *size* bytes, watched as *wd*: in the cache, or charged to *uid*.

        Takes over the reservation :meth:`reserve` made for *uid* of *reserved*
        bytes (None: none was made).
        """
        if reserved is not None:
            self._charge(uid, -cost(reserved))
        if not cached:
            self.pinned += size
            self._charge(uid, cost(size))
        self._pins[wd] = Pin(wd=wd, size=size, uid=uid, cached=cached)

    def is_pin(self, wd: int) -> bool:
        return wd in self._pins

    def left_cache(self, wd: int) -> None:
        """The cache let go of the memfd watched as *wd*: charged until it is freed."""
        pin = self._pins.get(wd)
        if pin is None or not pin.cached:
            return
        pin.cached = False
        self.pinned += pin.size
        self._charge(pin.uid, cost(pin.size))

    def freed(self, wd: int) -> None:
        """The kernel removed watch *wd*: its memfd is gone, nobody holds it any more."""
        pin = self._pins.pop(wd, None)
        if pin is None or pin.cached:
            return
        self.pinned -= pin.size
        self._charge(pin.uid, -cost(pin.size))
