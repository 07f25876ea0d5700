# Who may talk to the daemon, and how much of it each peer may use.
#
# Peers are identified by SO_PEERCRED when they connect (and SO_PEERGROUPS
# for their supplementary groups); the allow lists and the connection limits
# are checked right there, before the peer may send anything. Each uid gets
# a share: its connections and a quota of worker jobs, so a user whose files
# hang or who floods requests ties up only its own share.
#
# Must never: admit a peer that the allow lists exclude; count a connection
# twice or forget one (the per-uid record would leak or go negative); block
# (this runs on the event loop, at every accept).
from __future__ import annotations

import array
import collections
import errno
import os
import socket
import struct
from typing import Any

import attrs

from .copier import Quota
from .errors import RequestError
from .protocol import ErrorCode

_UCRED = struct.Struct("3i")
# socket.SO_PEERGROUPS is missing from some Pythons; Linux has it since 4.13.
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)
_NGROUPS_MAX = 65536


@attrs.frozen
class Peer:
    """Who is on the other end, from SO_PEERCRED at accept time."""

    pid: int
    uid: int
    gid: int

    @classmethod
    def from_socket(cls, sock: socket.socket) -> Peer:
        pid, uid, gid = _UCRED.unpack(
            sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
        )
        return cls(pid=pid, uid=uid, gid=gid)


def peer_groups(sock: socket.socket) -> tuple[int, ...]:
    """The peer's supplementary groups at connect time (empty if the kernel cannot tell)."""
    for count in (64, _NGROUPS_MAX):
        try:
            raw = sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, count * 4)
        except OSError as exc:
            if exc.errno == errno.ERANGE:
                continue
            return ()
        groups = array.array("I")
        groups.frombytes(raw[: len(raw) - len(raw) % 4])
        return tuple(groups)
    return ()


@attrs.frozen
class AccessPolicy:
    """Which peers may use the daemon, beyond the socket file's own permissions.

    With both lists empty, everyone who can connect to the socket may use it.
    Otherwise a peer is admitted when its uid is in ``allow_uids``, or its
    gid or one of its supplementary groups is in ``allow_gids``. The daemon's
    own uid is always admitted (its operator runs ``shadowd stats``).
    """

    allow_uids: frozenset[int] = frozenset()
    allow_gids: frozenset[int] = frozenset()
    owner_uid: int = attrs.field(factory=os.geteuid)

    @property
    def open_to_all(self) -> bool:
        return not self.allow_uids and not self.allow_gids

    def permits(self, peer: Peer, sock: socket.socket) -> bool:
        if self.open_to_all or peer.uid == self.owner_uid or peer.uid in self.allow_uids:
            return True
        if not self.allow_gids:
            return False
        if peer.gid in self.allow_gids:
            return True
        return not self.allow_gids.isdisjoint(peer_groups(sock))


@attrs.frozen
class PeerLimits:
    """Bounds on what peers may hold at once; see ``shadowd serve --help``."""

    max_clients: int = 4096
    max_clients_per_uid: int = 1024
    #: Below --copy-workers (4): one uid's copies cannot hold every worker.
    max_copies_per_uid: int = 2
    #: Descriptors one uid may have in replies it has not read and in
    #: replies the daemon holds for it (inflight.py).
    max_fds_per_uid: int = 4096
    #: Bytes of copies under way for one uid and of the memfds made for it
    #: that left the cache while still held (pins.py).
    max_pinned_bytes_per_uid: int = 256 * 1024 * 1024

    def __attrs_post_init__(self) -> None:
        if (
            min(
                self.max_clients,
                self.max_clients_per_uid,
                self.max_copies_per_uid,
                self.max_fds_per_uid,
                self.max_pinned_bytes_per_uid,
            )
            < 1
        ):
            raise ValueError("peer limits must be at least 1")


@attrs.define(eq=False)
class UidShare:
    """What one uid holds: its connections, its quota of worker jobs, and the
    descriptors it has the daemon send or hold for it (see inflight.py)."""

    uid: int
    quota: Quota
    connections: int = 0
    #: Descriptors in replies to this uid not known to be read, and held by
    #: the daemon for its replies that wait.
    fds: int = 0
    #: Its connections (for asking each what its peer has read).
    members: set[Any] = attrs.field(factory=set)
    #: When its connections were last asked (monotonic seconds).
    refreshed_at: float = -1e9
    #: Misses that did not wait, queued for a copy slot (filling.Filler).
    fills: collections.deque[Any] = attrs.field(factory=collections.deque)
    filling: bool = False


@attrs.define
class Gate:
    """Admits peers at accept time and keeps each uid's share.

    ``hits`` counts, per limit, how often a peer ran into it; the server adds
    its own limits (request size, fds, in-flight requests) to the same map.
    """

    policy: AccessPolicy = attrs.field(factory=AccessPolicy)
    limits: PeerLimits = attrs.field(factory=PeerLimits)
    hits: dict[str, int] = attrs.field(factory=dict)
    refused_peers: int = 0
    clients: int = 0
    _shares: dict[int, UidShare] = attrs.field(factory=dict)

    def admit(self, peer: Peer, sock: socket.socket) -> UidShare:
        """Count a new connection of *peer*, or raise the refusal to send it."""
        if not self.policy.permits(peer, sock):
            self.refused_peers += 1
            raise RequestError(
                ErrorCode.NOT_PERMITTED,
                f"uid {peer.uid} (gid {peer.gid}) is not allowed to use this shadowd",
            )
        limits = self.limits
        if self.clients >= limits.max_clients:
            self.hit("max_clients")
            raise RequestError(
                ErrorCode.BUSY, f"the daemon serves {limits.max_clients} clients already"
            )
        share = self._shares.get(peer.uid)
        if share is not None and share.connections >= limits.max_clients_per_uid:
            self.hit("max_clients_per_uid")
            raise RequestError(
                ErrorCode.BUSY,
                f"uid {peer.uid} has {limits.max_clients_per_uid} connections already",
            )
        if share is None:
            share = UidShare(peer.uid, Quota(limits.max_copies_per_uid, self.hits))
            self._shares[peer.uid] = share
        share.connections += 1
        self.clients += 1
        return share

    def leave(self, share: UidShare) -> None:
        """A connection of *share*'s uid ended."""
        share.connections -= 1
        self.clients -= 1
        self.forget_if_idle(share)

    def forget_if_idle(self, share: UidShare) -> None:
        # A share whose jobs still run stays, so that the uid cannot get a
        # fresh quota by reconnecting while its old jobs hang.
        if (
            share.connections == 0
            and share.quota.idle
            and share.fds <= 0
            and not share.filling
            and self._shares.get(share.uid) is share
        ):
            del self._shares[share.uid]

    def hit(self, limit: str) -> None:
        self.hits[limit] = self.hits.get(limit, 0) + 1

    @property
    def uids(self) -> int:
        return len(self._shares)
