"""The filesystem ``BlobStore``: content-addressed files ``blobs/<alg>/<xx>/<hex>``.

A download enters the cache through BlobWriter: bytes go to a temp file in
``tmp/`` and through the hash, both in worker threads while the download goes on,
and ``commit`` checks the digest and publishes the file atomically. Bulk import
enters through ``stage`` (hashed, then published with the rest of its bundle).
Nothing partial or unverified ever sits at a blob path.

Over 300 lines because BlobWriter is one state machine (two worker threads per
blob, the store-wide write-ahead bound, an abort that drains both threads before
the descriptor closes) that reads best whole; the store around it is small.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import time
from collections import deque
from collections.abc import AsyncIterator, Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from pathlib import Path
from typing import BinaryIO

from mirrorproxy.cache import BLOB, BlobInfo
from mirrorproxy.cache import CacheWriteError as CacheWriteError
from mirrorproxy.cache import Chunk as Chunk
from mirrorproxy.cache import DigestMismatch as DigestMismatch
from mirrorproxy.cache.appender import Appender
from mirrorproxy.cache.files import FileContent, StagedFile, stage_file
from mirrorproxy.cache.publish import publish, sweep_temp, temp_name
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning

logger = logging.getLogger(__name__)

READ_CHUNK = 1024 * 1024  # bytes per read when a blob is streamed instead of sent by file


class WriteSkipped(CacheWriteError):
    """A queued write dropped because the writer was aborted or an earlier write failed."""


class _Dropped(Exception):
    """A queued hash dropped because the blob is being thrown away."""


class FileBlobStore(FileContent):
    """Blob files under a cache directory (the filesystem ``BlobStore``).

    Owns the files and the bytes being written; decides nothing about what to cache.
    """

    kind = BLOB

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.in_flight = 0  # bytes queued by every BlobWriter, not yet written and hashed

    def prepare(self) -> int:
        """Create the layout and sweep temp files an interrupted run left; return how many.

        Files of another live process (a server, preload or import on the same cache
        dir) are left alone.
        """
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        return sweep_temp(self.tmp)

    async def lookup(self, digest: Digest) -> BlobInfo | None:
        path = self.path_of(digest)
        try:
            st = path.stat()  # one metadata syscall: cheap enough on the loop
        except OSError:
            return None
        return BlobInfo(size=st.st_size, path=path)

    def begin(
        self,
        digest: Digest,
        on_written: Callable[[], None] | None = None,
        *,
        tuning: Tuning = DEFAULT_TUNING,
    ) -> BlobWriter:
        """A writer for ``digest``, its write-ahead bounded by ``tuning``."""
        return BlobWriter(self, digest, on_written, tuning=tuning)

    def open(self, digest: Digest) -> BinaryIO:
        return open(self.path_of(digest), "rb")

    async def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """The file's bytes in bounded chunks (the server sends local files by sendfile)."""
        fd = await asyncio.to_thread(os.open, self.path_of(digest), os.O_RDONLY)
        try:
            while start < end:
                n = min(READ_CHUNK, end - start)
                chunk = await asyncio.to_thread(os.pread, fd, n, start)
                if not chunk:
                    raise EOFError(f"blob {digest} ends before byte {start}")
                start += len(chunk)
                yield chunk
        finally:
            os.close(fd)

    async def url(self, digest: Digest, *, expires: float) -> str | None:
        return None  # local files are served by the mirror itself

    async def probe(self) -> str | None:
        if not os.access(self.tmp, os.W_OK):
            return f"cache directory {self.root} is not writable"
        return None

    def stage(self, digest: Digest, chunks: Iterable[bytes]) -> StagedFile:
        return stage_file(self.tmp, self.path_of(digest), digest, chunks)


