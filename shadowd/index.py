# The index of the cache: a memfd the daemon writes and every peer that may
# read the daemon's descriptors anyway (its own uid, or root) maps read-only,
# so that a hit needs no round trip: the client finds the slot of the file it
# opened, reopens the daemon's memfd through /proc/PID/fd/N and checks it is
# exactly what the slot says (docs/protocol.md, "The index").
#
# Layout (little-endian), fixed for the index's life:
#   header, HEADER bytes: magic b"SHDWIDX1", u32 layout version (2), u32
#     slot size (SLOT), u32 slots (a power of two), u32 the daemon's pid,
#     u64 st_dev of the daemon's memfds, u32 most probes (MAX_PROBE), u32 0,
#     u64 a random generation (another daemon, another index), u32 the
#     first descriptor number of the range (fdrange.py), u32 its size (0:
#     none; readers of the first layout ignore both), u32 the daemon's own
#     descriptor of this index (a reader that finds this very memfd there
#     knows /proc/PID is the daemon, not another process of that pid in
#     its pid namespace, before it trusts the range), u32 0, u64 the slot
#     key (random; keys slot_of, so that only a reader of the index knows
#     which files share a probe run), zeros.
#   slots, SLOT bytes each: u32 seq (0 never used; odd while being written;
#     even once written), u32 state (1 live, 2 removed), u64 dev, u64 ino,
#     u64 size, i64 mtime_ns, i64 ctime_ns, i32 the daemon's fd of the memfd,
#     u32 the memfd's st_mode, u64 its st_ino, i64 its st_ctime_ns, zeros.
#   A file's slot is probed from slot_of(dev, ino, slots, key) on, at most
#   MAX_PROBE slots, stopping at one never used.
#
# Must never: let a reader trust a slot being written (seq is odd from before
# the first field is written until after the last); keep a slot of an entry
# the cache dropped (it is removed before the memfd can be closed); index a
# private entry, or one whose inode is not watched; place a file where
# anyone who cannot read the index could tell (the slot key is secret: an
# unkeyed placement let another uid fill a file's probe run with its own
# files, docs/security.md attack 42); be writable or growable
# by anyone but the daemon's own mapping (F_SEAL_FUTURE_WRITE, GROW, SHRINK);
# publish a range of descriptor numbers that are not all memfds at every
# instant (readers open a number in it without the O_PATH step).
from __future__ import annotations

import ctypes
import fcntl
import mmap
import os
import secrets
import struct
import sys

import attrs

from .cache import DropReason, Entry, HostKey
from .fdrange import FdRange
from .fds import FdHolder, move_high
from .memfd import SealedFile, reopen_readonly

MAGIC = b"SHDWIDX1"
#: 2: the slot key (header offset 64) keys slot_of; readers of layout 1
#: placed files unkeyed, and refuse this index as any layout they do not know.
LAYOUT_VERSION = 2
HEADER = 4096
SLOT = 128
MAX_PROBE = 16
_HEADER = struct.Struct("<8sIIIIQII Q II I I Q")
#: Where the header's slot key is (after the index fd and a u32 0).
KEY_OFFSET = 64
# seq, state, dev, ino, size, mtime_ns, ctime_ns, fd, mode, memfd ino, memfd ctime
_SLOT = struct.Struct("<IIQQQqqiIQq")
_SEQ = struct.Struct("<I")
_BODY_OFFSET = 4  # the fields after seq
_BODY = struct.Struct("<IQQQqqiIQq")
LIVE, REMOVED = 1, 2
_MASK64 = (1 << 64) - 1
F_SEAL_FUTURE_WRITE = getattr(fcntl, "F_SEAL_FUTURE_WRITE", 0x0010)
#: Every slot write happens in program order on x86 (TSO) without fences;
#: elsewhere the index is not published without the C writer.
ORDERED_STORES = sys.byteorder == "little" and os.uname().machine in ("x86_64", "i686", "amd64")


