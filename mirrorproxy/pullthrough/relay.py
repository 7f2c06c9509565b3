"""A miss relayed from the blob's owner, where the owner writes into our own store.

When the members of a cluster share one store (``Stores.shared``: a server's
workers over one cache directory, members over one bucket), the owner's download
commits the blob where every member finds it. A member asked for a blob it does not
own therefore relays the owner's answer to its client, verified by digest on the
way like any stream-through, and writes nothing: no second temp file, no second
commit, no second entry in the budget. Each client is one request to the owner,
whose own single-flight makes that one upstream download for all of them.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable

from mirrorproxy.core.oci import Digest
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.answers import MISS, Target
from mirrorproxy.pullthrough.corruption import CorruptBlobs
from mirrorproxy.pullthrough.direct import DirectStream, open_direct
from mirrorproxy.pullthrough.source import BlobFailed
from mirrorproxy.upstream.client import PeerRoute, UpstreamClient, UpstreamResponse


def _total(resp: UpstreamResponse) -> int | None:
    """The blob's size from an answer starting at ``resp.offset`` (to the end)."""
    if resp.content_length is None:
        return None
    return resp.offset + resp.content_length


class OwnerRelay:
    """A ``BlobSource`` over an answer of the blob's owner, uncached here.

    It owns the one answer opened to learn the size (handed to the first read that
    wants exactly those bytes) and opens another for any other range; it must not
    write the blob anywhere.
    """

    result = MISS

    def __init__(
        self,
        t: Target,
        digest: Digest,
        resp: UpstreamResponse,
        *,
        route: PeerRoute,
        client: UpstreamClient,
        metrics: Metrics,
        corrupt: CorruptBlobs,
        chunk: int,
        unclaimed: float,
        resumes: int,
    ) -> None:
        """``unclaimed``: seconds after which the first answer is dropped if no read
        took it (a client answered 416 or gone before its body); ``resumes``: cuts
        (the owner dying mid-blob) resumed from the next member, then upstream."""
        self._t, self._digest, self._route = t, digest, route
        self._resp: UpstreamResponse | None = resp
        self._client, self._metrics, self._corrupt, self._chunk = client, metrics, corrupt, chunk
        self._resumes = resumes
        self._size = _total(resp)
        self._upstream = resp.upstream.url
        asyncio.get_running_loop().call_later(unclaimed, self.close)

    @property
    def digest(self) -> Digest:
        return self._digest

    @property
    def size(self) -> int | None:
        return self._size

    @property
    def upstream(self) -> str | None:
        return self._upstream

    def small(self, limit: int) -> bytes | None:
        return None

    async def location(self) -> str | None:
        return None  # the owner's bytes pass through this member, verified

    async def open(self, rng: tuple[int, int] | None) -> DirectStream:
        claimed, self._resp = self._resp, None
        return await open_direct(
            self._t,
            self._digest,
            rng,
            claimed=claimed,
            size=self._size,
            client=self._client,
            metrics=self._metrics,
            corrupt=self._corrupt,
            chunk=self._chunk,
            route=self._route,
            max_resumes=self._resumes,
        )

    async def cached(self, progress: Callable[[int], None]) -> int:
        """Read the owner's answer through: the owner commits it to the shared store."""
        got = 0
        with await self.open(None) as stream:
            while (part := await stream.next()) is not None:
                got += len(part) if isinstance(part, bytes) else 0
                progress(got)
        if self._size is None:
            raise BlobFailed(f"blob {self._digest}: its owner did not state the size")
        return self._size

    def close(self) -> None:
        """Drop the answer opened for the size if no read took it."""
        resp, self._resp = self._resp, None
        if resp is not None:
            resp.close()
