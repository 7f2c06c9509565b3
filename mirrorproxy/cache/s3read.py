"""A blocking, seekable reader over one S3 object: what ``BlobStore.open`` returns.

Reads stream one GET; a seek drops it and the next read starts a Range GET at
the new position, so a partial read fetches only the bytes asked for.
"""

from __future__ import annotations

import contextlib
import io
from collections.abc import AsyncIterator
from typing import Any

from mirrorproxy.cache.s3client import S3Connection


class RangeReader(io.RawIOBase):
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
