"""The clients' side of a shared download (``BlobFill``): how they follow it.

- ``Follower``: one client's read of the download (a ``BlobStream``): its next
  byte and its own handle on the file, which follows the file across the rename at
  commit (or its removal), so a follower can always read what was written;
- ``FillClients``: every follower of one download, the chunks in memory and the
  live clients (``ChunkWindow``), and the wake-ups between them and the download.

The verification rule lives here for followers: a response's last byte is never
offered before the download is verified (``FillClients.cap``). It knows nothing of
upstreams or HTTP; it reads its download through the small ``Download`` view.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import BinaryIO, Protocol

from mirrorproxy.core.closing import Closing
from mirrorproxy.core.tuning import Tuning
from mirrorproxy.pullthrough.chunkwindow import ChunkWindow, LiveFollower
from mirrorproxy.pullthrough.source import ByteSink, FileRange, Part


class Download(Protocol):
    """What the clients' side reads of the download it serves."""

    size: int | None  # once the upstream answered, if it said
    received: int  # bytes taken from upstream: on disk, in flight or in memory
    upstream: str | None
    error: BaseException | None  # why the download failed
    failed: asyncio.Future[None]  # resolves when it fails

    # Bytes on disk, contiguous from 0; whether they go to a cache file at all; whether
    # the disk failed (followers are then served from memory); whether it ended.
    @property
    def written(self) -> int: ...
    @property
    def caching(self) -> bool: ...
    @property
    def streaming(self) -> bool: ...
    @property
    def finished(self) -> bool: ...

    def reader(self) -> BinaryIO | None:
        """A new handle on the file being written (or committed); None: there is none."""

    def check(self) -> None:
        """Raise ``BlobFailed`` if the download failed."""


class Follower(Closing):
    """One client following a download from ``pos`` to ``end`` (None: the blob's end).

    It owns its file handle and its position; it must not read past what the
    download offers (``FillClients.next_part``), and it leaves the download on close.
    """

    __slots__ = ("_clients", "end", "file", "pos")

    def __init__(self, clients: FillClients, file: BinaryIO, pos: int, end: int | None) -> None:
        self._clients, self.file, self.pos, self.end = clients, file, pos, end

    @property
    def size(self) -> int | None:
        return self._clients.download.size

    @property
    def upstream(self) -> str | None:
        return self._clients.download.upstream

    @property
    def failed(self) -> asyncio.Future[None]:
        return self._clients.download.failed

    async def next(self) -> Part | None:
        if self.end is not None and self.pos >= self.end:
            return None
        part = await self._clients.next_part(self, self.end)
        if isinstance(part, memoryview):
            return part
        if part <= self.pos:
            return None  # complete and verified (unknown end)
        return FileRange(self.file, self.pos, part)

    def advance(self, pos: int) -> None:
        """Record that everything before ``pos`` was sent."""
        self.pos = pos
        self._clients.moved()

    def check(self) -> None:
        self._clients.download.check()

    async def push(self, sink: ByteSink) -> int:
        """Be written to from memory while at the head of the download (a live client)."""
        if self.end is None:
            return 0
        pos = self.pos
        live = self._clients.go_live(sink, pos, self.end)
        if live is None:
            return 0
        try:
            await live.left
        finally:
            self._clients.leave_live(live)
        self.advance(live.pos)
        return live.pos - pos

    def close(self) -> None:
        """Leave the download (idempotent)."""
        self._clients.leave(self)
        self.file.close()


