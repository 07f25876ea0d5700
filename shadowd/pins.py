# Memory clients pin: a memfd the daemon made stays in memory as long as
# anyone holds a descriptor or a mapping of it, cached or not. While it is in
# the cache --max-bytes counts it; once out (evicted, replaced, never cached)
# it is charged, at its full size, to the uid whose request made the copy,
# until the kernel says the last holder let go (an inotify watch on the memfd
# is removed, with IN_IGNORED, when its inode is freed). Copies under way are
# charged the same. A uid at --max-pinned-bytes-per-uid gets no new copy:
# its request is refused with busy, and its clients copy for themselves.
#
# A memfd that another uid's request found too (a hit, or a copy it joined)
# is charged to no uid, only to all uids together: the daemon knows whom it
# gave a descriptor, never who still holds one, and a charge on either uid
# would let the other keep it up for as long as it likes (attack 41: a uid
# that held a hundred tiny entries another uid's requests made put that uid
# past its bound).
#
# All uids together are charged at most `total` (the server's --max-bytes, or
# one uid's bound if that is more); past it, a uid below its fair share (total
# over the uids charged) may go on, never past `hard`, half as much again:
# whoever may use many uids (a subordinate uid range: thousands) no longer
# pins one bound per uid (attack 40).
#
# So the memfds the daemon made hold at most --max-bytes in the cache plus,
# out of it, 1.5 times --max-bytes in all (and what the copies that evict
# entries someone holds add), of which a uid is charged at most
# --max-pinned-bytes-per-uid for those only its own requests found; sparse
# holes are never copied, and a holder that fills them by mapping the file
# pays for those pages itself.
#
# Each memfd is charged PIN_FLOOR at least: besides its pages it takes an
# inode and an inotify watch of the daemon's uid (fs.inotify.max_user_watches,
# shared by every cached file), so the bound is on their number too (attack 38).
#
# A copy that found its file grown since it was asked for (a retry copies the
# file at its new size) grows its reservation before it is kept or served, or
# is refused as a copy of that size would have been (grow).
#
# Must never: let a uid start a copy past its bound, or keep one grown past it;
# forget a charge while the memfd may still be held (a shared one stays in all
# uids' charge); charge a uid for a memfd another uid may hold; keep a watch
# that pins anything (an inotify watch does not keep a memfd's pages).
from __future__ import annotations

import logging

import attrs

from .errors import RequestError
from .protocol import ErrorCode

logger = logging.getLogger(__name__)

#: The least a memfd is charged, whatever its size: at the default bound (256 MiB)
#: a uid holds at most 4,096 memfds out of the cache, as many as it may have
#: descriptors in flight (--max-fds-per-uid). Charged by size alone, a uid held
#: 5,000 1-byte copies for 5,000 bytes of its bound, each with its watch, and as many
#: more as it liked: at the watch limit no file was cached any more, and no memfd
#: the daemon could not watch was charged (attack 38).
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
    #: Found by another uid's request too: charged to all uids together only.
    shared: bool = False


