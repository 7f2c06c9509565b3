"""Writing a download into its temp file, past the page cache where the filesystem allows.

A buffered write copies every byte into the page cache, and that copy was the most
expensive and least steady part of a cold fill (0.2-1.6 CPU-s/GB on the VM that
measures it: fresh page-cache memory is slow to touch there). With ``O_DIRECT`` the
device takes the bytes from our own buffer. It needs aligned memory, offsets and
lengths. Bytes whose memory is congruent to their file offset modulo ``ALIGN`` (the
upstream body's pieces are laid out so: ``upstream/bodyreader``) have their whole
blocks written straight from that memory; other whole blocks are copied into an
aligned staging buffer first. The partial blocks at either end of a batch (less than
``ALIGN`` bytes each) go through the page cache, so every byte handed over is in the
file when ``append`` returns, as with plain writes. Where ``O_DIRECT`` is refused (the open or a
write says EINVAL: some FUSE or network filesystems) the file is written the buffered
way from then on.

Readers of the file (followers of a download, the first hit once it is cached) then
read it from the disk instead of the page cache.

It owns the writes to the file and nothing else: the caller serializes the calls
(one thread), owns the file's descriptor, and decides what a failed write means.
"""

from __future__ import annotations

import contextlib
import ctypes
import errno
import mmap
import os
import time
from collections import deque
from collections.abc import Iterator, Sequence
from typing import TYPE_CHECKING

from mirrorproxy.cache import Chunk
from mirrorproxy.core import pages

if TYPE_CHECKING:
    from typing_extensions import Buffer  # collections.abc.Buffer from Python 3.12

ALIGN = 4096  # offsets and lengths of direct writes: a page, a multiple of any sector size
STAGE = 1024 * 1024  # bytes per direct write (a multiple of ALIGN)
IOV_MAX = 1024  # buffers per pwritev on Linux
IN_PLACE_MIN = 64 * 1024  # fewer aligned bytes than this in a region are staged instead


class Appender:
    """One file written in order from offset 0; ``end`` bytes of it are written."""

    def __init__(self, path: str | os.PathLike[str], fd: int, *, direct: bool) -> None:
        self.fd = fd  # the caller's descriptor (buffered writes); not closed here
        self.end = 0
        self._direct: int | None = None
        flag = getattr(os, "O_DIRECT", 0)
        if direct and flag:
            try:
                self._direct = os.open(path, os.O_WRONLY | flag)
            except OSError:
                self._direct = None  # the filesystem refuses: buffered writes
        self._stage: mmap.mmap | None = None  # page-aligned; allocated on first use
        self._device_bytes = 0  # written directly, and the seconds those writes took
        self._device_seconds = 0.0

    @property
    def device_rate(self) -> float | None:
        """Bytes per second the device took direct writes at (None: not measured yet)."""
        if self._device_bytes < ALIGN or self._device_seconds <= 0:
            return None
        return self._device_bytes / self._device_seconds

    @property
    def direct(self) -> bool:
        """Whether whole blocks bypass the page cache (until a write is refused)."""
        return self._direct is not None

    def append(self, chunks: Sequence[Chunk], offset: int, *, direct: bool = True) -> None:
        """Write ``chunks`` at ``offset``, where the file written so far ends
        (``direct=False``: all of them through the page cache).

        Raises:
            ValueError: ``offset`` is not ``end``.
            OSError: a write failed; ``end`` says how much of the file is written.
        """
        if offset != self.end:
            raise ValueError(f"write at {offset}, but the file ends at {self.end}")
        views = [memoryview(c) for c in chunks if len(c)]
        if not direct or self._direct is None:
            self._buffered(views)
            return
        pending: list[memoryview] = []  # bytes before the next in-place run
        pos = offset
        for region, address in _regions(views):
            lo, hi = _in_place(len(region), address, pos)
            if hi > lo and self._direct is not None:
                pending.append(region[:lo])
                self._staged(pending)
                pending = [region[hi:]]
                self._direct_from(region[lo:hi])
            else:
                pending.append(region)
            pos += len(region)
        self._staged(pending)

    def _staged(self, chunks: Sequence[memoryview]) -> None:
        """Write ``chunks`` at ``end``: whole blocks staged and written directly, the
        partial ones at either end buffered."""
        views = deque(v for v in chunks if len(v))
        size = sum(len(v) for v in views)
        head = -self.end % ALIGN
        if self._direct is None or size < head + ALIGN:
            self._buffered(views)
            return
        if head:
            self._buffered(_take(views, head))
        body = (size - head) // ALIGN * ALIGN
        while body and self._direct is not None:
            n = min(body, STAGE)
            self._write_staged(_take(views, n), n)
            body -= n
        self._buffered(views)  # the partial last block (and all, if direct writes stopped)

    def close(self) -> None:
        """Let go of the direct descriptor and the staging buffer (not ``fd``)."""
        if self._direct is not None:
            os.close(self._direct)
            self._direct = None
        stage, self._stage = self._stage, None
        if stage is not None:
            # A failed write's traceback may still hold a view on it: then it is
            # freed with the traceback.
            with contextlib.suppress(BufferError):
                stage.close()

    def _write_staged(self, views: Sequence[memoryview], n: int) -> None:
        """Stage ``n`` bytes (whole blocks) in the aligned buffer and write them directly."""
        if self._stage is None:
            self._stage = pages.anonymous(STAGE)
        with memoryview(self._stage) as stage:
            at = 0
            for v in views:
                stage[at : at + len(v)] = v
                at += len(v)
            self._direct_from(stage[:n])

    def _direct_from(self, data: memoryview) -> None:
        """Write ``data`` (aligned memory, whole blocks, at an aligned ``end``) directly;
        what a refusal leaves goes through the page cache."""
        done = 0
        while done < len(data) and self._direct is not None:
            done += self._pwrite_direct(self._direct, data[done:])
        if done < len(data):
            self._buffered([data[done:]])

    def _pwrite_direct(self, fd: int, data: memoryview) -> int:
        """One direct write; on EINVAL or a write off the block grid, stop writing directly."""
        began = time.perf_counter()
        try:
            n = os.pwrite(fd, data, self.end)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            n = 0
        self._device_seconds += time.perf_counter() - began
        self._device_bytes += n
        self.end += n
        if n == 0 or n % ALIGN:
            os.close(fd)
            self._direct = None
        return n

    def _buffered(self, chunks: Sequence[memoryview] | deque[memoryview]) -> None:
        views = list(chunks)
        while views:
            n = os.pwritev(self.fd, views[:IOV_MAX], self.end)
            self.end += n
            while views and n >= len(views[0]):
                n -= len(views.pop(0))
            if n:
                views[0] = views[0][n:]


