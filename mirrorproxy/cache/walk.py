"""Raw read-only walks over a filesystem cache: tag records as stored, manifest documents.

What ``export`` reads (the stores' typed listings, ``ManifestStore.tag_records`` and
``referrers_records``, are what other consumers use). Only reads; never writes,
deletes or hashes, and knows nothing about the index or HTTP. Every reader
tolerates files vanishing or being half-written by a running server: such an
entry is skipped, not an error.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrorproxy.cache import MANIFEST
from mirrorproxy.cache.files import content_path as content_path
from mirrorproxy.cache.records import record_paths


@dataclass(frozen=True, slots=True)
class TagRecord:
    """One tag record file: a tag and what it resolved to per Accept key."""

    namespace: str
    repository: str
    tag: str
    entries: Mapping[str, Mapping[str, Any]]  # Accept key -> {digest, media_type, size, fetched}


@dataclass(frozen=True, slots=True)
class ReferrersRecord:
    """What the mirror learnt of a subject's referrers: the index it stored for them."""

    namespace: str
    repository: str
    subject: str
    digest: str  # the referrers index, stored as a manifest


def tag_records(root: Path) -> Iterator[TagRecord]:
    """Every readable tag record under ``root/tags``, in a stable (path) order.

    Listed one shard directory at a time, so a cache of 100,000 tags is walked
    without holding every path in memory.
    """
    for path in record_paths(root / "tags"):
        try:
            record: Any = json.loads(path.read_bytes())
            rec = TagRecord(
                str(record["namespace"]),
                str(record["repository"]),
                str(record["tag"]),
                {str(k): v for k, v in record["entries"].items() if isinstance(v, Mapping)},
            )
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue
        yield rec


def referrers_records(root: Path) -> Iterator[ReferrersRecord]:
    """Every readable referrers record under ``root/referrers``, in path order."""
    for path in record_paths(root / "referrers"):
        try:
            record: Any = json.loads(path.read_bytes())
            rec = ReferrersRecord(
                str(record["namespace"]),
                str(record["repository"]),
                str(record["subject"]),
                str(record["digest"]),
            )
        except (OSError, ValueError, KeyError, AttributeError, TypeError):
            continue
        yield rec


def manifest_doc(root: Path, digest: str) -> dict[str, Any] | None:
    """The cached manifest's JSON document, or None if absent or unreadable."""
    try:
        raw = content_path(root, MANIFEST, digest).read_bytes()
        doc = json.loads(raw.partition(b"\n")[2])
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
