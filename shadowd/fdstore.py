# Warm restarts: every cached memfd is also kept in the service manager's
# file-descriptor store (FDSTORE=1), named after its key, removed from it when
# the cache drops the entry (FDSTOREREMOVE=1), and taken back into the cache
# when the next daemon starts (LISTEN_FDS / LISTEN_FDNAMES).
#
# Must never: restore a descriptor that is not a sealed memfd of exactly the
# size its name says (whatever comes back is checked as if a stranger sent
# it); trust a restored entry beyond its key: the normal lookup compares the
# version with the client's fresh stat, so an entry that went stale during the
# restart is invalidated on its next lookup, never served, and it is served
# only through the mount it was copied from (whose file system it then is,
# mount IDs being never reused), which watches it from then on; remove stored
# descriptors when the daemon merely stops (a restart must find them).
from __future__ import annotations

import logging
import os
import re
import stat
from collections.abc import Iterable, Sequence
from urllib.parse import quote, unquote

import attrs

from . import memfd
from .cache import Admission, Cache, DropReason, Entry, HostKey, Version
from .errors import DaemonError
from .fds import FdHolder, close_all
from .memfd import SealedFile
from .systemd import UNNAMED, Notifier, PassedFd

logger = logging.getLogger(__name__)

#: Every name this daemon gives a stored descriptor starts with this; the
#: version number changes whenever the format after it does.
NAME_PREFIX = "shadowd/v2/"
#: The service manager ignores longer names (and names with control
#: characters or ':').
MAX_NAME = 255
_UINT64 = 1 << 64
_INT64 = 1 << 63
_NUMBER = re.compile(r"-?[0-9]{1,20}\Z")
# Percent-encoded labels keep '/' readable; ':' (the LISTEN_FDNAMES separator),
# '%', spaces, control and non-ASCII characters are all encoded.
_LABEL_SAFE = "/"


@attrs.frozen
class StoredName:
    """What a stored descriptor's name says: the cache key, the mount, the version, the label.

    The mount's unique ID (0: the kernel had none) is what lets the next
    daemon vouch for the entry: it is served again only to a request
    through that very mount (see guard.EntryGuard.usable).
    """

    key: HostKey
    version: Version
    label: str | None
    mnt: int = 0

    def format(self) -> str:
        """The FDNAME for this entry; the label is left out when it would not fit."""
        size, mtime_ns, ctime_ns = self.version
        head = (
            f"{NAME_PREFIX}{self.key.dev}/{self.key.ino}/{self.mnt}/{size}/{mtime_ns}/{ctime_ns}/"
        )
        if self.label:
            named = head + quote(self.label, safe=_LABEL_SAFE, errors="replace")
            if len(named) <= MAX_NAME:
                return named
        return head

    @classmethod
    def parse(cls, name: str) -> StoredName | None:
        """The key in *name*, or None when it is not a name this format writes."""
        if not name.startswith(NAME_PREFIX) or len(name) > MAX_NAME:
            return None
        parts = name[len(NAME_PREFIX) :].split("/", 6)
        if len(parts) != 7 or not all(_NUMBER.match(p) for p in parts[:6]):
            return None
        dev, ino, mnt, size, mtime_ns, ctime_ns = (int(p) for p in parts[:6])
        if not (0 <= dev < _UINT64 and 0 <= ino < _UINT64 and 0 <= size < _INT64):
            return None
        if not (0 <= mnt < _UINT64):
            return None
        if not (-_INT64 <= mtime_ns < _INT64 and -_INT64 <= ctime_ns < _INT64):
            return None
        label = unquote(parts[6], errors="replace") or None
        return cls(key=HostKey(dev, ino), version=(size, mtime_ns, ctime_ns), label=label, mnt=mnt)


def name_for(entry: Entry) -> str | None:
    """The FDNAME of a cache entry, or None for entries that are never stored."""
    if entry.private or not isinstance(entry.key, HostKey) or entry.version[2] is None:
        return None
    return StoredName(
        key=entry.key, version=entry.version, label=entry.label, mnt=entry.mnt
    ).format()


class Rejected(DaemonError):
    """A stored descriptor that cannot go back into the cache (the reason says why)."""


def adopt_memfd(fd: int, expected_size: int) -> SealedFile:
    """*fd* as a SealedFile, if it is a sealed memfd of *expected_size* bytes.

    Raises Rejected otherwise; *fd* stays the caller's then.
    """
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise Rejected("not a regular file")
    try:
        target = os.readlink(f"/proc/self/fd/{fd}")
    except OSError as exc:
        raise Rejected(f"cannot read its link: {exc.strerror}") from None
    # Named after the file it copies (memfd.name_for), so any memfd name; a
    # memfd has no link to any directory.
    if not (target.startswith("/memfd:") and target.endswith(" (deleted)") and st.st_nlink == 0):
        raise Rejected(f"not a memfd ({target!r})")
    if not memfd.is_sealed(fd):
        raise Rejected("not sealed")
    if st.st_size != expected_size:
        raise Rejected(f"{st.st_size} bytes where its name says {expected_size}")
    executable = bool(st.st_mode & 0o111)
    if stat.S_IMODE(st.st_mode) != (0o555 if executable else 0o444):
        raise Rejected(f"mode {stat.S_IMODE(st.st_mode):o} is not what shadowd seals with")
    return SealedFile(FdHolder(fd), size=st.st_size, executable=executable)