@attrs.define
class Pins:
    """Per uid, the bytes of copies under way and of memfds out of the cache still held."""

    per_uid: int
    #: What all uids together are charged before only a uid below its fair share
    #: may have more (0: per_uid).
    total: int = 0
    #: What they are never charged past (0: total and half as much again).
    hard: int = 0
    #: How often a bound was reached, by name (the server's limit_hits).
    hits: dict[str, int] = attrs.field(factory=dict)
    #: Charged bytes per uid.
    charged: dict[int, int] = attrs.field(factory=dict)
    #: Charged bytes of every uid together, shared memfds included.
    used: int = 0
    #: Of those, the bytes of shared memfds, which no uid is charged.
    shared: int = 0
    #: Bytes of memfds out of the cache that someone still holds (every uid).
    pinned: int = 0
    _pins: dict[int, Pin] = attrs.field(factory=dict)

    def __attrs_post_init__(self) -> None:
        self.total = self.total or self.per_uid
        self.hard = max(self.hard or self.total + self.total // 2, self.total)

    def _charge(self, uid: int | None, n: int) -> None:
        if uid is None:
            return
        before = self.charged.get(uid, 0)
        left = before + n
        self.used += left - before if left > 0 else -before
        if left > 0:
            self.charged[uid] = left
        else:
            self.charged.pop(uid, None)

    def _charge_pin(self, pin: Pin, n: int) -> None:
        if pin.shared:
            self.used += n
            self.shared += n
        else:
            self._charge(pin.uid, n)

    def reserve(self, uid: int, size: int) -> None:
        """A copy of *size* bytes starts for *uid*: refused (busy) past its bound, or
        past the bound of all uids unless it is below its fair share of it."""
        self._check(uid, cost(size), size)
        self._charge(uid, cost(size))

    def grow(self, uid: int, reserved: int, size: int) -> None:
        """A copy reserved with :meth:`reserve` for *reserved* bytes came to *size* (the
        file grew before its copy, which copied it again): its reservation grows to
        *size*'s, or, refused as :meth:`reserve` would refuse it, stays as it was."""
        more = cost(size) - cost(reserved)
        if more > 0:
            self._check(uid, more, size)
            self._charge(uid, more)

    def _check(self, uid: int, want: int, size: int) -> None:
        """Refuse (busy) *want* more bytes for *uid*'s copy of a *size*-byte file past its
        bound, or past the bound of all uids unless it is below its fair share of it."""
        used = self.charged.get(uid, 0)
        if used + want > self.per_uid:
            self._refuse(
                f"uid {uid} has {used} bytes of copies under way or held out of the cache "
                f"(at most {self.per_uid}, --max-pinned-bytes-per-uid; each memfd "
                f"counts {PIN_FLOOR} at least); copy this {size}-byte file locally"
            )
        if self.used + want > self.total and not (
            self.used + want <= self.hard and used + want <= self.total // max(1, len(self.charged))
        ):
            self._refuse(
                f"all uids have {self.used} bytes of copies under way or held out of the "
                f"cache (at most {self.total}, --max-bytes, and past it a uid's fair share, "
                f"uid {uid} has {used}); copy this {size}-byte file locally"
            )

    def _refuse(self, message: str) -> None:
        self.hits["max_pinned_bytes_per_uid"] = self.hits.get("max_pinned_bytes_per_uid", 0) + 1
        raise RequestError(ErrorCode.BUSY, message)

    def unreserve(self, uid: int, size: int) -> None:
        """A copy reserved with :meth:`reserve` ended without a memfd to track."""
        self._charge(uid, -cost(size))

    def track(
        self,
        wd: int,
        size: int,
        uid: int | None,
        *,
        cached: bool,
        reserved: int | None,
        shared: bool = False,
    ) -> None:
        """A memfd of *size* bytes, watched as *wd*: in the cache, or charged to *uid*
        (to all uids together only when *shared*: requests of other uids joined its copy).

        Takes over the reservation :meth:`reserve` made for *uid* of *reserved*
        bytes (None: none was made).
        """
        if reserved is not None:
            self._charge(uid, -cost(reserved))
        pin = Pin(wd=wd, size=size, uid=uid, cached=cached, shared=shared and uid is not None)
        if not cached:
            self.pinned += size
            self._charge_pin(pin, cost(size))
        self._pins[wd] = pin

    def found(self, wd: int, uid: int) -> None:
        """A request of *uid* found the memfd watched as *wd* in the cache (a hit): if
        another uid is charged for it, none is from now on, all uids together are.

        Whoever holds it out of the cache, the daemon cannot tell which of the uids
        it was served to still does; charged to its maker, it kept that uid at its
        bound while another uid held it (attack 41)."""
        pin = self._pins.get(wd)
        if pin is None or pin.shared or pin.uid is None or pin.uid == uid:
            return
        if not pin.cached:
            n = cost(pin.size)
            self._charge(pin.uid, -n)
            self.used += n
            self.shared += n
        pin.shared = True

    def is_pin(self, wd: int) -> bool:
        return wd in self._pins

    def left_cache(self, wd: int) -> None:
        """The cache let go of the memfd watched as *wd*: charged until it is freed."""
        pin = self._pins.get(wd)
        if pin is None or not pin.cached:
            return
        pin.cached = False
        self.pinned += pin.size
        self._charge_pin(pin, cost(pin.size))

    def freed(self, wd: int) -> None:
        """The kernel removed watch *wd*: its memfd is gone, nobody holds it any more."""
        pin = self._pins.pop(wd, None)
        if pin is None or pin.cached:
            return
        self.pinned -= pin.size
        self._charge_pin(pin, -cost(pin.size))
