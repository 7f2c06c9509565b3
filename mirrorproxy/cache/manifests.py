"""Manifests by digest (immutable) and tag -> digest records, on disk and hot in memory.

A manifest file holds its media type on the first line and the exact bytes after
it. A tag record (``tags/<xx>/<hash>.json``) maps each Accept set a client used to
what the tag resolved to, so an index and a single-platform manifest under the
same tag never answer for each other. Files are written temp + rename.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import hashlib
import json
import logging
import os
import time
from collections import OrderedDict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from mirrorproxy.cache import StoredManifest, TagEntry, temp_name
from mirrorproxy.cache.index import MANIFEST
from mirrorproxy.cache.walk import content_path
from mirrorproxy.core.oci import Digest, manifest_digest, parse_digest

logger = logging.getLogger(__name__)

TagKey = tuple[str, str, str]  # (registry, repository, tag)
TAG_RECHECK = 1.0  # seconds a remembered tag record is trusted without a stat
MAX_TAGS_IN_MEMORY = 100_000


class FileManifestStore:
    def __init__(self, root: Path, *, memory_bytes: int = 64 * 1024 * 1024) -> None:
        self.root = root
        self.tmp = root / "tmp"
        self._memory_bytes = memory_bytes
        self._hot: OrderedDict[Digest, StoredManifest] = OrderedDict()
        self._hot_size = 0
        # Tag records in memory: entries, the file's mtime, when that was last checked.
        self._tags: OrderedDict[TagKey, tuple[dict[str, TagEntry], int, float]] = OrderedDict()
        self._tag_locks: dict[TagKey, tuple[asyncio.Lock, list[int]]] = {}

    def prepare(self) -> None:
        for sub in ("manifests", "tags", "referrers", "tmp"):
            (self.root / sub).mkdir(parents=True, exist_ok=True)

    def path_of(self, digest: Digest) -> Path:
        return content_path(self.root, MANIFEST, str(digest))

    def _tag_path(self, ns: str, repo: str, tag: str) -> Path:
        key = hashlib.sha256(f"{ns}\0{repo}\0{tag}".encode()).hexdigest()
        return self.root / "tags" / key[:2] / f"{key}.json"

    async def get(self, digest: Digest) -> StoredManifest | None:
        hot = self._hot.get(digest)
        if hot is not None:
            self._hot.move_to_end(digest)
            return hot
        try:
            raw = await asyncio.to_thread(self.path_of(digest).read_bytes)
        except OSError:
            return None
        media_type, sep, body = raw.partition(b"\n")
        if not sep or manifest_digest(body, media_type.decode(), digest.algorithm) != digest:
            logger.warning("dropping corrupt cached manifest %s", digest)
            with contextlib.suppress(OSError):
                self.path_of(digest).unlink()
            return None
        manifest = StoredManifest(digest, media_type.decode(), body)
        self._remember(manifest)
        return manifest

    async def put(self, manifest: StoredManifest) -> int:
        """Store a manifest; return the bytes its file takes (what the index counts)."""
        data = manifest.media_type.encode() + b"\n" + manifest.body
        await asyncio.to_thread(_atomic_write, self.tmp, self.path_of(manifest.digest), data)
        self._remember(manifest)
        return len(data)

    def forget(self, digest: Digest) -> None:
        """Drop a manifest from memory (it was evicted from disk)."""
        old = self._hot.pop(digest, None)
        if old is not None:
            self._hot_size -= len(old.body)

    def _remember(self, manifest: StoredManifest) -> None:
        if manifest.digest in self._hot or len(manifest.body) > self._memory_bytes // 4:
            return
        self._hot[manifest.digest] = manifest
        self._hot_size += len(manifest.body)
        while self._hot_size > self._memory_bytes:
            _, old = self._hot.popitem(last=False)
            self._hot_size -= len(old.body)

    async def get_tag(self, ns: str, repo: str, tag: str) -> dict[str, TagEntry]:
        """What a tag resolved to, per Accept set; re-read when another process wrote it.

        Another process (preload, import) may rewrite a record at any time, so a
        remembered one is checked against its file's mtime at most once a second.
        """
        key = (ns, repo, tag)
        memo = self._tags.get(key)
        now = time.monotonic()
        if memo is not None:
            entries, mtime, checked = memo
            if now - checked < TAG_RECHECK:
                self._tags.move_to_end(key)
                return entries
            if _mtime(self._tag_path(ns, repo, tag)) == mtime:
                self._tags[key] = (entries, mtime, now)
                self._tags.move_to_end(key)
                return entries
        mtime = _mtime(self._tag_path(ns, repo, tag))
        entries = await asyncio.to_thread(self._read_tag, ns, repo, tag)
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
        ns, repo, tag = key
        entries = dict(await self.get_tag(ns, repo, tag))
        entries[accept] = entry
        self._remember_tag(key, entries, -1)  # in memory first: the answer holds anyway
        path = self._tag_path(ns, repo, tag)
        await asyncio.to_thread(_atomic_write, self.tmp, path, _record_bytes(key, entries))
        self._remember_tag(key, entries, _mtime(path))

    def put_many(self, manifests: Iterable[StoredManifest]) -> list[int]:
        """Store many manifests behind one durability barrier (blocking; for bulk import).

        Returns the bytes each file takes, in order.
        """
        files = [
            (self.path_of(m.digest), m.media_type.encode() + b"\n" + m.body) for m in manifests
        ]
        _atomic_write_many(self.tmp, files)
        return [len(data) for _, data in files]

    def put_tags(self, items: Iterable[tuple[TagKey, str, TagEntry]]) -> int:
        """Record many tags behind one durability barrier (blocking; for bulk import).

        Each item is (key, accept, entry); a record that already says the same digest
        for that Accept set is left alone. Returns how many records were written.
        """
        changed: dict[TagKey, dict[str, TagEntry]] = {}
        for key, accept, entry in items:
            entries = changed.get(key)
            if entries is None:
                entries = self._read_tag(*key)
            current = entries.get(accept)
            if current is not None and current.digest == entry.digest:
                continue
            changed[key] = {**entries, accept: entry}
        _atomic_write_many(
            self.tmp,
            [(self._tag_path(*key), _record_bytes(key, e)) for key, e in changed.items()],
        )
        return len(changed)

    def _referrers_path(self, ns: str, repo: str, subject: Digest) -> Path:
        key = hashlib.sha256(f"{ns}\0{repo}\0{subject}".encode()).hexdigest()
        return self.root / "referrers" / key[:2] / f"{key}.json"

    async def get_referrers(self, ns: str, repo: str, subject: Digest) -> TagEntry | None:
        """The last referrers index learnt for ``subject`` (stored as a manifest)."""
        path = self._referrers_path(ns, repo, subject)
        try:
            record: Any = json.loads(await asyncio.to_thread(path.read_bytes))
            return TagEntry(
                digest=parse_digest(record["digest"]),
                media_type=str(record["media_type"]),
                size=int(record["size"]),
                fetched=float(record["fetched"]),
            )
        except FileNotFoundError:
            return None
        except Exception:  # a torn or foreign file is a cache miss, not an outage
            logger.warning("ignoring unreadable referrers record %s", path)
            return None

    async def put_referrers(self, ns: str, repo: str, subject: Digest, entry: TagEntry) -> None:
        record = {
            "namespace": ns,
            "repository": repo,
            "subject": str(subject),
            "digest": str(entry.digest),
            "media_type": entry.media_type,
            "size": entry.size,
            "fetched": entry.fetched,
        }
        path = self._referrers_path(ns, repo, subject)
        await asyncio.to_thread(_atomic_write, self.tmp, path, json.dumps(record).encode())

    def _read_tag(self, ns: str, repo: str, tag: str) -> dict[str, TagEntry]:
        path = self._tag_path(ns, repo, tag)
        try:
            record: Any = json.loads(path.read_bytes())
            out = {}
            for k, e in record["entries"].items():
                out[str(k)] = TagEntry(
                    digest=parse_digest(e["digest"]),
                    media_type=str(e["media_type"]),
                    size=int(e["size"]),
                    fetched=float(e["fetched"]),
                )
            return out
        except FileNotFoundError:
            return {}
        except Exception:  # a torn or foreign file is a cache miss, not an outage
            logger.warning("ignoring unreadable tag record %s", path)
            return {}


def _mtime(path: Path) -> int:
    """A version stamp of a record: mtime and inode (every write is a rename)."""
    try:
        st = path.stat()
    except OSError:
        return -1
    return st.st_mtime_ns ^ (st.st_ino << 64)


def _record_bytes(key: TagKey, entries: dict[str, TagEntry]) -> bytes:
    ns, repo, tag = key
    record = {
        "namespace": ns,
        "repository": repo,
        "tag": tag,
        "entries": {
            k: {
                "digest": str(e.digest),
                "media_type": e.media_type,
                "size": e.size,
                "fetched": e.fetched,
            }
            for k, e in entries.items()
        },
    }
    return json.dumps(record, indent=1).encode()


def _atomic_write(tmp_dir: Path, final: Path, data: bytes) -> None:
    tmp = tmp_dir / temp_name(final.name)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        final.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def _atomic_write_many(tmp_dir: Path, files: Sequence[tuple[Path, bytes]]) -> None:
    """Write many files temp + rename with one flush of the filesystem, not one per file.

    Every temp file is written first, then the filesystem is flushed once (syncfs),
    then all are renamed and each directory touched is fsynced: after a crash each
    final path holds either its old or its whole new content, like ``_atomic_write``.
    """
    if not files:
        return
    temps: list[tuple[Path, Path]] = []
    try:
        for final, data in files:
            tmp = tmp_dir / temp_name(final.name)
            temps.append((tmp, final))
            with open(tmp, "wb") as f:
                f.write(data)
        _sync_filesystem(tmp_dir)
        parents = set()
        for tmp, final in temps:
            if final.parent not in parents:
                final.parent.mkdir(parents=True, exist_ok=True)
                parents.add(final.parent)
            os.replace(tmp, final)
        for parent in parents:
            fd = os.open(parent, os.O_RDONLY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def _sync_filesystem(path: Path) -> None:
    """Flush the filesystem holding ``path`` (Linux syncfs; a global sync elsewhere)."""
    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
