"""A blob's multipart upload, fed from its local temp file while the download goes on.

Parts are read from the file (opened by name, per part) only when their turn comes, at most
``IN_FLIGHT`` at a time, so memory stays bounded and the download never waits for
the bucket. ``complete`` is the commit: until it runs nothing is visible under the
key, and ``abort`` leaves nothing behind. Every coroutine here runs on the
connection's loop.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from mirrorproxy.cache.s3client import S3Connection

IN_FLIGHT = 2  # parts read and being sent at once, per upload


class Multipart:
    """One multipart upload of ``key``; created on its first part."""

    def __init__(self, conn: S3Connection, key: str) -> None:
        self.conn = conn
        self.key = key
        self._create: asyncio.Task[str] | None = None
        self._slots: asyncio.Semaphore | None = None
        self._etags: dict[int, str] = {}

    async def _upload_id(self) -> str:
        if self._create is None:  # one loop, no await in between: no race
            self._create = asyncio.ensure_future(self._start())
        # Shielded: a cancelled part must not cancel the creation ``abort`` awaits.
        return await asyncio.shield(self._create)

    async def _start(self) -> str:
        async with self.conn.op("create_upload"):
            r = await self.conn.client.create_multipart_upload(
                Bucket=self.conn.config.bucket, Key=self.key
            )
        return r["UploadId"]

    async def send(self, number: int, path: Path, start: int, length: int) -> None:
        """Upload bytes [start, start + length) of the file ``path`` as part ``number``."""
        if self._slots is None:
            self._slots = asyncio.Semaphore(IN_FLIGHT)
        upload_id = await self._upload_id()
        async with self._slots:
            data = await asyncio.to_thread(_read, path, start, length)
            if len(data) != length:
                raise OSError(f"short read of part {number}: {len(data)} of {length} bytes")
            async with self.conn.op("upload_part"):
                r = await self.conn.client.upload_part(
                    Bucket=self.conn.config.bucket,
                    Key=self.key,
                    UploadId=upload_id,
                    PartNumber=number,
                    Body=data,
                )
        self._etags[number] = r["ETag"]

    async def complete(self) -> None:
        """Publish the parts sent, in order: the object appears whole, at once."""
        upload_id = await self._upload_id()
        parts: list[Any] = [{"PartNumber": n, "ETag": e} for n, e in sorted(self._etags.items())]
        async with self.conn.op("complete_upload"):
            await self.conn.client.complete_multipart_upload(
                Bucket=self.conn.config.bucket,
                Key=self.key,
                UploadId=upload_id,
                MultipartUpload={"Parts": parts},
            )

    async def abort(self) -> None:
        """Drop the upload and its parts (nothing to do if it was never created)."""
        if self._create is None:
            return
        try:
            upload_id = await self._create
        except Exception:
            return  # never created
        await self.conn.abort_upload(self.key, upload_id)


def _read(path: Path, start: int, length: int) -> bytes:
    with open(path, "rb") as f:
        f.seek(start)
        return f.read(length)


async def put_file(conn: S3Connection, key: str, path: Path, size: int) -> None:
    """Upload a whole local file as ``key``: one PUT, or a multipart upload completed
    only once every part is in (aborted on any failure)."""
    if size <= conn.part_size:
        data = await asyncio.to_thread(path.read_bytes)
        await conn.put_bytes(key, data)
        return
    upload = Multipart(conn, key)
    try:
        starts = range(0, size, conn.part_size)
        await asyncio.gather(
            *(
                upload.send(n, path, start, min(conn.part_size, size - start))
                for n, start in enumerate(starts, 1)
            )
        )
        await upload.complete()
    except BaseException:
        await asyncio.shield(upload.abort())
        raise
