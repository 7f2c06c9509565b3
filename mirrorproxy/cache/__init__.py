"""The cache: the only package that touches stored content, behind the Protocols here.

Every consumer (pull-through, the budget, bundle import, ``mirrorproxy cache``)
holds a ``BlobStore`` and a ``ManifestStore`` and nothing else of a backend; the
filesystem backend (``blobs``, ``manifests``) is one implementation, chosen by
``stores.open_stores``, and every backend passes the same conformance suite
(tests/integration/test_store_conformance.py).

The contract every backend keeps:
- Content is addressed by digest and becomes visible under it only whole and
  verified: a partial or wrong object is never found under its final key.
- Request-path methods are coroutines. Maintenance and bulk methods (listing,
  checking, deleting, import's batches) block: the command line, start-up and
  the budget's eviction call them; a server coroutine calls a bulk one in a thread.
- Manifests are verified on every read from the backend (a corrupt one reads as
  absent); blobs are verified when written and by ``check``.
- A backend that cannot reach its storage raises ``StoreUnavailable`` (the server
  answers 503 and recovers by itself when the storage is back).
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO, Protocol

from mirrorproxy.cache.publish import owner_alive as owner_alive
from mirrorproxy.cache.publish import temp_name as temp_name
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning

BLOB, MANIFEST = "blob", "manifest"  # the two kinds of content (index rows, listings)

Chunk = bytes | bytearray | memoryview
TagKey = tuple[str, str, str]  # (registry, repository, tag)


class DigestMismatch(Exception):
    """The bytes written do not hash to the digest they were fetched for."""


class StoreUnavailable(OSError):
    """The storage behind a store cannot be reached, or failed a request (a bucket
    that is down or answers 5xx): nothing is known about the content asked for."""


class CacheWriteError(OSError):
    """The cache's storage failed a write, fsync or rename.

    Its own class because an upstream's timeouts and connection errors are OSErrors
    too, and only this one means the storage is in trouble.
    """


@dataclass(frozen=True, slots=True)
class BlobInfo:
    """A stored blob: its size and where it is.

    ``local``: ``path`` is a file on this machine the server can ``sendfile`` from;
    otherwise it names the object in the store, read through ``BlobStore.read``.
    """

    size: int
    path: Path
    local: bool = True


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


@dataclass(frozen=True, slots=True)
class TagRecord:
    """One tag and what it resolved to per Accept key (a listing's row)."""

    namespace: str
    repository: str
    tag: str
    entries: Mapping[str, TagEntry]


@dataclass(frozen=True, slots=True)
class ReferrersRecord:
    """The referrers index last learnt for a subject (stored as a manifest)."""

    namespace: str
    repository: str
    subject: Digest
    entry: TagEntry


@dataclass(frozen=True, slots=True)
class Content:
    """One stored blob or manifest, as a listing reports it."""

    kind: str  # BLOB or MANIFEST
    digest: Digest
    size: int  # what it takes in the store (the index counts this)
    stored: float  # wall-clock seconds when it was written


class BlobWriterProto(Protocol):
    """One blob being written; it owns its bytes until ``commit`` publishes them.

    It must not make anything visible under the digest before ``commit`` verified
    it, and after ``abort`` (or a failed commit) it leaves nothing behind.
    """

    written: int  # bytes stored so far, contiguous from 0: what ``reader`` may read

    @property
    def disk_error(self) -> BaseException | None: ...

    def reader(self) -> BinaryIO | None: ...

    async def write(self, *chunks: Chunk) -> None: ...

    async def verify(self) -> None: ...

    async def commit(self) -> BlobInfo: ...

    async def abort(self) -> None: ...


class StagedBlob(Protocol):
    """A verified blob not yet visible: bulk import publishes all of a bundle or none."""

    size: int

    def publish(self) -> None: ...

    def discard(self) -> None: ...


class ContentStore(Protocol):
    """What maintenance needs of either kind of content (all blocking)."""

    def contents(self) -> Iterator[Content]:
        """Everything stored (whole objects only), in no particular order."""
        ...

    def size(self, digest: Digest) -> int | None:
        """What ``digest`` takes in the store, or None when it is absent."""
        ...

    def check(self, digest: Digest) -> bool | None:
        """Re-hash ``digest``: True when intact, False when not, None when absent."""
        ...

    def delete(self, digest: Digest) -> bool:
        """Remove ``digest`` (False: it was not there). Raises OSError when refused."""
        ...

    def quarantine(self, digest: Digest) -> str:
        """Move ``digest`` out of sight, kept for inspection; return where it went."""
        ...


class BlobStore(ContentStore, Protocol):
    """Blobs by digest. Owns their bytes; knows nothing of HTTP, upstreams or budgets."""

    def prepare(self) -> int:
        """Make the store usable and drop what dead writers left; return how many."""
        ...

    async def lookup(self, digest: Digest) -> BlobInfo | None: ...

    def begin(
        self,
        digest: Digest,
        on_written: Callable[[], None] | None = None,
        *,
        tuning: Tuning = DEFAULT_TUNING,
    ) -> BlobWriterProto: ...

    def open(self, digest: Digest) -> BinaryIO:
        """Read a stored blob from its start. Raises FileNotFoundError when absent."""
        ...

    def read(self, digest: Digest, start: int, end: int) -> AsyncIterator[bytes]:
        """Bytes ``[start, end)`` of a stored blob, streamed in bounded chunks (for a
        blob that is not a local file; never the whole blob in memory).

        Raises:
            FileNotFoundError: the blob is not stored (any more).
            StoreUnavailable: the storage failed.
        """
        ...

    async def url(self, digest: Digest, *, expires: float) -> str | None:
        """A URL a client may GET the stored blob from directly for ``expires``
        seconds (a redirect), or None when the store has none (local files)."""
        ...

    async def probe(self) -> str | None:
        """Whether the storage can be used now (readiness): None, or why not."""
        ...

    def stage(self, digest: Digest, chunks: Iterable[bytes]) -> StagedBlob:
        """Store ``chunks`` as ``digest``, verified but not yet visible.

        Raises:
            DigestMismatch: the chunks are not ``digest`` (nothing is left behind).
        """
        ...


class ManifestStore(ContentStore, Protocol):
    """Manifests by digest, tag records and referrers records.

    Owns what tags and subjects resolved to; never decides when to ask upstream.
    """

    def prepare(self) -> None: ...

    async def get(self, digest: Digest) -> StoredManifest | None:
        """A verified manifest (kept hot in memory); a corrupt stored copy is dropped."""
        ...

    def load(self, digest: Digest) -> StoredManifest | None:
        """A verified manifest read for maintenance: never remembered, never dropped."""
        ...

    async def put(self, manifest: StoredManifest) -> int:
        """Store a manifest; return what it takes in the store."""
        ...

    def put_many(self, manifests: Iterable[StoredManifest]) -> list[int]:
        """Store many manifests at once; return what each takes, in order."""
        ...

    async def get_tag(self, ns: str, repo: str, tag: str) -> dict[str, TagEntry]:
        """What a tag resolved to per Accept key ({} when unknown); sees other writers."""
        ...

    async def put_tag(self, ns: str, repo: str, tag: str, accept: str, entry: TagEntry) -> None:
        """Record one Accept key of a tag; the tag's other keys are kept."""
        ...

    def put_tags(self, items: Iterable[tuple[TagKey, str, TagEntry]]) -> int:
        """Record many (key, accept, entry) at once, skipping those already so; return
        how many records changed."""
        ...

    def tag_records(self) -> Iterator[TagRecord]: ...

    async def get_referrers(self, ns: str, repo: str, subject: Digest) -> TagEntry | None: ...

    async def put_referrers(
        self, ns: str, repo: str, subject: Digest, entry: TagEntry
    ) -> None: ...

    def referrers_records(self) -> Iterator[ReferrersRecord]: ...
