# Private files: bytes a client supplies itself (a file of an in-process
# kernel's disk image, which the host cannot see), shared only with clients of
# the same uid that name the same namespace. PrivateFiles answers their
# lookups and publishes (no sockets here; dispatch.py sends the replies).
#
# A published descriptor is never trusted. It must be open for reading; a
# memfd the publisher may write to is sealed in place (all four seals) and
# then checked for the size its key claims; one that cannot be sealed (the
# publisher keeps a writable shared mapping: F_ADD_SEALS fails with EBUSY; or
# it is no memfd at all) is copied into a memfd of our own in a worker
# thread, where a file of a hung mount can only tie up its uid's quota.
#
# Must never: serve one uid's private bytes to another uid (the uid from
# SO_PEERCRED is part of every key); cache bytes whose length differs from the
# key's size; cache a memfd its publisher can still change; block the event
# loop on a descriptor that is not a memfd (only fcntl and fstat of shmem
# files run on the loop; everything else, close included, runs in workers).
from __future__ import annotations

import errno
import fcntl
import os
import stat
from collections.abc import Callable

import attrs

from .cache import Admission, Cache, CacheLimits, PrivateKey
from .copier import Copier, Quota
from .errors import RequestError, SourceChanged, refusing_os_errors, request_error_from_os
from .fds import FdHolder
from .memfd import F_SEAL_EXEC, REQUIRED_SEALS, SealedFile, memfd_seals, own_sealed, sealed_copy
from .opens import Served
from .pins import Pins
from .protocol import ErrorCode, FileKey, Lookup, Publish
from .source import check_readable, check_regular, check_size, stat_sync

#: Errors of F_ADD_SEALS that mean "this file cannot be sealed by us": a
#: writable shared mapping (EBUSY), F_SEAL_SEAL already set or an fd not open
#: for writing (EPERM), not a memfd (EINVAL).
_UNSEALABLE = (errno.EBUSY, errno.EPERM, errno.EINVAL)


def private_key(uid: int, event: Lookup | Publish) -> PrivateKey:
    return PrivateKey(uid, event.namespace, event.key.ino)


def size_mismatch(size: int, key: FileKey) -> RequestError:
    return RequestError(
        ErrorCode.SIZE_MISMATCH,
        f"the published file holds {size} bytes; its key says {key.size}",
    )


def seal_in_place(
    fd: int, key: FileKey, made_here: Callable[[int, int], bool] = lambda dev, ino: False
) -> SealedFile | None:
    """Seal a published memfd as it is, when we can; None when it must be copied.

    Runs on the event loop: *fd* must be a shmem file (``memfd_seals`` is not
    None), whose fcntl and fstat never wait on anyone. On success the returned
    SealedFile owns a dup of *fd*; *fd* stays the caller's either way.
    """
    seals = memfd_seals(fd)
    if seals is None:
        return None
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        return None  # the worker refuses it with a message naming the kind
    if made_here(st.st_dev, st.st_ino):
        # A memfd of the daemon's own, served and sent back: kept, it would be
        # this private entry and the cached copy of a host file, and once the
        # host entry left the cache it would count again as held out of it
        # (pinned, in all uids' bound) while only this entry held it (attack 49).
        return None
    if st.st_size != key.size:
        raise size_mismatch(st.st_size, key)
    executable = bool(st.st_mode & 0o111)
    if seals & REQUIRED_SEALS != REQUIRED_SEALS:
        if seals & fcntl.F_SEAL_SEAL or fcntl.fcntl(fd, fcntl.F_GETFL) & os.O_ACCMODE != os.O_RDWR:
            return None
        try:
            # Freeze the exec bits too where the kernel knows F_SEAL_EXEC.
            try:
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS | F_SEAL_EXEC)
            except OSError as exc:
                if exc.errno != errno.EINVAL:
                    raise
                fcntl.fcntl(fd, fcntl.F_ADD_SEALS, REQUIRED_SEALS)
        except OSError as exc:
            if exc.errno in _UNSEALABLE:
                return None
            raise request_error_from_os(exc, "cannot seal the published memfd") from exc
        # The publisher may have resized it between our fstat and the seals.
        size = os.fstat(fd).st_size
        if size != key.size:
            raise size_mismatch(size, key)
    mode = 0o555 if executable else 0o444
    if stat.S_IMODE(st.st_mode) != mode:
        try:
            # Defence in depth: a read-only mode makes an O_RDWR reopen fail for
            # anyone but root. Not possible when the memfd is another uid's. Never
            # when it has that mode already: a chmod moves the ctime even then, and
            # a memfd the daemon served (sent back as a publish by any uid that was
            # served it) would be found changed at its entry's next hit, dropped and
            # copied again (attack 46).
            os.fchmod(fd, mode)
        except OSError:
            pass
    return own_sealed(os.dup(fd), size=key.size, executable=executable)


def copy_published(src: FdHolder, key: FileKey) -> SealedFile:
    """Blocking: a sealed copy of a published file that we could not seal.

    Takes ownership of *src* and closes it, in this thread (it may be a file
    of a hung mount). The publisher may still write to it while we copy;
    what it gets is its own uid's business, and once copied, nothing it does
    changes our bytes.
    """
    try:
        st = stat_sync(src.fd)
        check_readable(src.fd)
        check_regular(st)
        if st.size != key.size:
            raise size_mismatch(st.size, key)
        try:
            return sealed_copy(src.fd, st)
        except SourceChanged as exc:
            raise RequestError(
                ErrorCode.UNSTABLE, f"the published file changed while it was copied: {exc}"
            ) from None
        except OSError as exc:
            raise request_error_from_os(exc, "cannot copy the published file") from exc
    finally:
        src.close()


