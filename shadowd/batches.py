# A batch of opens (open_batch): each item answered as a lone open would be
# (opens.py), every item that can be at once on the poller's round, the rest
# (misses, untrusted fds, copies waiting for a slot) as each comes, and the
# reply's items in the order of the request.
#
# Must never: let one item's refusal or bug fail the others; reply before
# every item is filled in; lose an item's fd (an item that waits takes the
# holder it needs, the caller closes the rest; a bug part way gives back
# what the items before it took).
from __future__ import annotations

from collections.abc import Sequence

import attrs
import trio

from .access import Peer, UidShare
from .copier import Flight
from .errors import RequestError
from .fds import FdHolder, close_holders
from .opens import HELD, HostOpens, Miss, Pending, Served, Waiting, served_fd
from .protocol import ErrorCode, MissedItem, OpenedItem, Refusal
from .refusals import INTERNAL_MESSAGE


def batch_items(
    results: list[Served | Miss | Refusal | None], *, versions: bool = False
) -> tuple[OpenedItem | MissedItem | Refusal, ...]:
    """The items of a batch reply, in order (every slot is filled before sending).

    *versions*: say each served item's version and whether it is cached
    (protocol version 2).
    """
    items: list[OpenedItem | MissedItem | Refusal] = []
    for r in results:
        if isinstance(r, Served):
            if versions:
                items.append(
                    OpenedItem(
                        fd=r.fd.fd, size=r.size, hit=r.hit, version=r.version, cached=r.cached
                    )
                )
            else:
                items.append(OpenedItem(fd=r.fd.fd, size=r.size, hit=r.hit))
        elif isinstance(r, Miss):
            items.append(MissedItem(filling=r.filling, hit=r.hit))
        elif isinstance(r, Refusal):
            items.append(r)
        else:  # pragma: no cover - every slot is filled before sending
            items.append(Refusal(code=ErrorCode.INTERNAL, message="no result"))
    return tuple(items)


@attrs.frozen
class Batches:
    """Answers the items of batches with the opens of host files."""

    opens: HostOpens

    def now(
        self,
        holders: list[FdHolder],
        labels: Sequence[str | None],
        share: UidShare,
        peer: Peer,
        id: int,
        *,
        wait: bool = True,
        serve: bool = True,
    ) -> tuple[list[Served | Miss | Refusal | None], list[tuple[int, Pending]]]:
        """Serve every item of a batch that can be now; the rest wait.

        Returns the results (None where an item waits) and the items that
        wait. An item that must wait detaches the holder it needs; the caller
        closes the rest. With *wait* False no item waits: a miss is a Miss.
        With *serve* False (and *wait* False) no item is served an fd: a hit is
        HELD (the client only tells of files it has, and an fd it reads only at
        its next request would count in its uid's fd budget until then).
        """
        opens = self.opens
        results: list[Served | Miss | Refusal | None] = [None] * len(holders)
        later: list[tuple[int, Pending]] = []
        try:
            for i, src in enumerate(holders):
                try:
                    # A batch that does not wait tells of files its client has (or
                    # copies) already: their fills go after the uid's lone misses.
                    outcome = opens.serve_now(
                        src.fd, labels[i], share, wait=wait, told=not wait, serve=serve
                    )
                except RequestError as exc:
                    opens.refusals.count(peer, exc.code, exc.message)
                    results[i] = Refusal(code=exc.code, message=exc.message)
                    continue
                except Exception as exc:  # a bug of ours: this item fails, not the batch
                    opens.refusals.internal(peer, id, exc)
                    opens.refusals.count(peer, ErrorCode.INTERNAL, INTERNAL_MESSAGE)
                    results[i] = Refusal(code=ErrorCode.INTERNAL, message=INTERNAL_MESSAGE)
                    continue
                if type(outcome) is tuple:
                    if not serve:
                        results[i] = HELD
                        continue
                    try:
                        served = FdHolder(served_fd(outcome[0]))
                    except RequestError as exc:
                        opens.refusals.count(peer, exc.code, exc.message)
                        results[i] = Refusal(code=exc.code, message=exc.message)
                        continue
                    results[i] = Served(
                        fd=served, size=outcome[1], hit=True, version=outcome[2], cached=True
                    )
                elif isinstance(outcome, Miss):
                    results[i] = outcome
                    if outcome.untrusted:
                        opens.discard([src.detach()], share)  # in a worker
                elif outcome is None:
                    later.append((i, FdHolder(src.detach())))  # a worker closes it
                elif isinstance(outcome, Flight):
                    later.append((i, outcome))
                else:
                    later.append((i, Waiting(FdHolder(src.detach()))))
        except BaseException:
            # A bug of ours part way: give back what the items before it took.
            close_holders([r.fd for r in results if isinstance(r, Served)])
            opens.abandon(later, share)
            raise
        return results, later

    async def finish(
        self,
        results: list[Served | Miss | Refusal | None],
        later: list[tuple[int, Pending]],
        labels: Sequence[str | None],
        share: UidShare,
        peer: Peer,
    ) -> None:
        """Fill in the items of a batch that had to wait, each as it comes."""
        opens = self.opens

        async def one(i: int, pending: Pending) -> None:
            try:
                results[i] = await opens.finish(pending, labels[i], share)
            except RequestError as exc:
                opens.refusals.count(peer, exc.code, exc.message)
                results[i] = Refusal(code=exc.code, message=exc.message)

        async with trio.open_nursery() as nursery:
            for i, pending in later:
                nursery.start_soon(one, i, pending)
