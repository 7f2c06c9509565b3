"""Reading a bundle tar for import: its members, its documents and their pages, checked.

Everything here refuses what does not fit the layout with a ``BundleError`` that
names the member; nothing is trusted before it is checked against its descriptor
(size) or digest. Only reads the tar; the cache is ``importer``'s part.
"""

from __future__ import annotations

import json
import tarfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrorproxy.bundle import (
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
    is_page,
    member_name,
    parse_descriptor,
)
from mirrorproxy.core.errors import RegistryError
from mirrorproxy.core.oci import Digest, parse_digest, parse_name
from mirrorproxy.core.reference import ImageRef, parse_image_reference

MAX_LAYOUT_SIZE = 64 * 1024
Subject = tuple[str, str, Digest]  # registry, repository, digest


@dataclass(frozen=True, slots=True)
class Bundle:
    """The open tar, its regular files by name, and the manifest size limit."""

    tar: tarfile.TarFile
    members: dict[str, tarfile.TarInfo]
    limit: int


def members(tar: tarfile.TarFile, bundle: Path) -> dict[str, tarfile.TarInfo]:
    """Regular files by normalised name (links and devices are never content)."""
    try:
        infos = tar.getmembers()
    except (tarfile.TarError, EOFError) as err:
        raise BundleError(f"{bundle}: damaged or truncated tar ({err})") from None
    return {i.name.removeprefix("./"): i for i in infos if i.isreg()}


def read_small(tar: tarfile.TarFile, info: tarfile.TarInfo, name: str, limit: int) -> bytes:
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


def read_json(data: bytes, name: str) -> dict[str, Any]:
    try:
        doc = json.loads(data)
    except ValueError:
        doc = None
    if not isinstance(doc, dict):
        raise BundleError(f"{name}: not a JSON object")
    return doc


def read_layout(b: Bundle) -> dict[str, Any]:
    """Check ``oci-layout``; return ``index.json``."""
    for name in (LAYOUT_FILE, INDEX_FILE):
        if name not in b.members:
            raise BundleError(f"no {name} in the bundle (not an OCI image layout)")
    raw = read_small(b.tar, b.members[LAYOUT_FILE], LAYOUT_FILE, MAX_LAYOUT_SIZE)
    layout = read_json(raw, LAYOUT_FILE)
    if not isinstance(layout.get("imageLayoutVersion"), str):
        raise BundleError(f"{LAYOUT_FILE}: no imageLayoutVersion (not an OCI image layout)")
    raw = read_small(b.tar, b.members[INDEX_FILE], INDEX_FILE, MAX_INDEX_SIZE)
    return read_json(raw, INDEX_FILE)


def tops(
    b: Bundle, doc: dict[str, Any], where: str = INDEX_FILE, depth: int = 0
) -> Iterator[tuple[ImageRef | None, Descriptor, Subject | None]]:
    """Every top manifest: the entries of ``index.json`` and, one at a time, its pages;
    with the reference it is tagged as, or the subject it lists the referrers of."""
    entries = doc.get("manifests")
    if not isinstance(entries, list):
        raise BundleError(f"{where}: no manifests list")
    for obj in entries:
        desc = parse_descriptor(obj, where)
        if not is_page(obj):
            yield reference_of(obj, where), desc, subject_of(obj, where)
            continue
        if depth >= MAX_PAGE_DEPTH:
            raise BundleError(f"{where}: pages nested more than {MAX_PAGE_DEPTH} deep")
        name = member_name(desc.digest)
        body = read_small(b.tar, member(b.members, name, desc, where), name, MAX_INDEX_SIZE)
        if Digest.of(body, desc.digest.algorithm) != desc.digest:
            raise BundleError(f"{name}: content does not match its digest")
        yield from tops(b, read_json(body, name), name, depth + 1)


def subject_of(obj: dict[str, Any], where: str) -> Subject | None:
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


def reference_of(obj: dict[str, Any], where: str) -> ImageRef | None:
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


def member(
    members: dict[str, tarfile.TarInfo], name: str, desc: Descriptor, where: str
) -> tarfile.TarInfo:
    info = members.get(name)
    if info is None:
        raise BundleError(f"{name}: missing from the bundle (referenced by {where})")
    if info.size != desc.size:
        raise BundleError(f"{name}: {info.size} bytes, but {where} says {desc.size}")
    return info


def chunks(tar: tarfile.TarFile, info: tarfile.TarInfo, digest: Digest) -> Iterator[bytes]:
    """One member's bytes, streamed; BundleError if it is shorter than its header says."""
    name = member_name(digest)
    src = tar.extractfile(info)
    if src is None:
        raise BundleError(f"{name}: not a regular file")
    copied = 0
    try:
        while chunk := src.read(COPY_CHUNK):
            copied += len(chunk)
            yield chunk
    except (tarfile.TarError, EOFError) as err:
        raise BundleError(f"{name}: truncated ({err})") from None
    if copied != info.size:
        raise BundleError(f"{name}: truncated")