@attrs.define(eq=False)
class FdStore:
    """Keeps the service manager's fd store equal to the cache's host entries.

    A cache observer: every entry inserted is stored (while fewer than
    ``max_entries`` are), every entry evicted or invalidated is removed, and
    entries let go at shutdown stay for the next start.
    """

    notifier: Notifier | None
    #: How many descriptors the service manager keeps for us (its
    #: FileDescriptorStoreMax=); 0 stores nothing new.
    max_entries: int = 0
    restored: int = 0
    rejected: int = 0
    _names: dict[Entry, str] = attrs.field(factory=dict)

    @property
    def entries(self) -> int:
        """Entries the store holds for us, as far as we know."""
        return len(self._names)

    # -- start -----------------------------------------------------------

    def restore(self, cache: Cache, passed: Sequence[PassedFd]) -> None:
        """Take the stored memfds in *passed* back into *cache*; close the rest.

        Every descriptor in *passed* is ours to close or keep. Afterwards this
        store observes *cache*.
        """
        unwanted: set[str] = set()
        try:
            for i, item in enumerate(passed):
                try:
                    self._restore_one(cache, item, unwanted)
                except BaseException:
                    close_all(p.fd for p in passed[i + 1 :])
                    raise
            # Entries evicted again by the budgets while restoring.
            for entry, name in list(self._names.items()):
                if cache.peek(entry.key) is not entry:
                    del self._names[entry]
                    unwanted.add(name)
        finally:
            self._forget(unwanted)
        self.restored = len(self._names)
        if passed:
            logger.info(
                "warm restart: %d of %d stored descriptors back in the cache (%d rejected)",
                self.restored,
                len(passed),
                self.rejected,
            )
        cache.add_observer(self)

    def _restore_one(self, cache: Cache, item: PassedFd, unwanted: set[str]) -> None:
        stored = StoredName.parse(item.name)
        if stored is None:
            os.close(item.fd)
            if item.name != UNNAMED:
                logger.info("dropping a stored descriptor of unknown name %r", item.name)
                unwanted.add(item.name)
            return
        try:
            sealed = adopt_memfd(item.fd, stored.version[0])
        except (Rejected, OSError) as exc:
            os.close(item.fd)
            self.rejected += 1
            logger.warning("stored descriptor %r rejected: %s", item.name, exc)
            unwanted.add(item.name)
            return
        try:
            # Not watched (wd -1) until a request through its mount vouches for it.
            admission, entry = cache.insert(
                stored.key,
                stored.version,
                sealed,
                label=stored.label,
                ctime_ns=stored.version[2],
                mnt=stored.mnt,
            )
        finally:
            sealed.release()  # the cache took its own reference, if it kept it
        if entry is not None and entry.file is sealed:
            self._names[entry] = item.name
        elif admission is not Admission.CACHED:
            logger.info("stored entry %r not restored: %s", item.name, admission.value)
            unwanted.add(item.name)
        # else: a second descriptor of one version; dropping the entry later
        # removes every descriptor of that name from the store.

    def _forget(self, names: Iterable[str]) -> None:
        """Remove *names* from the store, then store again what we kept under them."""
        names = set(names)
        for name in sorted(names):
            self._send(f"FDSTOREREMOVE=1\nFDNAME={name}")
        for entry, name in self._names.items():
            if name in names:
                self._store(entry, name)

    # -- cache observer --------------------------------------------------

    def inserted(self, entry: Entry) -> None:
        if len(self._names) >= self.max_entries:
            return
        name = name_for(entry)
        if name is not None and self._store(entry, name):
            self._names[entry] = name

    def dropped(self, entry: Entry, reason: DropReason) -> None:
        name = self._names.pop(entry, None)
        if name is not None and reason is not DropReason.CLEARED:
            self._send(f"FDSTOREREMOVE=1\nFDNAME={name}")

    # -- sending ---------------------------------------------------------

    def _store(self, entry: Entry, name: str) -> bool:
        file = entry.file
        if not isinstance(file, SealedFile) or file.closed:
            return False
        # FDPOLL=0: a memfd has nothing to poll for; without it an older
        # manager would try, and a newer one would warn.
        return self._send(f"FDSTORE=1\nFDNAME={name}\nFDPOLL=0", (file.fd,), file)

    def _send(
        self, message: str, fds: tuple[int, ...] = (), keep: SealedFile | None = None
    ) -> bool:
        if self.notifier is None:
            return False
        return self.notifier.send(message, fds, keep)
