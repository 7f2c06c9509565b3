"""Air-gap bundles: OCI image layouts in a tar, written by ``export``, read by ``import``.

A bundle is a plain OCI image layout (``oci-layout``, ``index.json``,
``blobs/<alg>/<hex>``) in an uncompressed tar, so ``skopeo`` (``oci-archive:``) and
``ctr import`` read it too. Each tagged manifest's full reference
(``docker.io/library/alpine:3``) is in the annotations of its descriptor.

No index document grows with the tag count: up to ``PAGE_ENTRIES`` tags are listed
in ``index.json`` itself (what other tools look references up in); more are split,
in reference order, into nested image indexes ("pages", marked with the ``PAGE``
annotation) that ``index.json`` lists instead. Every index document export writes
stays under ``MAX_INDEX_SIZE``, the limit import enforces, so export can never write
a bundle import refuses. This package module owns only the layout format (member
names, descriptors, limits, what a manifest references); ``export`` (with ``plan``
and ``layoutwriter``) and ``importer`` (which reads the tar through ``reader``) own
the two commands. Pure: no IO here.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from mirrorproxy.core.errors import RegistryError
from mirrorproxy.core.oci import CONTAINERD_ACCEPT, OCI_INDEX, Digest, accept_types, parse_digest

LAYOUT_FILE, INDEX_FILE = "oci-layout", "index.json"
LAYOUT = {"imageLayoutVersion": "1.0.0"}
REF_NAME = "org.opencontainers.image.ref.name"
CONTAINERD_NAME = "io.containerd.image.name"
# The tag-record key containerd's own requests look up; import writes tags under it.
CONTAINERD_KEY = ",".join(accept_types(CONTAINERD_ACCEPT))
COPY_CHUNK = 1024 * 1024  # bytes per read when streaming a blob in or out
# A nested index of tags (value: "tags"); index.json lists these past PAGE_ENTRIES tags.
# An index.json entry that is a subject's referrers index: "<registry>/<repo>@<digest>".
REFERRERS = "io.mirrorproxy.referrers.subject"
PAGE = "io.mirrorproxy.bundle.page"
PAGE_VALUE = "tags"
PAGE_ENTRIES = 8192  # tags per index document; 8,192 of the longest references fit
PAGE_BYTES = 8 * 1024 * 1024  # ...and bytes per index document, whichever comes first
MAX_INDEX_SIZE = 16 * 1024 * 1024  # what import reads of one index document
MAX_PAGE_DEPTH = 4  # pages of pages: 8,192**3 tags before the fourth level

Warn = Callable[[str], None]


class BundleError(Exception):
    """A bundle problem, reported as one line; nothing was written (or left behind)."""


@dataclass(frozen=True, slots=True)
class Descriptor:
    media_type: str
    digest: Digest
    size: int

    def to_json(self) -> dict[str, Any]:
        return {"mediaType": self.media_type, "digest": str(self.digest), "size": self.size}


def member_name(digest: Digest) -> str:
    """The tar member holding ``digest``: ``blobs/sha256/<hex>``."""
    return f"blobs/{digest.algorithm}/{digest.hex}"


def parse_descriptor(obj: object, where: str) -> Descriptor:
    """Validate one descriptor from a manifest or ``index.json``.

    Raises:
        BundleError: not a descriptor with a valid digest and size.
    """
    if not isinstance(obj, dict):
        raise BundleError(f"{where}: a descriptor is not an object")
    size = obj.get("size")
    if not isinstance(size, int) or isinstance(size, bool) or size < 0:
        raise BundleError(f"{where}: descriptor {obj.get('digest')!r} has no valid size")
    try:
        digest = parse_digest(str(obj.get("digest", "")))
    except RegistryError as err:
        raise BundleError(f"{where}: {err.message}") from None
    return Descriptor(str(obj.get("mediaType", "")), digest, size)


def references(doc: dict[str, Any], where: str) -> tuple[list[Descriptor], list[Descriptor]]:
    """(child manifests, blobs) a manifest or index document points at.

    Raises:
        BundleError: a descriptor in it is malformed.
    """
    children = [parse_descriptor(d, where) for d in _list(doc.get("manifests"))]
    config = doc.get("config")
    blobs = [*([config] if config is not None else []), *_list(doc.get("layers"))]
    return children, [parse_descriptor(d, where) for d in blobs]


def _list(value: object) -> list[object]:
    return value if isinstance(value, list) else []


def is_page(obj: object) -> bool:
    """Whether an index entry is a nested index of tags written by export."""
    if not isinstance(obj, dict) or obj.get("mediaType") != OCI_INDEX:
        return False
    annotations = obj.get("annotations")
    return isinstance(annotations, dict) and annotations.get(PAGE) == PAGE_VALUE
