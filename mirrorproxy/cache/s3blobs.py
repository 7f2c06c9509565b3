"""The S3 ``BlobStore``: blobs as objects ``<prefix>blobs/<alg>/<hex>`` in one bucket.

A blob being written goes to a local temp file (followers read it there) and
through the hash; ``commit`` verifies the digest and only then uploads it (one PUT,
or a multipart upload completed only when every part is in, aborted otherwise), so
nothing partial or unverified is ever visible under a blob's key. Reads are S3
range requests. Content common to blobs and manifests lives in ``S3Content``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import os
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any, BinaryIO

from mirrorproxy.cache import BLOB, BlobInfo, CacheWriteError, Chunk, Content, DigestMismatch
from mirrorproxy.cache.publish import sweep_temp, temp_name
from mirrorproxy.cache.s3client import S3Connection
from mirrorproxy.core.oci import Digest, parse_digest
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning

READ_BUFFER = 1024 * 1024  # bytes a blob reader asks S3 for at a time
STALE_UPLOAD = 24 * 3600.0  # seconds after which an unfinished multipart upload is orphaned


class S3Content:
    """What maintenance needs of either kind of content, over objects of one kind."""

    kind = BLOB

    def __init__(self, conn: S3Connection) -> None:
        self.conn = conn

    def key_of(self, digest: Digest) -> str:
        return self.conn.key(f"{self.kind}s", digest.algorithm, digest.hex)

    def contents(self) -> Iterator[Content]:
        under = self.conn.key(f"{self.kind}s/")
        for key, size, stored in self.conn.run(self.conn.listing(under)):
            alg, _, hex_ = key[len(under) :].partition("/")
            try:
                digest = parse_digest(f"{alg}:{hex_}")
            except ValueError:
                continue  # not ours
            yield Content(self.kind, digest, size, stored)

    def size(self, digest: Digest) -> int | None:
        found = self.conn.run(self.conn.head(self.key_of(digest)))
        return None if found is None else found[0]

    def check(self, digest: Digest) -> bool | None:
        return self.conn.run(self._intact(digest))

    async def _intact(self, digest: Digest) -> bool | None:
        hasher = digest.hasher()
        try:
            async for chunk in self.conn.chunks(self.key_of(digest)):
                hasher.update(chunk)
        except KeyError:
            return None
        return hasher.hexdigest() == digest.hex

    def delete(self, digest: Digest) -> bool:
        return self.conn.run(self.conn.delete(self.key_of(digest)))

    def quarantine(self, digest: Digest) -> str:
        """Copy the object under ``quarantine/`` and remove it from its key."""
        src = self.key_of(digest)
        dst = self.conn.key(
            "quarantine", self.kind, digest.algorithm, f"{digest.hex}-{uuid.uuid4().hex}"
        )
        self.conn.run(self.conn.copy(src, dst))
        self.conn.run(self.conn.delete(src))
        return f"s3://{self.conn.config.bucket}/{dst}"


class S3BlobStore(S3Content):
    """Blobs in a bucket; ``work`` is the local directory for temp files."""

    def __init__(
        self, conn: S3Connection, work: Path, *, stale_upload: float = STALE_UPLOAD
    ) -> None:
        super().__init__(conn)
        self.tmp = work / "tmp"
        self.stale_upload = stale_upload

    def prepare(self) -> int:
        """Check the bucket, sweep dead writers' temp files and abort orphaned uploads.

        Multipart uploads younger than ``stale_upload`` may belong to a live member
        of a cluster and are left alone. Returns how many leftovers were removed.
        """
        self.conn.run(self.conn.check_bucket())
        self.tmp.mkdir(parents=True, exist_ok=True)
        swept = sweep_temp(self.tmp)
        cutoff = time.time() - self.stale_upload
        for key, upload_id, initiated in self.conn.run(self.conn.uploads()):
            if initiated < cutoff:
                self.conn.run(self.conn.abort_upload(key, upload_id))
                swept += 1
        return swept

    async def lookup(self, digest: Digest) -> BlobInfo | None:
        found = await self.conn.call(self.conn.head(self.key_of(digest)))
        # Not a local file: serving from this store streams ``open`` instead.
        return None if found is None else BlobInfo(size=found[0], path=Path(self.key_of(digest)))

    def begin(
        self,
        digest: Digest,
        on_written: Callable[[], None] | None = None,
        *,
        tuning: Tuning = DEFAULT_TUNING,
    ) -> S3BlobWriter:
        return S3BlobWriter(self, digest, on_written)

    def open(self, digest: Digest) -> BinaryIO:
        key = self.key_of(digest)
        found = self.conn.run(self.conn.head(key))
        if found is None:
            raise FileNotFoundError(f"s3://{self.conn.config.bucket}/{key}")
        return io.BufferedReader(_RangeReader(self.conn, key, found[0]), READ_BUFFER)

    def stage(self, digest: Digest, chunks: Iterable[bytes]) -> S3StagedBlob:
        path = self.tmp / temp_name(digest.hex)
        hasher = digest.hasher()
        size = 0
        try:
            with open(path, "xb") as f:
                for chunk in chunks:
                    f.write(chunk)
                    hasher.update(chunk)
                    size += len(chunk)
            if hasher.hexdigest() != digest.hex:
                raise DigestMismatch(
                    f"expected {digest}, got {digest.algorithm}:{hasher.hexdigest()}"
                )
        except BaseException:
            with contextlib.suppress(OSError):
                path.unlink()
            raise
        return S3StagedBlob(self, digest, path, size)


class S3StagedBlob:
    """A verified blob in a local temp file; ``publish`` uploads it."""

    def __init__(self, store: S3BlobStore, digest: Digest, path: Path, size: int) -> None:
        self.store, self.digest, self.path, self.size = store, digest, path, size

    def publish(self) -> None:
        conn = self.store.conn
        try:
            conn.run(conn.put_file(self.store.key_of(self.digest), self.path, self.size))
        finally:
            self.discard()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


class S3BlobWriter:
    """One blob being written: a local temp file and the hash, uploaded at commit."""

    def __init__(
        self, store: S3BlobStore, digest: Digest, on_written: Callable[[], None] | None
    ) -> None:
        self.store = store
        self.digest = digest
        self.tmp_path = store.tmp / temp_name(digest.hex)
        self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self._hasher: Any = digest.hasher()
        self._on_written = on_written
        self._lock = asyncio.Lock()  # writes land in order
        self._failure: BaseException | None = None
        self._closed = False
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
            offset = self.written
            try:
                await asyncio.to_thread(self._write_job, chunks, offset)
            except OSError as err:
                if self._failure is None:
                    self._failure = CacheWriteError(err.errno, err.strerror or str(err))
            else:
                self.written += sum(len(c) for c in chunks)
        if self._on_written is not None:
            self._on_written()

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
        """Verify, then upload; on any failure nothing is left behind.

        Raises:
            DigestMismatch: the content is not what was asked for.
            CacheWriteError: the temp file or the bucket refused the write.
        """
        conn, key = self.store.conn, self.store.key_of(self.digest)
        try:
            await self.verify()
            if self._failure is not None:
                raise self._failure
            try:
                await conn.call(conn.put_file(key, self.tmp_path, self.written))
            except Exception as err:
                raise CacheWriteError(f"S3 upload failed: {type(err).__name__}") from err
        finally:
            await self.abort()
        return BlobInfo(size=self.written, path=Path(key))

    async def abort(self) -> None:
        if self._closed:
            return
        async with self._lock:
            self._closed = True
            os.close(self._fd)
            with contextlib.suppress(OSError):
                self.tmp_path.unlink()


class _RangeReader(io.RawIOBase):
    """A seekable blocking reader over one object; each seek starts a new Range GET."""

    def __init__(self, conn: S3Connection, key: str, size: int) -> None:
        super().__init__()
        self._conn, self._key, self._size = conn, key, size
        self._pos = 0
        self._body: AsyncIterator[bytes] | None = None
        self._rest = b""

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        pos = max(0, base + offset)
        if pos != self._pos:
            self._drop()
            self._pos = pos
        return pos

    def readinto(self, buffer: Any) -> int:
        if self._pos >= self._size:
            return 0
        if not self._rest:
            if self._body is None:
                self._body = self._conn.chunks(self._key, self._pos)
            body = self._body
            try:
                self._rest = self._conn.run(_next(body))
            except KeyError:
                raise FileNotFoundError(self._key) from None
            if not self._rest:
                return 0
        view = memoryview(buffer).cast("B")
        n = min(len(view), len(self._rest))
        view[:n] = self._rest[:n]
        self._rest = self._rest[n:]
        self._pos += n
        return n

    def _drop(self) -> None:
        self._rest = b""
        body, self._body = self._body, None
        if body is not None:
            with contextlib.suppress(Exception):
                self._conn.run(_close(body))

    def close(self) -> None:
        if not self.closed:
            self._drop()
        super().close()


async def _next(body: AsyncIterator[bytes]) -> bytes:
    return await anext(body, b"")


async def _close(body: AsyncIterator[bytes]) -> None:
    aclose = getattr(body, "aclose", None)
    if aclose is not None:
        await aclose()
