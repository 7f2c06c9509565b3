"""The bytes of a download not on disk yet, and the live clients written from them.

``ChunkWindow`` holds the chunks a download took from upstream that the disk does
not have yet (or, once the disk failed, that some client still needs), and writes
each, as it comes, to the few "live" clients at the head of the download so those
do not wait for the disk; never a response's last byte before the download is
verified. It writes only to the ``ByteSink`` each live client brought; it knows
nothing of upstreams, the cache or HTTP.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque

from mirrorproxy.pullthrough.source import ByteSink


class LiveFollower:
    """A client at the head of the download: each chunk goes to its sink as it comes.

    ``left`` resolves (to ``pos``) when that stops: the client fell behind, went
    away, reached the held-back last byte, or the download ended. It holds no bytes;
    the window writes to its sink.
    """

    __slots__ = ("end", "left", "pos", "sink")

    def __init__(self, sink: ByteSink, pos: int, end: int) -> None:
        self.sink, self.pos, self.end = sink, pos, end
        self.left: asyncio.Future[int] = asyncio.get_running_loop().create_future()


class ChunkWindow:
    """Chunks ``(offset, bytes)`` in download order, and the live clients fed from them.

    It owns those chunks and the live clients' positions; it must not send a live
    client the last byte of its response before ``release_end`` (the download is
    verified), nor hold a chunk its download has trimmed.
    """

    def __init__(self, *, live_max: int, live_buffer: int) -> None:
        self._live_max, self._live_buffer = live_max, live_buffer
        # Chunks are never changed once held: a live client's transport may keep a view.
        self._chunks: deque[tuple[int, bytes | memoryview]] = deque()
        self.bytes = 0  # held in memory
        self.live: list[LiveFollower] = []
        self.verified = False  # set by ``release_end``: last bytes may go out

    def start(self, default: int) -> int:
        """Offset of the first byte held (``default`` when nothing is)."""
        return self._chunks[0][0] if self._chunks else default

    def add(self, offset: int, chunk: bytes | memoryview) -> None:
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

    def go_live(self, sink: ByteSink, pos: int, end: int) -> LiveFollower | None:
        """Make a client live from ``pos`` if there is room and it can catch up from here.

        The caller has checked that everything before ``pos`` is on disk and that the
        client wants the rest of the blob (``end`` is its size).
        """
        if (
            len(self.live) >= self._live_max
            or pos >= end - 1
            or sink.is_closing()
            or sink.get_write_buffer_size() > self._live_buffer // 2
        ):
            return None
        live = LiveFollower(sink, pos, end)
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

    def _send(self, live: LiveFollower, offset: int, chunk: bytes | memoryview) -> None:
        """Write what ``live`` lacks of ``chunk``; its last byte only once verified."""
        sink = live.sink
        last = live.end if self.verified else live.end - 1
        start, stop = live.pos - offset, min(len(chunk), last - offset)
        if start < 0 or sink.is_closing():
            self.leave(live)
            return
        if stop > start:
            whole = start == 0 and stop == len(chunk)
            sink.write(chunk if whole else memoryview(chunk)[start:stop])
            live.pos = offset + stop
        if live.pos >= live.end or sink.get_write_buffer_size() > self._live_buffer:
            self.leave(live)
