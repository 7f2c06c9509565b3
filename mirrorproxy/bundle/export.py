"""``mirrorproxy export``: cached images (or a chosen list) to a bundle tar.

Reads the cache only through its files (tag records, manifests, blobs) and never
writes to it, so it runs beside a serving mirror. Memory does not grow with the
number of tags: the plan (which tags, manifests and blobs go in) lives in a private
temporary SQLite database, each manifest is judged once however many tags point at
it, and the index documents are written page by page (see ``mirrorproxy.bundle``).
Blobs are streamed from their cache files into the tar and hashed on the way; the
tar is written to a temp file next to ``--out`` and renamed only when complete.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import sqlite3
import tarfile
import uuid
from collections import Counter
from collections.abc import Iterable, Iterator, Sequence
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
    MAX_PAGE_DEPTH,
    PAGE,
    PAGE_BYTES,
    PAGE_ENTRIES,
    PAGE_VALUE,
    REF_NAME,
    REFERRERS,
    BundleError,
    member_name,
    references,
)
from mirrorproxy.cache.index import BLOB, MANIFEST
from mirrorproxy.cache.walk import (
    ReferrersRecord,
    TagRecord,
    content_path,
    referrers_records,
    tag_records,
)
from mirrorproxy.core.errors import RegistryError
from mirrorproxy.core.oci import DOCKER_LIST, OCI_INDEX, Digest, manifest_digest, parse_digest
from mirrorproxy.core.reference import ImageRef
from mirrorproxy.core.units import format_size

MAX_NESTING = 4  # index -> manifest levels followed inside one image


@dataclass(slots=True)
class ExportResult:
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


class _Plan:
    """What goes into the bundle, kept on disk so memory stays flat at any tag count."""

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
        got = _read_manifest(self.root, digest)
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
            got = _read_manifest(self.root, digest)
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


def export_bundle(
    root: Path,
    out: Path,
    images: Sequence[ImageRef] | None,
    *,
    keep_going: bool = False,
    page_entries: int = PAGE_ENTRIES,
) -> ExportResult:
    """Write the bundle to ``out`` (via a temp file next to it and a rename).

    Args:
        root: the cache directory.
        out: the tar to write; replaced only when complete.
        images: exactly these references; None for every cached tag.
        keep_going: leave out (and report) requested images that are not completely
            cached instead of refusing.
        page_entries: tags per index document (see ``mirrorproxy.bundle``).

    Returns:
        What went into the bundle and what was left out.

    Raises:
        BundleError: a requested image is not (completely) cached (without
            ``keep_going``), or a cache file is corrupt or vanished meanwhile;
            ``out`` is untouched.
        OSError: ``out`` could not be written.
    """
    if not root.is_dir():
        raise BundleError(f"no cache at {root}")
    result = ExportResult()
    plan = _Plan(root, result)
    try:
        if images is None:
            for rec in tag_records(root):
                ref = f"{rec.namespace}/{rec.repository}:{rec.tag}"
                why = plan.add_top(ref, _candidates(rec))
                if why:
                    result.left_out.append(f"{ref}: {why}")
        else:
            _plan_images(root, plan, images, result)
            if result.left_out and not keep_going:
                shown = "; ".join(result.left_out[:5])
                more = len(result.left_out) - 5
                tail = f"; and {more} more" if more > 0 else ""
                raise BundleError(f"not completely in the cache: {shown}{tail}")
        plan.add_referrers(referrers_records(root))
        plan.count()
        _write(root, out, plan, page_entries)
    finally:
        plan.close()
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
) -> None:
    """Plan each requested image; note those not completely in the cache."""
    wanted = {(i.registry, i.repository, i.tag or "latest") for i in images if i.digest is None}
    found: dict[tuple[str, str, str], list[Digest]] = {}
    if wanted:
        for rec in tag_records(root):
            key = (rec.namespace, rec.repository, rec.tag)
            if key in wanted:
                found[key] = _candidates(rec)
    for image in images:
        if image.digest is not None:
            digests = [image.digest]
        else:
            digests = found.get((image.registry, image.repository, image.tag or "latest"), [])
        why = plan.add_top(str(image), digests) if digests else "the tag is not in the cache"
        if why:
            result.left_out.append(f"{image}: {why}")


def _platform(index_doc: dict[str, Any], digest: Digest) -> str:
    """The ``os/arch`` an index gives a child manifest ("unknown" if it gives none)."""
    manifests = index_doc.get("manifests")
    for d in manifests if isinstance(manifests, list) else []:
        if isinstance(d, dict) and d.get("digest") == str(digest):
            p = d.get("platform")
            if isinstance(p, dict):
                return "/".join(str(p[k]) for k in ("os", "architecture", "variant") if k in p)
    return "unknown"


def _read_manifest(root: Path, digest: Digest) -> tuple[str, bytes] | None:
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


def _write(root: Path, out: Path, plan: _Plan, page_entries: int) -> None:
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


def _index_entries(tar: tarfile.TarFile, plan: _Plan, page_entries: int) -> list[dict[str, Any]]:
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
    got = _read_manifest(root, digest)
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


def describe(result: ExportResult, out: Path, *, shown: int = 20) -> tuple[list[str], list[str]]:
    """(report lines, warning lines) telling what was exported and what was left out, why."""
    pages = f"; tags in {result.pages} nested indexes" if result.pages else ""
    lines = [
        f"exported {result.tags} tags ({result.images} images) to {out}: {result.blobs} blobs "
        f"({format_size(result.blob_bytes)}), {result.manifests} manifests{pages}"
    ]
    platforms = result.platforms_left_out
    if platforms:
        n = sum(platforms.values())
        which = ", ".join(f"{p} x{c}" for p, c in sorted(platforms.items()))
        lines.append(
            f"left out {n} platform manifests of multi-platform images ({which}): not in the "
            "cache (preload fetches only the platforms it is given)"
        )
    warnings = [f"{line}, left out" for line in result.left_out[:shown]]
    if len(result.left_out) > shown:
        warnings.append(f"... and {len(result.left_out) - shown} more references left out")
    if result.referrers:
        lines.append(f"with the referrers (signatures, SBOMs) of {result.referrers} manifests")
    if result.left_out:
        lines.append(f"left out {len(result.left_out)} references not completely in the cache")
    return lines, warnings
