"""Tag and referrers records as files: where they live, their JSON, and listing them.

A tag record (``tags/<xx>/<sha256 of ns, repo, tag>.json``) maps each Accept key a
client used to what the tag resolved to; a referrers record
(``referrers/<xx>/<sha256 of ns, repo, subject>.json``) names the referrers index
stored for a subject. Writing them is the manifest store's part (it publishes
atomically); this module only encodes, decodes and walks. A torn or foreign file
reads as no record: a cache miss, never an outage.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from mirrorproxy.cache import ReferrersRecord, TagEntry, TagKey, TagRecord
from mirrorproxy.core.oci import Digest, parse_digest

logger = logging.getLogger(__name__)


def tag_path(root: Path, ns: str, repo: str, tag: str) -> Path:
    key = hashlib.sha256(f"{ns}\0{repo}\0{tag}".encode()).hexdigest()
    return root / "tags" / key[:2] / f"{key}.json"


def referrers_path(root: Path, ns: str, repo: str, subject: Digest) -> Path:
    key = hashlib.sha256(f"{ns}\0{repo}\0{subject}".encode()).hexdigest()
    return root / "referrers" / key[:2] / f"{key}.json"


def entry_json(e: TagEntry) -> dict[str, Any]:
    return {
        "digest": str(e.digest),
        "media_type": e.media_type,
        "size": e.size,
        "fetched": e.fetched,
    }


def entry_from(obj: Any) -> TagEntry:
    return TagEntry(
        digest=parse_digest(obj["digest"]),
        media_type=str(obj["media_type"]),
        size=int(obj["size"]),
        fetched=float(obj["fetched"]),
    )


def tag_bytes(key: TagKey, entries: dict[str, TagEntry]) -> bytes:
    ns, repo, tag = key
    record = {
        "namespace": ns,
        "repository": repo,
        "tag": tag,
        "entries": {k: entry_json(e) for k, e in entries.items()},
    }
    return json.dumps(record, indent=1).encode()


def referrers_bytes(ns: str, repo: str, subject: Digest, entry: TagEntry) -> bytes:
    record = {"namespace": ns, "repository": repo, "subject": str(subject), **entry_json(entry)}
    return json.dumps(record).encode()


def _tag_record(raw: bytes) -> TagRecord:
    record: Any = json.loads(raw)
    entries = {str(k): entry_from(e) for k, e in record["entries"].items()}
    return TagRecord(
        str(record["namespace"]), str(record["repository"]), str(record["tag"]), entries
    )


def _referrers_record(raw: bytes) -> ReferrersRecord:
    record: Any = json.loads(raw)
    return ReferrersRecord(
        str(record["namespace"]),
        str(record["repository"]),
        parse_digest(record["subject"]),
        entry_from(record),
    )


def read_tag(path: Path) -> dict[str, TagEntry]:
    """The entries of the tag record at ``path`` ({} if absent or unreadable)."""
    try:
        return dict(_tag_record(path.read_bytes()).entries)
    except FileNotFoundError:
        return {}
    except Exception:
        logger.warning("ignoring unreadable tag record %s", path)
        return {}


def read_referrers(path: Path) -> TagEntry | None:
    """The entry of the referrers record at ``path`` (None if absent or unreadable)."""
    try:
        return _referrers_record(path.read_bytes()).entry
    except FileNotFoundError:
        return None
    except Exception:
        logger.warning("ignoring unreadable referrers record %s", path)
        return None


def tag_records(root: Path) -> Iterator[TagRecord]:
    """Every readable tag record under ``root``, in path order (unreadable ones skipped)."""
    for path in record_paths(root / "tags"):
        try:
            rec = _tag_record(path.read_bytes())
        except Exception:  # noqa: S112 - vanished, torn or foreign: not a record
            continue
        yield rec


def referrers_records(root: Path) -> Iterator[ReferrersRecord]:
    """Every readable referrers record under ``root``, in path order."""
    for path in record_paths(root / "referrers"):
        try:
            rec = _referrers_record(path.read_bytes())
        except Exception:  # noqa: S112 - vanished, torn or foreign: not a record
            continue
        yield rec


def record_paths(base: Path) -> Iterator[Path]:
    """``<base>/<xx>/<hash>.json`` in path order, one shard listed at a time.

    So a cache of 100,000 tags is walked without holding every path in memory.
    """
    try:
        shards = sorted(e.name for e in os.scandir(base) if e.is_dir())
    except OSError:
        return
    for shard in shards:
        try:
            names = sorted(e.name for e in os.scandir(base / shard) if e.name.endswith(".json"))
        except OSError:
            continue
        for name in names:
            yield base / shard / name
