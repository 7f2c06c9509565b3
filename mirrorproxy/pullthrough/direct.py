"""An uncached blob relayed from upstream to one client, as a ``BlobStream``.

Used when a blob cannot be cached (no room, no writable disk). The response the
download got serves a client wanting the whole blob; a range is asked of the
upstream itself. A whole blob is hashed on the way and its last byte held back
until the digest matches; a range cannot be verified here (the client verifies the
blob it assembles).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from mirrorproxy.core.closing import Closing
from mirrorproxy.core.errors import BlobUnknown, RangeNotSatisfiable
from mirrorproxy.core.oci import Digest
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.answers import Target
from mirrorproxy.pullthrough.corruption import CorruptBlobs
from mirrorproxy.pullthrough.source import BlobFailed, ByteSink, Part
from mirrorproxy.upstream.client import (
    PeerRoute,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
)

logger = logging.getLogger(__name__)


async def open_direct(
    t: Target,
    digest: Digest,
    rng: tuple[int, int] | None,
    *,
    claimed: UpstreamResponse | None,
    size: int | None,
    client: UpstreamClient,
    metrics: Metrics,
    corrupt: CorruptBlobs,
    chunk: int,
    route: PeerRoute | None = None,
) -> DirectStream:
    """Relay ``rng`` (None: the whole blob) from upstream, uncached.

    Args:
        claimed: a response already open, if unused: the whole blob, or the blob
            from some byte to its end (used when ``rng`` is exactly that).
        size: the blob's size, if the download learnt it.
        route: in a cluster, ask the blob's owner first.

    Raises:
        RangeNotSatisfiable: the upstream refused the range.
        BlobUnknown: no upstream has it.
    """
    resp = claimed
    if resp is not None and not _serves(resp, rng, size):
        resp.close()  # not the bytes this client wants
        resp = None
    if resp is None:
        start, end = rng if rng is not None else (0, None)
        try:
            resp = await client.open(
                t.ns,
                t.ns_name,
                "GET",
                f"{t.repo}/blobs/{digest}",
                what=f"blob {digest}",
                stream=True,
                start=start,
                end=end,
                avoid=corrupt.avoid(digest),
                route=route,
            )
        except UpstreamError as err:
            if any(a.status == 416 for a in err.attempts):
                raise RangeNotSatisfiable(
                    f"upstreams refused the range of blob {digest}"
                ) from None
            raise err.registry_error(BlobUnknown) from None
    if size is None and rng is None:
        size = resp.content_length
    start, length = (0, size) if rng is None else (rng[0], rng[1] - rng[0] + 1)
    whole = rng is None or (rng[0] == 0 and rng[1] + 1 == size)
    upstream = resp.upstream

    def verified() -> None:
        client.mark_verified(t.ns, upstream)

    def failed() -> None:
        metrics.digest_mismatches.labels(t.ns.name).inc()
        client.mark_failed(t.ns, upstream, corrupt=True)
        corrupt.record(digest, [upstream.url])
        logger.error("blob %s streamed through from %s failed verification", digest, upstream.url)

    return DirectStream(
        resp,
        start=start,
        length=length,
        size=size,
        digest=digest if whole else None,
        chunk=chunk,
        verified=verified,
        corrupt=failed,
    )


def _serves(resp: UpstreamResponse, rng: tuple[int, int] | None, size: int | None) -> bool:
    """Whether ``resp`` (from ``resp.offset`` to the end) is exactly ``rng``."""
    if rng is None:
        return resp.offset == 0
    return resp.offset == rng[0] and size is not None and rng[1] + 1 == size


class DirectStream(Closing):
    """One upstream response, relayed from ``start`` for ``length`` bytes (None: to its end).

    It owns that response (released on close, dropped unless read to the end) and
    the hash of a whole blob; it must not send the last byte of a whole blob that
    did not verify, nor cache anything.
    """

    failed: asyncio.Future[None] | None = None  # a failure shows as an error from ``next``

    def __init__(
        self,
        resp: UpstreamResponse,
        *,
        start: int,
        length: int | None,
        size: int | None,
        digest: Digest | None,
        chunk: int,
        verified: Callable[[], None],
        corrupt: Callable[[], None],
    ) -> None:
        """``digest``: the whole blob is relayed and must hash to it.

        ``verified`` and ``corrupt`` are told how the hash came out.
        """
        self._resp, self._digest, self._chunk = resp, digest, chunk
        self._verified, self._corrupt = verified, corrupt
        self.size = size
        self.upstream: str | None = resp.upstream.url
        self.pos = start
        self.end = start + length if length is not None else None
        self._skip, self._left = start - resp.offset, length
        self._hasher = digest.hasher() if digest is not None else None
        self._hashing: asyncio.Future[None] | None = None  # one chunk behind the sending
        self._held = b""  # the last byte so far, while the digest is unchecked
        self._body_done = False  # the upstream body was read to the end (or ``length``)
        self._ended = False  # the end was checked (and the held byte given out)
        self._complete = False  # the body was read whole and checked
        self._open = True

    async def next(self) -> Part | None:
        """The next bytes of the body.

        Raises:
            BlobFailed: the bytes are not the blob (its last byte was not sent).
            EOFError: the upstream body ended early.
        """
        while not self._body_done:
            chunk = await self._resp.read(self._chunk)
            if not chunk:
                self._body_done = True
                break
            if self._skip:
                cut = min(self._skip, len(chunk))
                chunk, self._skip = chunk[cut:], self._skip - cut
            if self._left is not None:
                chunk, self._left = chunk[: self._left], self._left - min(self._left, len(chunk))
                if self._left == 0:
                    self._body_done = True
            if not chunk:
                continue
            if self._hasher is not None:
                if self._hashing is not None:
                    await self._hashing  # in order, one chunk behind the sending
                loop = asyncio.get_running_loop()
                self._hashing = loop.run_in_executor(None, self._hasher.update, chunk)
                chunk, self._held = self._held + chunk[:-1], chunk[-1:]
            if chunk:
                return chunk
        return await self._last()

    async def _last(self) -> bytes | None:
        """At the body's end: the held byte once the digest matches, then None."""
        if self._ended:
            return None
        self._ended = True
        if self._left:
            raise EOFError(f"upstream body ended {self._left} bytes early")
        if self._hasher is not None and self._digest is not None:
            if self._hashing is not None:
                await self._hashing
            got = self._hasher.hexdigest()
            if got != self._digest.hex:
                self._corrupt()
                raise BlobFailed(
                    "the blob failed verification"
                    f" (expected {self._digest}, got {self._digest.algorithm}:{got})"
                )
            self._verified()
        self._complete = True  # read whole: the connection may go back to the pool
        return self._held or None

    def advance(self, pos: int) -> None:
        self.pos = pos

    def check(self) -> None:
        return None

    async def push(self, sink: ByteSink) -> int:
        return 0

    def close(self) -> None:
        """Release the response; drop its connection unless the body was read whole."""
        if self._open:
            self._open = False
            if not self._complete:
                self._resp.close()
            self._resp.release()
