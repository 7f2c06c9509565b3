"""Reading the rest of a large response body straight from the socket into our buffers.

aiohttp hands a body over as one new ``bytes`` object per socket read and copies
each of them once more in its parser, into freshly allocated memory: for a blob
that is a copy and a round of page faults per byte, on the event loop. Once
aiohttp has handed over what it already buffered, ``BodyReader`` becomes the
connection's protocol (an ``asyncio.BufferedProtocol``): the kernel writes the
body straight into pieces of our own (``recv_into``; through the TLS layer alike),
each piece filled by several reads and handed out as views, never copied.

It owns the body's bytes from that point and the connection's reads; it must not
parse HTTP (the headers and the framing are aiohttp's: only a body of known length
is taken over) nor refill a piece while any view of it lives (the views go to the
disk, the hash and client sockets). A piece nothing refers to any more is filled
again instead of allocating a new one: a fresh piece cost a zeroing ``memset`` and
a round of page faults (and the allocator's ``brk`` churn), about 15 % of the event
loop's CPU in a cold fill. The connection is not reused after it (aiohttp sees an
unfinished body and closes it on release).

Pieces are page-aligned private memory (``core.pages``: in huge pages where a piece
is a multiple of one, which made first touches cheap), and the first one is filled from
the offset that puts every byte at an address congruent to its place in the blob
modulo the page size: whole pages of a piece can then go to a file opened with
``O_DIRECT`` as they are, without a copy into an aligned buffer (``cache/appender``).
"""

from __future__ import annotations

import asyncio
import mmap
import sys
from collections import deque

import aiohttp

from mirrorproxy.core import pages
from mirrorproxy.core.pages import PAGE

# Full pieces kept for reuse, the oldest dropped past this. At least what one download
# can have in flight (Tuning's write_ahead + read_ahead + write_batch: 44 MiB), or the
# oldest, still in use, would be dropped and a new piece made for every read.
SPARE_BYTES = 64 * 1024 * 1024


def _unused_refcount() -> int:
    """``sys.getrefcount`` of a spare piece nothing else refers to, measured the way
    ``_new_piece`` measures (a view of a piece holds a reference to it, so any other
    count means a view lives)."""
    spares = deque([pages.anonymous(PAGE)])
    return sys.getrefcount(spares[0])


_UNUSED = _unused_refcount()


