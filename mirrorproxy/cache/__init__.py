"""The on-disk cache: the only package that touches the cache directory.

The stores sit behind small Protocols so that another backend (an object store
shared by several replicas) can replace the filesystem one.
"""

from __future__ import annotations

import os
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from mirrorproxy.core.oci import Digest


def temp_name(prefix: str) -> str:
    """A temp file name that records its owner, so a sweep spares live processes' files."""
    return f"{prefix[:16]}-{os.getpid()}-{uuid.uuid4().hex}.partial"


def owner_alive(name: str) -> bool:
    """Whether the process that made temp file ``name`` still runs (not us: we just began)."""
    parts = name.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


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

    async def write(self, *chunks: bytes | bytearray | memoryview) -> None: ...

    async def verify(self) -> None: ...

    async def commit(self) -> BlobInfo: ...

    async def abort(self) -> None: ...


class BlobStore(Protocol):
    async def lookup(self, digest: Digest) -> BlobInfo | None: ...

    def begin(self, digest: Digest) -> BlobWriterProto: ...


class ManifestStore(Protocol):
    async def get(self, digest: Digest) -> StoredManifest | None: ...

    async def put(self, manifest: StoredManifest) -> int: ...

    async def get_tag(self, ns: str, repo: str, tag: str) -> dict[str, TagEntry]: ...

    async def put_tag(
        self, ns: str, repo: str, tag: str, accept: str, entry: TagEntry
    ) -> None: ...
