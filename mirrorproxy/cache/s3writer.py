"""A blob being written to S3: a local temp file and the hash, its parts sent as it grows.

Followers of the download read the temp file (``reader``); every full part is
handed to a multipart upload while the download goes on (``s3upload``), and only
``commit`` (after verifying the digest) completes it, so nothing partial is ever
visible under the blob's key.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

from mirrorproxy.cache import BlobInfo, CacheWriteError, Chunk, DigestMismatch
from mirrorproxy.cache.publish import temp_name
from mirrorproxy.cache.s3upload import Multipart, put_file
from mirrorproxy.core.oci import Digest

if TYPE_CHECKING:
    from mirrorproxy.cache.s3blobs import S3BlobStore


class S3BlobWriter:
    """One blob being written: a local temp file and the hash, its parts sent as it grows.

    Every full part is handed to a multipart upload while the download goes on
    (``s3upload``); ``commit`` verifies the digest, sends the tail and only then
    completes the upload (a blob of one part is one PUT after verification).
    """

    def __init__(
        self, store: S3BlobStore, digest: Digest, on_written: Callable[[], None] | None
    ) -> None:
        self.store = store
        self.digest = digest
        self.key = store.key_of(digest)
        self.tmp_path = store.tmp / temp_name(digest.hex)
        self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._hasher: Any = digest.hasher()
        self._on_written = on_written
        self._lock = asyncio.Lock()  # writes land in order
        self._job: asyncio.Future[None] | None = None  # the write in a thread, if any
        self._failure: BaseException | None = None
        self._closed = False
        self._upload = Multipart(store.conn, self.key)
        self._sends: list[concurrent.futures.Future[None]] = []
        self._sent = 0  # bytes handed to parts
        self.written = 0

    @property
    def disk_error(self) -> BaseException | None:
        return self._failure

    def reader(self) -> BinaryIO | None:
        if self._closed:
            return None
        try:
            return open(f"/proc/self/fd/{self._fd}", "rb", buffering=0)
        except OSError:
            return open(self.tmp_path, "rb", buffering=0)

    async def write(self, *chunks: Chunk) -> None:
        """Write ``chunks`` to the temp file and the hash (in a thread, in order).

        After a failed write the chunks are only hashed: the blob will not be cached.
        """
        if self._closed:
            return
        async with self._lock:
            if not self._open():  # aborted while waiting
                return
            self._job = asyncio.ensure_future(
                asyncio.to_thread(self._write_job, chunks, self.written)
            )
            try:
                await asyncio.shield(self._job)  # abort waits for it before closing the fd
            except OSError as err:
                if self._failure is None:
                    self._failure = CacheWriteError(err.errno, err.strerror or str(err))
            else:
                self.written += sum(len(c) for c in chunks)
                self._ship(self.store.conn.part_size)
        if self._on_written is not None:
            self._on_written()

    def _open(self) -> bool:
        return not self._closed

    def _ship(self, part: int) -> None:
        """Hand every full part not yet sent to the upload (keeping a non-empty tail)."""
        while self._failure is None and self.written - self._sent > part:
            number = len(self._sends) + 1
            send = self._upload.send(number, self.tmp_path, self._sent, part)
            self._sends.append(self.store.conn.submit(send))
            self._sent += part

    def _write_job(self, chunks: Sequence[Chunk], offset: int) -> None:
        for c in chunks:
            self._hasher.update(c)
        if self._failure is not None:
            raise self._failure
        views = [memoryview(c).cast("B") for c in chunks]
        while views:
            n = os.pwritev(self._fd, views, offset)
            offset += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]

    async def verify(self) -> None:
        async with self._lock:
            actual = self._hasher.hexdigest()
        if actual != self.digest.hex:
            raise DigestMismatch(f"expected {self.digest}, got {self.digest.algorithm}:{actual}")

    async def commit(self) -> BlobInfo:
        """Verify, send the tail, then complete the upload; on failure nothing is left.

        Raises:
            DigestMismatch: the content is not what was asked for.
            CacheWriteError: the temp file or the bucket refused the write.
        """
        conn = self.store.conn
        try:
            await self.verify()
            if self._failure is not None:
                raise self._failure
            try:
                if not self._sends:
                    await conn.call(put_file(conn, self.key, self.tmp_path, self.written))
                else:
                    tail = self.written - self._sent
                    last = self._upload.send(len(self._sends) + 1, self.tmp_path, self._sent, tail)
                    self._sends.append(conn.submit(last))
                    for send in self._sends:
                        await asyncio.wrap_future(send)
                    await conn.call(self._upload.complete())
            except Exception as err:
                raise CacheWriteError(f"S3 upload failed: {type(err).__name__}") from err
        except BaseException:
            await self.abort()
            raise
        await self._close()
        return BlobInfo(size=self.written, path=Path(self.key), local=False)

    async def abort(self) -> None:
        """Drop the parts sent and the temp file."""
        if self._closed:
            return
        for send in self._sends:
            send.cancel()
        for send in self._sends:
            with contextlib.suppress(BaseException):
                await asyncio.wrap_future(send)
        with contextlib.suppress(Exception):
            await asyncio.shield(self.store.conn.call(self._upload.abort()))
        await self._close()

    async def _close(self) -> None:
        if self._closed:
            return
        self._closed = True
        if self._job is not None:
            with contextlib.suppress(BaseException):
                await self._job  # a write still in its thread must not outlive the fd
        os.close(self._fd)
        with contextlib.suppress(OSError):
            self.tmp_path.unlink()
