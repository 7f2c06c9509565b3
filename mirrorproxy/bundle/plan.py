"""The export plan: which tags, manifests and blobs go into a bundle.

It judges each manifest once (is it, with every blob and child it needs, completely
in the cache?) however many tags point at it, and keeps the plan in a private
temporary SQLite database, so memory stays flat at any tag count. It reads the cache
only through its files and never writes to it, nor to the bundle (``layoutwriter``
writes what the plan lists).
"""

from __future__ import annotations

import json
import sqlite3
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mirrorproxy.bundle import CONTAINERD_NAME, REF_NAME, REFERRERS, BundleError, references
from mirrorproxy.cache.index import BLOB, MANIFEST
from mirrorproxy.cache.walk import ReferrersRecord, content_path
from mirrorproxy.core.errors import RegistryError
from mirrorproxy.core.oci import OCI_INDEX, Digest, manifest_digest, parse_digest

MAX_NESTING = 4  # index -> manifest levels followed inside one image


@dataclass(slots=True)
class ExportResult:
    """What an export wrote and left out: the numbers and lines of its report.

    It owns the counts only; it must not decide anything (the ``Plan`` fills it in)
    nor word the report (``export.describe`` does).
    """

    tags: int = 0  # references written
    images: int = 0  # distinct manifests those references point at
    manifests: int = 0
    blobs: int = 0
    blob_bytes: int = 0
    pages: int = 0  # nested index documents; 0 when every tag is in index.json
    referrers: int = 0  # subjects whose referrers (signatures, SBOMs) went in
    # "reference: why" for each reference left out (not completely in the cache).
    left_out: list[str] = field(default_factory=list)
    # os/arch -> platform manifests of exported indexes that were not in the cache.
    platforms_left_out: Counter[str] = field(default_factory=Counter)


@dataclass(frozen=True, slots=True)
class _Verdict:
    ok: bool
    media_type: str
    size: int
    why: str  # when not ok


_SCHEMA = """
CREATE TABLE verdicts (digest TEXT PRIMARY KEY, ok INT, media_type TEXT, size INT, why TEXT);
CREATE TABLE manifests (digest TEXT PRIMARY KEY, size INT);
CREATE TABLE blobs (digest TEXT PRIMARY KEY, size INT);
CREATE TABLE tops (ref TEXT PRIMARY KEY, digest TEXT, media_type TEXT, size INT);
CREATE TABLE referrers (subject TEXT PRIMARY KEY, digest TEXT, size INT);
"""