class BlobWriter:
    """One blob being written to a temp file; readers may follow ``tmp_path``.

    ``write`` hands bytes to two worker threads of this writer, one writing and one
    hashing, each in order, and returns at once unless too much is in flight (see
    ``Tuning.write_ahead``): the download does not wait for the disk or the hash, and no
    byte is read back from the file to be hashed.
    """

    def __init__(
        self,
        store: FileBlobStore,
        digest: Digest,
        on_written: Callable[[], None] | None = None,
        *,
        tuning: Tuning = DEFAULT_TUNING,
    ) -> None:
        self.store = store
        self.digest = digest
        # Bytes handed to the threads, not yet on disk (and hashed), over all writers.
        self._ahead, self._ahead_min = tuning.write_ahead, tuning.write_ahead_min
        self.tmp_path = store.tmp / temp_name(digest.hex)
        self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        # Past the page cache where the filesystem allows (see ``appender``).
        self._out = Appender(self.tmp_path, self._fd, direct=tuning.direct_write)
        self._direct_backlog = tuning.direct_backlog
        self._lagged = 0  # bytes written through the page cache: the disk was behind
        self._began: float | None = None  # when the first bytes were queued
        self.written = 0  # on disk, contiguous from 0: what followers may read
        self.queued = 0  # handed to ``write``: written plus in flight
        self._hashed = 0
        self._hasher = digest.hasher()
        self._on_written = on_written
        self._writing = ThreadPoolExecutor(1, thread_name_prefix="blob-write")
        self._hashing = ThreadPoolExecutor(1, thread_name_prefix="blob-hash")
        self._writes: deque[asyncio.Future[None]] = deque()
        self._hashes: deque[asyncio.Future[None]] = deque()
        self._stop = False  # set on abort or after a failed write: the threads skip the rest
        self._failure: BaseException | None = None
        self._counted = 0  # our part of store.in_flight
        self._closed = False

    def reader(self) -> BinaryIO | None:
        """A new read handle on the blob being written; None once the writer let go.

        Opened through the writer's descriptor (``/proc/self/fd``), it is the same
        file whatever happens to its name: renamed at commit, or removed. It has a
        position of its own (TLS senders seek and read).
        """
        if self._closed:
            return None
        try:
            return open(f"/proc/self/fd/{self._fd}", "rb", buffering=0)
        except OSError:  # no /proc: by name (the caller must join before the commit)
            return open(self.tmp_path, "rb", buffering=0)

    @property
    def disk_error(self) -> BaseException | None:
        """The first failed write (the blob will not be cached), or None."""
        return self._failure

    async def write(self, *chunks: Chunk) -> None:
        """Queue ``chunks`` for the disk and the hash (the caller must not change them).

        Once a write has failed (``disk_error``), chunks are only hashed: the blob
        cannot be cached any more, but the bytes still streaming to clients can be
        verified.
        """
        size = sum(len(c) for c in chunks)
        if not size or self._stop:
            return
        loop = asyncio.get_running_loop()
        if self._began is None:
            self._began = time.monotonic()
        offset, self.queued = self.queued, self.queued + size
        if self._failure is None:
            wrote = loop.run_in_executor(self._writing, self._write_job, chunks, offset)
            wrote.add_done_callback(partial(self._wrote, size))
            self._writes.append(wrote)
        hashed = loop.run_in_executor(self._hashing, self._hash_job, chunks)
        hashed.add_done_callback(partial(self._did_hash, size))
        self._hashes.append(hashed)
        self._track()
        while self._over_budget():
            # Waiting for our own oldest jobs: they shrink our share and the total.
            # (Shielded: a cancelled caller must not detach a job from ``abort``.)
            if self._failure is None and self.written <= self._hashed and self._writes:
                with contextlib.suppress(OSError):  # kept in ``disk_error``
                    await asyncio.shield(self._writes.popleft())
            elif self._hashes:
                await asyncio.shield(self._hashes.popleft())
            else:
                break

    def _done(self) -> int:
        """Bytes no longer in flight: written and hashed (only hashed once the disk failed)."""
        return self._hashed if self._failure is not None else min(self.written, self._hashed)

    def _over_budget(self) -> bool:
        mine = self.queued - self._done()
        if mine <= self._ahead_min or not (self._writes or self._hashes):
            return False
        return mine > self._ahead or self.store.in_flight > self._ahead

    def _track(self) -> None:
        """Keep this writer's share of the store-wide in-flight count current."""
        mine = self.queued - self._done() if not self._closed else 0
        self.store.in_flight += mine - self._counted
        self._counted = mine

    def _write_job(self, chunks: Sequence[Chunk], offset: int) -> None:
        if self._stop or self._failure is not None:
            raise WriteSkipped("an earlier write failed or the blob is dropped")
        try:
            # Read across threads: a stale count only moves the switch by a batch.
            keeping_up = self.queued - self.written <= self._direct_backlog
            keeping_up = keeping_up or not self._disk_bound()
            if not keeping_up and self._out.direct:
                self._lagged += sum(len(c) for c in chunks)
            _write_all(self._out, chunks, offset, direct=keeping_up)
        except OSError as err:
            raise CacheWriteError(err.errno, err.strerror or str(err)) from err

    def _disk_bound(self) -> bool:
        """Whether writes are behind because of the disk: at the rate it took direct
        writes, it could not have written what the download brought in the time.

        Otherwise this thread was short of CPU, and the page cache would only cost
        more of it (buffered writes into fresh page cache were the most expensive
        part of a cold fill): the backlog drains once the thread runs, and the
        download waits at ``write_ahead`` meanwhile. Before anything was measured,
        the disk is assumed to be the cause.
        """
        rate = self._out.device_rate
        if rate is None or self._began is None:
            return True
        return rate * (time.monotonic() - self._began) < self.queued

    def _hash_job(self, chunks: Sequence[Chunk]) -> None:
        # Not stopped by a failed write: the clients fed from memory still get a
        # verified blob (and the failure is reported as the disk's, not the bytes').
        if self._stop:
            raise _Dropped
        for chunk in chunks:
            self._hasher.update(chunk)

    def _wrote(self, size: int, job: asyncio.Future[None]) -> None:
        err = CacheWriteError("write cancelled") if job.cancelled() else job.exception()
        if err is not None:
            if self._failure is None:
                self._failure = err
                self._writes.clear()  # the rest are skipped; their errors are read here
                self._track()
                if self._on_written is not None:
                    self._on_written()  # the owner learns of it at once
            return
        self.written += size
        self._track()
        if self._on_written is not None:
            self._on_written()

    def _did_hash(self, size: int, job: asyncio.Future[None]) -> None:
        if not job.cancelled() and job.exception() is None:
            self._hashed += size
            self._track()

    async def verify(self) -> None:
        """Wait until every byte queued is hashed, and check the digest.

        The disk may still be behind: ``commit`` waits for it.

        Raises:
            DigestMismatch: the content is not what was asked for (``abort`` next).
        """
        while self._hashes:
            await asyncio.shield(self._hashes.popleft())
        actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            self._stop = True
            raise DigestMismatch(f"expected {self.digest}, got {self.digest.algorithm}:{actual}")

    async def commit(self) -> BlobInfo:
        """Verify the digest, wait for the disk, then move the file into place.

        Raises:
            DigestMismatch: the content is not what was asked for (the file is removed).
            OSError: the cache could not be written (the file is removed).
        """
        try:
            await self.verify()
            while self._writes:
                await asyncio.shield(self._writes.popleft())
            if self._failure is not None:
                raise self._failure
            final = self.store.path_of(self.digest)
            await asyncio.shield(
                asyncio.get_running_loop().run_in_executor(
                    self._writing, _publish, self._fd, self.tmp_path, final
                )
            )
        except BaseException:
            await self.abort()
            raise
        self._close()
        if self._lagged:
            logger.debug(
                "blob %s: %d of %d bytes went through the page cache (the disk was behind)",
                self.digest,
                self._lagged,
                self.written,
            )
        return BlobInfo(size=self.written, path=final)

    async def abort(self) -> None:
        """Drop the blob: queued jobs are skipped, the temp file goes.

        The descriptor is closed only once both threads are done, even if this
        coroutine is cancelled meanwhile: a write still running must never land in
        whatever file gets the descriptor's number next.
        """
        self._stop = True
        self._writes.clear()
        self._hashes.clear()
        if self._closed:
            return
        loop = asyncio.get_running_loop()
        drained = asyncio.gather(
            loop.run_in_executor(None, partial(self._writing.shutdown, wait=True)),
            loop.run_in_executor(None, partial(self._hashing.shutdown, wait=True)),
        )
        drained.add_done_callback(lambda _: self._discard())
        await asyncio.shield(drained)

    def _discard(self) -> None:
        self._close()
        with contextlib.suppress(OSError):
            self.tmp_path.unlink()

    def _close(self) -> None:
        if not self._closed:
            self._closed = True
            self._track()
            self._writing.shutdown(wait=False)
            self._hashing.shutdown(wait=False)
            self._out.close()
            os.close(self._fd)


def _write_all(out: Appender, chunks: Sequence[Chunk], offset: int, *, direct: bool) -> None:
    """Write ``chunks`` at ``offset`` of the temp file (tests wrap it to fail or stall)."""
    out.append(chunks, offset, direct=direct)


def _publish(fd: int, tmp_path: Path, final: Path) -> None:
    try:
        publish(tmp_path, final, fd=fd)
    except OSError as err:
        raise CacheWriteError(err.errno, err.strerror or str(err)) from err
