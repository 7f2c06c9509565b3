"""``mirrorproxy import``: verify a bundle tar completely, then add it to the cache.

Two phases, so a bad bundle leaves nothing behind. First every manifest reachable
from ``index.json`` (through the pages of a large bundle) is read and checked
(they are small), and every blob they reference is staged in the blob store
(``BlobStore.stage``: hashed, stored, not yet visible); blobs already cached are
hashed too but not copied. Only when all of it matched its digest are the blobs
published, then the manifests written, then the tags (children before parents,
tags last), so a running mirror never sees a tag before its content. Memory does
not grow with the tag count: the tags are read page by page, twice (to verify,
then to record), and manifests and tags are written in batches (``put_many``,
``put_tags``). Idempotent: what is present is counted, not rewritten. Never holds
a layer in memory. Everything goes through the configured stores and the cache
index; reading the tar is ``reader``'s part.
"""

from __future__ import annotations

import asyncio
import tarfile
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirrorproxy.bundle import (
    CONTAINERD_KEY,
    INDEX_FILE,
    BundleError,
    Descriptor,
    Warn,
    member_name,
    references,
)
from mirrorproxy.bundle.reader import (
    Bundle,
    chunks,
    member,
    members,
    read_json,
    read_layout,
    read_small,
    tops,
)
from mirrorproxy.cache import (
    BLOB,
    MANIFEST,
    DigestMismatch,
    ManifestStore,
    StagedBlob,
    StoredManifest,
    TagEntry,
)
from mirrorproxy.cache.index import CacheIndex
from mirrorproxy.cache.stores import Stores, open_stores
from mirrorproxy.config import Config
from mirrorproxy.core.oci import (
    MANIFEST_TYPES,
    Digest,
    manifest_digest,
    manifest_media_type,
)
from mirrorproxy.core.reference import ImageRef

BATCH = 4096  # manifests or tags written behind one filesystem flush


@dataclass(slots=True)
class ImportResult:
    blobs: int = 0  # added
    blob_bytes: int = 0
    manifests: int = 0
    tags: int = 0
    present: int = 0  # blobs, manifests and tags that were already in the cache
    not_in_bundle: int = 0  # index children the export left out (not cached there)
    referrers: int = 0  # subjects whose referrers index was recorded


@dataclass(frozen=True, slots=True)
class _Manifest:
    media_type: str
    info: tarfile.TarInfo
    namespace: str


@dataclass(slots=True)
class _Walk:
    # Insertion order is children before parents: the order they are written in.
    manifests: dict[Digest, _Manifest] = field(default_factory=dict)
    blobs: dict[Digest, tuple[tarfile.TarInfo, str]] = field(default_factory=dict)


def import_bundle(config: Config, bundle: Path, *, warn: Warn, batch: int = BATCH) -> ImportResult:
    """Verify ``bundle`` completely, then add what the cache lacks.

    Args:
        config: gives the cache directory, the manifest size limit and the
            namespaces (references no namespace serves get a warning).
        bundle: the tar (uncompressed, seekable).
        warn: called with one line per registry the mirror would not serve.
        batch: manifests or tags written behind one filesystem flush.

    Returns:
        What was added and what was already present.

    Raises:
        BundleError: unreadable, damaged or inconsistent bundle (nothing added,
            no temp file left).
        OSError: the cache could not be written.
    """
    try:
        tar = tarfile.open(bundle, "r:")  # noqa: SIM115 - closed by the with below
    except tarfile.TarError as err:
        raise BundleError(f"{bundle}: not a tar archive ({err})") from None
    except OSError as err:
        raise BundleError(f"{bundle}: {err.strerror or err}") from None
    with tar:
        b = Bundle(tar, members(tar, bundle), config.cache.max_manifest_size)
        index = read_layout(b)
        walk = _Walk()
        result = ImportResult()
        unserved: Counter[str] = Counter()
        first: dict[str, ImageRef] = {}
        for ref, desc, _ in tops(b, index):
            namespace = ref.registry if ref is not None else ""
            _walk_manifest(b, walk, result, desc, namespace, INDEX_FILE)
            if ref is not None and config.namespace(ref.registry) is None:
                unserved[ref.registry] += 1
                first.setdefault(ref.registry, ref)
        for registry, n in unserved.items():
            more = f" and {n - 1} more references" if n > 1 else ""
            warn(f"{first[registry]}{more}: no namespace in {config.source} serves {registry}")
        stores = open_stores(config.cache, config.storage)
        stores.blobs.prepare()
        stores.manifests.prepare()
        staged: dict[Digest, StagedBlob] = {}
        try:
            _stage(tar, stores, walk, staged)
            asyncio.run(_commit(b, config.cache.dir, stores, index, walk, staged, result, batch))
        finally:
            for blob in staged.values():
                blob.discard()
            stores.close()
    return result


