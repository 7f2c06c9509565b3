"""Sending blob bodies to a client: cached files, downloads in progress, upstream relays.

The only code that writes blob bytes to client sockets (besides the live writes of
``BlobFill``). Every body goes out in bounded steps, and:

- a client that takes nothing for ``stall`` seconds (``[server] client_timeout``)
  raises ``Stalled``: the caller closes the connection, which releases the cache pin
  and the file;
- between steps the download being followed is checked, so a failed download cuts
  its clients at once, not after the rest of a long ``sendfile``.

File bytes go by ``sendfile`` (read and write on TLS) in slices sized to take about
``SLICE_TIME`` each: large for fast clients, so the calls cost nothing, and small
for slow ones, so a stall or a failure is seen soon. A client slower than
``MIN_SLICE`` per ``stall`` counts as stalled.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Callable
from typing import Any, BinaryIO

from aiohttp import web

from mirrorproxy.cache.blobs import DigestMismatch
from mirrorproxy.core.oci import Digest
from mirrorproxy.pullthrough.fill import BlobFill
from mirrorproxy.pullthrough.followers import FillFailed, Follower
from mirrorproxy.upstream.client import UpstreamResponse

KIB = 1024
SLICE_TIME = 0.1  # seconds one slice should take
MIN_SLICE = 64 * KIB
FIRST_SLICE = 1024 * KIB
MAX_SLICE = 16 * 1024 * KIB
RELAY_CHUNK = 1024 * KIB  # read size from an upstream response being relayed
FLUSH_POLL = 0.01  # seconds between looks at a transport buffer being flushed


class Stalled(Exception):
    """The client took nothing for ``stall`` seconds."""


class Sender:
    """Writes one response body; counts what it sent (``sent``) through ``count``."""

    def __init__(
        self, request: web.Request, *, stall: float, count: Callable[[int], None]
    ) -> None:
        self._request = request
        self._stall = stall
        self._count = count
        self._slice = FIRST_SLICE
        self.sent = 0

    def transport(self) -> asyncio.Transport:
        """The client's transport; raises if the client went away."""
        transport = self._request.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client went away")
        return transport

    def _sent(self, n: int) -> None:
        self.sent += n
        self._count(n)

    def _adapt(self, seconds: float, n: int) -> None:
        """Size the next slice to take about SLICE_TIME at this client's pace."""
        if seconds < SLICE_TIME / 2 and n >= self._slice:
            self._slice = min(self._slice * 2, MAX_SLICE)
        elif seconds > SLICE_TIME * 2:
            self._slice = max(self._slice // 2, MIN_SLICE)

    async def file(
        self,
        f: BinaryIO,
        pos: int,
        end: int,
        *,
        fill: BlobFill | None = None,
        moved: Callable[[int], None] | None = None,
    ) -> int:
        """Send bytes ``[pos, end)`` of ``f``; return ``end``.

        With ``fill`` (the download writing ``f``), a failure of the download stops
        the slice under way; ``moved`` gets the new position after each slice.

        Raises:
            FillFailed: ``fill`` failed.
            Stalled: the client took nothing for ``stall`` seconds.
            EOFError: the file ends early.
        """
        loop = asyncio.get_running_loop()
        while pos < end:
            if fill is not None:
                fill.check()
            n = min(self._slice, end - pos)
            began = loop.time()
            done = await self._send_slice(f, pos, n, fill)
            if not done:
                raise EOFError(f"file ends before byte {pos}")
            self._adapt(loop.time() - began, done)
            pos += done
            self._sent(done)
            if moved is not None:
                moved(pos)
        return pos

    async def _send_slice(self, f: BinaryIO, pos: int, n: int, fill: BlobFill | None) -> int:
        """Send ``n`` bytes of ``f`` from ``pos`` with ``sendfile``; stop if the client
        stalls or ``fill`` fails meanwhile.

        The transport's own buffer (headers, live writes) is flushed first, so the
        ``sendfile`` is in its socket wait when it has to be stopped: asyncio cannot
        stop one that still waits for that buffer without breaking the transport.
        """
        transport = self.transport()
        waited = 0.0
        while transport.get_write_buffer_size():
            if fill is not None:
                fill.check()
            if waited >= self._stall:
                transport.abort()
                raise Stalled(f"client took nothing for {self._stall:g}s")
            await asyncio.sleep(FLUSH_POLL)
            waited += FLUSH_POLL
        transport = self.transport()  # raises if the client went away meanwhile
        loop = asyncio.get_running_loop()
        # A handle of the call's own, closed when the call ends: a stopped call may
        # still touch it after this response has closed ``f``.
        handle = os.fdopen(os.dup(f.fileno()), "rb", buffering=0)
        task = asyncio.ensure_future(loop.sendfile(transport, handle, pos, n))
        task.add_done_callback(lambda _: handle.close())
        stops: set[asyncio.Future[Any]] = {task}
        if fill is not None:
            stops.add(fill.failed)
        try:
            await asyncio.wait(stops, timeout=self._stall, return_when=asyncio.FIRST_COMPLETED)
        finally:
            stopped = not task.done()
            if stopped:
                # Cancelled first (it then lets go of the transport), then the drop.
                task.cancel()
                transport.abort()
        if not stopped:
            try:
                return task.result()
            except RuntimeError:  # "Transport is closing": the client went away
                if transport.is_closing():
                    raise ConnectionResetError("client went away") from None
                raise
        if fill is not None:
            fill.check()  # raises FillFailed
        raise Stalled(f"client took nothing for {self._stall:g}s")

    async def data(self, resp: web.StreamResponse, data: bytes | memoryview) -> None:
        """Write ``data`` through ``resp`` (which frames it), in slices.

        Raises:
            Stalled: the client took nothing for ``stall`` seconds.
        """
        loop = asyncio.get_running_loop()
        view = memoryview(data)
        while view:
            part, view = view[: self._slice], view[self._slice :]
            began = loop.time()
            try:
                async with asyncio.timeout(self._stall):
                    await resp.write(part)
            except TimeoutError:
                raise Stalled(f"client took nothing for {self._stall:g}s") from None
            self._adapt(loop.time() - began, len(part))
            self._sent(len(part))

    async def follow(
        self, resp: web.StreamResponse, fill: BlobFill, follower: Follower, end: int | None
    ) -> None:
        """Send what ``follower`` still needs of a download, up to ``end`` (None: all).

        Live while at the head of the download, then from the file (or from memory
        once the disk failed). Without a known end the body is chunk-framed, so every
        byte goes through ``resp.write``.

        Raises:
            FillFailed: the download failed.
            Stalled: the client stopped taking bytes.
        """
        while end is None or follower.pos < end:
            pos = follower.pos
            if end is not None:
                live = fill.go_live(self.transport(), pos, end)
                if live is not None:
                    try:
                        await live.left
                    finally:
                        fill.leave(live)
                    self._sent(live.pos - pos)
                    follower.advance(live.pos)
                    if live.pos > pos:
                        continue  # it moved on: maybe it can stay live
            part = await fill.next_part(follower, end)
            self.transport()  # raises if the client went away while we waited
            if isinstance(part, memoryview):
                await self.data(resp, part)
                follower.advance(pos + len(part))
            elif part <= pos:
                return  # complete and verified (unknown end)
            elif end is not None:
                await self.file(follower.file, pos, part, fill=fill, moved=follower.advance)
            else:
                data = await asyncio.to_thread(
                    os.pread, follower.file.fileno(), min(part - pos, RELAY_CHUNK), pos
                )
                if not data:
                    raise FillFailed(f"temp file ends before byte {pos}")
                await self.data(resp, data)
                follower.advance(pos + len(data))

    async def relay(
        self,
        resp: web.StreamResponse,
        upstream: UpstreamResponse,
        *,
        start: int,
        length: int | None,
        digest: Digest | None,
    ) -> None:
        """Relay an upstream body (bytes ``start`` to ``start + length``, or to its end).

        With ``digest`` (the whole blob is relayed) the bytes are hashed on the way and
        the last one is held back until they match.

        Raises:
            DigestMismatch: the bytes are not the blob (its last byte was not sent).
            EOFError: the upstream body ended early.
            Stalled: the client stopped taking bytes.
        """
        loop = asyncio.get_running_loop()
        hasher = digest.hasher() if digest is not None else None
        hashing: asyncio.Future[None] | None = None
        skip, left = start - upstream.offset, length
        held = b""  # the last byte so far, while the digest is unchecked
        async for chunk in upstream.iter_chunked(RELAY_CHUNK):
            if skip:
                cut = min(skip, len(chunk))
                chunk, skip = chunk[cut:], skip - cut
            if left is not None:
                chunk, left = chunk[:left], left - min(left, len(chunk))
            if not chunk:
                if left == 0:
                    break
                continue
            if hasher is not None:
                if hashing is not None:
                    await hashing  # in order, one chunk behind the sending
                hashing = loop.run_in_executor(None, hasher.update, chunk)
                chunk, held = held + chunk[:-1], chunk[-1:]
            await self.data(resp, chunk)
            if left == 0:
                break
        if left:
            raise EOFError(f"upstream body ended {left} bytes early")
        if hasher is not None and digest is not None:
            if hashing is not None:
                await hashing
            if hasher.hexdigest() != digest.hex:
                raise DigestMismatch(
                    f"expected {digest}, got {digest.algorithm}:{hasher.hexdigest()}"
                )
            await self.data(resp, held)
