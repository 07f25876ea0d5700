# The bounds on what peers may hold at once (the `--max-clients*`, `--max-copies-per-uid`,
# `--max-fds-per-uid` and `--max-pinned-bytes-per-uid` flags): a value, apart from the
# gate that enforces it (access.py), so that the command line can show its defaults
# without importing the daemon's I/O (trio), which `shadowd stats` never needs.
#
# Must never: import trio or anything of the event loop; accept a bound below 1.
from __future__ import annotations

import attrs


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
    #: Bytes of copies under way for one uid and of the memfds made for it,
    #: found by no other uid, that left the cache while still held (pins.py).
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
