"""The stores a configuration names: the one place a backend is chosen.

Everything else receives the ``Stores`` built here and sees only the Protocols of
``mirrorproxy.cache``. Building them opens nothing; ``prepare`` on each makes them
usable.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirrorproxy.cache import BLOB, BlobStore, ContentStore, ManifestStore
from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.config import CacheConfig


@dataclass(frozen=True, slots=True)
class Stores:
    """A blob store and a manifest store over the same storage."""

    blobs: BlobStore
    manifests: ManifestStore

    def of(self, kind: str) -> ContentStore:
        """The store holding content of ``kind`` (BLOB or MANIFEST)."""
        return self.blobs if kind == BLOB else self.manifests


def open_stores(cache: CacheConfig) -> Stores:
    """The configured backend's stores (the filesystem under ``[cache] dir``)."""
    return Stores(
        blobs=FileBlobStore(cache.dir),
        manifests=FileManifestStore(cache.dir, memory_bytes=cache.memory_manifests),
    )
