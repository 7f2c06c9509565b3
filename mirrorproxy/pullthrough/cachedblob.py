"""A cached blob as a ``BlobSource``: verified content, pinned while it is read.

A local file is sent as it is (``sendfile``); content in a remote store is streamed
from it (``StoredStream``) or, with ``[storage.s3] redirect``, the client is sent
to a presigned URL of it. An object found by the lookup but gone when read (another
member evicted it meanwhile) is found gone before any header is sent: ``open``
answers None, and the request is asked again, as a miss.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mirrorproxy.cache import BlobInfo, BlobStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.core.oci import Digest
from mirrorproxy.pullthrough.answers import HIT
from mirrorproxy.pullthrough.source import FileRange, Part, PulledStream
from mirrorproxy.pullthrough.storedstream import StoredStream


class CachedBlob:
    """A hit: the committed blob (its bytes were verified when it was cached).

    It owns opening it (the file, or a ranged read of the store) and pinning it in
    the budget while a client reads it; it must not write to it, nor keep it pinned
    past ``close``.

    Args:
        redirect: seconds a presigned URL handed out by ``location`` stays valid;
            None: never redirect.
    """

    result = HIT
    upstream: str | None = None

    def __init__(
        self,
        digest: Digest,
        info: BlobInfo,
        budget: CacheBudget,
        store: BlobStore,
        *,
        redirect: float | None = None,
    ) -> None:
        self.digest, self._info, self._budget, self._store = digest, info, budget, store
        self._redirect = redirect

    @property
    def size(self) -> int:
        return self._info.size

    def small(self, limit: int) -> bytes | None:
        """A small blob in one read on the loop (page cache): cheaper than a sendfile set-up."""
        if self._info.size > limit or not self._info.local:
            return None
        try:
            with open(self._info.path, "rb", buffering=0) as f:
                data = f.read(self._info.size + 1)
        except OSError:
            return None  # evicted meanwhile, say: the sendfile path reports it properly
        return data if len(data) == self._info.size else None

    async def location(self) -> str | None:
        if self._redirect is None or self._info.local:
            return None
        url = await self._store.url(self.digest, expires=self._redirect)
        self._budget.lend(self.digest, self._redirect)  # the client reads it meanwhile
        return url

    async def open(self, rng: tuple[int, int] | None) -> CachedStream | StoredStream | None:
        start, end = (0, self._info.size) if rng is None else (rng[0], rng[1] + 1)
        self._budget.pin(self.digest)  # never evicted while being sent
        if not self._info.local:
            chunks = self._store.read(self.digest, start, end)
            first = b""
            if start < end:
                try:  # the GET itself, before any header: a gone object is a miss
                    first = await anext(chunks, b"")
                except BaseException as err:  # a store down is a 503, also before headers
                    self._budget.unpin(self.digest)
                    if isinstance(err, FileNotFoundError):  # evicted since the lookup
                        return None
                    raise
            return StoredStream(
                chunks, start, end, size=self._info.size, release=self._release, first=first
            )
        f = _open(self._info.path)
        if f is None:
            self._budget.unpin(self.digest)
            return None
        return CachedStream(self, f, start, end)

    async def cached(self, progress: Callable[[int], None]) -> int:
        return self._info.size

    def _release(self) -> None:
        self._budget.unpin(self.digest)


class CachedStream(PulledStream):
    """One client's read of a cached file: one range, sent as it is.

    It owns the open file and the pin (both let go on ``close``); it must not offer
    bytes outside its range.
    """

    failed: asyncio.Future[None] | None = None  # verified bytes on disk: nothing to fail
    upstream: str | None = None

    def __init__(self, blob: CachedBlob, file: BinaryIO, start: int, end: int) -> None:
        self._blob, self._file = blob, file
        self.pos, self.end = start, end
        self._open = True

    @property
    def size(self) -> int:
        return self._blob.size

    async def next(self) -> Part | None:
        return FileRange(self._file, self.pos, self.end) if self.pos < self.end else None

    def close(self) -> None:
        if self._open:
            self._open = False
            self._file.close()
            self._blob._release()


def _open(path: Path) -> BinaryIO | None:
    """Open a cached blob (a metadata lookup on the loop: cheap); None if it is gone."""
    try:
        return open(path, "rb", buffering=0)
    except FileNotFoundError:
        return None
