"""CacheBudget: keeps the cache inside ``max_size`` and ``min_free``.

A fill reserves its size before writing a byte; room is made by evicting the least
recently used entries (blobs before manifests, never one being served or filled).
When no room can be made (a blob bigger than the budget, a full disk) the caller
streams the blob through without caching it. Last use is tracked in memory and
written to the index in batches, off the hot path.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import sqlite3
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.cache.index import BLOB, MANIFEST, CacheIndex, Entry
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.config import CacheConfig
from mirrorproxy.metrics import Metrics
from mirrorproxy.oci import Digest, parse_digest

logger = logging.getLogger(__name__)

FLUSH_INTERVAL = 10.0  # seconds between writes of last-use times to the index
BUDGET, WRITE_ERROR = "budget", "write-error"  # why a blob was not cached
WRITE_RETRY = 30.0  # after a failed cache write, stream through this long, then try again


class CacheBudget:
    def __init__(
        self,
        config: CacheConfig,
        *,
        blobs: FileBlobStore,
        manifests: FileManifestStore,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._blobs = blobs
        self._manifests = manifests
        self._metrics = metrics
        self._clock = clock
        self.index: CacheIndex | None = None
        self.total = 0  # bytes of committed entries
        self._reserved: dict[str, int] = {}  # digest -> bytes promised to running fills
        self._pins: Counter[str] = Counter()  # digests being served or filled
        self._used: dict[tuple[str, str], float] = {}
        self._blocked_until = 0.0  # set by a failed write (disk full, read-only)
        self._unindexed: dict[tuple[str, str], tuple[int, str]] = {}  # retried by flush
        self.write_retry = WRITE_RETRY

    def open(self) -> None:
        """Open the index and make it agree with the files (run once at start)."""
        self.index = CacheIndex(self._config.dir / "index.db")
        added, dropped = self.index.reconcile(self._config.dir)
        if added or dropped:
            logger.info("cache index reconciled: %d entries added, %d dropped", added, dropped)
        self.total = self.index.total_size()
        self._metrics.cache_size_bytes.set(self.total)

    async def close(self) -> None:
        try:
            await self.flush()
        finally:
            if self.index is not None:
                self.index.close()
                self.index = None

    async def run_flusher(self) -> None:
        """Background task: persist last-use times, and pick up changes by the CLI."""
        while True:
            await asyncio.sleep(FLUSH_INTERVAL)
            try:
                await self.flush()
            except (OSError, sqlite3.Error) as err:  # a full disk, say: try again later
                logger.error("cannot update the cache index: %s", err)

    async def flush(self) -> None:
        if self.index is None:
            return
        used, self._used = self._used, {}
        index = self.index
        for (kind, digest), (size, namespace) in list(self._unindexed.items()):
            await asyncio.to_thread(index.add, kind, digest, size, namespace)
            del self._unindexed[(kind, digest)]
        if used:
            await asyncio.to_thread(index.touch_many, used)
        self.total = await asyncio.to_thread(index.total_size)
        self._metrics.cache_size_bytes.set(self.total)

    # -- use -------------------------------------------------------------------

    def touch(self, kind: str, digest: Digest) -> None:
        self._used[(kind, str(digest))] = self._clock()

    def pin(self, digest: Digest) -> None:
        self._pins[str(digest)] += 1

    def unpin(self, digest: Digest) -> None:
        key = str(digest)
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    # -- admission ---------------------------------------------------------------

    def write_failed(self, err: OSError) -> None:
        """The disk refused a write: stream through for a while, then try again."""
        if self._clock() >= self._blocked_until:
            logger.error(
                "cache write failed (%s): streaming blobs through uncached for %.0fs",
                err.strerror or err,
                self.write_retry,
            )
        self._blocked_until = self._clock() + self.write_retry

    def reserve(self, digest: Digest, size: int | None) -> str | None:
        """Promise room for a blob about to be written.

        Returns:
            None when the blob may be cached; else why not ("budget" or
            "write-error"), and the caller streams it through uncached.
        """
        if self._clock() < self._blocked_until:
            return WRITE_ERROR
        need = size or 0
        limit = self._config.max_size
        if limit and need > limit:
            logger.info("blob %s (%d bytes) exceeds the cache budget: not cached", digest, need)
            return BUDGET
        if not self._make_room(need):
            if self._clock() < self._blocked_until:
                return WRITE_ERROR  # eviction itself hit a broken disk
            logger.warning("no room in the cache for blob %s (%d bytes): not cached", digest, need)
            return BUDGET
        self._reserved[str(digest)] = need
        return None

    def release(self, digest: Digest) -> None:
        self._reserved.pop(str(digest), None)

    def committed(self, kind: str, digest: Digest, size: int, namespace: str) -> None:
        """Account for an entry that reached its content path."""
        self._reserved.pop(str(digest), None)
        if self.index is None:
            return
        try:
            known = self.index.get(kind, str(digest))
            self.index.add(kind, str(digest), size, namespace)
        except sqlite3.Error as err:
            # The file is in place and verified: count it now so the budget holds,
            # and record it when the index can be written again (flush).
            logger.error("cannot record %s %s in the cache index: %s", kind, digest, err)
            self._unindexed[(kind, str(digest))] = (size, namespace)
            known = None
        self.total += size - (known.size if known else 0)
        self._metrics.cache_size_bytes.set(self.total)
        if self._over_budget(0):  # its size was not known up front
            self._make_room(0)

    def _over_budget(self, need: int) -> bool:
        limit = self._config.max_size
        if limit and self.total + sum(self._reserved.values()) + need > limit:
            return True
        if self._config.min_free or self._config.min_free_bytes:
            try:
                st = os.statvfs(self._config.dir)
            except OSError:
                return False
            free = st.f_bavail * st.f_frsize - need
            wanted = max(
                self._config.min_free * st.f_blocks * st.f_frsize, self._config.min_free_bytes
            )
            return free < wanted
        return False

    def _make_room(self, need: int) -> bool:
        if self.index is None or not self._over_budget(need):
            return True
        if self._used:  # eviction must see the latest uses, not the last flush
            used, self._used = self._used, {}
            self.index.touch_many(used)
        while self._over_budget(need):
            victims = [e for e in self.index.oldest() if self._evictable(e)]
            if not victims:
                return False
            for entry in victims:
                if not self._evict(entry):
                    return False
                if not self._over_budget(need):
                    break
        return True

    def _evictable(self, entry: Entry) -> bool:
        return entry.digest not in self._pins and entry.digest not in self._reserved

    def _evict(self, entry: Entry) -> bool:
        """Delete one entry; False when the disk refused (read-only, say)."""
        try:
            digest = parse_digest(entry.digest)
        except Exception:
            digest = None
        try:
            if digest is not None:
                path: Path = (
                    self._blobs.path_of(digest)
                    if entry.kind == BLOB
                    else self._manifests.path_of(digest)
                )
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                if entry.kind == MANIFEST:
                    self._manifests.forget(digest)
            if self.index is not None:
                self.index.remove(entry.kind, entry.digest)
        except OSError as err:
            self.write_failed(err)
            return False
        except sqlite3.Error as err:
            logger.error("cannot update the cache index while evicting: %s", err)
            return False
        self._used.pop((entry.kind, entry.digest), None)
        self.total -= entry.size
        self._metrics.cache_size_bytes.set(self.total)
        self._metrics.cache_evictions.labels(entry.kind).inc()
        logger.info("evicted %s %s (%d bytes)", entry.kind, entry.digest, entry.size)
        return True
