"""The OCI distribution grammar: names, tags, digests, Range and Accept headers.

Pure and synchronous. Everything a client sends is checked here before it touches
the disk or the network; a value that passes cannot escape the cache directory
(digest hex is the only part of a request that becomes a path).

Over 300 lines because it is the whole grammar in one place: each parser is short,
and splitting them would scatter the rules a reviewer checks side by side.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import json
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from mirrorproxy.core.errors import (
    DigestInvalid,
    ManifestUnknown,
    NameInvalid,
    PaginationInvalid,
    RangeNotSatisfiable,
)

MAX_NAME_LENGTH = 255  # the spec's note on client limits; also bounds path length

# distribution-spec: <name> = path-component ("/" path-component)*
_NAME_RE = re.compile(
    r"[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*(?:/[a-z0-9]+(?:(?:\.|_|__|-+)[a-z0-9]+)*)*"
)
_TAG_RE = re.compile(r"[A-Za-z0-9_][A-Za-z0-9._-]{0,127}")
_DIGEST_RE = re.compile(r"([a-z0-9]+(?:[.+_-][a-z0-9]+)*):([a-zA-Z0-9=_-]+)")
_HEX = {"sha256": 64, "sha512": 128}
_RANGE_RE = re.compile(r"([0-9]*)-([0-9]*)")  # one range-spec; ASCII digits: \d takes any script
# A byte position past any blob; longer digit strings cap here (int() refuses >4300).
_BEYOND = 10**18

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_V1_SIGNED = "application/vnd.docker.distribution.manifest.v1+prettyjws"
DOCKER_V1 = "application/vnd.docker.distribution.manifest.v1+json"
MANIFEST_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_LIST, DOCKER_V1_SIGNED)
INDEX_TYPES = (OCI_INDEX, DOCKER_LIST)
# What containerd sends when it resolves a tag; preload and import use it too, so
# the tag records they write answer containerd's own requests.
CONTAINERD_ACCEPT = ", ".join((DOCKER_MANIFEST, DOCKER_LIST, OCI_MANIFEST, OCI_INDEX, "*/*"))


@dataclass(frozen=True, slots=True)
class Digest:
    """A validated ``algorithm:hex`` content digest (sha256 or sha512)."""

    algorithm: str
    hex: str

    def __str__(self) -> str:
        return f"{self.algorithm}:{self.hex}"

    def hasher(self) -> hashlib._Hash:
        return hashlib.new(self.algorithm)

    @classmethod
    def of(cls, data: bytes, algorithm: str = "sha256") -> Digest:
        return cls(algorithm, hashlib.new(algorithm, data).hexdigest())


def parse_name(name: str) -> str:
    """Validate a repository name (``library/alpine``).

    Raises:
        NameInvalid: not in the distribution-spec grammar, or too long.
    """
    if len(name) > MAX_NAME_LENGTH or not _NAME_RE.fullmatch(name):
        raise NameInvalid(f"invalid repository name {name[:300]!r}")
    return name


def parse_digest(text: str) -> Digest:
    """Validate a digest; only sha256 and sha512 are accepted.

    Raises:
        DigestInvalid: malformed, another algorithm, or hex of the wrong length or case.
    """
    m = _DIGEST_RE.fullmatch(text)
    if m is None:
        raise DigestInvalid(f"invalid digest {text[:200]!r}")
    algorithm, encoded = m.groups()
    if algorithm not in _HEX:
        raise DigestInvalid(f"digest algorithm {algorithm!r} is not supported (sha256, sha512)")
    if len(encoded) != _HEX[algorithm] or not re.fullmatch(r"[0-9a-f]+", encoded):
        raise DigestInvalid(f"invalid {algorithm} digest {text[:200]!r}")
    return Digest(algorithm, encoded)


MAX_PAGE = 100_000  # tags per page a client may ask for (``n``)


def parse_tags_query(query: Mapping[str, str]) -> dict[str, str]:
    """The ``n`` and ``last`` of a tag list request, checked; other keys are dropped.

    Raises:
        PaginationInvalid: ``n`` is not a whole number from 0 to MAX_PAGE.
        NameInvalid: ``last`` is not a tag.
    """
    params: dict[str, str] = {}
    n = query.get("n")
    if n is not None:
        if not (n.isascii() and n.isdigit() and len(n) <= 6 and int(n) <= MAX_PAGE):
            raise PaginationInvalid(f"n must be a number from 0 to {MAX_PAGE}, got {n[:20]!r}")
        params["n"] = str(int(n))
    last = query.get("last")
    if last is not None:
        if not _TAG_RE.fullmatch(last):
            raise NameInvalid(f"last must be a tag, got {last[:200]!r}")
        params["last"] = last
    return params


def parse_reference(text: str) -> str | Digest:
    """Return a tag (str) or a Digest for a manifest reference.

    Raises:
        DigestInvalid: a reference with a colon that is no valid digest.
        ManifestUnknown: neither a tag nor a digest. A reference that cannot exist
            names no manifest: the distribution-spec (and its conformance suite)
            want 404 here; NAME_INVALID is for repository names.
    """
    if ":" in text:
        return parse_digest(text)
    if not _TAG_RE.fullmatch(text):
        raise ManifestUnknown(f"invalid tag {text[:200]!r}: no such manifest")
    return text


def parse_range(header: str | None, size: int) -> tuple[int, int] | None:
    """Apply a ``Range`` header to a blob of ``size`` bytes, the RFC 9110 way.

    One rule for every way a blob is served (cached, downloading, streamed through):

    - a single satisfiable range gives its inclusive (start, end) within the blob;
    - no header, another unit, a malformed or invalid range set (``bytes=abc``,
      ``bytes=5-3``), or several ranges of which one is satisfiable: None, and the
      whole blob is sent with 200 (a server may ignore Range; multipart answers are
      not worth their cost for blobs);
    - a well-formed set of which no range is satisfiable (``bytes=5000-`` on a
      1000-byte blob, ``bytes=-0``): 416.

    Raises:
        RangeNotSatisfiable: no range of a well-formed set overlaps the blob.
    """
    if not header:
        return None
    unit, eq, spec = header.strip().partition("=")
    if not eq or unit.strip().lower() != "bytes":
        return None
    parts = [p.replace(" ", "").replace("\t", "") for p in spec.split(",")]
    parsed: list[tuple[int, int] | None] = []  # None: a well-formed but unsatisfiable part
    for part in parts:
        if not part:
            continue  # the list syntax allows empty elements: "bytes=0-1,,5-6"
        m = _RANGE_RE.fullmatch(part)
        if m is None:
            return None
        first, last = m.groups()
        if not first and not last:
            return None
        if not first:  # suffix: the last N bytes
            n = _position(last)
            if size == 0 and n:
                return None  # the whole (empty) body satisfies a suffix range
            parsed.append((max(0, size - n), size - 1) if n else None)
            continue
        start = _position(first)
        if last and _position(last) < start:
            return None  # an invalid range-spec makes the whole header invalid
        end = min(_position(last), size - 1) if last else size - 1
        parsed.append((start, end) if start < size else None)
    if not parsed:
        return None
    satisfiable = [r for r in parsed if r is not None]
    if not satisfiable:
        raise RangeNotSatisfiable(
            f"range {header[:100]!r} not satisfiable for size {size}",
            headers={"Content-Range": f"bytes */{size}"},
        )
    return satisfiable[0] if len(parsed) == 1 else None


def _position(digits: str) -> int:
    """A byte position from ASCII digits; absurdly long numbers cap beyond any blob."""
    significant = digits.lstrip("0")
    return int(significant or "0") if len(significant) <= 18 else _BEYOND


def join_fields(values: Iterable[str]) -> str | None:
    """One header value from repeated header lines (RFC 9110 5.3: a comma list).

    containers/image and Docker send each Accept type on a line of its own; reading
    only the first line would forward one type upstream and key tag records by it.
    """
    joined = ", ".join(v.strip() for v in values if v.strip())
    return joined or None


def accept_types(header: str | None) -> tuple[str, ...]:
    """Media types a client accepts, sorted and without parameters (a stable cache key)."""
    if not header:
        return ()
    types = {part.split(";", 1)[0].strip().lower() for part in header.split(",")}
    types.discard("")
    return tuple(sorted(types))


def acceptable(media_type: str, accepted: tuple[str, ...]) -> bool:
    """Whether a stored manifest of ``media_type`` may answer a client's Accept."""
    return not accepted or media_type in accepted or "*/*" in accepted


