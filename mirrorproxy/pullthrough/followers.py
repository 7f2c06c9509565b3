"""The clients' side of a shared download (``BlobFill``): how they follow it.

- ``Follower``: one client's place in the download and its own handle on the file;
- ``ChunkWindow``: the chunks a download took from upstream that the disk does not
  have yet (or, once the disk failed, that some client still needs), written as
  they come to the few "live" clients at the head of the download, so those do not
  wait for the disk; never a response's last byte before the download is verified;
- ``FillTuning``: the sizes that bound all this.

It knows nothing of upstreams, the cache or HTTP beyond a transport.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class FillTuning:
    """How downloads share their bytes (tests pass smaller values)."""

    write_batch: int = 4 * MIB  # bytes gathered before one write: fewer thread hops
    live_max: int = 4  # live clients per download; the others read the file (sendfile)
    live_buffer: int = 4 * MIB  # a live client with more than this unsent goes to the file
    # Once the disk failed: bytes kept in memory for the followers; past this the
    # download waits for the slowest of them.
    stream_buffer: int = 16 * MIB
    max_resumes: int = 3
    unclaimed_timeout: float = 30.0  # a direct response nobody picked up is closed after this


class FillFailed(Exception):
    """The shared download failed; followers must abort their response."""


class Follower:
    """One client of a download: its next byte, and its own handle on the temp file.

    The handle is opened on joining and follows the file across the rename at
    commit (or its removal), so a follower can always read what was written.
    """

    __slots__ = ("_leave", "_moved", "file", "pos")

    def __init__(
        self,
        file: BinaryIO,
        pos: int,
        *,
        moved: Callable[[], None],
        leave: Callable[[Follower], None],
    ) -> None:
        self.file, self.pos = file, pos
        self._moved, self._leave = moved, leave

    def advance(self, pos: int) -> None:
        """Record that everything before ``pos`` was sent."""
        self.pos = pos
        self._moved()

    def close(self) -> None:
        """Leave the download (idempotent)."""
        self._leave(self)
        self.file.close()

    def __enter__(self) -> Follower:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()


class LiveFollower:
    """A client at the head of the download: each chunk goes to its socket.

    ``left`` resolves (to ``pos``) when that stops: the client fell behind, went
    away, reached the held-back last byte, or the download ended.
    """

    __slots__ = ("end", "left", "pos", "transport")

    def __init__(self, transport: asyncio.Transport, pos: int, end: int) -> None:
        self.transport, self.pos, self.end = transport, pos, end
        self.left: asyncio.Future[int] = asyncio.get_running_loop().create_future()


class ChunkWindow:
    """Chunks ``(offset, bytes)`` in download order, and the live clients fed from them."""

    def __init__(self, *, live_max: int, live_buffer: int) -> None:
        self._live_max, self._live_buffer = live_max, live_buffer
        self._chunks: deque[tuple[int, bytes]] = deque()
        self.bytes = 0  # held in memory
        self.live: list[LiveFollower] = []
        self.verified = False  # set by ``release_end``: last bytes may go out

    def start(self, default: int) -> int:
        """Offset of the first byte held (``default`` when nothing is)."""
        return self._chunks[0][0] if self._chunks else default

    def add(self, offset: int, chunk: bytes) -> None:
        """Hold ``chunk`` and write it to the live clients."""
        self._chunks.append((offset, chunk))
        self.bytes += len(chunk)
        for live in list(self.live):
            self._send(live, offset, chunk)

    def trim(self, below: int) -> None:
        """Forget the chunks that end at or before ``below``."""
        chunks = self._chunks
        while chunks and chunks[0][0] + len(chunks[0][1]) <= below:
            self.bytes -= len(chunks.popleft()[1])

    def clear(self) -> None:
        """Let every live client go and forget every chunk."""
        for live in list(self.live):
            self.leave(live)
        self._chunks.clear()
        self.bytes = 0

    def part(self, pos: int, cap: int) -> memoryview | None:
        """The held bytes from ``pos`` (within one chunk), not past ``cap``."""
        for offset, chunk in self._chunks:
            if offset <= pos < offset + len(chunk):
                stop = min(offset + len(chunk), cap)
                return memoryview(chunk)[pos - offset : stop - offset] if stop > pos else None
        return None

    def go_live(self, transport: asyncio.Transport, pos: int, end: int) -> LiveFollower | None:
        """Make a client live from ``pos`` if there is room and it can catch up from here.

        The caller has checked that everything before ``pos`` is on disk and that the
        client wants the rest of the blob (``end`` is its size).
        """
        if (
            len(self.live) >= self._live_max
            or pos >= end - 1
            or transport.is_closing()
            or transport.get_write_buffer_size() > self._live_buffer // 2
        ):
            return None
        live = LiveFollower(transport, pos, end)
        self.live.append(live)
        for offset, chunk in list(self._chunks):
            if offset + len(chunk) > live.pos and not live.left.done():
                self._send(live, offset, chunk)
        return live

    def leave(self, live: LiveFollower) -> None:
        """Stop writing to a live client (idempotent)."""
        with contextlib.suppress(ValueError):
            self.live.remove(live)
        if not live.left.done():
            live.left.set_result(live.pos)

    def release_end(self) -> None:
        """The download is verified: send the live clients their last bytes, let them go
        (what is no longer in memory comes from the file)."""
        self.verified = True
        for live in list(self.live):
            for offset, chunk in list(self._chunks):
                if offset + len(chunk) > live.pos and not live.left.done():
                    self._send(live, offset, chunk)
            self.leave(live)

    def _send(self, live: LiveFollower, offset: int, chunk: bytes) -> None:
        """Write what ``live`` lacks of ``chunk``; its last byte only once verified."""
        transport = live.transport
        last = live.end if self.verified else live.end - 1
        start, stop = live.pos - offset, min(len(chunk), last - offset)
        if start < 0 or transport.is_closing():
            self.leave(live)
            return
        if stop > start:
            whole = start == 0 and stop == len(chunk)
            transport.write(chunk if whole else memoryview(chunk)[start:stop])
            live.pos = offset + stop
        if live.pos >= live.end or transport.get_write_buffer_size() > self._live_buffer:
            self.leave(live)
