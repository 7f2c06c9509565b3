"""Writing a planned bundle: the OCI image layout as a tar, complete or not at all.

The tar is written to a temp file next to ``--out`` and renamed only when complete.
Blobs are streamed from their cache files and hashed on the way (bit rot stays
home); manifests are read again rather than kept in memory; index documents are
written page by page (see ``mirrorproxy.bundle``). It decides nothing about what
goes in: that is the ``Plan``'s.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import tarfile
import uuid
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import IO, Any

from mirrorproxy.bundle import (
    COPY_CHUNK,
    INDEX_FILE,
    LAYOUT,
    LAYOUT_FILE,
    MAX_PAGE_DEPTH,
    PAGE,
    PAGE_BYTES,
    PAGE_VALUE,
    BundleError,
    member_name,
)
from mirrorproxy.bundle.plan import Plan, read_manifest
from mirrorproxy.cache.index import BLOB
from mirrorproxy.cache.walk import content_path
from mirrorproxy.core.oci import OCI_INDEX, Digest


def write_layout(root: Path, out: Path, plan: Plan, page_entries: int) -> None:
    """Write the planned layout as a tar, temp file first, then rename to ``out``.

    Content first, then the pages, then ``index.json`` (tar order means nothing to
    an image layout, and only then are the pages' digests known).
    """
    tmp = out.parent / f".{out.name}.{uuid.uuid4().hex}.partial"
    try:
        with open(tmp, "wb") as f:
            with tarfile.TarFile(
                fileobj=f, mode="w", format=tarfile.PAX_FORMAT, copybufsize=COPY_CHUNK
            ) as tar:
                _add_bytes(tar, LAYOUT_FILE, json.dumps(LAYOUT).encode())
                _add_dir(tar, "blobs")
                for alg in sorted({*plan.algorithms(), "sha256"}):
                    _add_dir(tar, f"blobs/{alg}")
                for digest, size, is_manifest in plan.content():
                    if is_manifest:
                        _add_manifest(tar, root, digest)
                    else:
                        _add_blob(tar, root, digest, size)
                top = _index_entries(tar, plan, page_entries)
                _add_bytes(tar, INDEX_FILE, _index_doc(top))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, out)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def _index_entries(tar: tarfile.TarFile, plan: Plan, page_entries: int) -> list[dict[str, Any]]:
    """The entries of ``index.json``: the tags when they fit, else pages (of pages)."""
    if plan.result.tags + plan.result.referrers <= page_entries:
        flat = list(plan.entries())
        if len(_index_doc(flat)) <= PAGE_BYTES:
            return flat
    level: Iterable[dict[str, Any]] = plan.entries()
    for _ in range(MAX_PAGE_DEPTH):
        pages = list(_pages(tar, level, page_entries))
        plan.result.pages += len(pages)
        if len(pages) <= page_entries:
            return pages
        level = pages
    raise BundleError("too many tags for one bundle")  # pragma: no cover - 8192**4 tags


def _pages(
    tar: tarfile.TarFile, entries: Iterable[dict[str, Any]], page_entries: int
) -> Iterator[dict[str, Any]]:
    """Write entries as nested indexes of at most ``page_entries`` / ``PAGE_BYTES`` each."""
    page: list[dict[str, Any]] = []
    size = 0
    for entry in entries:
        n = len(json.dumps(entry, separators=(",", ":"))) + 1
        if page and (len(page) >= page_entries or size + n > PAGE_BYTES - 1024):
            yield _add_page(tar, page)
            page, size = [], 0
        page.append(entry)
        size += n
    if page:
        yield _add_page(tar, page)


def _add_page(tar: tarfile.TarFile, entries: list[dict[str, Any]]) -> dict[str, Any]:
    body = _index_doc(entries)
    digest = Digest.of(body, "sha256")
    _add_bytes(tar, member_name(digest), body)
    return {
        "mediaType": OCI_INDEX,
        "digest": str(digest),
        "size": len(body),
        "annotations": {PAGE: PAGE_VALUE},
    }


def _index_doc(entries: list[dict[str, Any]]) -> bytes:
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": entries}
    return json.dumps(doc, separators=(",", ":")).encode()


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


def _add_manifest(tar: tarfile.TarFile, root: Path, digest: Digest) -> None:
    """Read a planned manifest again (bodies are not kept in memory) and add it."""
    got = read_manifest(root, digest)
    if got is None:
        raise BundleError(
            f"manifest {digest} left the cache while exporting (evicted?); run the export again"
        )
    _add_bytes(tar, member_name(digest), got[1])


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