def same_variant(stored_key: tuple[str, ...], media_type: str, accepted: tuple[str, ...]) -> bool:
    """Whether a tag answer given for one Accept set may stand in for another's.

    Only when the client names the stored media type itself (``*/*`` alone says
    nothing about index or single manifest), and only when both Accept sets agree
    on indexes: a single-platform answer given to a client that took no index says
    nothing about whether the tag is an index.
    """
    if media_type not in accepted:
        return False
    if media_type in INDEX_TYPES:
        return True
    takes_index = any(t in INDEX_TYPES for t in accepted)
    return takes_index == any(t in INDEX_TYPES for t in stored_key)


def manifest_digest(body: bytes, media_type: str, algorithm: str = "sha256") -> Digest:
    """A manifest's content digest as registries compute it.

    Equal to the hash of the body, except for signed schema1 manifests, whose digest
    covers the JWS payload without its signatures.
    """
    if media_type == DOCKER_V1_SIGNED:
        payload = schema1_payload(body)
        if payload is not None:
            return Digest.of(payload, algorithm)
    return Digest.of(body, algorithm)


def schema1_payload(body: bytes) -> bytes | None:
    """The signed bytes of a schema1 JWS manifest (``formatLength`` + ``formatTail``).

    None when the body is not a well-formed signed manifest.
    """
    try:
        doc = json.loads(body)
        protected = doc["signatures"][0]["protected"]
        header = json.loads(_b64url(protected))
        length, tail = header["formatLength"], _b64url(header["formatTail"])
    except (ValueError, KeyError, IndexError, TypeError, binascii.Error):
        return None
    if not isinstance(length, int) or not 0 < length <= len(body):
        return None
    return body[:length] + tail


