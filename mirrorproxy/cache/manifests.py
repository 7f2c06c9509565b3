"""Manifests by digest (immutable) and tag -> digest records, on disk and hot in memory.

A manifest file holds its media type on the first line and the exact bytes after
it, and is checked against its digest on every read from disk. A tag record maps
each Accept set a client used to what the tag resolved to, so an index and a
single-platform manifest under the same tag never answer for each other (see
``records`` for their files). Every file is published atomically.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import OrderedDict
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from mirrorproxy.cache import (
    MANIFEST,
    ReferrersRecord,
    StoredManifest,
    TagEntry,
    TagKey,
    TagRecord,
)
from mirrorproxy.cache import records as rec
from mirrorproxy.cache.files import FileContent
from mirrorproxy.cache.hotset import MAX_TAGS_IN_MEMORY, HotManifests
from mirrorproxy.cache.publish import write_atomic, write_atomic_many
from mirrorproxy.core.oci import Digest, manifest_digest

logger = logging.getLogger(__name__)

TAG_RECHECK = 1.0  # seconds a remembered tag record is trusted without a stat


class FileManifestStore(FileContent):
    """Manifest files, tag and referrers records under a cache directory.

    Owns what is stored and a bounded hot copy in memory; never decides when a tag
    is stale or asks an upstream.
    """

    kind = MANIFEST

    def __init__(self, root: Path, *, memory_bytes: int = 64 * 1024 * 1024) -> None:
        super().__init__(root)
        self._hot = HotManifests(memory_bytes)
        # Tag records in memory: entries, the file's mtime, when that was last checked.
        self._tags: OrderedDict[TagKey, tuple[dict[str, TagEntry], int, float]] = OrderedDict()
        self._tag_locks: dict[TagKey, tuple[asyncio.Lock, list[int]]] = {}

    def prepare(self) -> None:
        for sub in ("manifests", "tags", "referrers", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    # -- manifests -------------------------------------------------------------

    async def get(self, digest: Digest) -> StoredManifest | None:
        hot = self._hot.get(digest)
        if hot is not None:
            return hot
        try:
            raw = await asyncio.to_thread(self.path_of(digest).read_bytes)
        except OSError:
            return None
        manifest = _parse(raw, digest)
        if manifest is None:
            logger.warning("dropping corrupt cached manifest %s", digest)
            with contextlib.suppress(OSError):
                self.path_of(digest).unlink()
            return None
        self._hot.remember(manifest)
        return manifest

    def load(self, digest: Digest) -> StoredManifest | None:
        try:
            raw = self.path_of(digest).read_bytes()
        except OSError:
            return None
        return _parse(raw, digest)

    def _intact(self, f: BinaryIO, digest: Digest) -> bool:
        return _parse(f.read(), digest) is not None

    async def put(self, manifest: StoredManifest) -> int:
        """Store a manifest; return the bytes its file takes (what the index counts)."""
        data = _file_bytes(manifest)
        await asyncio.to_thread(
            write_atomic, self.path_of(manifest.digest), data, tmp_dir=self.tmp
        )
        self._hot.remember(manifest)
        return len(data)

    def put_many(self, manifests: Iterable[StoredManifest]) -> list[int]:
        """Store many manifests behind one durability barrier (blocking; for bulk import).

        Returns the bytes each file takes, in order.
        """
        files = [(self.path_of(m.digest), _file_bytes(m)) for m in manifests]
        write_atomic_many(self.tmp, files)
        return [len(data) for _, data in files]

    def delete(self, digest: Digest) -> bool:
        self.forget(digest)
        return super().delete(digest)

    def quarantine(self, digest: Digest) -> str:
        self.forget(digest)
        return super().quarantine(digest)

    def forget(self, digest: Digest) -> None:
        """Drop a manifest from memory (it left the disk)."""
        self._hot.forget(digest)

    # -- tags --------------------------------------------------------------------

    async def get_tag(self, ns: str, repo: str, tag: str) -> dict[str, TagEntry]:
        """What a tag resolved to, per Accept set; re-read when another process wrote it.

        Another process (preload, import) may rewrite a record at any time, so a
        remembered one is checked against its file's mtime at most once a second.
        """
        key = (ns, repo, tag)
        path = rec.tag_path(self.root, ns, repo, tag)
        memo = self._tags.get(key)
        now = time.monotonic()
        if memo is not None:
            entries, mtime, checked = memo
            if now - checked < TAG_RECHECK:
                self._tags.move_to_end(key)
                return entries
            if _mtime(path) == mtime:
                self._tags[key] = (entries, mtime, now)
                self._tags.move_to_end(key)
                return entries
        mtime = _mtime(path)
        entries = await asyncio.to_thread(rec.read_tag, path)
        if entries:  # no negative caching: preload/import may write it any time
            self._remember_tag(key, entries, mtime)
        return entries

    def _remember_tag(self, key: TagKey, entries: dict[str, TagEntry], mtime: int) -> None:
        self._tags[key] = (entries, mtime, time.monotonic())
        self._tags.move_to_end(key)
        while len(self._tags) > MAX_TAGS_IN_MEMORY:
            self._tags.popitem(last=False)

    async def put_tag(self, ns: str, repo: str, tag: str, accept: str, entry: TagEntry) -> None:
        """Record one Accept variant of a tag (variants written at once never clobber)."""
        key = (ns, repo, tag)
        lock, users = self._tag_locks.setdefault(key, (asyncio.Lock(), [0]))
        users[0] += 1
        try:
            async with lock:
                await self._put_tag(key, accept, entry)
        finally:
            users[0] -= 1
            if not users[0]:
                del self._tag_locks[key]

    async def _put_tag(self, key: TagKey, accept: str, entry: TagEntry) -> None:
        entries = dict(await self.get_tag(*key))
        entries[accept] = entry
        self._remember_tag(key, entries, -1)  # in memory first: the answer holds anyway
        path = rec.tag_path(self.root, *key)
        data = rec.tag_bytes(key, entries)
        await asyncio.to_thread(write_atomic, path, data, tmp_dir=self.tmp)
        self._remember_tag(key, entries, _mtime(path))

    def put_tags(self, items: Iterable[tuple[TagKey, str, TagEntry]]) -> int:
        """Record many tags behind one durability barrier (blocking; for bulk import).

        Each item is (key, accept, entry); a record that already says the same digest
        for that Accept set is left alone. Returns how many records were written.
        """
        changed: dict[TagKey, dict[str, TagEntry]] = {}
        for key, accept, entry in items:
            entries = changed.get(key)
            if entries is None:
                entries = rec.read_tag(rec.tag_path(self.root, *key))
            current = entries.get(accept)
            if current is not None and current.digest == entry.digest:
                continue
            changed[key] = {**entries, accept: entry}
        write_atomic_many(
            self.tmp,
            [(rec.tag_path(self.root, *key), rec.tag_bytes(key, e)) for key, e in changed.items()],
        )
        return len(changed)

    def tag_records(self) -> Iterator[TagRecord]:
        return rec.tag_records(self.root)

    # -- referrers ---------------------------------------------------------------

    async def get_referrers(self, ns: str, repo: str, subject: Digest) -> TagEntry | None:
        """The last referrers index learnt for ``subject`` (stored as a manifest)."""
        path = rec.referrers_path(self.root, ns, repo, subject)
        return await asyncio.to_thread(rec.read_referrers, path)

    async def put_referrers(self, ns: str, repo: str, subject: Digest, entry: TagEntry) -> None:
        path = rec.referrers_path(self.root, ns, repo, subject)
        data = rec.referrers_bytes(ns, repo, subject, entry)
        await asyncio.to_thread(write_atomic, path, data, tmp_dir=self.tmp)

    def referrers_records(self) -> Iterator[ReferrersRecord]:
        return rec.referrers_records(self.root)


def _file_bytes(manifest: StoredManifest) -> bytes:
    return manifest.media_type.encode() + b"\n" + manifest.body


def _parse(raw: bytes, digest: Digest) -> StoredManifest | None:
    """The manifest a file holds, if it is whole and hashes to ``digest``."""
    media_type, sep, body = raw.partition(b"\n")
    try:
        kind = media_type.decode()
    except UnicodeDecodeError:
        return None
    if not sep or manifest_digest(body, kind, digest.algorithm) != digest:
        return None
    return StoredManifest(digest, kind, body)


def _mtime(path: Path) -> int:
    """A version stamp of a record: mtime and inode (every write is a rename)."""
    try:
        st = path.stat()
    except OSError:
        return -1
    return st.st_mtime_ns ^ (st.st_ino << 64)
