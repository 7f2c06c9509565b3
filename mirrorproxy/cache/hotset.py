"""What manifest stores keep in memory: hot manifests, and (for remote stores) tags.

A manifest is immutable, so a verified copy in memory answers for ever (until the
store drops it): hot ones are served without touching the storage, which keeps
manifests fast and, for a remote store, keeps them served while it is down. Tag
records change, so a remote store only trusts a remembered one for a moment, and
longer only when the storage cannot be asked. Both are bounded.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable

from mirrorproxy.cache import StoredManifest, TagEntry, TagKey
from mirrorproxy.core.oci import Digest

MAX_TAGS_IN_MEMORY = 100_000


class HotManifests:
    """Verified manifests in memory, least recently used dropped past ``memory_bytes``."""

    def __init__(self, memory_bytes: int) -> None:
        self._memory_bytes = memory_bytes
        self._hot: OrderedDict[Digest, StoredManifest] = OrderedDict()
        self._size = 0

    def get(self, digest: Digest) -> StoredManifest | None:
        hot = self._hot.get(digest)
        if hot is not None:
            self._hot.move_to_end(digest)
        return hot

    def remember(self, manifest: StoredManifest) -> None:
        """Keep ``manifest`` (one over a quarter of the bound is not kept)."""
        if manifest.digest in self._hot or len(manifest.body) > self._memory_bytes // 4:
            return
        self._hot[manifest.digest] = manifest
        self._size += len(manifest.body)
        while self._size > self._memory_bytes:
            _, old = self._hot.popitem(last=False)
            self._size -= len(old.body)

    def forget(self, digest: Digest) -> None:
        """Drop a manifest that left the store."""
        old = self._hot.pop(digest, None)
        if old is not None:
            self._size -= len(old.body)


class RecentTags:
    """Tag records as last read or written, with when (monotonic seconds)."""

    def __init__(
        self,
        *,
        fresh: float,
        limit: int = MAX_TAGS_IN_MEMORY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.fresh = fresh  # seconds a record is trusted without asking the store
        self._limit = limit
        self._clock = clock
        self._tags: OrderedDict[TagKey, tuple[dict[str, TagEntry], float]] = OrderedDict()

    def get(self, key: TagKey, *, stale: bool = False) -> dict[str, TagEntry] | None:
        """The remembered record if still fresh (any age with ``stale``)."""
        found = self._tags.get(key)
        if found is None or (not stale and self._clock() - found[1] >= self.fresh):
            return None
        self._tags.move_to_end(key)
        return found[0]

    def remember(self, key: TagKey, entries: dict[str, TagEntry]) -> None:
        self._tags[key] = (entries, self._clock())
        self._tags.move_to_end(key)
        while len(self._tags) > self._limit:
            self._tags.popitem(last=False)
