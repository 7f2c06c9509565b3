"""BlobFill: one upstream download of a blob, shared by every client that wants it.

The download runs as its own task, detached from any client, so it completes (and
the cache gets the blob) even when the client that started it goes away. Each
client joins as a ``Follower`` (``followers.py``) and reads the temp file as it
grows, at its own pace; the few that keep up are "live": each chunk goes to their
socket straight from memory, not waiting for the disk (one that falls behind goes
back to the file). In a [cluster] the owner is asked first (``route``).

Integrity: the last byte of every response (whole blob or range) is held back
until the digest is verified, so a corrupt download never reaches a client whole.
When a download fails, its followers learn it at once (they check between bounded
sends). On a digest mismatch the endpoints that sent the bytes cool down (only a
verified body clears that), and ``CorruptBlobs`` has the next download try them last.

Faults: a cut mid-blob resumes with ``Range`` on the next usable endpoint. A disk
failing mid-download (ENOSPC, EIO) turns it into stream-through for its followers:
the bytes not on disk stay in memory (bounded; verified the same way).

Over 300 lines: the download's steps (open, reserve, pump, resume, verify, commit,
degrade, fail) share its state and read best top to bottom in one class.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Collection
from typing import BinaryIO

import aiohttp

from mirrorproxy.cache import (
    BlobInfo,
    BlobStore,
    BlobWriterProto,
    CacheWriteError,
    DigestMismatch,
)
from mirrorproxy.cache.budget import WRITE_ERROR, CacheBudget, Reservation
from mirrorproxy.cache.index import BLOB
from mirrorproxy.config import Namespace, Upstream
from mirrorproxy.core.errors import BadGateway
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import Tuning
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.corruption import CorruptBlobs
from mirrorproxy.pullthrough.fillerrors import check_resumed, client_error, describe, log_failure
from mirrorproxy.pullthrough.followers import FillClients
from mirrorproxy.pullthrough.source import BlobFailed
from mirrorproxy.upstream.client import PeerRoute, UpstreamClient, UpstreamResponse

logger = logging.getLogger(__name__)


class BlobFill:
    """One download: the upstream responses, the cache writer, the verification.

    It owns the bytes of the blob until they are committed, and decides when the
    download has failed; its clients read it through ``FillClients`` and the
    ``Follower`` each gets. It must not write to a client except through a sink the
    client handed over (live clients), nor answer HTTP.
    """

    def __init__(
        self,
        *,
        ns: Namespace,
        ns_name: str,
        repo: str,
        digest: Digest,
        client: UpstreamClient,
        store: BlobStore,
        budget: CacheBudget,
        metrics: Metrics,
        corrupt: CorruptBlobs,
        tuning: Tuning,
        on_done: Callable[[BlobFill], None],
        route: PeerRoute | None = None,
        scratch: BlobStore | None = None,
    ) -> None:
        """``scratch``: members share ``store``; a blob its owner sends goes here only."""
        self.ns, self.ns_name, self.repo, self.digest = ns, ns_name, repo, digest
        self._scratch = scratch
        self.relayed = False  # from the owner into scratch: never committed here
        self._client, self._store, self._metrics, self._on_done = client, store, metrics, on_done
        self._budget, self._corrupt, self._tuning, self._route = budget, corrupt, tuning, route
        # Set instead of a writer when the blob cannot be cached: the upstream
        # response itself, for the one client that claims it.
        self.direct: UpstreamResponse | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # upstream said 200 (size known)
        self.size: int | None = None
        self.upstream: str | None = None  # URL of the endpoint sending the bytes (access log)
        self.result: BlobInfo | None = None
        self.error: BaseException | None = None
        self._writer: BlobWriterProto | None = None
        self._reservation: Reservation | None = None  # this fill's room in the budget
        self._sources: list[Upstream] = []  # endpoints that sent bytes of this download
        self.received = 0  # bytes taken from upstream: on disk, in flight or in memory
        self._streaming = False  # the disk failed: followers are served from memory
        self._finishing = False  # streaming and verified: waiting for followers to finish
        self.verified = False  # every byte arrived and matched the digest
        self.failed: asyncio.Future[None] = loop.create_future()  # resolves when it fails
        # The followers, and the chunks not yet on disk (once streaming: not yet sent
        # to every follower) with the live clients written from them.
        self.clients = FillClients(self, tuning, alone=self._alone)
        self.task = asyncio.create_task(self._run(), name=f"fill {digest}")

    def claim_direct(self) -> UpstreamResponse | None:
        """Take the uncached upstream response (once); None if another client has it."""
        resp, self.direct = self.direct, None
        return resp

    @property
    def written(self) -> int:
        """Bytes of the blob on disk so far (progress)."""
        return self._writer.written if self._writer is not None else 0

    @property
    def caching(self) -> bool:
        """False when the blob goes to clients uncached (see ``claim_direct``)."""
        return self._writer is not None

    @property
    def streaming(self) -> bool:
        """The disk failed: the followers are served from memory."""
        return self._streaming

    @property
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    @property
    def held(self) -> int:
        """Bytes held in memory: not on disk yet, or not sent yet once the disk failed."""
        return self.clients.memory.bytes

    @property
    def live_count(self) -> int:
        """Clients written straight from memory right now."""
        return self.clients.live_count

    def check(self) -> None:
        """Raise BlobFailed if the download failed (followers call it between sends)."""
        if self.error is not None:
            raise BlobFailed(describe(self.error))

    def reader(self) -> BinaryIO | None:
        """A new handle on the blob's file, temp or committed; None if there is none."""
        if self._writer is None:
            return None
        file = self._writer.reader()
        if file is None:  # committed: the writer let go of the file
            if self.result is None or not self.result.local:
                return None  # a remote store's object: read from the store instead
            file = open(self.result.path, "rb", buffering=0)  # noqa: SIM115 - the follower owns it
        return file

    def _alone(self) -> None:
        """Memory-only and no follower left: finish, or stop a download nobody reads."""
        if self._finishing:
            self.clients.wake_download()
        else:
            logger.info("blob %s: no client left for the uncached download; stopped", self.digest)
            self.task.cancel()

    def _on_written(self) -> None:
        """The disk moved: forget chunks now on disk, wake followers (or go memory-only)."""
        writer = self._writer
        if writer is not None and writer.disk_error is not None:
            if not self._streaming and not self.finished:
                self._degrade(writer.disk_error)
            return
        self.clients.on_disk(self.written)

    def _degrade(self, err: BaseException) -> None:
        """The disk failed: serve the followers from memory, cache nothing."""
        self._streaming = True
        self._metrics.cache_write_errors.inc()
        self._metrics.cache_passthrough.labels(WRITE_ERROR).inc()
        if self._reservation is not None:
            self._reservation.release()  # nothing of it will be committed
        if isinstance(err, OSError):
            self._budget.write_failed(err)
        logger.error(
            "blob %s: cache write failed (%s); streaming it uncached to its %d clients",
            self.digest,
            err,
            len(self.clients.followers),
        )
        self._on_done(self)  # new requests start afresh (and stream through)
        self.clients.to_memory()
        if not self.clients.followers and not self.clients.memory.verified:
            logger.info("blob %s: no client to stream the uncached download to", self.digest)
            self.task.cancel()

    async def _run(self) -> None:
        resp: UpstreamResponse | None = None
        what = f"blob {self.digest}"
        avoid = self._corrupt.avoid(self.digest)
        try:
            resp = await self._open(0, avoid)
            self._sources.append(resp.upstream)
            self.size = resp.content_length
            self.upstream = resp.upstream.url
            self._reservation = self._budget.reserve(self.digest, self.size)
            refused = self._reservation.refused
            if refused is not None:
                self._hand_over(resp, refused)
                resp = None
                return
            self.relayed = self._scratch is not None and self._client.is_peer(self.upstream)
            store = self._scratch if self._scratch is not None and self.relayed else self._store
            try:
                self._writer = store.begin(self.digest, self._on_written, tuning=self._tuning)
            except OSError as err:
                self._reservation.release()
                self._budget.write_failed(err)
                self._metrics.cache_write_errors.inc()
                self._hand_over(resp, WRITE_ERROR)
                resp = None
                return
            self._budget.pin(self.digest)
            self.ready.set_result(None)
            resumes = 0
            while True:
                try:
                    await self._pump(resp, self._writer)
                    break
                except (aiohttp.ClientError, TimeoutError) as err:
                    if self.size is not None and self.received >= self.size:
                        break  # every byte arrived; only the end of the response was lost
                    resumes += 1
                    logger.warning(
                        "blob %s: upstream %s failed after %d bytes (%s); resuming",
                        self.digest,
                        resp.upstream.url,
                        self.received,
                        err,
                    )
                    resp.close()
                    self._client.mark_failed(self.ns, resp.upstream)
                    if resumes > self._tuning.max_resumes:
                        raise
                    resp = await self._open(self.received, avoid)
                    self._sources.append(resp.upstream)
                    self.upstream = resp.upstream.url
                    check_resumed(resp, self.size, self.digest, self._client, self.ns)
            if self.size is not None and self.received != self.size:
                raise BadGateway(f"upstream sent {self.received} bytes of {self.size} for {what}")
            # The last byte goes out as soon as the digest matches (to live clients
            # from memory, maybe before the disk has it); the rest of the writes,
            # fsync and rename follow while clients finish (this fill stays
            # registered until then: a request meanwhile joins it).
            await self._writer.verify()
            self.verified = True
            self._client.mark_verified(self.ns, resp.upstream)
            self.clients.verified()
            if self.relayed and not self._streaming:
                await self._let_go()
            elif not self._streaming:
                try:
                    self.result = await self._writer.commit()
                except CacheWriteError as err:  # fsync or rename: the file is whole
                    self._degrade(err)
                else:
                    self._budget.committed(
                        BLOB,
                        self.digest,
                        self.result.size,
                        self.ns_name,
                        reservation=self._reservation,
                    )
                    logger.info(
                        "cached blob %s (%d bytes) from %s",
                        self.digest,
                        self.result.size,
                        resp.upstream.url,
                    )
            if self._streaming:
                await self._stream_out()
        except BaseException as err:
            self.error = err
            self.failed.set_result(None)
            self._on_done(self)  # new requests start afresh instead of joining a failure
            self.clients.release()  # cut them now, not after the disk lets go
            log_failure(self._metrics, self.ns.name, self.digest, err, resp)
            if isinstance(err, DigestMismatch):
                self._distrust()
            if self._writer is not None:
                await self._writer.abort()
                if self._reservation is not None:
                    self._reservation.release()  # this fill's own, not a retry's
                if isinstance(err, CacheWriteError):
                    self._budget.write_failed(err)
            if not self.ready.done():
                self.ready.set_exception(client_error(err, what))
                self.ready.exception()  # retrieved here; waiters get it too
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            if resp is not None:
                resp.release()
            if self._writer is not None:
                self._budget.unpin(self.digest)
            self.clients.release()
            self._on_done(self)

    async def _open(self, start: int, avoid: Collection[str]) -> UpstreamResponse:
        """The blob from byte ``start`` (in a cluster: its owner first, then upstream)."""
        return await self._client.open(
            self.ns,
            self.ns_name,
            "GET",
            f"{self.repo}/blobs/{self.digest}",
            what=f"blob {self.digest}",
            stream=True,
            start=start,
            avoid=avoid,
            route=self._route,
        )

    async def _let_go(self) -> None:
        """The owner commits the blob into the store we share: once the followers
        have read the temp file, drop it (later requests find the owner's commit)."""
        self._on_done(self)
        await self.clients.drain()
        writer = self._writer
        assert writer is not None  # noqa: S101 - relayed implies a writer
        await writer.abort()
        if self._reservation is not None:
            self._reservation.release()
        logger.info("blob %s relayed from %s to its clients", self.digest, self.upstream)

    async def _stream_out(self) -> None:
        """Verified but not cached: let the followers finish from memory, then clean up."""
        self._finishing = True
        await self.clients.drain()
        writer = self._writer
        assert writer is not None  # noqa: S101 - streaming implies a writer
        self.error = writer.disk_error or CacheWriteError("the cache could not be written")
        logger.info("blob %s streamed through uncached", self.digest)
        await writer.abort()

    def _distrust(self) -> None:
        """Bad bytes: every endpoint that sent some cools down and goes last next time."""
        for up in dict.fromkeys(self._sources):
            self._client.mark_failed(self.ns, up, corrupt=True)
        self._corrupt.record(self.digest, (up.url for up in self._sources))

    def _hand_over(self, resp: UpstreamResponse, reason: str) -> None:
        """Serve this blob straight from upstream, uncached, to the client that claims it."""
        self._metrics.cache_passthrough.labels(reason).inc()
        self.direct = resp
        self.ready.set_result(None)

        def close_unclaimed() -> None:
            if self.direct is resp:
                self.direct = None
                resp.close()

        asyncio.get_running_loop().call_later(self._tuning.unclaimed_timeout, close_unclaimed)

    async def _pump(self, resp: UpstreamResponse, writer: BlobWriterProto) -> None:
        """Copy the body to live clients and the writer; after a resume from 0, skip."""
        skip, t = self.received - resp.offset, self._tuning
        batch: list[bytes | memoryview] = []
        batched = 0
        try:
            while True:
                part = min(t.read_piece, t.stream_buffer // 8) if self._streaming else t.read_piece
                view = min(part, t.read_view)
                chunk = await resp.read_chunk(view, piece=part, limit=t.read_ahead)
                if not chunk:
                    break
                if skip:
                    cut = min(skip, len(chunk))
                    chunk, skip = chunk[cut:], skip - cut
                    if not chunk:
                        continue
                offset = self.received
                self.received += len(chunk)
                if self.size is not None and self.received > self.size:
                    raise BadGateway(
                        f"{resp.upstream.url} sent more than the {self.size} bytes"
                        f" of blob {self.digest}"
                    )
                self.clients.arrived(offset, chunk)
                batch.append(chunk)
                batched += len(chunk)
                if batched >= t.write_batch or self._streaming:
                    queued, batch, batched = batch, [], 0  # queued once, even if cancelled
                    await writer.write(*queued)
                if self._streaming:
                    self.clients.notify()
                    await self.clients.room(t.stream_buffer)
        finally:
            if batch:  # good bytes before a cut still count: resume after them
                await writer.write(*batch)
