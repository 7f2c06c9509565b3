"""Sending blob bodies to a client: whatever a ``BlobStream`` offers, in bounded steps.

The only code that writes blob bytes to client sockets (live clients of a download
get theirs through the transport this module hands to ``BlobStream.push``). The
stream decides which bytes may go (the last one only once verified) and raises when
they cannot be completed; this module decides how they go:

- file bytes by ``sendfile`` (read and write on TLS) when the length is framed
  and the client is on another machine; else read and written through the
  response (chunked, or a loopback client: below);
- every body in bounded steps: a client that takes nothing for ``stall`` seconds
  (``[server] client_timeout``) raises ``Stalled`` and the caller drops the
  connection, which releases the cache pin and the file;
- between steps the stream is checked, and a ``sendfile`` under way stops when the
  stream fails, so a failed download cuts its clients at once.

Slices are sized to take about ``Tuning.slice_time`` each: large for fast clients,
so the calls cost nothing, and small for slow ones, so a stall or a failure is seen
soon. A client slower than ``Tuning.min_slice`` per ``stall`` counts as stalled.

A client on this machine (a loopback peer, plain TCP: the node-local mirror's
containerd) gets file bytes copied in ``Tuning.copy_piece`` writes instead. On
loopback the receiver's copy is the limit, and it is cheaper from the socket's own
buffers than from page-cache pages that ``sendfile`` hands over page by page: 256 MiB
cached went at 3.2-4.7 GB/s in 256 KiB writes against 2.5 by ``sendfile``, at less
server CPU (0.28 against 0.34 CPU-s/GB), to an aiohttp client and curl alike. Reads
are taken from the page cache on the loop (``RWF_NOWAIT``); what is not there is
read in a thread, so a disk read never stalls the loop.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
from collections.abc import Callable, Iterator
from typing import Any, BinaryIO

from aiohttp import web

from mirrorproxy.core.tuning import Tuning
from mirrorproxy.http.guard import peer_address
from mirrorproxy.pullthrough.source import BlobFailed, BlobStream, FileRange


class Stalled(Exception):
    """The client took nothing for ``stall`` seconds."""


class Sender:
    """Writes one response body from a ``BlobStream``; counts what it sent (``sent``).

    It owns the client's socket for that body: ``sendfile``, writes, the stall
    timer. It must not decide which bytes a client may have (the stream does), nor
    let a failed stream's ``sendfile`` run on.
    """

    def __init__(
        self,
        request: web.Request,
        *,
        stall: float,
        count: Callable[[int], None],
        tuning: Tuning,
    ) -> None:
        self._request = request
        self._stall = stall
        self._count = count
        self._tuning = tuning
        self._slice = tuning.first_slice
        self._copy = tuning.loopback_copy and _local_plain(request.transport)
        self._nowait = hasattr(os, "RWF_NOWAIT")  # until the filesystem refuses it
        self._buf: bytearray | None = None
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
        """Size the next slice to take about ``slice_time`` at this client's pace."""
        t = self._tuning
        if seconds < t.slice_time / 2 and n >= self._slice:
            self._slice = min(self._slice * 2, t.max_slice)
        elif seconds > t.slice_time * 2:
            self._slice = max(self._slice // 2, t.min_slice)

    async def send(self, resp: web.StreamResponse, stream: BlobStream) -> None:
        """Send what ``stream`` has from its position to its end.

        Live while the stream can push (at the head of a download), else part by
        part. Without a known end the body is chunk-framed, so every byte goes
        through ``resp.write``.

        Raises:
            BlobFailed: the stream's bytes cannot be completed.
            Stalled: the client stopped taking bytes.
            EOFError: a file or an upstream body ends early.
        """
        framed = stream.end is not None
        while True:
            if stream.end is not None and stream.pos < stream.end:
                pushed = await stream.push(self.transport())
                if pushed:
                    self._sent(pushed)
                    continue  # it moved on: maybe it can stay live
            # Asked until it says None, even at ``end``: a relay learns there that
            # its upstream body ended cleanly.
            part = await stream.next()
            if part is None:
                return
            self.transport()  # raises if the client went away while we waited
            if not isinstance(part, FileRange):
                pos = stream.pos
                with self._cut_on_failure(stream):
                    await self.data(resp, part)
                stream.advance(pos + len(part))
            elif framed and not self._copy:
                await self._file(stream, part)
            else:
                with self._cut_on_failure(stream):
                    await self._copied(resp, stream, part)

    @contextlib.contextmanager
    def _cut_on_failure(self, stream: BlobStream) -> Iterator[None]:
        """Drop the client's connection the moment ``stream`` fails, even while a
        write waits for a slow client (``sendfile`` slices watch for it themselves:
        their call must be stopped before the drop)."""
        failed = stream.failed
        if failed is None:
            yield
            return
        transport = self.transport()

        def cut(_: asyncio.Future[None]) -> None:
            transport.abort()

        failed.add_done_callback(cut)
        try:
            yield
        except ConnectionError:
            if failed.done():
                raise BlobFailed("the download failed while its client was sent bytes") from None
            raise
        finally:
            failed.remove_done_callback(cut)

    async def _copied(self, resp: web.StreamResponse, stream: BlobStream, part: FileRange) -> None:
        """Send ``part`` read from its file and written through ``resp``.

        Raises:
            BlobFailed: the stream failed.
            Stalled: the client took nothing for ``stall`` seconds.
            EOFError: the file ends early.
        """
        pos = part.start
        while pos < part.stop:
            stream.check()
            data = await self._read(part.file.fileno(), pos, part.stop - pos)
            if not data:
                raise EOFError(f"file ends before byte {pos}")
            await self.data(resp, data)
            if self.transport().get_write_buffer_size():
                # It may hold a view of what it could not send yet (Python 3.12+
                # queues views, 3.11 copies): the next read takes a new buffer.
                self._buf = None
            pos += len(data)
            stream.advance(pos)

    async def _read(self, fd: int, pos: int, n: int) -> bytes | memoryview:
        """Up to ``copy_piece`` bytes at ``pos``: from the page cache on the loop when
        they are there, else (or where ``RWF_NOWAIT`` is refused) in a thread."""
        n = min(n, self._tuning.copy_piece)
        if self._nowait:
            buf = self._buf
            if buf is None:
                buf = self._buf = bytearray(self._tuning.copy_piece)
            try:
                got = os.preadv(fd, [memoryview(buf)[:n]], pos, os.RWF_NOWAIT)
            except BlockingIOError:
                got = -1  # not all in the page cache
            except OSError as err:
                if err.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                    raise
                self._nowait = False  # this filesystem cannot say
                got = -1
            if got > 0:
                return memoryview(buf)[:got]
        return await asyncio.to_thread(os.pread, fd, n, pos)

    async def _file(self, stream: BlobStream, part: FileRange) -> None:
        """Send ``part`` by ``sendfile`` slices, advancing ``stream`` after each.

        Raises:
            BlobFailed: the stream failed.
            Stalled: the client took nothing for ``stall`` seconds.
            EOFError: the file ends early.
        """
        loop = asyncio.get_running_loop()
        pos, end = part.start, part.stop
        while pos < end:
            stream.check()
            n = min(self._slice, end - pos)
            began = loop.time()
            done = await self._send_slice(part.file, pos, n, stream)
            if not done:
                raise EOFError(f"file ends before byte {pos}")
            self._adapt(loop.time() - began, done)
            pos += done
            self._sent(done)
            stream.advance(pos)

    async def _send_slice(self, f: BinaryIO, pos: int, n: int, stream: BlobStream) -> int:
        """Send ``n`` bytes of ``f`` from ``pos`` with ``sendfile``; stop if the client
        stalls or ``stream`` fails meanwhile.

        The transport's own buffer (headers, live writes) is flushed first, so the
        ``sendfile`` is in its socket wait when it has to be stopped: asyncio cannot
        stop one that still waits for that buffer without breaking the transport.
        """
        transport = self.transport()
        waited = 0.0
        poll = self._tuning.flush_poll
        while transport.get_write_buffer_size():
            stream.check()
            if waited >= self._stall:
                transport.abort()
                raise Stalled(f"client took nothing for {self._stall:g}s")
            await asyncio.sleep(poll)
            waited += poll
        transport = self.transport()  # raises if the client went away meanwhile
        loop = asyncio.get_running_loop()
        # A handle of the call's own, closed when the call ends: a stopped call may
        # still touch it after this response has closed ``f``.
        handle = os.fdopen(os.dup(f.fileno()), "rb", buffering=0)
        task = asyncio.ensure_future(loop.sendfile(transport, handle, pos, n))
        task.add_done_callback(lambda _: handle.close())
        stops: set[asyncio.Future[Any]] = {task}
        if stream.failed is not None:
            stops.add(stream.failed)
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
        stream.check()  # raises BlobFailed if that is why it stopped
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


def _local_plain(transport: asyncio.BaseTransport | None) -> bool:
    """Whether ``transport`` is plain TCP to a loopback address (a client on this machine).

    The socket's own peer, not ``request.remote``: how bytes go depends on the hop.
    """
    if transport is None or transport.get_extra_info("sslcontext") is not None:
        return False
    peer = transport.get_extra_info("peername")
    address = peer_address(str(peer[0])) if isinstance(peer, tuple) and peer else None
    return address is not None and address.is_loopback
