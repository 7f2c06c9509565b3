"""A miss as a ``BlobSource``: the blob as its shared download offers it to one client.

A client joins the download as a follower; when the download cannot serve it any
more (uncached, failed, or committed to a store that is not a local file) it gets
the committed blob from the store, or a relay straight from upstream.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

from mirrorproxy.cache import BlobInfo
from mirrorproxy.core.oci import Digest
from mirrorproxy.pullthrough.answers import HIT, MISS
from mirrorproxy.pullthrough.fill import BlobFill
from mirrorproxy.pullthrough.source import BlobFailed, BlobStream, NotCacheable

Opener = Callable[[tuple[int, int] | None], Awaitable[BlobStream]]
StoredOpener = Callable[[BlobInfo, tuple[int, int] | None], Awaitable[BlobStream | None]]


class FillSource:
    """A miss: the blob as its shared download offers it to one client.

    It hands out followers of the download, or, when the download cannot serve a
    client (uncached, failed, moved on), a relay straight from upstream. It must not
    expose the download itself.
    """

    def __init__(self, fill: BlobFill, direct: Opener, stored: StoredOpener) -> None:
        self._fill, self._direct, self._stored = fill, direct, stored
        # Joining a download whose bytes are all here and verified (it is committing)
        # costs no upstream byte: a hit, as a lookup a moment later would be.
        self.result = HIT if fill.verified else MISS

    @property
    def digest(self) -> Digest:
        return self._fill.digest

    @property
    def size(self) -> int | None:
        return self._fill.size

    @property
    def upstream(self) -> str | None:
        return self._fill.upstream

    def small(self, limit: int) -> bytes | None:
        return None

    async def location(self) -> str | None:
        return None

    async def open(self, rng: tuple[int, int] | None) -> BlobStream:
        fill = self._fill
        start = rng[0] if rng is not None else 0
        end = fill.size if rng is None else rng[1] + 1
        follower = fill.clients.join(start, end)
        if follower is not None:
            return follower
        if fill.verified and fill.caching and not fill.streaming:
            await asyncio.wait({fill.task})  # committing: a moment
        if fill.result is not None:  # committed to a store that is not a local file
            stream = await self._stored(fill.result, rng)
            if stream is not None:
                return stream
        return await self._direct(rng)

    async def cached(self, progress: Callable[[int], None], *, every: float = 0.25) -> int:
        """Wait for the download to be committed, telling ``progress`` every ``every`` s."""
        fill = self._fill
        if not fill.caching:
            resp = fill.claim_direct()
            if resp is not None:
                resp.release()
            raise NotCacheable(f"blob {fill.digest} cannot be cached")
        while not fill.task.done():
            progress(fill.received)
            await asyncio.wait({fill.task}, timeout=every)
        if fill.relayed and fill.verified and fill.size is not None:
            return fill.size  # from its owner, which commits it into the store we share
        if fill.result is None:
            raise BlobFailed(f"blob {fill.digest}: {fill.error or 'download failed'}")
        return fill.result.size
