"""A cached blob as a ``BlobSource``: a verified file, pinned while it is read."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path
from typing import BinaryIO

from mirrorproxy.cache import BlobInfo
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.core.closing import Closing
from mirrorproxy.core.oci import Digest
from mirrorproxy.pullthrough.answers import HIT
from mirrorproxy.pullthrough.source import ByteSink, FileRange, Part


class CachedBlob:
    """A hit: the committed file of a blob (its bytes were verified when it was cached).

    It owns opening that file and pinning it in the budget while a client reads it;
    it must not write to the file, nor keep it pinned past ``close``.
    """

    result = HIT
    upstream: str | None = None

    def __init__(self, digest: Digest, info: BlobInfo, budget: CacheBudget) -> None:
        self.digest, self._info, self._budget = digest, info, budget

    @property
    def size(self) -> int:
        return self._info.size

    def small(self, limit: int) -> bytes | None:
        """A small blob in one read on the loop (page cache): cheaper than a sendfile set-up."""
        if self._info.size > limit:
            return None
        try:
            with open(self._info.path, "rb", buffering=0) as f:
                data = f.read(self._info.size + 1)
        except OSError:
            return None  # evicted meanwhile, say: the sendfile path reports it properly
        return data if len(data) == self._info.size else None

    async def open(self, rng: tuple[int, int] | None) -> CachedStream | None:
        self._budget.pin(self.digest)  # never evicted while being sent
        f = _open(self._info.path)
        if f is None:
            self._budget.unpin(self.digest)
            return None
        start, end = (0, self._info.size) if rng is None else (rng[0], rng[1] + 1)
        return CachedStream(self, f, start, end)

    async def cached(self, progress: Callable[[int], None]) -> int:
        return self._info.size

    def _release(self) -> None:
        self._budget.unpin(self.digest)


class CachedStream(Closing):
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

    def advance(self, pos: int) -> None:
        self.pos = pos

    def check(self) -> None:
        return None

    async def push(self, sink: ByteSink) -> int:
        return 0

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