def _b64url(text: object) -> bytes:
    if not isinstance(text, str):
        raise TypeError("not a string")
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def manifest_media_type(body: bytes, header: str | None) -> str:
    """The manifest's media type: the upstream's header, else its ``mediaType`` field."""
    if header:
        ctype = header.split(";", 1)[0].strip()
        if ctype and ctype not in ("application/json", "application/octet-stream", "text/plain"):
            return ctype
    try:
        doc = json.loads(body)
    except ValueError:
        return OCI_MANIFEST
    if isinstance(doc, dict):
        declared = doc.get("mediaType")
        if isinstance(declared, str) and declared:
            return declared
        if "manifests" in doc:
            return OCI_INDEX
        if doc.get("schemaVersion") == 1:
            return DOCKER_V1_SIGNED
    return OCI_MANIFEST


MAX_ARTIFACT_TYPE = 255


def filter_referrers(body: bytes, artifact_type: str) -> bytes:
    """A referrers index with only the descriptors of one ``artifactType``.

    The mirror caches the whole list once per subject and filters it itself, so one
    upstream answer serves every filter, and ``OCI-Filters-Applied`` is always true.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        return body
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        return body
    wanted = artifact_type[:MAX_ARTIFACT_TYPE]
    doc["manifests"] = [
        m for m in doc["manifests"] if isinstance(m, dict) and m.get("artifactType") == wanted
    ]
    return json.dumps(doc, separators=(",", ":")).encode()


def empty_referrers() -> bytes:
    """The answer of a registry that knows no referrers for a subject."""
    doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": []}
    return json.dumps(doc, separators=(",", ":")).encode()
