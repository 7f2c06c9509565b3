"""Content-addressed blob files: ``blobs/<alg>/<xx>/<hex>``.

A blob enters the cache only through BlobWriter: bytes go to a temp file in
``tmp/``, a worker thread hashes what has been written (reading it back, so the
download never waits for the hash), and ``commit`` checks the digest, fsyncs and
renames atomically. Nothing partial or unverified ever sits at a blob path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path

from mirrorproxy.cache import BlobInfo, owner_alive, temp_name
from mirrorproxy.cache.index import BLOB
from mirrorproxy.cache.walk import content_path
from mirrorproxy.oci import Digest

logger = logging.getLogger(__name__)

HASH_CHUNK = 4 * 1024 * 1024


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest they were fetched for."""


class FileBlobStore:
    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def prepare(self) -> int:
        """Create the layout and sweep temp files an interrupted run left; return how many.

        Files of another live process (a server, preload or import on the same cache
        dir) are left alone.
        """
        (self.root / "blobs").mkdir(parents=True, exist_ok=True)
        self.tmp.mkdir(parents=True, exist_ok=True)
        swept = 0
        for entry in self.tmp.iterdir():
            if owner_alive(entry.name):
                continue
            with contextlib.suppress(OSError):
                entry.unlink()
                swept += 1
        return swept

    def path_of(self, digest: Digest) -> Path:
        return content_path(self.root, BLOB, str(digest))

    async def lookup(self, digest: Digest) -> BlobInfo | None:
        path = self.path_of(digest)
        try:
            st = path.stat()  # one metadata syscall: cheap enough on the loop
        except OSError:
            return None
        return BlobInfo(size=st.st_size, path=path)

    def begin(self, digest: Digest) -> BlobWriter:
        return BlobWriter(self, digest)


class BlobWriter:
    """One blob being written to a temp file; readers may follow ``tmp_path``."""

    def __init__(self, store: FileBlobStore, digest: Digest) -> None:
        self.store = store
        self.digest = digest
        self.tmp_path = store.tmp / temp_name(digest.hex)
        self._fd = os.open(self.tmp_path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
        self.written = 0
        self._hasher = digest.hasher()
        self._hashed = 0
        self._more = asyncio.Event()
        self._closed = False
        self._stop = threading.Event()  # tells the hashing thread to quit early
        self._hash_task = asyncio.create_task(self._hash_loop())

    async def write(self, data: bytes | bytearray) -> None:
        await asyncio.to_thread(_write_all, self._fd, data, self.written)
        self.written += len(data)
        self._more.set()

    async def _hash_loop(self) -> None:
        """Hash what is on disk, in a thread, catching up while writes go on."""
        while True:
            target = self.written
            if self._stop.is_set():
                return
            if self._hashed < target:
                self._hashed = await asyncio.to_thread(
                    _hash_range, self._fd, self._hasher, self._hashed, target, self._stop
                )
                continue
            if self._closed:
                return
            self._more.clear()
            await self._more.wait()

    async def commit(self, on_verified: Callable[[], None] | None = None) -> BlobInfo:
        """Verify the digest, then move the file into place.

        ``on_verified`` runs as soon as the digest matches, before fsync and rename.

        Raises:
            DigestMismatch: the content is not what was asked for (the file is removed).
            OSError: the cache could not be written (the file is removed).
        """
        self._closed = True
        self._more.set()
        try:
            await self._hash_task
            actual = self._hasher.hexdigest()
            if actual != self.digest.hex:
                raise DigestMismatch(
                    f"expected {self.digest}, got {self.digest.algorithm}:{actual}"
                )
            if on_verified is not None:
                on_verified()
            final = self.store.path_of(self.digest)
            await asyncio.to_thread(_publish, self._fd, self.tmp_path, final)
        except BaseException:
            await self.abort()
            raise
        self._close_fd()
        return BlobInfo(size=self.written, path=final)

    async def abort(self) -> None:
        self._closed = True
        self._stop.set()
        self._more.set()
        # Wait for the hashing thread rather than cancel it: it must be done with
        # the descriptor before the descriptor is closed (and its number reused).
        with contextlib.suppress(Exception):
            await asyncio.shield(self._hash_task)
        self._close_fd()
        with contextlib.suppress(OSError):
            self.tmp_path.unlink()

    def _close_fd(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


def _write_all(fd: int, data: bytes | bytearray, offset: int) -> None:
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view = view[n:]
        offset += n


def _hash_range(fd: int, hasher: object, start: int, end: int, stop: threading.Event) -> int:
    update = hasher.update  # type: ignore[attr-defined]
    pos = start
    while pos < end and not stop.is_set():
        chunk = os.pread(fd, min(HASH_CHUNK, end - pos), pos)
        if not chunk:
            break
        update(chunk)
        pos += len(chunk)
    return pos


def _publish(fd: int, tmp_path: Path, final: Path) -> None:
    os.fsync(fd)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp_path, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)  # make the rename itself durable
    finally:
        os.close(dir_fd)
