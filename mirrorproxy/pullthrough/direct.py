"""An uncached blob relayed from upstream to one client, as a ``BlobStream``.

Used when a blob cannot be cached (no room, no writable disk). The response the
download got serves a client wanting the whole blob; a range is asked of the
upstream itself. A whole blob is hashed on the way and its last byte held back
until the digest matches; a range cannot be verified here (the client verifies the
blob it assembles).

A cut mid-body (the owner member killed, an upstream dropping the connection)
resumes with ``Range`` from the next usable endpoint, like a download does: the
client sees one body, and the hash of a whole blob runs on across the seam.

Over 300 lines: relaying, holding the last byte, verifying and resuming are one
body's state and stay together.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import aiohttp

from mirrorproxy.config import Upstream
from mirrorproxy.core.errors import BlobUnknown, RangeNotSatisfiable
from mirrorproxy.core.oci import Digest
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.answers import Target
from mirrorproxy.pullthrough.corruption import CorruptBlobs
from mirrorproxy.pullthrough.source import BlobFailed, Part, PulledStream
from mirrorproxy.upstream.client import (
    PeerRoute,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
)

logger = logging.getLogger(__name__)

# Given the failed response, the byte to resume at and the last byte wanted (None:
# to the end): the rest from the next usable endpoint.
Reopen = Callable[["UpstreamResponse", int, int | None], Awaitable["UpstreamResponse"]]


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
    max_resumes: int = 3,
) -> DirectStream:
    """Relay ``rng`` (None: the whole blob) from upstream, uncached.

    Args:
        claimed: a response already open, if unused: the whole blob, or the blob
            from some byte to its end (used when ``rng`` is exactly that).
        size: the blob's size, if the download learnt it.
        route: in a cluster, ask the blob's owner first (and resume from the
            next member when it is cut off).
        max_resumes: cuts resumed before the client is cut too.

    Raises:
        RangeNotSatisfiable: the upstream refused the range.
        BlobUnknown: no upstream has it.
    """
    what = f"blob {digest}"

    async def fetch(start: int, end: int | None) -> UpstreamResponse:
        return await client.open(
            t.ns,
            t.ns_name,
            "GET",
            f"{t.repo}/blobs/{digest}",
            what=what,
            stream=True,
            start=start,
            end=end,
            avoid=corrupt.avoid(digest),
            route=route,
        )

    async def reopen(bad: UpstreamResponse, start: int, end: int | None) -> UpstreamResponse:
        client.mark_failed(t.ns, bad.upstream)
        return await fetch(start, end)

    resp = claimed
    if resp is not None and not _serves(resp, rng, size):
        resp.close()  # not the bytes this client wants
        resp = None
    if resp is None:
        start, end = rng if rng is not None else (0, None)
        try:
            resp = await fetch(start, end)
        except UpstreamError as err:
            if any(a.status == 416 for a in err.attempts):
                raise RangeNotSatisfiable(f"upstreams refused the range of {what}") from None
            raise err.registry_error(BlobUnknown) from None
    if size is None and rng is None:
        size = resp.content_length
    start, length = (0, size) if rng is None else (rng[0], rng[1] - rng[0] + 1)
    whole = rng is None or (rng[0] == 0 and rng[1] + 1 == size)

    def verified(up: Upstream) -> None:
        client.mark_verified(t.ns, up)

    def failed(sources: list[Upstream]) -> None:
        metrics.digest_mismatches.labels(t.ns.name).inc()
        for up in dict.fromkeys(sources):
            client.mark_failed(t.ns, up, corrupt=True)
        corrupt.record(digest, [up.url for up in sources])
        urls = ", ".join(up.url for up in sources)
        logger.error("blob %s streamed through from %s failed verification", digest, urls)

    return DirectStream(
        resp,
        start=start,
        length=length,
        size=size,
        digest=digest if whole else None,
        chunk=chunk,
        verified=verified,
        corrupt=failed,
        reopen=reopen,
        max_resumes=max_resumes,
    )


def _serves(resp: UpstreamResponse, rng: tuple[int, int] | None, size: int | None) -> bool:
    """Whether ``resp`` (from ``resp.offset`` to the end) is exactly ``rng``."""
    if rng is None:
        return resp.offset == 0
    return resp.offset == rng[0] and size is not None and rng[1] + 1 == size


class DirectStream(PulledStream):
    """One upstream response, relayed from ``start`` for ``length`` bytes (None: to its end).

    It owns that response (released on close, dropped unless read to the end), the
    responses it resumes with, and the hash of a whole blob; it must not send the
    last byte of a whole blob that did not verify, nor cache anything.
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
        verified: Callable[[Upstream], None],
        corrupt: Callable[[list[Upstream]], None],
        reopen: Reopen | None = None,
        max_resumes: int = 0,
    ) -> None:
        """``digest``: the whole blob is relayed and must hash to it.

        ``verified`` is told the endpoint whose bytes completed a matching hash,
        ``corrupt`` every endpoint that sent bytes of one that did not match.
        """
        self._resp, self._digest, self._chunk = resp, digest, chunk
        self._verified, self._corrupt = verified, corrupt
        self._reopen, self._resumes_left = reopen, max_resumes
        self._sources = [resp.upstream]
        self.size = size
        self.upstream: str | None = resp.upstream.url
        self.pos = start
        self.end = start + length if length is not None else None
        self._at = resp.offset  # blob offset of the next byte ``_resp`` gives
        self._want = start  # blob offset of the next byte this stream takes
        self._left = length
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
            EOFError: the upstream body ended early (and could not be resumed).
        """
        while not self._body_done:
            chunk = await self._read()
            if not chunk:
                self._body_done = True
                break
            at, self._at = self._at, self._at + len(chunk)
            if at < self._want:  # a resume from before where we are (or from 0)
                chunk = chunk[self._want - at :]
            if self._left is not None:
                chunk, self._left = chunk[: self._left], self._left - min(self._left, len(chunk))
                if self._left == 0:
                    self._body_done = True
            if not chunk:
                continue
            self._want += len(chunk)
            if self._hasher is not None:
                if self._hashing is not None:
                    await self._hashing  # in order, one chunk behind the sending
                loop = asyncio.get_running_loop()
                self._hashing = loop.run_in_executor(None, self._hasher.update, chunk)
                chunk, self._held = self._held + chunk[:-1], chunk[-1:]
            if chunk:
                return chunk
        return await self._last()

    async def _read(self) -> bytes:
        """The next piece of the body; a cut resumes from the next usable endpoint.

        Raises:
            aiohttp.ClientError, TimeoutError: cut, and out of resumes (or none
                could be opened: the original error is raised).
        """
        while True:
            try:
                chunk = await self._resp.read(self._chunk)
            except (aiohttp.ClientError, TimeoutError) as err:
                if not await self._resume(err):
                    raise
                continue
            if chunk or not self._left:
                return chunk
            # Ended early without an error (a body without a length): resume too.
            if not await self._resume(EOFError(f"body ended {self._left} bytes early")):
                return chunk

    async def _resume(self, err: BaseException) -> bool:
        """Swap the cut response for the rest from the next endpoint; False: cannot."""
        if self._reopen is None or self._resumes_left <= 0:
            return False
        self._resumes_left -= 1
        bad = self._resp
        logger.warning(
            "relaying %s: %s failed at byte %d (%s); resuming",
            self._digest or "a blob range",
            bad.upstream.url,
            self._want,
            str(err) or type(err).__name__,
        )
        bad.close()
        to_end = self.end is None or self.end == self.size
        end = None if to_end or self.end is None else self.end - 1
        try:
            resp = await self._reopen(bad, self._want, end)
        except UpstreamError as again:
            logger.warning("cannot resume at byte %d: %s", self._want, again)
            return False
        other_size = None not in (resp.total, self.size) and resp.total != self.size
        if resp.offset > self._want or (end is None and other_size):
            resp.close()
            logger.warning("cannot resume at byte %d from %s", self._want, resp.upstream.url)
            return False
        self._resp, self._at = resp, resp.offset
        self._sources.append(resp.upstream)
        self.upstream = resp.upstream.url
        return True

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
                self._corrupt(self._sources)
                raise BlobFailed(
                    "the blob failed verification"
                    f" (expected {self._digest}, got {self._digest.algorithm}:{got})"
                )
            self._verified(self._resp.upstream)
        self._complete = True  # read whole: the connection may go back to the pool
        return self._held or None

    def close(self) -> None:
        """Release the response; drop its connection unless the body was read whole."""
        if self._open:
            self._open = False
            if not self._complete:
                self._resp.close()
            self._resp.release()