class BodyReader(asyncio.BufferedProtocol):
    """The last ``remaining`` bytes of a body, read into ``piece``-sized buffers;
    ``start`` is where in the blob the first of them lies (for the alignment above).

    At most ``limit`` bytes wait unread before the socket is paused. A read that
    brings nothing for ``stall`` seconds raises ``aiohttp.ServerTimeoutError``; a
    connection that ends early raises ``aiohttp.ClientPayloadError``, as aiohttp's
    own body reads do, so callers handle both alike.
    """

    def __init__(
        self,
        transport: asyncio.Transport,
        previous: asyncio.BaseProtocol,
        *,
        remaining: int,
        piece: int,
        limit: int,
        stall: float,
        start: int = 0,
    ) -> None:
        self._transport, self._previous = transport, previous
        self._remaining, self._piece, self._limit, self._stall = remaining, piece, limit, stall
        # The piece being filled: at first a placeholder, full, so the first read
        # takes a real one.
        self._buf = pages.anonymous(1)
        self._lead = start % PAGE  # where in the first piece its first byte goes
        self._filled = 1  # bytes of ``_buf`` received
        self._handed = 1  # bytes of ``_buf`` handed out
        self._ready: deque[memoryview] = deque()  # full pieces' parts not handed out yet
        self._spares: deque[mmap.mmap] = deque()  # full pieces, oldest first, maybe in use
        self._unread = 0  # bytes received and not handed out
        self._paused = False
        self._error: BaseException | None = None
        self._waiter: asyncio.Future[None] | None = None
        transport.set_protocol(self)

    # -- the protocol (called by the transport) ------------------------------------

    def get_buffer(self, sizehint: int) -> memoryview:
        if self._filled == len(self._buf):
            if self._handed < self._filled:
                self._ready.append(memoryview(self._buf)[self._handed :])
            self._retire(self._buf)
            lead, self._lead = self._lead, 0
            self._buf = self._new_piece(max(1, min(self._piece, lead + self._remaining)))
            self._filled = self._handed = lead
        return memoryview(self._buf)[self._filled :]

    def buffer_updated(self, nbytes: int) -> None:
        if nbytes > self._remaining:
            self._fail(aiohttp.ClientPayloadError("upstream sent more than the body's length"))
            self._transport.abort()
            return
        self._filled += nbytes
        self._remaining -= nbytes
        self._unread += nbytes
        if self._remaining == 0:
            # Every byte is here: give the connection back, still paused (it is
            # closed on release; aiohttp never saw the end of this body).
            self._pause()
            self._transport.set_protocol(self._previous)
        elif self._unread >= self._limit:
            self._pause()
        self._wake()

    def eof_received(self) -> bool | None:
        self._fail(aiohttp.ClientPayloadError("upstream closed the body before its end"))
        return None  # the transport closes itself

    def connection_lost(self, exc: Exception | None) -> None:
        self._fail(aiohttp.ClientPayloadError(f"upstream connection lost: {exc or 'closed'}"))
        self._previous.connection_lost(exc)  # aiohttp's bookkeeping of the connection

    def _retire(self, piece: mmap.mmap) -> None:
        """Keep a piece whose bytes were all received, to fill again once unused."""
        if len(piece) == self._piece:
            self._spares.append(piece)
            if len(self._spares) * self._piece > SPARE_BYTES:
                self._spares.popleft()

    def _new_piece(self, size: int) -> mmap.mmap:
        """The oldest spare piece if nothing refers to it any more, else a new one."""
        spares = self._spares
        if spares and len(spares[0]) == size and sys.getrefcount(spares[0]) == _UNUSED:
            return spares.popleft()
        return pages.anonymous(size)

    # -- the reader's side ----------------------------------------------------------

    def set_piece(self, piece: int) -> None:
        """Fill pieces of ``piece`` bytes from the next one on (spares of another
        size are dropped)."""
        if piece != self._piece:
            self._piece = piece
            self._spares.clear()

    async def read(self, at_most: int) -> memoryview | bytes:
        """The next bytes received, at most ``at_most`` (a view on a piece); ``b""``
        after the last.

        Raises:
            aiohttp.ClientPayloadError: the connection ended before the body did.
            aiohttp.ServerTimeoutError: nothing came for ``stall`` seconds.
        """
        while True:
            if self._ready:
                view = self._ready.popleft()
                if len(view) > at_most:
                    view, rest = view[:at_most], view[at_most:]
                    self._ready.appendleft(rest)
                return self._took(view)
            if self._handed < self._filled:
                stop = min(self._filled, self._handed + at_most)
                view = memoryview(self._buf)[self._handed : stop]
                self._handed = stop
                return self._took(view)
            if self._error is not None:
                raise self._error
            if self._remaining == 0:
                return b""
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                async with asyncio.timeout(self._stall):
                    await self._waiter
            except TimeoutError:
                raise aiohttp.ServerTimeoutError(
                    f"no body bytes from upstream for {self._stall:g}s"
                ) from None
            finally:
                self._waiter = None

    def _took(self, view: memoryview) -> memoryview:
        self._unread -= len(view)
        if self._paused and self._remaining and self._unread < self._limit // 2:
            self._paused = False
            self._transport.resume_reading()
        return view

    def _pause(self) -> None:
        if not self._paused:
            self._paused = True
            self._transport.pause_reading()

    def _fail(self, err: BaseException) -> None:
        if self._error is None and self._remaining:
            self._error = err
        self._wake()

    def _wake(self) -> None:
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_result(None)
