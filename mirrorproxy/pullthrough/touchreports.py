"""A cluster over one bucket: who owns each blob now, and reports of use to the owners.

``MemberSplit`` splits the bucket by the live member list (``Members.current``,
asked each time: with ``members_dns`` it changes): a digest's owner is the first
member in rendezvous order, the only one accounting for it and evicting it, and
each member's part of ``max_size`` is 1/N.

The owner's LRU sees only its own hits, and a client may be reading a blob from
the bucket through another member when the owner wants to evict it. So every
``touch_report`` seconds ``TouchReporter`` sends each owner one report (at most
``touch_batch`` digests; reads first) of the blobs this member served and of those
it is reading now, for the digests it does not own. The owner counts them as used
and pins those read until ``remote_pin`` passes unless reported again, so a member
that dies pins nothing for long. A report that fails is not retried: what it
said was served is told in the next round, the reads if they still run.

It owns the report loop; it must not touch the index (the budget does) nor speak
HTTP itself (``UpstreamClient.post_member`` does).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Iterable

from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.rendezvous import blob_key, owner
from mirrorproxy.core.touches import TOUCHES_PATH, encode_report
from mirrorproxy.core.tuning import Tuning
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.upstream.client import UpstreamClient
from mirrorproxy.upstream.members import Members

logger = logging.getLogger(__name__)


class MemberSplit:
    """The owner of each digest and this member's share, by the live member list.

    Until the list is known (a first DNS lookup failed) this member stands alone:
    it owns everything, within the whole of ``max_size``.
    """

    def __init__(self, self_url: str, members: Members) -> None:
        self.self_url, self._members = self_url, members

    def members(self) -> tuple[str, ...]:
        return self._members.current or (self.self_url,)

    def owner(self, digest: str) -> str | None:
        return owner(blob_key(digest), self.members())

    def owns(self, digest: Digest) -> bool:
        return self.owner(str(digest)) == self.self_url

    def share(self) -> float:
        return 1 / len(self.members())


class TouchReporter:
    """Every ``touch_report`` seconds, this member's use of others' blobs, to their owners."""

    def __init__(
        self,
        split: MemberSplit,
        budget: CacheBudget,
        client: UpstreamClient,
        metrics: Metrics,
        tuning: Tuning,
    ) -> None:
        self._split, self._budget, self._client = split, budget, client
        self._metrics, self._tuning = metrics, tuning

    async def run(self) -> None:
        """Background task: report, forever (until cancelled)."""
        while True:
            await asyncio.sleep(self._tuning.touch_report)
            try:
                await self.report()
            except Exception:  # a report must never end the loop
                logger.exception("cannot report blob use to the cluster")

    async def report(self) -> int:
        """Send one round of reports now; how many digests the owners took."""
        remote = self._budget.remote
        served = remote.take_served() if remote is not None else set()
        reading = set(self._budget.pinned)
        by_owner: dict[str, tuple[list[str], list[str]]] = {}
        for digest in sorted(reading | served):
            to = self._split.owner(digest)
            if to is None or to == self._split.self_url:
                continue
            read, used = by_owner.setdefault(to, ([], []))
            (read if digest in reading else used).append(digest)
        sent = await asyncio.gather(
            *(self._send(to, read, used) for to, (read, used) in by_owner.items())
        )
        return sum(sent)

    async def _send(self, to: str, reading: list[str], served: list[str]) -> int:
        batch = self._tuning.touch_batch
        reading = reading[:batch]
        served = served[: batch - len(reading)]
        if not await self._client.post_member(to, TOUCHES_PATH, encode_report(served, reading)):
            remote = self._budget.remote
            if remote is not None:
                for digest in served:
                    remote.note(digest)  # told next time (reads are reported while they last)
            return 0
        self._count("served", served)
        self._count("reading", reading)
        return len(served) + len(reading)

    def _count(self, use: str, digests: Iterable[str]) -> None:
        n = sum(1 for _ in digests)
        if n:
            self._metrics.cluster_touches_sent.labels(use).inc(n)
