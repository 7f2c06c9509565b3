"""The S3 ``ManifestStore``: manifests, tag records and referrers records as objects.

Manifests live at ``<prefix>manifests/<alg>/<hex>`` and are verified on every
read. A tag keeps one small object per Accept key
(``tags/<ns>/<repo>/<tag>/<accept>``, each part percent-encoded), so members
recording different Accept keys of one tag never overwrite each other's; a
referrers record is ``referrers/<ns>/<repo>/<alg>/<hex>``. A PUT is atomic, so a
reader sees a whole object or none.

Hot manifests are kept in memory like the filesystem store's (``[cache]
memory_manifests``), so they are served without a request, even while the bucket
is down. A tag record read or written is trusted for ``TAG_RECHECK`` seconds (other
members and ``import`` write them too), and served as last known while the bucket
cannot be asked; its ``fetched`` time still decides freshness, as on disk.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator
from urllib.parse import quote, unquote

from mirrorproxy.cache import (
    MANIFEST,
    ReferrersRecord,
    StoredManifest,
    StoreUnavailable,
    TagEntry,
    TagKey,
    TagRecord,
)
from mirrorproxy.cache.hotset import HotManifests, RecentTags
from mirrorproxy.cache.records import entry_from, entry_json
from mirrorproxy.cache.s3client import S3Connection
from mirrorproxy.cache.s3content import S3Content
from mirrorproxy.core.oci import Digest, parse_digest

TAG_RECHECK = 1.0  # seconds a remembered tag record is trusted without asking the bucket


def _q(part: str) -> str:
    return quote(part, safe="")


class S3ManifestStore(S3Content):
    """Manifests (stored as a media-type line, then the body) and records in a bucket."""

    kind = MANIFEST

    def __init__(self, conn: S3Connection, *, memory_bytes: int = 64 * 1024 * 1024) -> None:
        super().__init__(conn)
        self._hot = HotManifests(memory_bytes)
        self._tags = RecentTags(fresh=TAG_RECHECK)

    def prepare(self) -> None:
        self.conn.run(self.conn.check_bucket())

    # -- manifests ----------------------------------------------------------------------

    async def _read(self, digest: Digest) -> StoredManifest | None:
        raw = await self.conn.get_bytes(self.key_of(digest))
        if raw is None:
            return None
        media_type, sep, body = raw.partition(b"\n")
        if not sep or _hex(digest, body) != digest.hex:
            return None
        return StoredManifest(digest, media_type.decode("utf-8", "replace"), body)

    async def get(self, digest: Digest) -> StoredManifest | None:
        hot = self._hot.get(digest)
        if hot is not None:
            return hot
        found = await self.conn.call(self._read(digest))
        if found is None:
            await self.conn.call(self._drop_damaged(digest))
        else:
            self._hot.remember(found)
        return found

    async def _drop_damaged(self, digest: Digest) -> None:
        if await self.conn.head(self.key_of(digest)) is not None:
            await self.conn.delete(self.key_of(digest))

    def load(self, digest: Digest) -> StoredManifest | None:
        return self.conn.run(self._read(digest))

    def check(self, digest: Digest) -> bool | None:
        if self.conn.run(self.conn.head(self.key_of(digest))) is None:
            return None
        return self.load(digest) is not None

    async def _put(self, manifest: StoredManifest) -> int:
        data = manifest.media_type.encode() + b"\n" + manifest.body
        await self.conn.put_bytes(self.key_of(manifest.digest), data)
        return len(data)

    async def put(self, manifest: StoredManifest) -> int:
        size = await self.conn.call(self._put(manifest))
        self._hot.remember(manifest)
        return size

    def delete(self, digest: Digest) -> bool:
        self._hot.forget(digest)
        return super().delete(digest)

    def quarantine(self, digest: Digest) -> str:
        self._hot.forget(digest)
        return super().quarantine(digest)

    def put_many(self, manifests: Iterable[StoredManifest]) -> list[int]:
        return [self.conn.run(self._put(m)) for m in manifests]

    # -- tag records --------------------------------------------------------------------

    def _tag_dir(self, ns: str, repo: str, tag: str) -> str:
        return self.conn.key("tags", _q(ns), _q(repo), _q(tag)) + "/"

    async def _get_tag(self, ns: str, repo: str, tag: str) -> dict[str, TagEntry]:
        under = self._tag_dir(ns, repo, tag)
        out: dict[str, TagEntry] = {}
        for key, _, _ in await self.conn.listing(under):
            raw = await self.conn.get_bytes(key)
            if raw is not None:
                out[unquote(key[len(under) :])] = entry_from(json.loads(raw))
        return out

    async def get_tag(self, ns: str, repo: str, tag: str) -> dict[str, TagEntry]:
        key = (ns, repo, tag)
        known = self._tags.get(key)
        if known is not None:
            return known
        try:
            entries = await self.conn.call(self._get_tag(ns, repo, tag))
        except StoreUnavailable:
            last = self._tags.get(key, stale=True)
            if last is None:
                raise
            return last  # the bucket is down: what was last known, judged by its age
        if entries:  # no negative caching: another member may write it any time
            self._tags.remember(key, entries)
        return entries

    async def _put_tag(self, ns: str, repo: str, tag: str, accept: str, entry: TagEntry) -> None:
        key = self._tag_dir(ns, repo, tag) + _q(accept)
        await self.conn.put_bytes(key, json.dumps(entry_json(entry)).encode())

    async def put_tag(self, ns: str, repo: str, tag: str, accept: str, entry: TagEntry) -> None:
        key = (ns, repo, tag)
        known = self._tags.get(key, stale=True) or {}
        self._tags.remember(key, {**known, accept: entry})  # the answer holds anyway
        await self.conn.call(self._put_tag(ns, repo, tag, accept, entry))

    def put_tags(self, items: Iterable[tuple[TagKey, str, TagEntry]]) -> int:
        changed: set[TagKey] = set()
        known: dict[TagKey, dict[str, TagEntry]] = {}
        for key, accept, entry in items:
            if key not in known:
                known[key] = self.conn.run(self._get_tag(*key))
            if known[key].get(accept) != entry:
                self.conn.run(self._put_tag(*key, accept, entry))
                known[key][accept] = entry
                changed.add(key)
        return len(changed)

    def tag_records(self) -> Iterator[TagRecord]:
        under = self.conn.key("tags/")
        grouped: dict[TagKey, dict[str, TagEntry]] = {}
        for key, _, _ in self.conn.run(self.conn.listing(under)):
            parts = key[len(under) :].split("/")
            if len(parts) != 4:
                continue
            raw = self.conn.run(self.conn.get_bytes(key))
            if raw is None:
                continue
            ns, repo, tag, accept = (unquote(p) for p in parts)
            grouped.setdefault((ns, repo, tag), {})[accept] = entry_from(json.loads(raw))
        for (ns, repo, tag), entries in grouped.items():
            yield TagRecord(ns, repo, tag, entries)

    # -- referrers records --------------------------------------------------------------

    def _referrers_key(self, ns: str, repo: str, subject: Digest) -> str:
        return self.conn.key("referrers", _q(ns), _q(repo), subject.algorithm, subject.hex)

    async def _get_referrers(self, ns: str, repo: str, subject: Digest) -> TagEntry | None:
        raw = await self.conn.get_bytes(self._referrers_key(ns, repo, subject))
        return None if raw is None else entry_from(json.loads(raw))

    async def get_referrers(self, ns: str, repo: str, subject: Digest) -> TagEntry | None:
        return await self.conn.call(self._get_referrers(ns, repo, subject))

    async def put_referrers(self, ns: str, repo: str, subject: Digest, entry: TagEntry) -> None:
        key = self._referrers_key(ns, repo, subject)
        data = json.dumps(entry_json(entry)).encode()
        await self.conn.call(self.conn.put_bytes(key, data))

    def referrers_records(self) -> Iterator[ReferrersRecord]:
        under = self.conn.key("referrers/")
        for key, _, _ in self.conn.run(self.conn.listing(under)):
            parts = key[len(under) :].split("/")
            if len(parts) != 4:
                continue
            raw = self.conn.run(self.conn.get_bytes(key))
            if raw is None:
                continue
            try:
                subject = parse_digest(f"{parts[2]}:{parts[3]}")
            except ValueError:
                continue
            entry = entry_from(json.loads(raw))
            yield ReferrersRecord(unquote(parts[0]), unquote(parts[1]), subject, entry)


def _hex(digest: Digest, body: bytes) -> str:
    h = digest.hasher()
    h.update(body)
    return h.hexdigest()
