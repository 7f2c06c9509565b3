"""The blob source: what a client gets when it asks for a blob, cached or not.

Three kinds stand behind it: a cached file, a download in progress shared with
other clients, and an uncached blob relayed from upstream. The HTTP side sees only
this interface: it owns the sockets, ``sendfile`` and the loop that sends; the
source owns the bytes and their verification. The rules every kind keeps:

- the last byte of a response (whole blob or range) comes only once the blob's
  digest matched, so a corrupt blob never reaches a client whole;
- when the bytes cannot be completed (the download failed or did not verify), every
  call raises ``BlobFailed`` and ``failed`` resolves, so the response is cut at once.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import BinaryIO, Protocol

from mirrorproxy.core.closing import Closing
from mirrorproxy.core.oci import Digest


class BlobFailed(Exception):
    """The bytes being sent cannot be completed; the response must be cut."""


class NotCacheable(Exception):
    """The blob goes to clients uncached (no room, or the disk cannot be written)."""


@dataclass(frozen=True, slots=True)
class FileRange:
    """Bytes ``[start, stop)`` of an open file, to be sent as they are (``sendfile``)."""

    file: BinaryIO
    start: int
    stop: int


Part = FileRange | bytes | memoryview


class ByteSink(Protocol):
    """Where a client's bytes may be written as they arrive (an asyncio transport)."""

    def write(self, data: bytes | bytearray | memoryview) -> None: ...

    def is_closing(self) -> bool: ...

    def get_write_buffer_size(self) -> int: ...


class BlobStream(Protocol):
    """One client's read of a blob, from ``pos`` to ``end`` (None: to the blob's end).

    The caller sends each part ``next`` gives, then ``advance``s past what it sent.
    It is a context manager: leaving it lets go of the file, the pin or the upstream
    response.
    """

    @property
    def size(self) -> int | None:
        """The blob's size, when known (for the response headers)."""

    @property
    def upstream(self) -> str | None:
        """URL of the endpoint the bytes come from, if any (for the access log)."""

    @property
    def pos(self) -> int:
        """The next byte to send."""

    @property
    def end(self) -> int | None:
        """Where the read stops (exclusive); None: where the blob ends, not known yet."""

    @property
    def failed(self) -> asyncio.Future[None] | None:
        """Resolves when the bytes cannot be completed (None: they cannot fail)."""

    async def next(self) -> Part | None:
        """What to send next from ``pos``; None once everything was sent.

        Raises:
            BlobFailed: the bytes cannot be completed.
        """

    def advance(self, pos: int) -> None:
        """Record that everything before ``pos`` was sent."""

    def check(self) -> None:
        """Raise ``BlobFailed`` if the bytes cannot be completed (between sends)."""

    async def push(self, sink: ByteSink) -> int:
        """Have the bytes written to ``sink`` as they arrive, while that keeps up.

        Returns:
            How many bytes were written that way (``pos`` moved by as much); 0 when
            this read cannot be pushed now (read on with ``next``).
        """

    def close(self) -> None:
        """Let go of what the read holds (idempotent)."""

    def __enter__(self) -> BlobStream: ...

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None: ...


class PulledStream(Closing):
    """A ``BlobStream`` its sender pulls part by part: nothing pushes it, and only
    ``next`` tells of a failure. Gives the members such streams share."""

    pos: int

    def advance(self, pos: int) -> None:
        self.pos = pos

    def check(self) -> None:
        return None

    async def push(self, sink: ByteSink) -> int:
        return 0


class BlobSource(Protocol):
    """A blob a client asked for: cached (a hit) or fetched now (a miss).

    It owns how the bytes are read and checked; it must not write to a client
    itself except through a ``ByteSink`` the caller handed to ``push``.
    """

    @property
    def digest(self) -> Digest: ...

    @property
    def size(self) -> int | None:
        """The blob's size, when known (an upstream may not state it)."""

    @property
    def result(self) -> str:
        """``hit`` or ``miss`` (metrics and the access log)."""

    @property
    def upstream(self) -> str | None:
        """URL of the endpoint the download came from, on a miss (the access log)."""

    def small(self, limit: int) -> bytes | None:
        """The whole blob in one read, if it is cached and at most ``limit`` bytes."""

    async def location(self) -> str | None:
        """A URL the client may fetch the cached blob from itself (a 307 redirect),
        or None: the mirror sends the bytes."""

    async def open(self, rng: tuple[int, int] | None) -> BlobStream | None:
        """Start reading the inclusive byte range ``rng`` (None: the whole blob).

        Returns:
            The read, or None when a cached blob was evicted meanwhile (ask again).

        Raises:
            RegistryError: an uncached blob's upstream refused (416, 404, ...).
        """

    async def cached(self, progress: Callable[[int], None]) -> int:
        """Wait until the blob is in the cache; ``progress`` gets the bytes so far.

        Returns:
            The blob's size.

        Raises:
            NotCacheable: the blob cannot be cached.
            BlobFailed: the download failed.
        """