class FillClients:
    """The followers of one download and the bytes held in memory for them.

    It owns who follows, what each may read next, and the live clients; the download
    tells it what arrived, reached the disk or was verified. It must not fetch,
    write the cache or decide when the download has failed.
    """

    def __init__(self, download: Download, tuning: Tuning, *, alone: Callable[[], None]) -> None:
        self.download = download
        self._live_buffer = tuning.live_buffer
        self._alone = alone  # memory-only and the last follower left
        self.followers: set[Follower] = set()
        self.memory = ChunkWindow(live_max=tuning.live_max, live_buffer=tuning.live_buffer)
        loop = asyncio.get_running_loop()
        self._tick: asyncio.Future[None] = loop.create_future()  # more to read, or the end
        self._moved: asyncio.Future[None] = loop.create_future()  # a follower moved on

    def join(self, pos: int, end: int | None) -> Follower | None:
        """Follow the download from byte ``pos``; None if it cannot serve that any more."""
        d = self.download
        if not d.caching or d.error is not None:
            return None
        if d.streaming and not self._available(pos):
            return None
        file = d.reader()
        if file is None:
            return None
        follower = Follower(self, file, pos, end)
        self.followers.add(follower)
        return follower

    def _available(self, pos: int) -> bool:
        """Whether a new follower can still get byte ``pos`` (file, memory or to come)."""
        if pos < self.download.written:
            return True
        return pos >= self.memory.start(self.download.received)

    def leave(self, follower: Follower) -> None:
        if follower not in self.followers:
            return
        self.followers.discard(follower)
        self.moved()
        d = self.download
        if not d.streaming:
            self.wake_download()  # a download letting go of its copy waits for this
        if d.streaming and not self.followers and not d.finished:
            self._alone()

    def moved(self) -> None:
        """A follower moved on or left: in memory-only mode, forget what all have sent."""
        if self.download.streaming:
            lowest = min((f.pos for f in self.followers), default=self.download.received)
            self.memory.trim(lowest)
            self.wake_download()

    def wake_download(self) -> None:
        """Wake a download waiting for its followers (``room``, ``drain``)."""
        moved, self._moved = self._moved, asyncio.get_running_loop().create_future()
        moved.set_result(None)

    def notify(self) -> None:
        """Wake the followers: more to read, or the end."""
        tick, self._tick = self._tick, asyncio.get_running_loop().create_future()
        tick.set_result(None)

    async def next_part(self, follower: Follower, end: int | None) -> int | memoryview:
        """What ``follower`` may send next of a response ending at ``end`` (None: the blob's end).

        Returns:
            A position past ``follower.pos`` up to which it may read its file, or bytes
            from memory (after a disk failure); ``follower.pos`` itself when the blob is
            complete and everything was sent (only for ``end=None``).

        Raises:
            BlobFailed: the download failed; the response must be aborted.
        """
        d = self.download
        while True:
            d.check()
            pos, cap = follower.pos, self.cap(end)
            if pos < cap:
                written = d.written
                if pos < written:
                    return min(written, cap)
                if d.streaming:
                    view = self.memory.part(pos, cap)
                    if view is not None:
                        return view
            elif self.memory.verified and pos >= d.received:
                return pos  # everything was sent
            await asyncio.shield(self._tick)

    def cap(self, end: int | None) -> int:
        """How far a response ending at ``end`` may go now: never to its last byte unverified."""
        received = self.download.received
        if self.memory.verified:
            return end if end is not None else received
        limit = (end if end is not None else received) - 1
        size = self.download.size
        if size is not None:
            limit = min(limit, size - 1)  # never a complete-looking unverified blob
        return max(0, limit)

    # -- live clients --------------------------------------------------------------

    def go_live(self, sink: ByteSink, pos: int, end: int) -> LiveFollower | None:
        """Have the download write to ``sink`` from ``pos`` (None: read the file).

        Only for a client that has everything on disk before ``pos``, wants the rest
        of the blob, and is close enough to the head to catch up from memory.
        """
        d = self.download
        if (
            not d.caching
            or d.streaming
            or d.finished
            or d.size is None
            or end != d.size
            or not d.written <= pos <= d.received
            or d.received - pos > self._live_buffer
        ):
            return None
        return self.memory.go_live(sink, pos, end)

    def leave_live(self, live: LiveFollower) -> None:
        """Stop writing to a live client (idempotent)."""
        self.memory.leave(live)

    @property
    def live_count(self) -> int:
        """Clients written straight from memory right now."""
        return len(self.memory.live)

    # -- what the download reports ---------------------------------------------------

    def arrived(self, offset: int, chunk: bytes | memoryview) -> None:
        """Hold a chunk from upstream (and write it to the live clients)."""
        self.memory.add(offset, chunk)

    def on_disk(self, written: int) -> None:
        """The disk moved: forget the chunks now on disk, wake the followers."""
        if not self.download.streaming:
            self.memory.trim(written)
        self.notify()

    def to_memory(self) -> None:
        """The disk failed: live clients read memory like the others from now on."""
        for live in list(self.memory.live):
            self.leave_live(live)
        self.moved()
        self.notify()

    def verified(self) -> None:
        """Release the last byte: to live clients from memory, to the others from disk."""
        self.memory.release_end()
        self.notify()

    def release(self) -> None:
        """The download ended: live clients go back to ``next_part``, which tells them how."""
        self.memory.clear()
        self.notify()
        self.wake_download()

    async def room(self, limit: int) -> None:
        """Memory-only: wait while the bytes held for followers exceed ``limit``."""
        while self.memory.bytes > limit and self.followers:
            self.memory.trim(min(f.pos for f in self.followers))
            if self.memory.bytes <= limit:
                return
            await asyncio.shield(self._moved)

    async def drain(self) -> None:
        """Wait until every follower has left."""
        while self.followers:
            await asyncio.shield(self._moved)