def _mix(x: int) -> int:
    """A 64-bit bijection with full avalanche (splitmix64's finaliser)."""
    x ^= x >> 30
    x = (x * 0xBF58476D1CE4E5B9) & _MASK64
    x ^= x >> 27
    x = (x * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def slot_of(dev: int, ino: int, slots: int, key: int) -> int:
    """Where a file's probe starts: (dev, ino) mixed under the index's slot *key*,
    masked to *slots*. The key enters before the first mix, so without it nobody
    can tell which files share a probe run (docs/protocol.md, "The index")."""
    return _mix(_mix((key ^ dev) & _MASK64) ^ ino) & (slots - 1)


def slots_for(max_entries: int) -> int:
    """Twice the entries, rounded up to a power of two (at least 64)."""
    n = 64
    while n < 2 * max_entries:
        n *= 2
    return n


@attrs.frozen
class Slot:
    """What one slot says (for readers and tests)."""

    seq: int
    state: int
    dev: int
    ino: int
    size: int
    mtime_ns: int
    ctime_ns: int
    fd: int
    mode: int
    memfd_ino: int
    memfd_ctime_ns: int

    @property
    def version(self) -> tuple[int, int, int]:
        return (self.size, self.mtime_ns, self.ctime_ns)


@attrs.define
class _Mapping:
    """A shared, writable mapping of a file, made without keeping an fd.

    Python's ``mmap.mmap`` keeps a dup of the fd it maps, at the lowest free
    number: a long-lived fd among the low numbers each hit's two fds take,
    which would split a round's fds in two and cost a close_range (see
    fds.LONG_LIVED_BASE). libc's mmap keeps none.
    """

    address: int
    size: int
    view: memoryview

    @classmethod
    def of(cls, fd: int, size: int) -> _Mapping:
        address = _libc.mmap(None, size, mmap.PROT_READ | mmap.PROT_WRITE, mmap.MAP_SHARED, fd, 0)
        if address in (None, _MAP_FAILED):
            err = ctypes.get_errno()
            raise OSError(err, f"mmap the index: {os.strerror(err)}")
        array = (ctypes.c_ubyte * size).from_address(address)
        return cls(address, size, memoryview(array).cast("B"))

    def close(self) -> None:
        if self.address:
            self.view.release()
            _libc.munmap(self.address, self.size)
            self.address = 0


_libc = ctypes.CDLL(None, use_errno=True)
_libc.mmap.restype = ctypes.c_void_p
_libc.mmap.argtypes = (
    ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long
)  # fmt: skip
_libc.munmap.argtypes = (ctypes.c_void_p, ctypes.c_size_t)
_MAP_FAILED = ctypes.c_void_p(-1).value


def read_slot(view: mmap.mmap | memoryview | bytes, n: int) -> Slot:
    return Slot(*_SLOT.unpack_from(view, HEADER + n * SLOT))


@attrs.define(eq=False)
class Index:
    """The daemon's side: a sealed memfd it alone writes, kept in step with the cache.

    A cache observer: an entry is put in its slot once it is watched (host
    entries only), and removed when the cache drops it, before its memfd can
    be closed. Entries that do not fit within MAX_PROBE slots are simply
    not in the index (served through the socket).
    """

    slots: int
    #: Where indexed memfds are renumbered to, so readers may skip the O_PATH
    #: step (None: every reader takes it).
    fd_range: FdRange | None = None
    holder: FdHolder = attrs.field(init=False)
    _mapping: _Mapping = attrs.field(init=False)
    _map: memoryview = attrs.field(init=False)
    #: Where each indexed entry's slot is.
    _where: dict[HostKey, int] = attrs.field(factory=dict, init=False)
    memfd_dev: int = attrs.field(default=0, init=False)
    generation: int = attrs.field(factory=lambda: secrets.randbits(63), init=False)
    #: What keys slot_of: known to the index's readers only (never in stats, logs
    #: or replies), so no other uid can aim its files at a file's probe run.
    key: int = attrs.field(factory=lambda: secrets.randbits(64), init=False, repr=False)

    def __attrs_post_init__(self) -> None:
        size = HEADER + self.slots * SLOT
        fd = os.memfd_create("shadowd-index", os.MFD_CLOEXEC | os.MFD_ALLOW_SEALING)
        try:
            os.ftruncate(fd, size)
            self._mapping = _Mapping.of(fd, size)
            self._map = self._mapping.view
            # Our mapping stays writable; nobody else can write, grow or
            # shrink it, or map it writable, from now on.
            fcntl.fcntl(
                fd,
                fcntl.F_ADD_SEALS,
                F_SEAL_FUTURE_WRITE | fcntl.F_SEAL_GROW | fcntl.F_SEAL_SHRINK | fcntl.F_SEAL_SEAL,
            )
            os.fchmod(fd, 0o444)
        except BaseException:
            os.close(fd)
            raise
        self.holder = FdHolder(move_high(fd))
        probe = os.memfd_create("shadowd-probe", os.MFD_CLOEXEC)
        try:
            self.memfd_dev = os.fstat(probe).st_dev
        finally:
            os.close(probe)
        _HEADER.pack_into(
            self._map,
            0,
            MAGIC,
            LAYOUT_VERSION,
            SLOT,
            self.slots,
            os.getpid(),
            self.memfd_dev,
            MAX_PROBE,
            0,
            self.generation,
            self.fd_range.base if self.fd_range is not None else 0,
            self.fd_range.size if self.fd_range is not None else 0,
            self.holder.fd,
            0,
            self.key,
        )

    @property
    def entries(self) -> int:
        return len(self._where)

    def reader_fd(self) -> int:
        """A fresh read-only fd of the index, for a peer that may read it."""
        return reopen_readonly(self.holder.fd)

    def close(self) -> None:
        self._mapping.close()
        self.holder.close()
        if self.fd_range is not None:
            self.fd_range.close()

    # -- cache observer --------------------------------------------------

    def inserted(self, entry: Entry) -> None:
        self.put(entry)

    def dropped(self, entry: Entry, reason: DropReason) -> None:
        self.remove(entry)

    # -- slots -----------------------------------------------------------

    def put(self, entry: Entry) -> bool:
        """Publish *entry* if it may be (a watched host entry of a sealed memfd)."""
        file = entry.file
        if entry.private or entry.wd < 0 or not isinstance(file, SealedFile) or file.closed:
            return False
        mode, memfd_ctime = file.stamp
        if mode < 0:
            return False
        key = HostKey(*entry.key)  # type: ignore[misc]
        size, mtime_ns, ctime_ns = entry.version
        if ctime_ns is None or not _fits(mtime_ns) or not _fits(ctime_ns):
            return False
        n = self._where.get(key)
        if n is None:
            n = self._free_slot(key)
            if n is None:
                return False
        if self.fd_range is not None:
            file.move_into(self.fd_range)  # (once; when full, it stays where it is)
        memfd_ino = os.fstat(file.fd).st_ino
        self._write(
            n, LIVE, key.dev, key.ino, size, mtime_ns, ctime_ns, file.fd, mode, memfd_ino,
            memfd_ctime,
        )  # fmt: skip
        self._where[key] = n
        return True

    def remove(self, entry: Entry) -> None:
        """Take *entry* out (before its memfd may be closed)."""
        key = HostKey(*entry.key) if not entry.private else None  # type: ignore[misc]
        if key is None:
            return
        n = self._where.get(key)
        if n is None:
            return
        slot = read_slot(self._map, n)
        if slot.fd != entry.file.fd:
            return  # the slot holds a newer entry of the same file
        del self._where[key]
        self._write(n, REMOVED, 0, 0, 0, 0, 0, -1, 0, 0, 0)

    def _free_slot(self, key: HostKey) -> int | None:
        start = slot_of(key.dev, key.ino, self.slots, self.key)
        mask = self.slots - 1
        for i in range(MAX_PROBE):
            n = (start + i) & mask
            seq, state = struct.unpack_from("<II", self._map, HEADER + n * SLOT)
            if seq == 0 or state != LIVE:
                return n
        return None

    def _write(self, n: int, *fields: int) -> None:
        """Seqlock write: seq odd, the fields, seq even (stores stay in order)."""
        offset = HEADER + n * SLOT
        seq = _SEQ.unpack_from(self._map, offset)[0]
        odd = ((seq + 1) | 1) & 0xFFFFFFFF
        done = (odd + 1) & 0xFFFFFFFF or 2  # never 0, which means "never used"
        _SEQ.pack_into(self._map, offset, odd)  # being written
        _BODY.pack_into(self._map, offset + _BODY_OFFSET, *fields)
        _SEQ.pack_into(self._map, offset, done)


def _fits(ns: int) -> bool:
    return -(1 << 63) <= ns < (1 << 63)
