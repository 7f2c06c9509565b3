"""The S3 ``BlobStore``: blobs as objects ``<prefix>blobs/<alg>/<hex>`` in one bucket.

A blob being written goes to a local temp file (followers read it there) and
through the hash, and its full parts go to a multipart upload as they arrive;
``commit`` verifies the digest and only then completes the upload (aborted
otherwise; a one-part blob is a single PUT after verification), so nothing
partial or unverified is ever visible under a blob's key. Reads are S3
range requests (``read`` streams them to the server, ``open`` is the blocking
reader maintenance uses); ``url`` presigns a GET for redirects. What blobs and
manifests share is in ``s3content``.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time
from collections.abc import AsyncIterator, Callable, Iterable
from pathlib import Path
from typing import BinaryIO

from mirrorproxy.cache import BlobInfo, DigestMismatch
from mirrorproxy.cache.publish import sweep_temp, temp_name
from mirrorproxy.cache.s3client import S3Connection, S3StoreError
from mirrorproxy.cache.s3content import S3Content
from mirrorproxy.cache.s3read import RangeReader
from mirrorproxy.cache.s3upload import put_file
from mirrorproxy.cache.s3writer import S3BlobWriter
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning

READ_BUFFER = 1024 * 1024  # bytes a blob reader asks S3 for at a time
STALE_UPLOAD = 24 * 3600.0  # seconds after which an unfinished multipart upload is orphaned


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
        self.conn.run(self.conn.check_bucket(write=True))
        self.tmp.mkdir(parents=True, exist_ok=True)
        swept = sweep_temp(self.tmp)
        cutoff = time.time() - self.stale_upload
        for key, upload_id, initiated in self.conn.run(self.conn.uploads()):
            if initiated < cutoff:
                self.conn.run(self.conn.abort_upload(key, upload_id))
                swept += 1
        return swept

    async def lookup(self, digest: Digest) -> BlobInfo | None:
        key = self.key_of(digest)
        found = await self.conn.call(self.conn.head(key))
        # Not a local file: the server streams it with ``read`` instead of sendfile.
        return None if found is None else BlobInfo(size=found[0], path=Path(key), local=False)

    async def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """One Range GET, handed over chunk by chunk from the client's loop."""
        conn = self.conn
        body = conn.chunks(self.key_of(digest), start, end)
        try:
            while True:
                try:
                    chunk = await conn.call(_next(body))
                except KeyError:
                    raise FileNotFoundError(self.key_of(digest)) from None
                if not chunk:
                    return
                yield chunk
        finally:
            with contextlib.suppress(Exception):
                await asyncio.shield(conn.call(body.aclose()))

    async def url(self, digest: Digest, *, expires: float) -> str | None:
        return await self.conn.call(self.conn.presign(self.key_of(digest), expires))

    async def probe(self) -> str | None:
        try:
            await self.conn.call(self.conn.probe())
        except S3StoreError as err:
            return f"the S3 store is unreachable: {err}"
        return None

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
        return io.BufferedReader(RangeReader(self.conn, key, found[0]), READ_BUFFER)

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
            conn.run(put_file(conn, self.store.key_of(self.digest), self.path, self.size))
        finally:
            self.discard()

    def discard(self) -> None:
        with contextlib.suppress(OSError):
            self.path.unlink()


async def _next(body: AsyncIterator[bytes]) -> bytes:
    return await anext(body, b"")
