"""Writing a download into its temp file, past the page cache where the filesystem allows.

A buffered write copies every byte into the page cache, and that copy was the most
expensive and least steady part of a cold fill (0.2-1.6 CPU-s/GB on the VM that
measures it: fresh page-cache memory is slow to touch there). With ``O_DIRECT`` the
device takes the bytes from our own buffer. It needs aligned memory, offsets and
lengths: the whole blocks of each write are copied into an aligned staging buffer
and written directly; the partial blocks at either end of it (less than ``ALIGN``
bytes each) go through the page cache, so every byte handed over is in the file when
``append`` returns, as with plain writes. Where ``O_DIRECT`` is refused (the open or a
write says EINVAL: some FUSE or network filesystems) the file is written the buffered
way from then on.

Readers of the file (followers of a download, the first hit once it is cached) then
read it from the disk instead of the page cache.

It owns the writes to the file and nothing else: the caller serializes the calls
(one thread), owns the file's descriptor, and decides what a failed write means.
"""

from __future__ import annotations

import contextlib
import errno
import mmap
import os
from collections import deque
from collections.abc import Sequence

from mirrorproxy.cache import Chunk

ALIGN = 4096  # offsets and lengths of direct writes: a page, a multiple of any sector size
STAGE = 1024 * 1024  # bytes per direct write (a multiple of ALIGN)
IOV_MAX = 1024  # buffers per pwritev on Linux


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
        views = deque(memoryview(c) for c in chunks if len(c))
        size = sum(len(v) for v in views)
        head = -offset % ALIGN
        if not direct or self._direct is None or size < head + ALIGN:
            self._buffered(views)
            return
        if head:
            self._buffered(_take(views, head))
        body = (size - head) // ALIGN * ALIGN
        while body and self._direct is not None:
            n = min(body, STAGE)
            self._write_direct(_take(views, n), n)
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

    def _write_direct(self, views: Sequence[memoryview], n: int) -> None:
        """Stage ``n`` bytes (whole blocks) and write them directly; what a refusal
        leaves goes through the page cache."""
        if self._stage is None:
            self._stage = mmap.mmap(-1, STAGE)
        with memoryview(self._stage) as stage:
            at = 0
            for v in views:
                stage[at : at + len(v)] = v
                at += len(v)
            done = 0
            while done < n and self._direct is not None:
                done += self._pwrite_direct(self._direct, stage[done:n])
            if done < n:
                self._buffered([stage[done:n]])

    def _pwrite_direct(self, fd: int, data: memoryview) -> int:
        """One direct write; on EINVAL or a write off the block grid, stop writing directly."""
        try:
            n = os.pwrite(fd, data, self.end)
        except OSError as err:
            if err.errno != errno.EINVAL:
                raise
            n = 0
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
