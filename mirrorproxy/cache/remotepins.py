"""Use of a shared bucket's blobs by the other members of a cluster, as a budget keeps it.

The owner of a blob is the only member that evicts it, but clients read it from
the bucket through any member. So, on the owner, ``hold`` pins a blob that
another member reports reading, until a deadline: a report refreshes it, and a
member that dies stops refreshing, so nothing stays pinned for long. On every
member, ``note`` collects the blobs it served (bounded), for the report to their
owners. It must not talk to the members (``pullthrough.touchreports`` does) nor
touch the index (the budget does).
"""

from __future__ import annotations

from collections.abc import Iterable

SERVED_MAX = 8192  # blobs remembered between two reports (more are dropped until then)


class RemoteUse:
    """Pins held for other members (digest -> deadline) and the blobs served here."""

    def __init__(self) -> None:
        self._held: dict[str, float] = {}
        self._served: set[str] = set()

    def hold(self, digests: Iterable[str], *, until: float) -> None:
        """Pin ``digests`` until ``until`` (budget clock), or later if already."""
        for digest in digests:
            if self._held.get(digest, 0.0) < until:
                self._held[digest] = until

    def held(self, now: float) -> set[str]:
        """The digests still pinned at ``now`` (lapsed ones are dropped)."""
        lapsed = [d for d, until in self._held.items() if until <= now]
        for digest in lapsed:
            del self._held[digest]
        return set(self._held)

    def note(self, digest: str) -> None:
        """A blob was served here (whoever owns it; the report sorts that out)."""
        if len(self._served) < SERVED_MAX:
            self._served.add(digest)

    def take_served(self) -> set[str]:
        """The blobs served since the last call."""
        served, self._served = self._served, set()
        return served
