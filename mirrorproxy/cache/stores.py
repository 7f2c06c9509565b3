"""The stores a configuration names: the one place a backend is chosen.

Everything else receives the ``Stores`` built here and sees only the Protocols of
``mirrorproxy.cache``. Building them opens no file (an S3 backend makes its
client); ``prepare`` on each makes them usable, ``close`` releases the client.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from mirrorproxy.cache import BLOB, BlobStore, ContentStore, ManifestStore
from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.config import CacheConfig, StorageConfig


def _nothing() -> None:
    return None


@dataclass(frozen=True, slots=True)
class Stores:
    """A blob store and a manifest store over the same storage."""

    blobs: BlobStore
    manifests: ManifestStore
    close: Callable[[], None] = _nothing  # releases what the backend holds open
    # Every member of a cluster sees the same content (one bucket, or the one cache
    # directory of a server's workers): what the owner committed is there already,
    # so a member that gets a blob from its owner writes it to ``scratch`` for its
    # own clients, and never commits it. None: a filesystem cache of its own (each
    # member keeps its own copy).
    scratch: BlobStore | None = None

    @property
    def shared(self) -> bool:
        return self.scratch is not None

    def of(self, kind: str) -> ContentStore:
        """The store holding content of ``kind`` (BLOB or MANIFEST)."""
        return self.blobs if kind == BLOB else self.manifests


def _unobserved(op: str, seconds: float, failed: bool) -> None:
    return None


def open_stores(
    cache: CacheConfig,
    storage: StorageConfig | None = None,
    *,
    observe: Callable[[str, float, bool], None] = _unobserved,
    shared: bool = False,
) -> Stores:
    """The configured backend's stores: the filesystem under ``[cache] dir`` unless
    ``[storage]`` names S3 (then ``[cache] dir`` holds only temp files and the index).

    Args:
        observe: told (operation, seconds, failed) of every request a remote
            backend makes (its metrics); a local backend makes none.
        shared: other cluster members (a server's workers) use this same directory.
            A bucket is shared by every member that names it.
    """
    if storage is not None and storage.s3 is not None:
        from mirrorproxy.cache.s3blobs import S3BlobStore
        from mirrorproxy.cache.s3client import S3Connection
        from mirrorproxy.cache.s3manifests import S3ManifestStore

        conn = S3Connection(storage.s3, observe=observe)
        manifests = S3ManifestStore(conn, memory_bytes=cache.memory_manifests)
        # Temp files of relayed blobs go where the S3 writer keeps its own.
        scratch = FileBlobStore(cache.dir)
        return Stores(S3BlobStore(conn, cache.dir), manifests, conn.close, scratch=scratch)
    blobs = FileBlobStore(cache.dir)
    return Stores(
        blobs=blobs,
        manifests=FileManifestStore(cache.dir, memory_bytes=cache.memory_manifests),
        scratch=blobs if shared else None,
    )
