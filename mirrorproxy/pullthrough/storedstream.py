"""A cached blob that is not a local file, read as a ``BlobStream`` from its store.

A remote store (S3) holds the verified object; a client's read is one ranged
read of it (``BlobStore.read``), handed to the HTTP side chunk by chunk, never
the whole blob in memory. A store that fails or loses the object mid-way makes
the read raise ``BlobFailed``, so the response is cut rather than left hanging.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable

from mirrorproxy.cache import StoreUnavailable
from mirrorproxy.pullthrough.source import BlobFailed, Part, PulledStream


class StoredStream(PulledStream):
    """One client's read of a stored object, ``[pos, end)``.

    It owns the ranged read (closed on ``close``) and calls ``release`` once (the
    budget pin); it must not offer bytes outside its range.
    """

    failed: asyncio.Future[None] | None = None  # verified bytes in the store
    upstream: str | None = None

    def __init__(
        self,
        chunks: AsyncIterator[bytes],
        start: int,
        end: int,
        *,
        size: int,
        release: Callable[[], None],
        first: bytes = b"",
    ) -> None:
        """``first``: the first chunk, already read from ``chunks``."""
        self._chunks, self._release, self._first = chunks, release, first
        self.pos, self.end, self._size = start, end, size
        self._open = True
        self._closing: asyncio.Task[None] | None = None

    @property
    def size(self) -> int:
        return self._size

    async def next(self) -> Part | None:
        if self.pos >= self.end:
            return None
        chunk, self._first = self._first, b""
        try:
            chunk = chunk or await anext(self._chunks, b"")
        except (StoreUnavailable, FileNotFoundError, EOFError) as err:
            raise BlobFailed(f"reading the stored blob failed: {err}") from None
        if not chunk:
            raise BlobFailed(f"the stored blob ended before byte {self.pos}")
        return chunk[: self.end - self.pos]

    def close(self) -> None:
        if not self._open:
            return
        self._open = False
        self._release()
        aclose = getattr(self._chunks, "aclose", None)
        if aclose is not None:  # ends the ranged GET and frees its connection
            with contextlib.suppress(RuntimeError):  # no running loop: nothing to end
                self._closing = asyncio.ensure_future(aclose())
