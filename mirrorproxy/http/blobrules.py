"""HTTP rules for blob answers: one set for cached, downloading and streamed-through blobs.

Pure: from the request's headers, the digest and (once known) the size, decide what
to answer. Following RFC 9110:

- The ETag is the quoted digest (a blob's bytes never change). ``If-None-Match``
  with it (or ``*``) gives 304; ``If-Match`` without it gives 412; an ``If-Range``
  that is not it (a date, a weak or another tag) makes the range ignored.
- ``Range`` is applied by ``oci.parse_range``: one satisfiable range gives 206, an
  unusable header or several ranges give the whole blob with 200, and 416 only
  when nothing asked for overlaps the blob.
- ``Accept-Ranges: bytes`` on every answer, HEAD and 304 included.
"""

from __future__ import annotations

from multidict import MultiMapping

from mirrorproxy.core.errors import PreconditionFailed, RangeNotSatisfiable
from mirrorproxy.core.oci import Digest, parse_range

BLOB_TYPE = "application/octet-stream"
_BEYOND = 10**18  # a size no blob reaches: where a range starts, before the size is known


def etag(digest: Digest) -> str:
    return f'"{digest}"'


def blob_headers(digest: Digest) -> dict[str, str]:
    """Headers of every blob answer (200, 206, 304, HEAD) but the length and range."""
    return {
        "Docker-Content-Digest": str(digest),
        "ETag": etag(digest),
        "Accept-Ranges": "bytes",
        "Content-Type": BLOB_TYPE,
    }


def content_range(rng: tuple[int, int], size: int) -> dict[str, str]:
    return {"Content-Range": f"bytes {rng[0]}-{rng[1]}/{size}"}


def _field(headers: MultiMapping[str], name: str) -> str | None:
    """A field's value, repeated lines joined as one list (RFC 9110 5.3)."""
    values = headers.getall(name, [])
    return ", ".join(values) if values else None


def _tags(value: str) -> list[str]:
    return [t.strip() for t in value.split(",") if t.strip()]


def not_modified(headers: MultiMapping[str], digest: Digest) -> bool:
    """Check the preconditions of a GET or HEAD; True: answer 304.

    Raises:
        PreconditionFailed: ``If-Match`` lists neither ``*`` nor this blob's ETag.
    """
    if_match = _field(headers, "If-Match")
    if if_match is not None:
        tags = _tags(if_match)
        if "*" not in tags and etag(digest) not in tags:  # strong comparison: no W/
            raise PreconditionFailed(f"If-Match does not name blob {digest}")
    if_none_match = _field(headers, "If-None-Match")
    if if_none_match is None:
        return False
    tags = [t.removeprefix("W/") for t in _tags(if_none_match)]  # weak comparison
    return "*" in tags or etag(digest) in tags


def _range_field(headers: MultiMapping[str], digest: Digest) -> str | None:
    """The Range header, unless an If-Range that does not hold voids it."""
    if_range = _field(headers, "If-Range")
    if if_range is not None and if_range.strip() != etag(digest):
        return None  # dates never hold: blobs carry no Last-Modified
    return _field(headers, "Range")


def wanted_range(
    headers: MultiMapping[str], digest: Digest, size: int | None
) -> tuple[int, int] | None:
    """The inclusive byte range to send with 206, or None for the whole blob (200).

    A blob whose size is not known yet (its upstream sent none) is sent whole.

    Raises:
        RangeNotSatisfiable: nothing asked for overlaps the blob (416).
    """
    if size is None:
        return None
    try:
        return parse_range(_range_field(headers, digest), size)
    except RangeNotSatisfiable as err:
        err.headers["Accept-Ranges"] = "bytes"
        raise


def first_byte(headers: MultiMapping[str], digest: Digest) -> int:
    """Where a GET's answer will start, before the blob's size is known (0: at the start).

    A suffix range (``bytes=-N``) counts as starting past 0: it skips the beginning.
    """
    try:
        rng = parse_range(_range_field(headers, digest), _BEYOND)
    except RangeNotSatisfiable:
        return 0  # answered 416 once the size is known; nothing is sent
    return rng[0] if rng is not None else 0
