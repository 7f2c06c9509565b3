"""``mirrorproxy import``: verify a bundle tar completely, then add it to the cache.

Two phases, so a bad bundle leaves nothing behind. First every manifest reachable
from ``index.json`` is read and checked (they are small), and every blob they
reference is streamed from the tar into ``<cache>/tmp`` while being hashed; blobs
already cached are hashed too but not copied. Only when all of it matched its
digest are the blobs renamed into place, then the manifests written through the
manifest store, then the tags (children before parents, tags last), so a running
mirror never sees a tag before its content. Idempotent: what is present is counted,
not rewritten. Never holds a layer in memory.
"""

from __future__ import annotations

import asyncio
import json
import os
import tarfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mirrorproxy.bundle import (
    CONTAINERD_KEY,
    CONTAINERD_NAME,
    COPY_CHUNK,
    INDEX_FILE,
    LAYOUT_FILE,
    REF_NAME,
    BundleError,
    Descriptor,
    Warn,
    member_name,
    parse_descriptor,
    references,
)
from mirrorproxy.cache import StoredManifest, TagEntry, temp_name
from mirrorproxy.cache.index import BLOB, MANIFEST, CacheIndex
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.cache.walk import content_path
from mirrorproxy.config import Config
from mirrorproxy.oci import MANIFEST_TYPES, Digest, manifest_media_type
from mirrorproxy.reference import ImageRef, parse_image_reference

MAX_INDEX_SIZE = 16 * 1024 * 1024  # index.json of many thousand images still fits
MAX_LAYOUT_SIZE = 64 * 1024


@dataclass(slots=True)
class ImportResult:
    blobs: int = 0  # added
    blob_bytes: int = 0
    manifests: int = 0
    tags: int = 0
    present: int = 0  # blobs, manifests and tags that were already in the cache
    not_in_bundle: int = 0  # index children the export left out (not cached there)


@dataclass(frozen=True, slots=True)
class _Manifest:
    media_type: str
    body: bytes
    namespace: str


@dataclass(slots=True)
class _Walk:
    tops: list[tuple[ImageRef | None, Descriptor]] = field(default_factory=list)
    # Insertion order is children before parents: the order they are written in.
    manifests: dict[Digest, _Manifest] = field(default_factory=dict)
    blobs: dict[Digest, tuple[tarfile.TarInfo, str]] = field(default_factory=dict)


def import_bundle(config: Config, bundle: Path, *, warn: Warn) -> ImportResult:
    """Verify ``bundle`` completely, then add what the cache lacks.

    Args:
        config: gives the cache directory, the manifest size limit and the
            namespaces (a reference no namespace serves gets a warning).
        bundle: the tar (uncompressed, seekable).
        warn: called with one line per reference the mirror would not serve.

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
        walk = _Walk()
        result = ImportResult()
        _read_layout(tar, _members(tar, bundle), walk, result, config)
        for ref, _ in walk.tops:
            if ref is not None and config.namespace(ref.registry) is None:
                warn(f"{ref}: no namespace in {config.source} serves {ref.registry}")
        for sub in ("blobs", "manifests", "tags", "tmp"):
            (root / sub).mkdir(parents=True, exist_ok=True)
        staged: dict[Digest, Path] = {}
        try:
            _stage(tar, root, walk, staged, result)
            asyncio.run(_commit(root, walk, staged, result))
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


def _read_layout(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    walk: _Walk,
    result: ImportResult,
    config: Config,
) -> None:
    """Check ``oci-layout``, read ``index.json`` and verify every manifest it reaches."""
    for name in (LAYOUT_FILE, INDEX_FILE):
        if name not in members:
            raise BundleError(f"no {name} in the bundle (not an OCI image layout)")
    layout = _json(
        _read_small(tar, members[LAYOUT_FILE], LAYOUT_FILE, MAX_LAYOUT_SIZE), LAYOUT_FILE
    )
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise BundleError(f"{LAYOUT_FILE}: no imageLayoutVersion (not an OCI image layout)")
    index = _json(_read_small(tar, members[INDEX_FILE], INDEX_FILE, MAX_INDEX_SIZE), INDEX_FILE)
    tops = index.get("manifests")
    if not isinstance(tops, list):
        raise BundleError(f"{INDEX_FILE}: no manifests list")
    limit = config.cache.max_manifest_size
    for obj in tops:
        desc = parse_descriptor(obj, INDEX_FILE)
        ref = _reference(obj)
        namespace = ref.registry if ref is not None else ""
        _walk_manifest(tar, members, walk, result, desc, namespace, INDEX_FILE, limit)
        walk.tops.append((ref, desc))


def _reference(obj: dict[str, Any]) -> ImageRef | None:
    """The full reference an ``index.json`` entry names, if it names one.

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
        raise BundleError(f"{INDEX_FILE}: {err}") from None


def _walk_manifest(
    tar: tarfile.TarFile,
    members: dict[str, tarfile.TarInfo],
    walk: _Walk,
    result: ImportResult,
    desc: Descriptor,
    namespace: str,
    where: str,
    limit: int,
) -> None:
    """Verify one manifest and, depth first, what it references."""
    if desc.digest in walk.manifests:
        return
    name = member_name(desc.digest)
    info = _member(members, name, desc, where)
    body = _read_small(tar, info, name, limit)
    if Digest.of(body, desc.digest.algorithm) != desc.digest:
        raise BundleError(f"{name}: content does not match its digest")
    doc = _json(body, name)
    children, blobs = references(doc, name)
    for child in children:
        if member_name(child.digest) not in members:
            result.not_in_bundle += 1  # left out at export: it was not cached there
            continue
        _walk_manifest(tar, members, walk, result, child, namespace, f"manifest {name}", limit)
    for blob in blobs:
        blob_info = _member(members, member_name(blob.digest), blob, f"manifest {name}")
        walk.blobs.setdefault(blob.digest, (blob_info, namespace))
    declared = desc.media_type if desc.media_type in MANIFEST_TYPES else None
    walk.manifests[desc.digest] = _Manifest(manifest_media_type(body, declared), body, namespace)


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
    root: Path, walk: _Walk, staged: dict[Digest, Path], result: ImportResult
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
        for digest, m in walk.manifests.items():
            if await store.get(digest) is not None:
                result.present += 1
                continue
            await store.put(StoredManifest(digest, m.media_type, m.body))
            index.add(MANIFEST, str(digest), len(m.body), m.namespace)
            result.manifests += 1
        now = time.time()
        for ref, desc in walk.tops:
            if ref is None or ref.tag is None:
                continue
            entries = await store.get_tag(ref.registry, ref.repository, ref.tag)
            current = entries.get(CONTAINERD_KEY)
            if current is not None and current.digest == desc.digest:
                result.present += 1
                continue
            m = walk.manifests[desc.digest]
            entry = TagEntry(desc.digest, m.media_type, len(m.body), now)
            await store.put_tag(ref.registry, ref.repository, ref.tag, CONTAINERD_KEY, entry)
            result.tags += 1
    finally:
        index.close()


def _publish(tmp: Path, final: Path) -> None:
    """Rename a verified, fsynced temp file into place and make the rename durable."""
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    dir_fd = os.open(final.parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
