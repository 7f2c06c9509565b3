"""``mirrorproxy export``: cached images (or a chosen list) to a bundle tar.

Reads the cache only through its files (tag records, manifests, blobs) and never
writes to it, so it runs beside a serving mirror. Blobs are streamed from their
cache files into the tar and hashed on the way, never held in memory; the tar is
written to a temp file next to ``--out`` and renamed only when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from mirrorproxy.bundle import (
    CONTAINERD_KEY,
    CONTAINERD_NAME,
    COPY_CHUNK,
    INDEX_FILE,
    LAYOUT,
    LAYOUT_FILE,
    REF_NAME,
    BundleError,
    Descriptor,
    member_name,
    references,
)
from mirrorproxy.cache.index import BLOB, MANIFEST
from mirrorproxy.cache.walk import TagRecord, content_path, tag_records
from mirrorproxy.errors import RegistryError
from mirrorproxy.oci import DOCKER_LIST, OCI_INDEX, Digest, parse_digest
from mirrorproxy.reference import ImageRef


@dataclass(slots=True)
class ExportResult:
    images: int = 0
    manifests: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    # One line per image or index child left out because the cache lacks (part of) it.
    left_out: list[str] = field(default_factory=list)


@dataclass(slots=True)
class _Plan:
    tops: dict[str, Descriptor] = field(default_factory=dict)  # reference -> descriptor
    manifests: dict[Digest, bytes] = field(default_factory=dict)  # raw bodies
    blobs: dict[Digest, int] = field(default_factory=dict)  # digest -> size


def export_bundle(root: Path, out: Path, images: Sequence[ImageRef] | None) -> ExportResult:
    """Write the bundle to ``out`` (via a temp file next to it and a rename).

    Args:
        root: the cache directory.
        out: the tar to write; replaced only when complete.
        images: exactly these references; None for every cached tag.

    Returns:
        What went into the bundle.

    Raises:
        BundleError: a requested image is not (completely) cached, or a cache file
            is corrupt or vanished meanwhile; ``out`` is untouched.
        OSError: ``out`` could not be written.
    """
    if not root.is_dir():
        raise BundleError(f"no cache at {root}")
    result = ExportResult()
    plan = _Plan()
    if images is None:
        for rec in tag_records(root):
            ref = f"{rec.namespace}/{rec.repository}:{rec.tag}"
            if not _add_image(root, plan, ref, _candidates(rec), result):
                result.left_out.append(f"{ref}: not completely in the cache, left out")
    else:
        missing = _plan_images(root, plan, images, result)
        if missing:
            raise BundleError("not in the cache: " + ", ".join(missing))
    result.images = len(plan.tops)
    result.manifests = len(plan.manifests)
    result.blobs = len(plan.blobs)
    result.blob_bytes = sum(plan.blobs.values())
    _write(root, out, plan)
    return result


def _candidates(rec: TagRecord) -> list[Digest]:
    """A tag's digests, best first: containerd's answer, then an index, then the newest."""
    ranked = sorted(
        rec.entries.items(),
        key=lambda kv: (
            kv[0] == CONTAINERD_KEY,
            kv[1].get("media_type") in (OCI_INDEX, DOCKER_LIST),
            float(kv[1].get("fetched") or 0),
        ),
        reverse=True,
    )
    out: list[Digest] = []
    for _, entry in ranked:
        try:
            digest = parse_digest(str(entry.get("digest", "")))
        except RegistryError:
            continue
        if digest not in out:
            out.append(digest)
    return out


def _plan_images(
    root: Path, plan: _Plan, images: Sequence[ImageRef], result: ExportResult
) -> list[str]:
    """Add each requested image to the plan; return those not in the cache."""
    tags = {(r.namespace, r.repository, r.tag): r for r in tag_records(root)}
    missing = []
    for image in images:
        ref = str(image)
        if image.digest is not None:
            digests = [image.digest]
        else:
            rec = tags.get((image.registry, image.repository, image.tag or "latest"))
            digests = _candidates(rec) if rec is not None else []
        if not _add_image(root, plan, ref, digests, result):
            missing.append(ref)
    return missing


def _add_image(
    root: Path,
    plan: _Plan,
    ref: str,
    digests: Sequence[Digest],
    result: ExportResult,
) -> bool:
    """Plan the first usable of a reference's manifests; False if none is cached."""
    mark = len(result.left_out)
    for digest in digests:
        got = _read_manifest(root, digest)
        if got is None:
            continue
        media_type, body = got
        if not _add_manifest(root, plan, ref, digest, body, result):
            del result.left_out[mark:]  # the reference as a whole is reported instead
            continue
        plan.tops[ref] = Descriptor(media_type, digest, len(body))
        return True
    return False