def _walk_manifest(
    b: Bundle, walk: _Walk, result: ImportResult, desc: Descriptor, namespace: str, where: str
) -> None:
    """Verify one manifest and, depth first, what it references."""
    if desc.digest in walk.manifests:
        return
    name = member_name(desc.digest)
    info = member(b.members, name, desc, where)
    body = read_small(b.tar, info, name, b.limit)
    declared = desc.media_type if desc.media_type in MANIFEST_TYPES else None
    media_type = manifest_media_type(body, declared)
    if manifest_digest(body, media_type, desc.digest.algorithm) != desc.digest:
        raise BundleError(f"{name}: content does not match its digest")
    doc = read_json(body, name)
    children, blobs = references(doc, name)
    for child in children:
        if member_name(child.digest) not in b.members:
            result.not_in_bundle += 1  # left out at export: it was not cached there
            continue
        _walk_manifest(b, walk, result, child, namespace, f"manifest {name}")
    for blob in blobs:
        blob_info = member(b.members, member_name(blob.digest), blob, f"manifest {name}")
        walk.blobs.setdefault(blob.digest, (blob_info, namespace))
    walk.manifests[desc.digest] = _Manifest(media_type, info, namespace)


def _stage(
    tar: tarfile.TarFile,
    stores: Stores,
    walk: _Walk,
    staged: dict[Digest, StagedBlob],
) -> None:
    """Hash every blob; stage those the cache lacks (recorded in ``staged``)."""
    for digest, (info, _) in sorted(walk.blobs.items(), key=lambda kv: kv[1][0].offset_data):
        data = chunks(tar, info, digest)
        if stores.blobs.size(digest) == info.size:
            hasher = digest.hasher()  # present: a bad bundle is refused either way
            for chunk in data:
                hasher.update(chunk)
            if hasher.hexdigest() != digest.hex:
                raise BundleError(f"{member_name(digest)}: content does not match its digest")
            continue
        try:
            staged[digest] = stores.blobs.stage(digest, data)
        except DigestMismatch:
            raise BundleError(
                f"{member_name(digest)}: content does not match its digest"
            ) from None


async def _commit(
    b: Bundle,
    root: Path,
    stores: Stores,
    index_doc: dict[str, Any],
    walk: _Walk,
    staged: dict[Digest, StagedBlob],
    result: ImportResult,
    batch: int,
) -> None:
    """Publish verified content: blobs, manifests, then tags."""
    index = await asyncio.to_thread(CacheIndex.of_cache, root)
    store = stores.manifests
    try:
        result.present += len(walk.blobs) - len(staged)
        for digest, blob in list(staged.items()):
            info, namespace = walk.blobs[digest]
            await asyncio.to_thread(blob.publish)
            del staged[digest]
            index.add(BLOB, str(digest), info.size, namespace)
            result.blobs += 1
            result.blob_bytes += info.size
        missing: list[tuple[StoredManifest, str]] = []
        for digest, m in walk.manifests.items():
            if await store.get(digest) is not None:
                result.present += 1
                continue
            body = read_small(b.tar, m.info, member_name(digest), b.limit)
            if manifest_digest(body, m.media_type, digest.algorithm) != digest:  # tar changed
                raise BundleError(f"{member_name(digest)}: content does not match its digest")
            missing.append((StoredManifest(digest, m.media_type, body), m.namespace))
            if len(missing) >= batch:
                await _put_manifests(store, index, missing, result)
        await _put_manifests(store, index, missing, result)
        now = time.time()
        tags: list[tuple[tuple[str, str, str], str, TagEntry]] = []
        for ref, desc, subject in tops(b, index_doc):
            if subject is not None:
                registry, repo, of = subject
                m = walk.manifests[desc.digest]
                entry = TagEntry(desc.digest, m.media_type, m.info.size, now)
                await store.put_referrers(registry, repo, of, entry)
                result.referrers += 1
            if ref is None or ref.tag is None:
                continue
            m = walk.manifests[desc.digest]
            entry = TagEntry(desc.digest, m.media_type, m.info.size, now)
            tags.append(((ref.registry, ref.repository, ref.tag), CONTAINERD_KEY, entry))
            if len(tags) >= batch:
                await _put_tags(store, tags, result)
        await _put_tags(store, tags, result)
    finally:
        index.close()


async def _put_manifests(
    store: ManifestStore,
    index: CacheIndex,
    missing: list[tuple[StoredManifest, str]],
    result: ImportResult,
) -> None:
    """Write a batch of manifests, then index them; empties ``missing``."""
    sizes = await asyncio.to_thread(store.put_many, [m for m, _ in missing])
    for (m, namespace), size in zip(missing, sizes, strict=True):
        index.add(MANIFEST, str(m.digest), size, namespace)
    result.manifests += len(missing)
    missing.clear()


async def _put_tags(
    store: ManifestStore,
    tags: list[tuple[tuple[str, str, str], str, TagEntry]],
    result: ImportResult,
) -> None:
    """Write a batch of tag records; empties ``tags``."""
    written = await asyncio.to_thread(store.put_tags, tags)
    result.tags += written
    result.present += len(tags) - written
    tags.clear()
