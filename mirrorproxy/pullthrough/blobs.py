"""Blobs: local-first, one shared download per digest, and what each client is handed.

A cached blob is a ``CachedBlob``; a miss joins the running download of the digest
(``BlobFill``) or starts one, and the client gets a ``FillSource`` over it. A blob
that cannot be cached is relayed from upstream to the client (``DirectStream``),
verified when whole. HEAD learns the size from the cache, a running download or the
upstream. In a [cluster] a download asks the blob's owner first (see ``BlobFill``);
over a store the members share, a download from the owner writes to ``scratch``
only: its clients follow it as any other, and the owner commits the blob.

Over 300 lines because the running downloads' registry (start, join, refusing a
cluster loop, shutdown) and the HEAD probes share the policy's state.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from functools import partial

from mirrorproxy.cache import BlobInfo, BlobStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.index import BLOB
from mirrorproxy.config import Config
from mirrorproxy.core.errors import BadGateway, BlobUnknown, LoopDetected, ResumeRefused
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.rendezvous import blob_key
from mirrorproxy.core.tuning import Tuning
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.answers import HIT, MISS, OFFLINE, BlobHead, Target, count
from mirrorproxy.pullthrough.cachedblob import CachedBlob
from mirrorproxy.pullthrough.corruption import CorruptBlobs
from mirrorproxy.pullthrough.direct import DirectStream, open_direct
from mirrorproxy.pullthrough.fill import BlobFill
from mirrorproxy.pullthrough.fillsource import FillSource
from mirrorproxy.pullthrough.isolation import Isolation
from mirrorproxy.pullthrough.source import BlobSource, BlobStream
from mirrorproxy.upstream.client import UpstreamClient, UpstreamError

logger = logging.getLogger(__name__)

REDIRECT_EXPIRES = 20 * 60.0  # seconds a presigned blob URL handed to a client is valid


class BlobPolicy:
    """When a blob comes from the cache, a running download, a new one or a relay.

    It owns the registry of running downloads (one per digest) and their shutdown;
    it must not touch a client's socket (sources and streams are handed to the HTTP
    side) nor a download's internals beyond starting, joining and waiting for it.
    """

    def __init__(
        self,
        config: Config,
        *,
        blobs: BlobStore,
        budget: CacheBudget,
        client: UpstreamClient,
        metrics: Metrics,
        isolation: Isolation,
        corrupt: CorruptBlobs,
        tuning: Tuning,
        scratch: BlobStore | None = None,
    ) -> None:
        """``scratch``: the other cluster members commit into ``blobs`` too; a blob
        from its owner is written here for our clients and never committed."""
        self._config = config
        self._scratch = scratch
        self._blobs = blobs
        self._budget = budget
        self._client = client
        self._metrics = metrics
        self._isolation = isolation
        self.corrupt = corrupt
        self.tuning = tuning  # for downloads started from now on
        s3 = config.storage.s3
        self._redirect = REDIRECT_EXPIRES if s3 is not None and s3.redirect else None
        self.fills: dict[Digest, BlobFill] = {}  # the download a request joins, by digest
        # Every download until its task ends: a failed one leaves ``fills`` at once
        # (new requests start afresh) but still cleans up for a moment.
        self.running: set[BlobFill] = set()
        self._forwarding: set[BlobFill] = set()  # started by asking another cluster member

    async def settled(self) -> None:
        """Wait until every running download is in place (or failed and cleaned up)."""
        while self.running:
            tasks = [fill.task for fill in list(self.running)]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        """At shutdown: let running downloads finish for a grace period, then cancel."""
        tasks = [fill.task for fill in self.running if not fill.task.done()]
        grace = self.tuning.shutdown_grace
        if tasks:
            logger.info("waiting up to %.0fs for %d downloads to finish", grace, len(tasks))
            await asyncio.wait(tasks, timeout=grace)
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(BaseException):
                await task

    async def blob(self, t: Target, digest: Digest, *, first_byte: int = 0) -> BlobSource:
        """A cached blob, or a download shared with every other client asking for it.

        Args:
            first_byte: where the client's range starts (0: the whole blob).

        Raises:
            ResumeRefused: a resume into a blob whose download failed verification
                a moment ago (the bytes the client holds may be corrupt).
            BlobUnknown: no upstream has it.
            RegistryError: upstreams failed in another way.
        """
        ago = self.corrupt.refused_resume(digest, first_byte)
        if ago is not None:
            raise ResumeRefused(
                f"not resuming blob {digest} at byte {first_byte}: a download of it failed"
                f" verification {ago:.0f}s ago, so the bytes before it may be corrupt;"
                " fetch it again from byte 0"
            )
        asked = self._budget.now()
        info = await self._blobs.lookup(digest)
        if info is not None:
            await self._isolation.check(t, BLOB, digest)  # cached via a private namespace?
            count(self._metrics, t, "blob", HIT)
            self._budget.touch(BLOB, digest)
            return CachedBlob(digest, info, self._budget, self._blobs, redirect=self._redirect)
        self._budget.vanished(BLOB, digest, since=asked)  # a lifecycle rule deleted it?
        if self._config.cache.offline:
            raise BlobUnknown(f"blob {digest} is not cached and {OFFLINE}")
        fill = await self._fill(t, digest)
        source = FillSource(
            fill, partial(self._stream_through, t, digest, fill), partial(self._stored, digest)
        )
        count(self._metrics, t, "blob", source.result)
        return source

    async def _fill(self, t: Target, digest: Digest) -> BlobFill:
        """The running download of ``digest`` for this namespace, or a new one; once ready."""
        fill = self.fills.get(digest)
        if t.forwarded and fill in self._forwarding and self._forwards_now(fill):
            # Members that disagree on the owner: joining would wait on ourselves.
            raise LoopDetected(f"blob {digest} is being forwarded from here too")
        while fill is not None and (fill.ns_name, fill.repo) != (t.ns_name, t.repo):
            # Bytes are shared across repositories (they are verified by digest), but
            # not failures: another namespace's upstreams may lack what ours have.
            await self._isolation.check(t, BLOB, digest, origin=fill.ns_name)
            try:
                await asyncio.shield(fill.ready)
                break
            except Exception:
                newer = self.fills.get(digest)  # another waiter may have started one
                fill = newer if newer is not fill else None
        if fill is None:
            route = t.route(blob_key(str(digest)), "blob")
            fill = BlobFill(
                ns=t.ns,
                ns_name=t.ns_name,
                repo=t.repo,
                digest=digest,
                client=self._client,
                store=self._blobs,
                budget=self._budget,
                metrics=self._metrics,
                corrupt=self.corrupt,
                tuning=self.tuning,
                on_done=self._fill_done,
                route=route,
                scratch=self._scratch,
            )
            self.fills[digest] = fill
            self.running.add(fill)
            fill.task.add_done_callback(partial(_discard, self.running, fill))
            if self._client.forwards(route):
                self._forwarding.add(fill)
                fill.task.add_done_callback(partial(_discard, self._forwarding, fill))
        await asyncio.shield(fill.ready)
        return fill

    def _forwards_now(self, fill: BlobFill) -> bool:
        """Whether ``fill`` is asking another member still (not yet its upstreams)."""
        return fill.upstream is None or self._client.is_peer(fill.upstream)

    def _fill_done(self, fill: BlobFill) -> None:
        if self.fills.get(fill.digest) is fill:
            del self.fills[fill.digest]

    async def _stored(
        self, digest: Digest, info: BlobInfo, rng: tuple[int, int] | None
    ) -> BlobStream | None:
        """A blob committed a moment ago, read from the store."""
        return await CachedBlob(digest, info, self._budget, self._blobs).open(rng)

    async def _stream_through(
        self, t: Target, digest: Digest, fill: BlobFill, rng: tuple[int, int] | None
    ) -> DirectStream:
        """An uncached blob (no room, no writable disk), straight from upstream."""
        return await open_direct(
            t,
            digest,
            rng,
            claimed=fill.claim_direct(),
            size=fill.size,
            client=self._client,
            metrics=self._metrics,
            corrupt=self.corrupt,
            chunk=self.tuning.read_view,
            max_resumes=self.tuning.max_resumes,
        )

    async def head(self, t: Target, digest: Digest) -> BlobHead:
        """Size for a HEAD: from the cache, a running fill, or the upstream.

        An upstream HEAD without a length is asked for the first byte instead (its
        Content-Range states the total); failing that, the blob is downloaded.
        """
        info = await self._blobs.lookup(digest)
        if info is not None:
            await self._isolation.check(t, BLOB, digest)  # cached via a private namespace?
            count(self._metrics, t, "blob", HIT)
            return BlobHead(info.size, HIT)
        fill = self.fills.get(digest)
        ready = fill is not None and fill.ready.done() and not fill.ready.exception()
        if fill is not None and ready and fill.size is not None:
            await self._isolation.check(t, BLOB, digest, origin=fill.ns_name)
            if fill.verified:
                return BlobHead(fill.size, HIT)
            return BlobHead(fill.size, MISS, fill.upstream)
        if self._config.cache.offline:
            raise BlobUnknown(f"blob {digest} is not cached and {OFFLINE}")
        path, what = f"{t.repo}/blobs/{digest}", f"blob {digest}"
        try:
            route = t.route(blob_key(str(digest)), "blob")  # the owner may have it
            resp = await self._client.open(t.ns, t.ns_name, "HEAD", path, what=what, route=route)
        except UpstreamError as err:
            raise err.registry_error(BlobUnknown) from None
        resp.release()
        if resp.content_length is not None:
            return BlobHead(resp.content_length, MISS, resp.upstream.url)
        size = await self._probe_size(t, digest)
        return BlobHead(size, MISS, resp.upstream.url)

    async def _probe_size(self, t: Target, digest: Digest) -> int:
        """The size of a blob whose upstream HEAD did not say: a one-byte range, else
        the whole download.

        Raises:
            BadGateway: the size could not be learnt.
        """
        path, what = f"{t.repo}/blobs/{digest}", f"blob {digest}"
        try:
            resp = await self._client.open(
                t.ns, t.ns_name, "GET", path, what=what, stream=True, start=0, end=0
            )
        except UpstreamError:
            pass
        else:
            total = _range_total(resp.headers.get("Content-Range"))
            resp.close()  # one byte at most was asked for; never reuse a half-read body
            if total is not None:
                return total
        fill = await self._fill(t, digest)
        await asyncio.wait({fill.task})
        if fill.result is not None:
            return fill.result.size
        raise BadGateway(f"no upstream states the size of {what}")


def _discard(running: set[BlobFill], fill: BlobFill, _task: object) -> None:
    running.discard(fill)


def _range_total(content_range: str | None) -> int | None:
    """The complete length in ``Content-Range: bytes a-b/total`` (None: absent or ``*``)."""
    total = (content_range or "").rpartition("/")[2].strip()
    return int(total) if total.isascii() and total.isdigit() and len(total) <= 18 else None