def _add_manifest(
    root: Path,
    plan: _Plan,
    ref: str,
    digest: Digest,
    body: bytes,
    result: ExportResult,
) -> bool:
    """Plan a manifest, its cached children and their blobs; False if incomplete.

    Nothing of an incomplete manifest enters ``plan``: it is built aside first.
    """
    try:
        doc = json.loads(body)
        children, blobs = references(doc if isinstance(doc, dict) else {}, str(digest))
    except (ValueError, BundleError):
        return False
    mine = _Plan()
    for blob in blobs:
        try:
            size = content_path(root, BLOB, str(blob.digest)).stat().st_size
        except OSError:
            return False
        if size != blob.size:
            return False
        mine.blobs[blob.digest] = size
    for child in children:
        got = _read_manifest(root, child.digest)
        if got is None or not _add_manifest(root, mine, ref, child.digest, got[1], result):
            platform = _platform(doc, child.digest)
            result.left_out.append(
                f"{ref}: {platform} manifest {child.digest} not completely in the cache, left out"
            )
    if children and not mine.manifests:
        return False
    mine.manifests[digest] = body
    plan.manifests.update(mine.manifests)
    plan.blobs.update(mine.blobs)
    return True


def _platform(index_doc: dict[str, Any], digest: Digest) -> str:
    """The ``os/arch`` an index gives a child manifest ("platform" if it gives none)."""
    manifests = index_doc.get("manifests")
    for d in manifests if isinstance(manifests, list) else []:
        if isinstance(d, dict) and d.get("digest") == str(digest):
            p = d.get("platform")
            if isinstance(p, dict):
                return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if k in p)
    return "platform"


def _read_manifest(root: Path, digest: Digest) -> tuple[str, bytes] | None:
    """A cached manifest's (media type, body), if present and intact."""
    try:
        raw = content_path(root, MANIFEST, str(digest)).read_bytes()
    except OSError:
        return None
    media_type, sep, body = raw.partition(b"\n")
    if not sep or Digest.of(body, digest.algorithm) != digest:
        return None
    return media_type.decode(errors="replace"), body


def _write(root: Path, out: Path, plan: _Plan) -> None:
    """Write the planned layout as a tar, temp file first, then rename to ``out``."""
    index = {
        "schemaVersion": 2,
        "mediaType": OCI_INDEX,
        "manifests": [
            desc.to_json() | {"annotations": {REF_NAME: ref, CONTAINERD_NAME: ref}}
            for ref, desc in sorted(plan.tops.items())
        ],
    }
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "wb") as f:
            with tarfile.TarFile(
                fileobj=f, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_CHUNK
            ) as tar:
                _add_bytes(tar, LAYOUT_FILE, json.dumps(LAYOUT).encode())
                _add_bytes(tar, INDEX_FILE, json.dumps(index, indent=1).encode())
                digests = sorted({*plan.manifests, *plan.blobs}, key=str)
                _add_dir(tar, "blobs")
                for alg in sorted({d.algorithm for d in digests}):
                    _add_dir(tar, f"blobs/{alg}")
                for digest in digests:
                    body = plan.manifests.get(digest)
                    if body is not None:
                        _add_bytes(tar, member_name(digest), body)
                    else:
                        _add_blob(tar, root, digest, plan.blobs[digest])
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _info(name: str, size: int = 0, *, directory: bool = False) -> tarfile.TarInfo:
    """A reproducible member header (no owner, no timestamp)."""
    info = tarfile.TarInfo(name)
    info.size = size
    info.mode = 0o755 if directory else 0o644
    if directory:
        info.type = tarfile.DIRTYPE
    return info


def _add_dir(tar: tarfile.TarFile, name: str) -> None:
    tar.addfile(_info(name, directory=True))


def _add_bytes(tar: tarfile.TarFile, name: str, data: bytes) -> None:
    tar.addfile(_info(name, len(data)), io.BytesIO(data))


def _add_blob(tar: tarfile.TarFile, root: Path, digest: Digest, size: int) -> None:
    """Stream one cache file into the tar, hashing it on the way (bit rot stays home)."""
    path = content_path(root, BLOB, str(digest))
    try:
        f = open(path, "rb")  # noqa: SIM115 - closed below, after the hash check
    except FileNotFoundError:
        raise BundleError(
            f"blob {digest} left the cache while exporting (evicted?); run the export again"
        ) from None
    with f:
        reader = _HashingReader(f, digest.hasher())
        tar.addfile(_info(member_name(digest), size), reader)
    if reader.hasher.hexdigest() != digest.hex:
        raise BundleError(
            f"cache file {path}: content does not match its digest "
            "(run `mirrorproxy cache verify`)"
        )


class _HashingReader:
    """A file wrapper that hashes what tarfile reads through it."""

    def __init__(self, f: IO[bytes], hasher: hashlib._Hash) -> None:
        self._f = f
        self.hasher = hasher

    def read(self, n: int = -1) -> bytes:
        data = self._f.read(n)
        self.hasher.update(data)
        return data
