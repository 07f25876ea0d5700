# What the daemon refused, and the log lines about it: one account for every
# refusal (the stats' `refused`, `refused_by_code`, `fds_refused`) and every
# internal error, whichever part of the daemon refused.
#
# Must never: let a client flood the log (lines are rate-limited, every
# refusal is still counted); lose the count of a refusal that was not logged.
from __future__ import annotations

import logging
import time

import attrs

from .access import Peer

logger = logging.getLogger(__name__)

#: What a client is told about a bug of ours; the traceback goes to the log.
INTERNAL_MESSAGE = "internal error in shadowd; see its log"


@attrs.define
class LogBudget:
    """At most *per_minute* lines of one kind a minute, so a client cannot flood the log."""

    per_minute: int = 20
    window_start: float = -60.0
    used: int = 0
    suppressed: int = 0

    def allow(self, now: float) -> tuple[bool, int]:
        """(may log now, lines suppressed since the last one that was logged)."""
        if now - self.window_start >= 60.0:
            self.window_start, self.used = now, 0
        if self.used >= self.per_minute:
            self.suppressed += 1
            return False, 0
        self.used += 1
        suppressed, self.suppressed = self.suppressed, 0
        return True, suppressed


@attrs.define
class Refusals:
    """Counts refusals and internal errors, and logs them within a budget."""

    refused: int = 0
    refused_by_code: dict[str, int] = attrs.field(factory=dict)
    #: Descriptors that came with requests the protocol refused.
    fds_refused: int = 0
    internal_errors: int = 0
    _refusal_log: LogBudget = attrs.field(factory=LogBudget)
    _internal_log: LogBudget = attrs.field(factory=LogBudget)

    def count(self, peer: Peer, code: str, message: str) -> None:
        """Account for one refusal sent (or about to be sent) to *peer*."""
        self.refused += 1
        self.refused_by_code[code] = self.refused_by_code.get(code, 0) + 1
        allowed, suppressed = self._refusal_log.allow(time.monotonic())
        if allowed:
            logger.warning(
                "refused pid %d uid %d: %s: %s%s",
                peer.pid,
                peer.uid,
                code,
                message,
                f" ({suppressed} more refusals not logged)" if suppressed else "",
            )

    def flush_log(self) -> None:
        """Say how many lines the budgets kept out of the log since the last one (at exit)."""
        refusals, internal = self._refusal_log.suppressed, self._internal_log.suppressed
        self._refusal_log.suppressed = self._internal_log.suppressed = 0
        if refusals or internal:
            logger.warning(
                "%d refusal and %d internal error lines were not logged (at most %d a minute "
                "of each; all are counted in the stats)",
                refusals,
                internal,
                self._refusal_log.per_minute,
            )

    def internal(self, peer: Peer, id: int | None, exc: BaseException | None) -> None:
        """Account for a bug of ours met answering request *id* (None: unknown) of *peer*.

        *exc* is the exception, or None for the one being handled.
        """
        self.internal_errors += 1
        # Rate-limited like refusals: input that trips a bug must not flood the log.
        allowed, suppressed = self._internal_log.allow(time.monotonic())
        if allowed:
            logger.error(
                "internal error answering request %s of pid %d%s",
                "?" if id is None else id,
                peer.pid,
                f" ({suppressed} more internal errors not logged)" if suppressed else "",
                exc_info=exc if exc is not None else True,
            )