def _take(views: deque[memoryview], n: int) -> list[memoryview]:
    """The first ``n`` bytes of ``views`` (which must hold them), taken off it."""
    out: list[memoryview] = []
    while n:
        v = views.popleft()
        if len(v) > n:
            v, rest = v[:n], v[n:]
            views.appendleft(rest)
        out.append(v)
        n -= len(v)
    return out


def _regions(views: Sequence[memoryview]) -> Iterator[tuple[memoryview, int | None]]:
    """``views`` with neighbours that lie next to each other in one buffer joined (a
    piece handed on in several reads is one region again), each with its address
    (None for read-only memory, which is not ours to hand to the device)."""
    obj: Buffer = b""
    start = stop = 0  # the run so far: ``obj[start:stop]``, at address ``base + start``
    base: int | None = None
    for v in views:
        if v.readonly or not v.c_contiguous:
            if base is not None:
                yield memoryview(obj)[start:stop], base + start
                base = None
            yield v, None
            continue
        origin = _address(memoryview(v.obj))
        at = _address(v) - origin
        if base is not None and v.obj is obj and at == stop:
            stop += len(v)
            continue
        if base is not None:
            yield memoryview(obj)[start:stop], base + start
        obj, start, stop, base = v.obj, at, at + len(v), origin
    if base is not None:
        yield memoryview(obj)[start:stop], base + start


def _address(view: memoryview) -> int:
    """Where a writable ``view``'s bytes are in memory."""
    return ctypes.addressof(ctypes.c_char.from_buffer(view))


def _in_place(size: int, address: int | None, pos: int) -> tuple[int, int]:
    """The part ``[lo, hi)`` of ``size`` bytes at ``address`` (file offset ``pos``)
    that can be written directly from where they are: whole aligned blocks at aligned
    addresses; empty if the memory is not congruent to the offset or the part small."""
    if address is None or (address - pos) % ALIGN:
        return 0, 0
    lo = -pos % ALIGN
    hi = lo + (size - lo) // ALIGN * ALIGN
    return (lo, hi) if hi - lo >= IN_PLACE_MIN else (0, 0)
