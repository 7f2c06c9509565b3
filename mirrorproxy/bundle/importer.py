"""``mirrorproxy import``: verify a bundle tar completely, then add it to the cache.

Two phases, so a bad bundle leaves nothing behind. First every manifest reachable
from ``index.json`` (through the pages of a large bundle) is read and checked
(they are small), and every blob they reference is streamed from the tar into
``<cache>/tmp`` while being hashed; blobs already cached are hashed too but not
copied. Only when all of it matched its digest are the blobs renamed into place,
then the manifests written, then the tags (children before parents, tags last), so
a running mirror never sees a tag before its content. Memory does not grow with
the tag count: the tags are read page by page, twice (to verify, then to record),
and manifests and tags are written in batches behind one filesystem flush each.
Idempotent: what is present is counted, not rewritten. Never holds a layer in memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
import time
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mirrorproxy.bundle import (
    CONTAINERD_KEY,
    CONTAINERD_NAME,
    COPY_CHUNK,
    INDEX_FILE,
    LAYOUT_FILE,
    MAX_INDEX_SIZE,
    MAX_PAGE_DEPTH,
    REF_NAME,
    REFERRERS,
    BundleError,
    Descriptor,
    Warn,
    is_page,
    member_name,
    parse_descriptor,
    references,
)
from mirrorproxy.cache import StoredManifest, TagEntry, temp_name
from mirrorproxy.cache.index import BLOB, MANIFEST, CacheIndex
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.cache.walk import content_path
from mirrorproxy.config import Config
from mirrorproxy.core.errors import RegistryError
from mirrorproxy.core.oci import (
    MANIFEST_TYPES,
    Digest,
    manifest_digest,
    manifest_media_type,
    parse_digest,
    parse_name,
)
from mirrorproxy.core.reference import ImageRef, parse_image_reference

MAX_LAYOUT_SIZE = 64 * 1024
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


@dataclass(frozen=True, slots=True)
class _Bundle:
    """The open tar, its regular files by name, and the manifest size limit."""

    tar: tarfile.TarFile
    members: dict[str, tarfile.TarInfo]
    limit: int


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
    root = config.cache.dir
    try:
        tar = tarfile.open(bundle, "r:")  # noqa: SIM115 - closed by the with below
    except tarfile.TarError as err:
        raise BundleError(f"{bundle}: not a tar archive ({err})") from None
    except OSError as err:
        raise BundleError(f"{bundle}: {err.strerror or err}") from None
    with tar:
        b = _Bundle(tar, _members(tar, bundle), config.cache.max_manifest_size)
        index = _read_layout(b)
        walk = _Walk()
        result = ImportResult()
        unserved: Counter[str] = Counter()
        first: dict[str, ImageRef] = {}
        for ref, desc, _ in _tops(b, index):
            namespace = ref.registry if ref is not None else ""
            _walk_manifest(b, walk, result, desc, namespace, INDEX_FILE)
            if ref is not None and config.namespace(ref.registry) is None:
                unserved[ref.registry] += 1
                first.setdefault(ref.registry, ref)
        for registry, n in unserved.items():
            more = f" and {n - 1} more references" if n > 1 else ""
            warn(f"{first[registry]}{more}: no namespace in {config.source} serves {registry}")
        for sub in ("blobs", "manifests", "tags", "referrers", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        staged: dict[Digest, Path] = {}
        try:
            _stage(tar, root, walk, staged, result)
            asyncio.run(_commit(b, root, index, walk, staged, result, batch))
        finally:
            for path in staged.values():
                path.unlink(missing_ok=True)
    return result


def _members(tar: tarfile.TarFile, bundle: Path) -> dict[str, tarfile.TarInfo]:
    """Regular files by normalised name (links and devices are never content)."""
    try:
        infos = tar.getmembers()
    except (tarfile.TarError, EOFError) as err:
        raise BundleError(f"{bundle}: damaged or truncated tar ({err})") from None
    return {i.name.removeprefix("./"): i for i in infos if i.isreg()}


def _read_small(tar: tarfile.TarFile, info: tarfile.TarInfo, name: str, limit: int) -> bytes:
    if info.size > limit:
        raise BundleError(f"{name}: {info.size} bytes, more than the {limit} allowed")
    f = tar.extractfile(info)
    try:
        data = f.read() if f is not None else b""
    except (tarfile.TarError, EOFError, OSError) as err:
        raise BundleError(f"{name}: truncated ({err})") from None
    if len(data) != info.size:
        raise BundleError(f"{name}: truncated")
    return data


def _json(data: bytes, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise BundleError(f"{name}: not a JSON object")
    return doc


def _read_layout(b: _Bundle) -> dict[str, Any]:
    """Check ``oci-layout``; return ``index.json``."""
    for name in (LAYOUT_FILE, INDEX_FILE):
        if name not in b.members:
            raise BundleError(f"no {name} in the bundle (not an OCI image layout)")
    raw = _read_small(b.tar, b.members[LAYOUT_FILE], LAYOUT_FILE, MAX_LAYOUT_SIZE)
    layout = _json(raw, LAYOUT_FILE)
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise BundleError(f"{LAYOUT_FILE}: no imageLayoutVersion (not an OCI image layout)")
    raw = _read_small(b.tar, b.members[INDEX_FILE], INDEX_FILE, MAX_INDEX_SIZE)
    return _json(raw, INDEX_FILE)


def _tops(
    b: _Bundle, doc: dict[str, Any], where: str = INDEX_FILE, depth: int = 0
) -> Iterator[tuple[ImageRef | None, Descriptor, Subject | None]]:
    """Every top manifest: the entries of ``index.json`` and, one at a time, its pages;
    with the reference it is tagged as, or the subject it lists the referrers of."""
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise BundleError(f"{where}: no manifests list")
    for obj in entries:
        desc = parse_descriptor(obj, where)
        if not is_page(obj):
            yield _reference(obj, where), desc, _subject(obj, where)
            continue
        if depth >= MAX_PAGE_DEPTH:
            raise BundleError(f"{where}: pages nested more than {MAX_PAGE_DEPTH} deep")
        name = member_name(desc.digest)
        body = _read_small(b.tar, _member(b.members, name, desc, where), name, MAX_INDEX_SIZE)
        if Digest.of(body, desc.digest.algorithm) != desc.digest:
            raise BundleError(f"{name}: content does not match its digest")
        yield from _tops(b, _json(body, name), name, depth + 1)


Subject = tuple[str, str, Digest]  # registry, repository, digest


def _subject(obj: dict[str, Any], where: str) -> Subject | None:
    """The ``<registry>/<repo>@<digest>`` whose referrers an entry lists, if it does."""
    annotations = obj.get("annotations")
    value = annotations.get(REFERRERS) if isinstance(annotations, dict) else None
    if not isinstance(value, str):
        return None
    name, _, digest = value.rpartition("@")
    registry, _, repo = name.partition("/")
    try:
        return registry, parse_name(repo), parse_digest(digest)
    except RegistryError:
        raise BundleError(f"{where}: bad referrers subject {value[:300]!r}") from None


def _reference(obj: dict[str, Any], where: str) -> ImageRef | None:
    """The full reference an index entry names, if it names one.

    A bare ``ref.name`` (``3``, ``latest``) is a tag without a repository, as other
    tools write it: the content is imported, but no tag can be recorded.
    """
    annotations = obj.get("annotations")
    if not isinstance(annotations, dict):
        return None
    name = annotations.get(CONTAINERD_NAME) or annotations.get(REF_NAME)
    if not isinstance(name, str) or not any(c in name for c in "/:@"):
        return None
    try:
        return parse_image_reference(name)
    except ValueError as err:
        raise BundleError(f"{where}: {err}") from None


def _walk_manifest(
    b: _Bundle, walk: _Walk, result: ImportResult, desc: Descriptor, namespace: str, where: str
) -> None:
    """Verify one manifest and, depth first, what it references."""
    if desc.digest in walk.manifests:
        return
    name = member_name(desc.digest)
    info = _member(b.members, name, desc, where)
    body = _read_small(b.tar, info, name, b.limit)
    declared = desc.media_type if desc.media_type in MANIFEST_TYPES else None
    media_type = manifest_media_type(body, declared)
    if manifest_digest(body, media_type, desc.digest.algorithm) != desc.digest:
        raise BundleError(f"{name}: content does not match its digest")
    doc = _json(body, name)
    children, blobs = references(doc, name)
    for child in children:
        if member_name(child.digest) not in b.members:
            result.not_in_bundle += 1  # left out at export: it was not cached there
            continue
        _walk_manifest(b, walk, result, child, namespace, f"manifest {name}")
    for blob in blobs:
        blob_info = _member(b.members, member_name(blob.digest), blob, f"manifest {name}")
        walk.blobs.setdefault(blob.digest, (blob_info, namespace))
    walk.manifests[desc.digest] = _Manifest(media_type, info, namespace)


def _member(
    members: dict[str, tarfile.TarInfo], name: str, desc: Descriptor, where: str
) -> tarfile.TarInfo:
    info = members.get(name)
    if info is None:
        raise BundleError(f"{name}: missing from the bundle (referenced by {where})")
    if info.size != desc.size:
        raise BundleError(f"{name}: {info.size} bytes, but {where} says {desc.size}")
    return info


def _stage(
    tar: tarfile.TarFile,
    root: Path,
    walk: _Walk,
    staged: dict[Digest, Path],
    result: ImportResult,
) -> None:
    """Hash every blob; copy those the cache lacks into ``tmp/`` (recorded in ``staged``)."""
    for digest, (info, _) in sorted(walk.blobs.items(), key=lambda kv: kv[1][0].offset_data):
        final = content_path(root, BLOB, str(digest))
        try:
            present = final.stat().st_size == info.size
        except OSError:
            present = False
        if present:
            _copy(tar, info, digest, None)  # a bad bundle is refused either way
            continue
        tmp = root / "tmp" / temp_name(digest.hex)
        staged[digest] = tmp
        with open(tmp, "xb") as out:
            _copy(tar, info, digest, out)
            out.flush()
            os.fsync(out.fileno())


def _copy(
    tar: tarfile.TarFile, info: tarfile.TarInfo, digest: Digest, out: IO[bytes] | None
) -> None:
    """Stream one member through the hash (and into ``out``), then check it."""
    name = member_name(digest)
    src = tar.extractfile(info)
    if src is None:
        raise BundleError(f"{name}: not a regular file")
    hasher = digest.hasher()
    copied = 0
    try:
        while chunk := src.read(COPY_CHUNK):
            hasher.update(chunk)
            copied += len(chunk)
            if out is not None:
                out.write(chunk)
    except (tarfile.TarError, EOFError) as err:
        raise BundleError(f"{name}: truncated ({err})") from None
    if copied != info.size:
        raise BundleError(f"{name}: truncated")
    if hasher.hexdigest() != digest.hex:
        raise BundleError(f"{name}: content does not match its digest")


async def _commit(
    b: _Bundle,
    root: Path,
    index_doc: dict[str, Any],
    walk: _Walk,
    staged: dict[Digest, Path],
    result: ImportResult,
    batch: int,
) -> None:
    """Move verified content into place: blobs, manifests, then tags."""
    index = await asyncio.to_thread(CacheIndex, root / "index.db")
    store = FileManifestStore(root)
    try:
        result.present += len(walk.blobs) - len(staged)
        for digest, tmp in list(staged.items()):
            info, namespace = walk.blobs[digest]
            await asyncio.to_thread(_publish, tmp, content_path(root, BLOB, str(digest)))
            del staged[digest]
            index.add(BLOB, str(digest), info.size, namespace)
            result.blobs += 1
            result.blob_bytes += info.size
        missing: list[tuple[StoredManifest, str]] = []
        for digest, m in walk.manifests.items():
            if await store.get(digest) is not None:
                result.present += 1
                continue
            body = _read_small(b.tar, m.info, member_name(digest), b.limit)
            if manifest_digest(body, m.media_type, digest.algorithm) != digest:  # tar changed
                raise BundleError(f"{member_name(digest)}: content does not match its digest")
            missing.append((StoredManifest(digest, m.media_type, body), m.namespace))
            if len(missing) >= batch:
                await _put_manifests(store, index, missing, result)
        await _put_manifests(store, index, missing, result)
        now = time.time()
        tags: list[tuple[tuple[str, str, str], str, TagEntry]] = []
        for ref, desc, subject in _tops(b, index_doc):
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
    store: FileManifestStore,
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
    store: FileManifestStore,
    tags: list[tuple[tuple[str, str, str], str, TagEntry]],
    result: ImportResult,
) -> None:
    """Write a batch of tag records; empties ``tags``."""
    written = await asyncio.to_thread(store.put_tags, tags)
    result.tags += written
    result.present += len(tags) - written
    tags.clear()


def _publish(tmp: Path, final: Path) -> None:
    """Rename a verified, fsynced temp file into place and make the rename durable."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
