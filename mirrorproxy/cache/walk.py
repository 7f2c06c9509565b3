"""Read-only walks over a cache directory: content paths, tag records, manifest documents.

Shared by the commands that look at the cache from outside the server (``cache``,
``export``, ``import``). Only reads; never writes, deletes or hashes, and knows
nothing about the index or HTTP. Every reader tolerates files vanishing or being
half-written by a running server: such an entry is skipped, not an error.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mirrorproxy.cache.index import BLOB, MANIFEST


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


def content_path(root: Path, kind: str, digest: str) -> Path:
    """Where a blob or manifest with ``digest`` lives under the cache ``root``."""
    alg, _, hexpart = digest.partition(":")
    sub = "blobs" if kind == BLOB else "manifests"
    return root / sub / alg / hexpart[:2] / hexpart


def tag_records(root: Path) -> Iterator[TagRecord]:
    """Every readable tag record under ``root/tags``, in a stable (path) order.

    Listed one shard directory at a time, so a cache of 100,000 tags is walked
    without holding every path in memory.
    """
    for path in _record_paths(root / "tags"):
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
    for path in _record_paths(root / "referrers"):
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


def _record_paths(tags: Path) -> Iterator[Path]:
    """``tags/<xx>/<hash>.json`` in path order, one shard listed at a time."""
    try:
        shards = sorted(e.name for e in os.scandir(tags) if e.is_dir())
    except OSError:
        return
    for shard in shards:
        try:
            names = sorted(e.name for e in os.scandir(tags / shard) if e.name.endswith(".json"))
        except OSError:
            continue
        for name in names:
            yield tags / shard / name


def manifest_doc(root: Path, digest: str) -> dict[str, Any] | None:
    """The cached manifest's JSON document, or None if absent or unreadable."""
    try:
        raw = content_path(root, MANIFEST, digest).read_bytes()
        doc = json.loads(raw.partition(b"\n")[2])
    except (OSError, ValueError):
        return None
    return doc if isinstance(doc, dict) else None