@attrs.define
class PrivateCounters:
    """What happened to published files, for stats."""

    publishes: int = 0
    sealed_in_place: int = 0
    copied: int = 0
    races_lost: int = 0
    #: Entries dropped because a holder changed their memfd's attributes.
    tampered: int = 0


def adopt(
    cache: Cache,
    key: PrivateKey,
    file_key: FileKey,
    sealed: SealedFile,
    counters: PrivateCounters,
    *,
    track: Callable[[SealedFile, bool], None] | None = None,
) -> tuple[int, int, bool, bool]:
    """Cache a published file, or keep a concurrent publisher's; serve one of them.

    Returns a served fd, its size, whether it is another publisher's copy
    (that one won the race) and whether the file is cached. Takes over the
    caller's reference to *sealed*. *track(sealed, cached)* is told of
    *sealed* when it is served (pins.py), before our reference goes.
    """
    try:
        # A descriptor of it first: a file we cannot serve is never cached.
        with refusing_os_errors("cannot open a served descriptor"):
            fd = sealed.share()
        admission, entry = cache.insert(
            key, file_key.version, sealed, private=True, ctime_ns=file_key.ctime_ns
        )
        if entry is None or entry.file is sealed:
            if track is not None:
                track(sealed, entry is not None)
            return fd, sealed.size, False, admission is Admission.CACHED
        os.close(fd)
        counters.races_lost += 1
        with refusing_os_errors("cannot open a served descriptor"):
            return entry.file.share(), entry.size, True, True
    finally:
        sealed.release()


@attrs.define(eq=False)
class PrivateFiles:
    """Answers lookups and publishes of private files; no sockets here.

    A lookup is answered at once; a publish is sealed in place on the loop
    when it is a memfd we can seal, and copied in a worker otherwise.
    """

    cache: Cache
    copier: Copier
    limits: CacheLimits
    pins: Pins
    #: Watches a memfd the daemon made until it is freed (EntryGuard.track, guard.py).
    track: Callable[..., None]
    #: Whether (st_dev, st_ino) is a memfd the daemon made (EntryGuard.made_here): such
    #: a memfd published is copied, never kept.
    made_here: Callable[[int, int], bool] = lambda dev, ino: False
    counters: PrivateCounters = attrs.field(factory=PrivateCounters)
    #: Descriptors served of published files that were not cached.
    uncached: int = 0

    def lookup(self, uid: int, event: Lookup) -> Served | None:
        """A served fd of this uid's entry for the key, or None on a miss."""
        entry = self.cache.lookup(private_key(uid, event), event.key.version, private=True)
        if entry is None:
            return None
        if not entry.file.intact(times=False):
            # A holder of the memfd's own uid changed its mode or ACL through
            # a served fd: the next publish replaces it.
            self.counters.tampered += 1
            self.cache.reject(entry)
            return None
        with refusing_os_errors("cannot open a served descriptor"):
            return Served(fd=FdHolder(entry.file.share()), size=entry.size, hit=True)

    def publish_now(self, uid: int, event: Publish, src: FdHolder) -> Served | None:
        """A published file served at once (an entry of this version, or sealed in place).

        None when the file must be copied (:meth:`finish_publish`). The
        received fd stays *src*'s.
        """
        check_size(event.key.size, self.limits.max_file_size)
        key = private_key(uid, event)
        entry = self.cache.peek(key)
        if entry is not None and entry.version == event.key.version:
            # Another publisher of this uid and namespace was first.
            self.counters.races_lost += 1
            with refusing_os_errors("cannot open a served descriptor"):
                return Served(fd=FdHolder(entry.file.share()), size=entry.size, hit=True)
        check_readable(src.fd)
        with refusing_os_errors("cannot inspect the published fd"):
            sealed = seal_in_place(src.fd, event.key, self.made_here)
        if sealed is None:
            return None
        self.counters.publishes += 1
        self.counters.sealed_in_place += 1
        return self._adopt(key, event, sealed)

    async def finish_publish(self, uid: int, event: Publish, src: FdHolder, quota: Quota) -> Served:
        """Copy a published file in a worker (which owns and closes *src*), then serve it.

        When the uid may not have another copy under way, RequestError is
        raised before the worker takes *src*: it is still the caller's.
        """
        shmem = memfd_seals(src.fd) is not None
        key = event.key
        reserved = key.size
        # Refused (busy) past the uid's bound; *src* is then still the caller's.
        self.pins.reserve(uid, reserved)
        try:
            sealed = await self.copier.run(
                lambda: copy_published(src, key), src, remote=not shmem, quota=quota
            )
        except BaseException:
            self.pins.unreserve(uid, reserved)
            raise
        self.copier.copies += 1
        self.copier.bytes_copied += sealed.size
        self.counters.publishes += 1
        self.counters.copied += 1

        tracked = False

        def track(copy: SealedFile, cached: bool) -> None:
            nonlocal tracked
            self.track(copy, uid, cached=cached, reserved=reserved)
            tracked = True

        try:
            return self._adopt(private_key(uid, event), event, sealed, track)
        finally:
            if not tracked:  # not served: lost the race, or refused
                self.pins.unreserve(uid, reserved)

    def _adopt(
        self,
        key: PrivateKey,
        event: Publish,
        sealed: SealedFile,
        track: Callable[[SealedFile, bool], None] | None = None,
    ) -> Served:
        """Cache *sealed* (taking over our reference) and serve it or the winner's copy."""
        fd, size, lost, cached = adopt(
            self.cache, key, event.key, sealed, self.counters, track=track
        )
        if not cached:
            self.uncached += 1
        # cached: its descriptor's close after the reply is then never the memfd's
        # last (dispatch.py closes such at once; the others go to the Closer).
        return Served(fd=FdHolder(fd), size=size, hit=lost, cached=cached)
