"""The on-disk cache: the only package that touches the cache directory.

The stores sit behind small Protocols so that another backend (an object store
shared by several replicas) can replace the filesystem one.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirrorproxy.oci import Digest


@dataclass(frozen=True, slots=True)
class BlobInfo:
    size: int
    path: Path  # a local file the server can sendfile from


@dataclass(frozen=True, slots=True)
class StoredManifest:
    digest: Digest
    media_type: str
    body: bytes


@dataclass(frozen=True, slots=True)
class TagEntry:
    """What a tag resolved to, for one Accept set, and when that was learnt."""

    digest: Digest
    media_type: str
    size: int
    fetched: float  # wall-clock seconds (survives restarts)


class BlobWriterProto(Protocol):
    written: int

    async def write(self, data: bytes | bytearray) -> None: ...

    async def commit(self) -> BlobInfo: ...

    async def abort(self) -> None: ...


class BlobStore(Protocol):
    async def lookup(self, digest: Digest) -> BlobInfo | None: ...

    def begin(self, digest: Digest) -> BlobWriterProto: ...


class ManifestStore(Protocol):
    async def get(self, digest: Digest) -> StoredManifest | None: ...

    async def put(self, manifest: StoredManifest) -> None: ...

    async def get_tag(self, ns: str, repo: str, tag: str) -> dict[str, TagEntry]: ...

    async def put_tag(
        self, ns: str, repo: str, tag: str, accept: str, entry: TagEntry
    ) -> None: ...
