"""BlobFill: one upstream download of a blob, shared by every client that wants it.

The download runs as its own task, detached from any client, so it completes (and
the cache gets the blob) even when the client that started it goes away. Clients
follow the temp file as it grows, each at its own pace; the few that keep up with
the download are "live": each chunk goes to their socket straight from memory, so
they do not wait for the disk. A live client that falls behind goes back to the
file. The last byte is held back until the digest is verified, so a corrupt
download never reaches a client whole. A connection cut mid-blob resumes with
``Range`` on the next usable endpoint.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import deque
from collections.abc import Callable
from typing import BinaryIO

import aiohttp

from mirrorproxy.cache import BlobInfo
from mirrorproxy.cache.blobs import BlobWriter, CacheWriteError, DigestMismatch, FileBlobStore
from mirrorproxy.cache.budget import WRITE_ERROR, CacheBudget, Reservation
from mirrorproxy.cache.index import BLOB
from mirrorproxy.config import Namespace
from mirrorproxy.errors import BadGateway, BlobUnknown, RegistryError
from mirrorproxy.metrics import Metrics
from mirrorproxy.oci import Digest
from mirrorproxy.upstream.client import UpstreamClient, UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)

WRITE_BATCH = 4 * 1024 * 1024  # bytes gathered before one write: fewer thread hops
LIVE_MAX = 4  # live clients per download; the others read the file (sendfile, no copy)
LIVE_BUFFER = 4 * 1024 * 1024  # a live client with more than this unsent goes to the file
MAX_RESUMES = 3
UNCLAIMED_TIMEOUT = 30.0  # a direct response nobody picked up is closed after this


class FillFailed(Exception):
    """The shared download failed; followers must abort their response."""


class LiveFollower:
    """A client at the head of the download: the pump writes each chunk to its socket.

    ``left`` resolves (to ``pos``) when the pump stops doing so: the client fell
    behind, went away, reached the held-back last byte, or the download ended.
    """

    __slots__ = ("end", "left", "pos", "transport")

    def __init__(self, transport: asyncio.Transport, pos: int, end: int) -> None:
        self.transport, self.pos, self.end = transport, pos, end
        self.left: asyncio.Future[int] = asyncio.get_running_loop().create_future()


class BlobFill:
    def __init__(
        self,
        *,
        ns: Namespace,
        ns_name: str,
        repo: str,
        digest: Digest,
        client: UpstreamClient,
        store: FileBlobStore,
        budget: CacheBudget,
        metrics: Metrics,
        on_done: Callable[[BlobFill], None],
    ) -> None:
        self.ns, self.ns_name, self.repo, self.digest = ns, ns_name, repo, digest
        self._client, self._store, self._metrics, self._on_done = client, store, metrics, on_done
        self._budget = budget
        # Set instead of a writer when the blob cannot be cached: the upstream
        # response itself, for the one client that claims it.
        self.direct: UpstreamResponse | None = None
        loop = asyncio.get_running_loop()
        self.ready: asyncio.Future[None] = loop.create_future()  # upstream said 200 (size known)
        self.size: int | None = None
        self.upstream: str | None = None  # URL of the endpoint sending the bytes (access log)
        self.result: BlobInfo | None = None
        self.error: BaseException | None = None
        self._writer: BlobWriter | None = None
        self._reservation: Reservation | None = None  # this fill's room in the budget
        self.received = 0  # bytes taken from upstream: on disk, in flight or in ``_window``
        self._window: deque[tuple[int, bytes]] = deque()  # (offset, chunk) not yet on disk
        self._live: list[LiveFollower] = []
        self._verified = False  # digest matched: the held-back last byte may go out
        self._tick: asyncio.Future[None] = loop.create_future()
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
    def finished(self) -> bool:
        return self.result is not None or self.error is not None

    def _notify(self) -> None:
        tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
        tick.set_result(None)

    def _readable(self) -> int:
        if self._writer is None:
            return 0
        if self._verified:
            return self._writer.written
        limit = self._writer.written - 1
        if self.size is not None:
            limit = min(limit, self.size - 1)  # never a complete-looking unverified blob
        return max(0, limit)

    def open_reader(self) -> BinaryIO:
        """Open the blob being written, for a client to follow with ``readable``.

        Raises:
            FillFailed: the download failed or never started.
        """
        # Open synchronously, right after checking state: the temp file is renamed
        # on commit, and an open descriptor follows it across the rename.
        if self.error is not None or self._writer is None:
            raise FillFailed(str(self.error or "download not started"))
        path = self.result.path if self.result is not None else self._writer.tmp_path
        try:
            return open(path, "rb", buffering=0)
        except FileNotFoundError:
            # The commit's rename (in a worker thread) beat us: it is in place now.
            return open(self._store.path_of(self.digest), "rb", buffering=0)

    def go_live(self, transport: asyncio.Transport, pos: int, end: int) -> LiveFollower | None:
        """Have the download write to ``transport`` from ``pos`` (None: read the file).

        Only for a client that has everything on disk before ``pos``, wants the rest
        of the blob, and is close enough to the head to catch up from memory.
        """
        if (
            self._writer is None
            or self.finished
            or self.size is None
            or end != self.size
            or pos >= end - 1
            or len(self._live) >= LIVE_MAX
            or not self._writer.written <= pos <= self.received
            or self.received - pos > LIVE_BUFFER
            or transport.is_closing()
            or transport.get_write_buffer_size() > LIVE_BUFFER // 2
        ):
            return None
        live = LiveFollower(transport, pos, end)
        self._live.append(live)
        self._catch_up(live)
        return live

    def leave(self, live: LiveFollower) -> None:
        """Stop writing to a live client (idempotent)."""
        with contextlib.suppress(ValueError):
            self._live.remove(live)
        if not live.left.done():
            live.left.set_result(live.pos)

    def _catch_up(self, live: LiveFollower) -> None:
        """Send ``live`` what it lacks of the chunks still in memory."""
        for offset, chunk in list(self._window):
            if offset + len(chunk) > live.pos and not live.left.done():
                self._send_live(live, offset, chunk)

    def _send_live(self, live: LiveFollower, offset: int, chunk: bytes) -> None:
        """Write what ``live`` lacks of ``chunk``; the last byte only once verified."""
        transport = live.transport
        last = live.end if self._verified else live.end - 1
        start, stop = live.pos - offset, min(len(chunk), last - offset)
        if start < 0 or transport.is_closing():
            self.leave(live)
            return
        if stop > start:
            whole = start == 0 and stop == len(chunk)
            transport.write(chunk if whole else memoryview(chunk)[start:stop])
            live.pos = offset + stop
        if live.pos >= live.end or transport.get_write_buffer_size() > LIVE_BUFFER:
            self.leave(live)

    def _on_written(self) -> None:
        """More is on disk: forget those chunks, wake followers of the file."""
        written = self.written
        window = self._window
        while window and window[0][0] + len(window[0][1]) <= written:
            window.popleft()
        self._notify()

    async def readable(self, pos: int) -> int:
        """Wait until bytes past ``pos`` may be sent; return how far (``pos``: the end).

        Raises:
            FillFailed: the download failed; the response must be aborted.
        """
        while True:
            if self.error is not None:
                raise FillFailed(str(self.error))
            limit = self._readable()
            if limit > pos:
                return limit
            if self.result is not None:
                return limit  # everything was sent
            await asyncio.shield(self._tick)

    async def _run(self) -> None:
        resp: UpstreamResponse | None = None
        path = f"{self.repo}/blobs/{self.digest}"
        what = f"blob {self.digest}"
        try:
            resp = await self._client.open(
                self.ns, self.ns_name, "GET", path, what=what, stream=True
            )
            self.size = resp.content_length
            self.upstream = resp.upstream.url
            self._reservation = self._budget.reserve(self.digest, self.size)
            refused = self._reservation.refused
            if refused is not None:
                self._hand_over(resp, refused)
                resp = None
                return
            try:
                self._writer = self._store.begin(self.digest, self._on_written)
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
                    if resumes > MAX_RESUMES:
                        raise
                    resp = await self._client.open(
                        self.ns,
                        self.ns_name,
                        "GET",
                        path,
                        what=what,
                        stream=True,
                        start=self.received,
                    )
                    self.upstream = resp.upstream.url
                    self._check_resumed(resp)
            if self.size is not None and self.received != self.size:
                raise BadGateway(f"upstream sent {self.received} bytes of {self.size} for {what}")
            # The last byte goes out as soon as the digest matches (to live clients
            # from memory, maybe before the disk has it); the rest of the writes,
            # fsync and rename follow while clients finish (this fill stays
            # registered until then: a request meanwhile joins it).
            await self._writer.verify()
            self._on_verified()
            self.result = await self._writer.commit()
            self._budget.committed(
                BLOB, self.digest, self.result.size, self.ns_name, reservation=self._reservation
            )
            logger.info(
                "cached blob %s (%d bytes) from %s", self.digest, self.size or 0, resp.upstream.url
            )
        except BaseException as err:
            self.error = err
            self._on_done(self)  # new requests start afresh instead of joining a failure
            self._release_clients()  # cut them now, not after the disk lets go
            self._log_failure(err, resp)
            if self._writer is not None:
                await self._writer.abort()
                if self._reservation is not None:
                    self._reservation.release()  # this fill's own, not a retry's
                if isinstance(err, CacheWriteError):
                    self._budget.write_failed(err)
            if not self.ready.done():
                self.ready.set_exception(_client_error(err, what))
                self.ready.exception()  # retrieved here; waiters get it too
            if isinstance(err, asyncio.CancelledError):
                raise
        finally:
            if resp is not None:
                resp.release()
            if self._writer is not None:
                self._budget.unpin(self.digest)
            self._release_clients()
            self._on_done(self)

    def _check_resumed(self, resp: UpstreamResponse) -> None:
        """A resumed response must be the same blob's rest: same total size.

        Raises:
            BadGateway: the endpoint announces a different size (and is cooled down).
        """
        if self.size is None or resp.content_length is None:
            return
        total = resp.offset + resp.content_length
        if total != self.size:
            self._client.mark_failed(self.ns, resp.upstream)
            raise BadGateway(
                f"{resp.upstream.url} has {total} bytes for blob {self.digest},"
                f" not the {self.size} the download started with"
            )

    def _release_clients(self) -> None:
        """Live clients go back to ``readable``, which tells them how it ended."""
        for live in list(self._live):
            self.leave(live)
        self._window.clear()
        self._notify()

    def _on_verified(self) -> None:
        """Release the last byte: to live clients from memory, to the others from disk."""
        self._verified = True
        for live in list(self._live):
            self._catch_up(live)
            self.leave(live)  # what is not in memory any more comes from the file
        self._notify()

    def _hand_over(self, resp: UpstreamResponse, reason: str) -> None:
        """Serve this blob straight from upstream, uncached, to the client that claims it."""
        self._metrics.cache_passthrough.labels(reason).inc()
        self.direct = resp
        self.ready.set_result(None)

        def close_unclaimed() -> None:
            if self.direct is resp:
                self.direct = None
                resp.close()

        asyncio.get_running_loop().call_later(UNCLAIMED_TIMEOUT, close_unclaimed)

    async def _pump(self, resp: UpstreamResponse, writer: BlobWriter) -> None:
        """Copy the body to live clients and the writer; after a resume from 0, skip."""
        skip = self.received - resp.offset
        batch: list[bytes] = []
        batched = 0
        try:
            while True:
                chunk = await resp.resp.content.readany()
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
                self._window.append((offset, chunk))
                for live in list(self._live):
                    self._send_live(live, offset, chunk)
                batch.append(chunk)
                batched += len(chunk)
                if batched >= WRITE_BATCH:
                    queued, batch, batched = batch, [], 0  # queued once, even if cancelled
                    await writer.write(*queued)
        finally:
            if batch:  # good bytes before a cut still count: resume after them
                await writer.write(*batch)

    def _log_failure(self, err: BaseException, resp: UpstreamResponse | None) -> None:
        endpoint = resp.upstream.url if resp is not None else "-"
        if isinstance(err, DigestMismatch):
            self._metrics.digest_mismatches.labels(self.ns.name).inc()
            if resp is not None:
                self._client.mark_failed(self.ns, resp.upstream)
            logger.error("blob %s from %s discarded: %s", self.digest, endpoint, err)
        elif isinstance(err, CacheWriteError):
            self._metrics.cache_write_errors.inc()
            logger.error("blob %s: cache write failed: %s", self.digest, err)
        elif isinstance(err, UpstreamError | RegistryError):
            logger.warning("blob %s: %s", self.digest, err)
        elif not isinstance(err, asyncio.CancelledError):
            logger.error("blob %s: download from %s failed: %r", self.digest, endpoint, err)


def _client_error(err: BaseException, what: str) -> Exception:
    """What a client waiting for the response headers is told."""
    if isinstance(err, UpstreamError):
        return err.registry_error(BlobUnknown)
    if isinstance(err, RegistryError):
        return err
    return BadGateway(f"could not fetch {what}: {err}")


async def finish_fills(fills: list[BlobFill], *, grace: float) -> None:
    """At shutdown: let running downloads finish for ``grace`` seconds, then cancel."""
    tasks = [fill.task for fill in fills if not fill.task.done()]
    if tasks:
        logger.info("waiting up to %.0fs for %d downloads to finish", grace, len(tasks))
        await asyncio.wait(tasks, timeout=grace)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