class Plan:
    """What goes into the bundle, kept on disk so memory stays flat at any tag count.

    It owns the verdicts on manifests and the lists of what to write, and fills in
    the ``ExportResult`` counts; it must not write the bundle or touch the cache.
    """

    def __init__(self, root: Path, result: ExportResult) -> None:
        self.root = root
        self.result = result
        self.db = sqlite3.connect("")  # a private temp database, deleted on close
        self.db.executescript(_SCHEMA)

    def close(self) -> None:
        self.db.close()

    def add_top(self, ref: str, digests: Sequence[Digest]) -> str:
        """Plan the first complete of a reference's manifests; return why none is ("" if ok)."""
        why = "no manifest for it in the cache"
        for i, digest in enumerate(digests):
            verdict = self._judge(digest, 0)
            if verdict.ok:
                self.db.execute(
                    "INSERT OR REPLACE INTO tops VALUES (?, ?, ?, ?)",
                    (ref, str(digest), verdict.media_type, verdict.size),
                )
                return ""
            if i == 0:
                why = verdict.why
        return why

    def _judge(self, digest: Digest, depth: int) -> _Verdict:
        """Whether a manifest is completely cached; once per digest, planned if so."""
        row = self.db.execute(
            "SELECT ok, media_type, size, why FROM verdicts WHERE digest = ?", (str(digest),)
        ).fetchone()
        if row is not None:
            return _Verdict(bool(row[0]), row[1], row[2], row[3])
        verdict = self._check(digest, depth)
        self.db.execute(
            "INSERT INTO verdicts VALUES (?, ?, ?, ?, ?)",
            (str(digest), int(verdict.ok), verdict.media_type, verdict.size, verdict.why),
        )
        return verdict

    def _check(self, digest: Digest, depth: int) -> _Verdict:
        got = read_manifest(self.root, digest)
        if got is None:
            return _Verdict(False, "", 0, f"manifest {digest} is not in the cache")
        media_type, body = got
        try:
            doc = json.loads(body)
            children, blobs = references(doc if isinstance(doc, dict) else {}, str(digest))
        except (ValueError, BundleError):
            return _Verdict(False, media_type, len(body), f"manifest {digest} is not valid")
        sizes = []
        for blob in blobs:
            try:
                size = content_path(self.root, BLOB, str(blob.digest)).stat().st_size
            except OSError:
                return _Verdict(False, media_type, len(body), f"blob {blob.digest} is not cached")
            if size != blob.size:
                return _Verdict(False, media_type, len(body), f"blob {blob.digest} is incomplete")
            sizes.append((str(blob.digest), size))
        kept = 0
        for child in children:
            if depth < MAX_NESTING and self._judge(child.digest, depth + 1).ok:
                kept += 1
            else:
                self.result.platforms_left_out[_platform(doc, child.digest)] += 1
        if children and not kept:
            why = "none of its platform manifests is in the cache"
            return _Verdict(False, media_type, len(body), why)
        self.db.executemany("INSERT OR IGNORE INTO blobs VALUES (?, ?)", sizes)
        self.db.execute("INSERT OR IGNORE INTO manifests VALUES (?, ?)", (str(digest), len(body)))
        return _Verdict(True, media_type, len(body), "")

    def add_referrers(self, records: Iterable[ReferrersRecord]) -> None:
        """Plan the referrers (signatures, SBOMs) of exported manifests whose every
        referrer is cached, so they travel with their images."""
        for rec in records:
            planned = self.db.execute(
                "SELECT 1 FROM manifests WHERE digest = ?", (rec.subject,)
            ).fetchone()
            if planned is None:
                continue
            try:
                digest = parse_digest(rec.digest)
            except RegistryError:
                continue
            got = read_manifest(self.root, digest)
            if got is None:
                continue
            try:
                doc = json.loads(got[1])
                children, _ = references(doc if isinstance(doc, dict) else {}, rec.digest)
            except (ValueError, BundleError):
                continue
            if not children:
                continue  # nothing refers to it: offline, the tag fallback says so too
            subject = f"{rec.namespace}/{rec.repository}@{rec.subject}"
            missing = [c for c in children if not self._judge(c.digest, 1).ok]
            if missing:
                self.result.left_out.append(
                    f"referrers of {subject}: {len(missing)} of them are not in the cache"
                )
                continue
            self.db.execute(
                "INSERT OR IGNORE INTO manifests VALUES (?, ?)", (rec.digest, len(got[1]))
            )
            self.db.execute(
                "INSERT OR REPLACE INTO referrers VALUES (?, ?, ?)",
                (subject, rec.digest, len(got[1])),
            )

    def count(self) -> None:
        """Fill in the result's totals."""
        r, q = self.result, self.db.execute
        r.tags, r.images = q("SELECT count(*), count(DISTINCT digest) FROM tops").fetchone()
        r.manifests = q("SELECT count(*) FROM manifests").fetchone()[0]
        r.blobs, r.blob_bytes = q("SELECT count(*), coalesce(sum(size), 0) FROM blobs").fetchone()
        r.referrers = q("SELECT count(*) FROM referrers").fetchone()[0]

    def content(self) -> Iterator[tuple[Digest, int, bool]]:
        """(digest, size, is a manifest) of every member to write, in digest order."""
        rows = self.db.execute(
            "SELECT digest, size, 1 FROM manifests UNION ALL "
            "SELECT digest, size, 0 FROM blobs WHERE digest NOT IN (SELECT digest FROM manifests) "
            "ORDER BY 1"
        )
        for digest, size, is_manifest in rows:
            yield parse_digest(digest), size, bool(is_manifest)

    def algorithms(self) -> list[str]:
        rows = self.db.execute(
            "SELECT DISTINCT substr(digest, 1, instr(digest, ':') - 1) FROM "
            "(SELECT digest FROM manifests UNION SELECT digest FROM blobs) ORDER BY 1"
        )
        return [alg for (alg,) in rows]

    def entries(self) -> Iterator[dict[str, Any]]:
        """One ``index.json`` entry per planned reference, in reference order, then
        one per referrers index (named by its subject, not by a reference)."""
        yield from self._tag_entries()
        for subject, digest, size in self.db.execute(
            "SELECT subject, digest, size FROM referrers ORDER BY subject"
        ):
            yield {
                "mediaType": OCI_INDEX,
                "digest": digest,
                "size": size,
                "annotations": {REFERRERS: subject},
            }

    def _tag_entries(self) -> Iterator[dict[str, Any]]:
        for ref, digest, media_type, size in self.db.execute(
            "SELECT ref, digest, media_type, size FROM tops ORDER BY ref"
        ):
            yield {
                "mediaType": media_type,
                "digest": digest,
                "size": size,
                "annotations": {REF_NAME: ref, CONTAINERD_NAME: ref},
            }


def _platform(index_doc: dict[str, Any], digest: Digest) -> str:
    """The ``os/arch`` an index gives a child manifest ("unknown" if it gives none)."""
    manifests = index_doc.get("manifests")
    for d in manifests if isinstance(manifests, list) else []:
        if isinstance(d, dict) and d.get("digest") == str(digest):
            p = d.get("platform")
            if isinstance(p, dict):
                return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if k in p)
    return "unknown"


def read_manifest(root: Path, digest: Digest) -> tuple[str, bytes] | None:
    """A cached manifest's (media type, body), if present and intact."""
    try:
        raw = content_path(root, MANIFEST, str(digest)).read_bytes()
    except OSError:
        return None
    media_type, sep, body = raw.partition(b"\n")
    kind = media_type.decode(errors="replace")
    if not sep or manifest_digest(body, kind, digest.algorithm) != digest:
        return None
    return kind, body
