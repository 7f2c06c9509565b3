"""Pull-through policy: the only module that knows both the cache and the upstreams.

- Digests (manifests and blobs) are local-first: immutable, so a cached copy is
  always right. A miss is fetched, verified against the digest, and stored.
- Tags are remote-first once stale: fresh for ``tag_ttl``, then revalidated with a
  HEAD; when every upstream fails, the last known answer is served, marked stale.
- Concurrent misses for the same thing share one upstream request.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from functools import partial
from typing import TypeVar

from yarl import URL

from mirrorproxy.cache import BlobInfo, BlobStore, ManifestStore, StoredManifest, TagEntry
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.index import BLOB, MANIFEST
from mirrorproxy.config import Config, Namespace
from mirrorproxy.core.errors import (
    BadGateway,
    BlobUnknown,
    ManifestInvalid,
    ManifestUnknown,
    NameUnknown,
    NotFound,
    RangeNotSatisfiable,
    ResumeRefused,
    Unavailable,
)
from mirrorproxy.core.oci import (
    MANIFEST_TYPES,
    OCI_INDEX,
    Digest,
    accept_types,
    manifest_digest,
    manifest_media_type,
    parse_digest,
    same_variant,
)
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.corruption import CorruptBlobs
from mirrorproxy.pullthrough.fill import BlobFill
from mirrorproxy.pullthrough.followers import FillTuning
from mirrorproxy.pullthrough.isolation import Isolation
from mirrorproxy.upstream.client import (
    TooLarge,
    UpstreamClient,
    UpstreamError,
    UpstreamResponse,
)

logger = logging.getLogger(__name__)

T = TypeVar("T")

HIT, MISS, STALE = "hit", "miss", "stale"
OFFLINE = "the mirror is offline"
SHUTDOWN_GRACE = 10.0  # seconds running downloads get to finish when the server stops


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request points: the namespace serving it and the repository."""

    ns: Namespace
    ns_name: str  # the registry the client asked for (ns=), may differ under a wildcard
    repo: str


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    manifest: StoredManifest
    result: str  # hit, miss or stale
    upstream: str | None = None  # URL of the endpoint that answered, when one was asked


@dataclass(frozen=True, slots=True)
class BlobAnswer:
    """A cached file to sendfile, or a download: followed if ``fill.caching``, else
    streamed through (``PullThrough.stream_through``)."""

    size: int | None
    info: BlobInfo | None = None
    fill: BlobFill | None = None


@dataclass(frozen=True, slots=True)
class BlobHead:
    """What a HEAD learns: the size, and where it came from (for the access log)."""

    size: int | None
    result: str  # HIT or MISS
    upstream: str | None = None  # the endpoint asked, on a MISS


class PullThrough:
    def __init__(
        self,
        config: Config,
        *,
        blobs: BlobStore,
        manifests: ManifestStore,
        budget: CacheBudget,
        client: UpstreamClient,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self.budget = budget
        self._blobs = blobs
        self._manifests = manifests
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._fills: dict[Digest, BlobFill] = {}  # the download a request joins, by digest
        # Every download until its task ends: a failed one leaves ``_fills`` at once
        # (new requests start afresh) but still cleans up for a moment.
        self._running: set[BlobFill] = set()
        self._pending: dict[tuple[object, ...], asyncio.Future[object]] = {}
        self._isolation = Isolation(config, client=client, budget=budget, metrics=metrics)
        self.corrupt = CorruptBlobs()  # recent digest mismatches (replaceable in tests)
        self.fill_tuning = FillTuning()  # how downloads share bytes (replaceable in tests)

    async def settled(self) -> None:
        """Wait until every running download is in place (or failed and cleaned up)."""
        while self._running:
            tasks = [fill.task for fill in list(self._running)]
            await asyncio.gather(*tasks, return_exceptions=True)

    async def close(self) -> None:
        await finish_fills(list(self._running), grace=SHUTDOWN_GRACE)

    def _count(self, t: Target, kind: str, result: str) -> None:
        self._metrics.child(self._metrics.cache_requests, t.ns.name, kind, result).inc()

    # -- manifests ---------------------------------------------------------------

    async def manifest(self, t: Target, ref: str | Digest, accept: str | None) -> ManifestAnswer:
        """Answer a manifest request by tag or digest.

        Raises:
            ManifestUnknown: no upstream has it (and no stale copy exists for a tag).
            RegistryError: upstreams failed in another way.
        """
        if isinstance(ref, Digest):
            answer = await self._manifest_by_digest(t, ref, accept)
        else:
            answer = await self._manifest_by_tag(t, ref, accept)
        self._count(t, "manifest", answer.result)
        return answer

    async def _manifest_by_digest(
        self, t: Target, digest: Digest, accept: str | None
    ) -> ManifestAnswer:
        cached = await self._manifests.get(digest)
        if cached is not None:
            await self._isolation.check(t, MANIFEST, digest)  # cached via a private namespace?
            self.budget.touch(MANIFEST, digest)
            return ManifestAnswer(cached, HIT)
        if self._config.cache.offline:
            raise ManifestUnknown(f"manifest {t.repo}@{digest} is not cached and {OFFLINE}")
        # Ask for every manifest type: content by digest is fixed, and some
        # registries refuse an index to a client whose Accept lacks it.
        wanted = ", ".join(dict.fromkeys([*accept_types(accept), *MANIFEST_TYPES]))
        try:
            answer = await self._coalesce(
                ("m", t.ns_name, t.repo, digest),
                lambda: self._fetch_by_digest(t, digest, wanted),
            )
        except UpstreamError as err:
            raise err.registry_error(ManifestUnknown) from None
        return answer

    async def _fetch_by_digest(self, t: Target, digest: Digest, accept: str) -> ManifestAnswer:
        """Fetch by digest; a wrong body cools its endpoint down and the next one is asked."""
        for attempt in range(len(t.ns.upstreams)):
            try:
                return await self._fetch_manifest(t, str(digest), accept, digest)
            except _WrongDigest:
                if attempt == len(t.ns.upstreams) - 1:
                    raise
        raise AssertionError("unreachable")  # pragma: no cover

    async def _manifest_by_tag(self, t: Target, tag: str, accept: str | None) -> ManifestAnswer:
        key = ",".join(accept_types(accept))
        entries = await self._manifests.get_tag(t.ns_name, t.repo, tag)
        entry = entries.get(key)
        cached = await self._manifests.get(entry.digest) if entry is not None else None
        fresh = entry is not None and self._clock() - entry.fetched < t.ns.tag_ttl
        if cached is not None and fresh:
            self.budget.touch(MANIFEST, cached.digest)
            return ManifestAnswer(cached, HIT)
        if self._config.cache.offline:
            stale = await self._stale(entries, key, accept)
            if stale is None:
                raise ManifestUnknown(f"manifest {t.repo}:{tag} is not cached and {OFFLINE}")
            return ManifestAnswer(stale, STALE)
        try:
            return await self._coalesce(
                ("t", t.ns_name, t.repo, tag, key),
                lambda: self._refresh_tag(t, tag, accept, key, cached),
            )
        except UpstreamError as err:
            # Only an outage may be bridged with the last answer: a registry that
            # answered (404, 400 for this Accept, ...) has said what is true now.
            stale = await self._stale(entries, key, accept) if err.outage else None
            if stale is None:
                raise err.registry_error(ManifestUnknown) from None
            logger.warning("serving stale %s/%s:%s: %s", t.ns_name, t.repo, tag, err)
            return ManifestAnswer(stale, STALE)

    async def _refresh_tag(
        self, t: Target, tag: str, accept: str | None, key: str, cached: StoredManifest | None
    ) -> ManifestAnswer:
        """Revalidate a known tag with a HEAD, or fetch it; update the tag record."""
        path = f"{t.repo}/manifests/{tag}"
        headers = {"Accept": accept} if accept else {}
        resp: UpstreamResponse | None = None
        if cached is not None:
            try:
                resp = await self._client.open(
                    t.ns,
                    t.ns_name,
                    "HEAD",
                    path,
                    what=f"manifest {t.repo}:{tag}",
                    headers=headers,
                )
            except UpstreamError as err:
                if not _refused_head(err):
                    raise
                resp = None  # an upstream that refuses HEAD (405, say): ask with GET
        if cached is not None and resp is not None:
            resp.release()  # HEAD: no body
            upstream_digest = resp.headers.get("Docker-Content-Digest", "")
            if upstream_digest == str(cached.digest):
                await self._remember_tag(t, tag, key, cached)
                return ManifestAnswer(cached, HIT, resp.upstream.url)
        answer = await self._fetch_manifest(t, tag, accept, None)
        await self._remember_tag(t, tag, key, answer.manifest)
        return answer

    async def _remember_tag(self, t: Target, tag: str, key: str, m: StoredManifest) -> None:
        entry = TagEntry(m.digest, m.media_type, len(m.body), self._clock())
        try:
            await self._manifests.put_tag(t.ns_name, t.repo, tag, key, entry)
        except OSError as err:  # kept in memory; the answer does not depend on the disk
            self._metrics.cache_write_errors.inc()
            logger.error("cannot record tag %s/%s:%s: %s", t.ns_name, t.repo, tag, err)

    async def _stale(
        self, entries: Mapping[str, TagEntry], key: str, accept: str | None
    ) -> StoredManifest | None:
        """The last answer for this Accept set, else one given to a client that asked
        for the same variant (see ``oci.same_variant``), newest first."""
        accepted = accept_types(accept)
        ordered = [entries[key]] if key in entries else []
        ordered += sorted(
            (
                e
                for k, e in entries.items()
                if k != key and same_variant(tuple(k.split(",")), e.media_type, accepted)
            ),
            key=lambda e: -e.fetched,
        )
        for entry in ordered:
            manifest = await self._manifests.get(entry.digest)
            if manifest is not None:
                return manifest
        return None

    async def _fetch_manifest(
        self, t: Target, ref: str, accept: str | None, expect: Digest | None
    ) -> ManifestAnswer:
        """GET a manifest upstream, check size and digest, store it (a miss)."""
        what = f"manifest {t.repo}:{ref}" if expect is None else f"manifest {t.repo}@{ref}"
        try:
            resp = await self._client.fetch(
                t.ns,
                t.ns_name,
                f"{t.repo}/manifests/{ref}",
                what=what,
                limit=self._config.cache.max_manifest_size,
                headers={"Accept": accept} if accept else {},
            )
        except TooLarge as err:
            raise ManifestInvalid(str(err)) from None
        body = resp.body
        header_digest = resp.headers.get("Docker-Content-Digest")
        media_type = manifest_media_type(body, resp.headers.get("Content-Type"))
        if expect is not None:
            digest = manifest_digest(body, media_type, expect.algorithm)
            if digest != expect:
                self._metrics.digest_mismatches.labels(t.ns.name).inc()
                self._client.mark_failed(t.ns, resp.upstream)
                raise _WrongDigest(f"{resp.upstream.url} sent a {what} with digest {digest}")
        else:
            digest = manifest_digest(body, media_type)
            if (
                header_digest
                and header_digest.startswith("sha256:")
                and header_digest != str(digest)
            ):
                raise BadGateway(
                    f"{resp.upstream.url} sent a {what} whose digest {digest} differs "
                    f"from its Docker-Content-Digest {header_digest}"
                )
            if header_digest and header_digest.startswith("sha512:"):
                sha512 = parse_digest(header_digest)
                if manifest_digest(body, media_type, "sha512") == sha512:
                    digest = sha512
        manifest = StoredManifest(digest, media_type, body)
        try:
            stored = await self._manifests.put(manifest)
            self.budget.committed(MANIFEST, digest, stored, t.ns_name)
        except OSError as err:
            self._metrics.cache_write_errors.inc()
            logger.error("cannot cache %s: %s", what, err)
        return ManifestAnswer(manifest, MISS, resp.upstream.url)

    # -- blobs -------------------------------------------------------------------

    async def blob(self, t: Target, digest: Digest, *, first_byte: int = 0) -> BlobAnswer:
        """A cached blob, or a download shared with every other client asking for it.

        Args:
            first_byte: where the client's range starts (0: the whole blob).

        Raises:
            ResumeRefused: a resume into a blob whose download failed verification
                a moment ago (the bytes the client holds may be corrupt).
            BlobUnknown: no upstream has it.
            RegistryError: upstreams failed in another way.
        """
        ago = self.corrupt.refused_resume(digest, first_byte)
        if ago is not None:
            raise ResumeRefused(
                f"not resuming blob {digest} at byte {first_byte}: a download of it failed"
                f" verification {ago:.0f}s ago, so the bytes before it may be corrupt;"
                " fetch it again from byte 0"
            )
        info = await self._blobs.lookup(digest)
        if info is not None:
            await self._isolation.check(t, BLOB, digest)  # cached via a private namespace?
            self._count(t, "blob", HIT)
            self.budget.touch(BLOB, digest)
            return BlobAnswer(info.size, info=info)
        if self._config.cache.offline:
            raise BlobUnknown(f"blob {digest} is not cached and {OFFLINE}")
        fill = await self._fill(t, digest)
        self._count(t, "blob", MISS)
        return BlobAnswer(fill.size, fill=fill)

    async def _fill(self, t: Target, digest: Digest) -> BlobFill:
        """The running download of ``digest`` for this namespace, or a new one; once ready."""
        fill = self._fills.get(digest)
        while fill is not None and (fill.ns_name, fill.repo) != (t.ns_name, t.repo):
            # Bytes are shared across repositories (they are verified by digest), but
            # not failures: another namespace's upstreams may lack what ours have.
            await self._isolation.check(t, BLOB, digest, origin=fill.ns_name)
            try:
                await asyncio.shield(fill.ready)
                break
            except Exception:
                newer = self._fills.get(digest)  # another waiter may have started one
                fill = newer if newer is not fill else None
        if fill is None:
            fill = BlobFill(
                ns=t.ns,
                ns_name=t.ns_name,
                repo=t.repo,
                digest=digest,
                client=self._client,
                store=self._blobs,
                budget=self.budget,
                metrics=self._metrics,
                corrupt=self.corrupt,
                tuning=self.fill_tuning,
                on_done=self._fill_done,
            )
            self._fills[digest] = fill
            self._running.add(fill)
            fill.task.add_done_callback(partial(_discard, self._running, fill))
        await asyncio.shield(fill.ready)
        return fill

    async def stream_through(
        self, t: Target, digest: Digest, fill: BlobFill | None, rng: tuple[int, int] | None
    ) -> UpstreamResponse:
        """An uncached blob (no room, no writable disk), straight from upstream.

        The response the download got is used for the whole blob; a range is asked
        of the upstream itself. The caller reads and releases the response.

        Raises:
            RangeNotSatisfiable: the upstream refused the range.
            BlobUnknown: no upstream has it.
        """
        if fill is not None:
            resp = fill.claim_direct()
            if resp is not None and rng is None:
                return resp
            if resp is not None:
                resp.close()  # the whole blob from byte 0: not what this client wants
        start, end = rng if rng is not None else (0, None)
        try:
            return await self._client.open(
                t.ns,
                t.ns_name,
                "GET",
                f"{t.repo}/blobs/{digest}",
                what=f"blob {digest}",
                stream=True,
                start=start,
                end=end,
                avoid=self.corrupt.avoid(digest),
            )
        except UpstreamError as err:
            if any(a.status == 416 for a in err.attempts):
                raise RangeNotSatisfiable(
                    f"upstreams refused the range of blob {digest}"
                ) from None
            raise err.registry_error(BlobUnknown) from None

    def stream_verified(self, t: Target, resp: UpstreamResponse) -> None:
        """A blob streamed through from ``resp`` matched its digest."""
        self._client.mark_verified(t.ns, resp.upstream)

    def stream_failed_verification(
        self, t: Target, digest: Digest, resp: UpstreamResponse
    ) -> None:
        """A blob streamed through from ``resp`` did not match: as for a download."""
        self._metrics.digest_mismatches.labels(t.ns.name).inc()
        self._client.mark_failed(t.ns, resp.upstream, corrupt=True)
        self.corrupt.record(digest, [resp.upstream.url])
        logger.error(
            "blob %s streamed through from %s failed verification", digest, resp.upstream.url
        )

    def _fill_done(self, fill: BlobFill) -> None:
        if self._fills.get(fill.digest) is fill:
            del self._fills[fill.digest]

    async def blob_head(self, t: Target, digest: Digest) -> BlobHead:
        """Size for a HEAD: from the cache, a running fill, or the upstream.

        An upstream HEAD without a length is asked for the first byte instead (its
        Content-Range states the total); failing that, the blob is downloaded.
        """
        info = await self._blobs.lookup(digest)
        if info is not None:
            await self._isolation.check(t, BLOB, digest)  # cached via a private namespace?
            self._count(t, "blob", HIT)
            return BlobHead(info.size, HIT)
        fill = self._fills.get(digest)
        ready = fill is not None and fill.ready.done() and not fill.ready.exception()
        if fill is not None and ready and fill.size is not None:
            await self._isolation.check(t, BLOB, digest, origin=fill.ns_name)
            return BlobHead(fill.size, MISS, fill.upstream)
        if self._config.cache.offline:
            raise BlobUnknown(f"blob {digest} is not cached and {OFFLINE}")
        path, what = f"{t.repo}/blobs/{digest}", f"blob {digest}"
        try:
            resp = await self._client.open(t.ns, t.ns_name, "HEAD", path, what=what)
        except UpstreamError as err:
            raise err.registry_error(BlobUnknown) from None
        resp.release()
        if resp.content_length is not None:
            return BlobHead(resp.content_length, MISS, resp.upstream.url)
        size = await self._probe_size(t, digest)
        return BlobHead(size, MISS, resp.upstream.url)

    async def _probe_size(self, t: Target, digest: Digest) -> int:
        """The size of a blob whose upstream HEAD did not say: a one-byte range, else
        the whole download.

        Raises:
            BadGateway: the size could not be learnt.
        """
        path, what = f"{t.repo}/blobs/{digest}", f"blob {digest}"
        try:
            resp = await self._client.open(
                t.ns, t.ns_name, "GET", path, what=what, stream=True, start=0, end=0
            )
        except UpstreamError:
            pass
        else:
            total = _range_total(resp.headers.get("Content-Range"))
            resp.close()  # one byte at most was asked for; never reuse a half-read body
            if total is not None:
                return total
        fill = await self._fill(t, digest)
        await asyncio.wait({fill.task})
        if fill.result is not None:
            return fill.result.size
        raise BadGateway(f"no upstream states the size of {what}")

    # -- referrers ---------------------------------------------------------------

    async def referrers(self, t: Target, subject: Digest) -> ManifestAnswer:
        """The referrers index of ``subject``, cached like a tag (TTL, stale on outage).

        Raises:
            NotFound: no upstream offers the referrers API (clients then fall back to
                the ``sha256-<hex>`` tag scheme, which goes through as tags).
            RegistryError: upstreams failed and nothing is cached.
        """
        entry = await self._manifests.get_referrers(t.ns_name, t.repo, subject)
        cached = await self._manifests.get(entry.digest) if entry is not None else None
        fresh = entry is not None and self._clock() - entry.fetched < t.ns.tag_ttl
        if cached is not None and fresh:
            self._count(t, "referrers", HIT)
            return ManifestAnswer(cached, HIT)
        if self._config.cache.offline:
            if cached is None:
                raise NotFound(f"referrers of {t.repo}@{subject} are not cached and {OFFLINE}")
            self._count(t, "referrers", STALE)
            return ManifestAnswer(cached, STALE)
        try:
            answer = await self._coalesce(
                ("r", t.ns_name, t.repo, subject), lambda: self._fetch_referrers(t, subject)
            )
        except UpstreamError as err:
            if cached is None or not err.outage:
                if err.not_found:
                    raise NotFound(
                        f"no upstream of {t.ns_name} offers the referrers API",
                        {"upstreams": [str(a) for a in err.attempts]},
                    ) from None
                raise err.registry_error() from None
            logger.warning(
                "serving stale referrers of %s/%s@%s: %s", t.ns_name, t.repo, subject, err
            )
            answer = ManifestAnswer(cached, STALE)
        self._count(t, "referrers", answer.result)
        return answer

    async def _fetch_referrers(self, t: Target, subject: Digest) -> ManifestAnswer:
        """GET every page of the list upstream (bounded), merge, store as one index."""
        path = f"{t.repo}/referrers/{subject}"
        limit = self._config.cache.max_manifest_size
        descriptors: list[object] = []
        query: dict[str, str] = {}
        upstream = ""
        for _ in range(MAX_REFERRER_PAGES):
            try:
                resp = await self._client.fetch(
                    t.ns,
                    t.ns_name,
                    path,
                    what=f"referrers of {t.repo}@{subject}",
                    limit=limit,
                    headers={"Accept": OCI_INDEX},
                    query=query,
                )
            except TooLarge as err:
                raise BadGateway(str(err)) from None
            upstream = resp.upstream.url
            descriptors += _index_manifests(resp.body, upstream)
            query = _next_page(resp.headers.get("Link"))
            if not query:
                break
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        body = json.dumps(doc, separators=(",", ":")).encode()
        if len(body) > limit:
            raise BadGateway(f"referrers of {t.repo}@{subject} exceed {limit} bytes")
        manifest = StoredManifest(Digest.of(body), OCI_INDEX, body)
        try:
            stored = await self._manifests.put(manifest)
            self.budget.committed(MANIFEST, manifest.digest, stored, t.ns_name)
            entry = TagEntry(manifest.digest, OCI_INDEX, len(body), self._clock())
            await self._manifests.put_referrers(t.ns_name, t.repo, subject, entry)
        except OSError as err:
            self._metrics.cache_write_errors.inc()
            logger.error("cannot cache referrers of %s@%s: %s", t.repo, subject, err)
        return ManifestAnswer(manifest, MISS, upstream)

    # -- pass-through ------------------------------------------------------------

    async def tags_list(self, t: Target, params: Mapping[str, str]) -> TagList:
        """Tag listing is live data: passed through, never cached.

        ``params``: the checked ``n`` and ``last`` (``oci.parse_tags_query``).
        """
        if self._config.cache.offline:
            raise Unavailable(f"tag lists are not cached and {OFFLINE}")
        try:
            resp = await self._client.fetch(
                t.ns,
                t.ns_name,
                f"{t.repo}/tags/list",
                what=f"tags of {t.repo}",
                limit=self._config.cache.max_manifest_size,
                query=params,
            )
        except UpstreamError as err:
            raise err.registry_error(NameUnknown) from None
        except TooLarge as err:
            raise BadGateway(str(err)) from None
        return TagList(
            resp.body,
            resp.headers.get("Content-Type", "application/json"),
            _next_link(resp.headers.get("Link"), t),
        )

    async def _coalesce(self, key: tuple[object, ...], make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make`` once for concurrent callers with the same key; all share its outcome."""
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)  # type: ignore[arg-type]
        fut: asyncio.Future[object] = asyncio.get_running_loop().create_future()
        self._pending[key] = fut
        try:
            result = await make()
        except BaseException as err:
            # Followers get the failure, never the leader's own cancellation.
            shared = (
                err
                if not isinstance(err, asyncio.CancelledError)
                else Unavailable("the request fetching this was cancelled; try again")
            )
            fut.set_exception(shared)
            fut.exception()  # mark retrieved: followers may be none
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            del self._pending[key]


@dataclass(frozen=True, slots=True)
class TagList:
    body: bytes
    content_type: str
    link: str | None  # the next page, as a path on this mirror


def _next_link(header: str | None, t: Target) -> str | None:
    """Point an upstream's pagination Link at this mirror (same n/last, our ns)."""
    if not header or "<" not in header or ">" not in header:
        return None
    inner = header[header.index("<") + 1 : header.index(">")]
    try:
        upstream_query = URL(inner).query
    except ValueError:
        return None
    page = {k: upstream_query[k] for k in ("n", "last") if k in upstream_query}
    url = URL.build(path=f"/v2/{t.repo}/tags/list", query={**page, "ns": t.ns_name})
    return f'<{url}>; rel="next"'


MAX_REFERRER_PAGES = 10


def _index_manifests(body: bytes, upstream: str) -> list[object]:
    """The descriptors of an upstream's referrers page.

    Raises:
        BadGateway: the page is not an image index.
    """
    try:
        doc = json.loads(body)
    except ValueError:
        doc = None
    if not isinstance(doc, dict) or not isinstance(doc.get("manifests"), list):
        raise BadGateway(f"{upstream} sent a referrers answer that is not an image index")
    return list(doc["manifests"])


def _next_page(header: str | None) -> dict[str, str]:
    """The query of a ``Link: <...>; rel="next"`` (only the upstream's own paging keys)."""
    if not header or "<" not in header or ">" not in header:
        return {}
    try:
        upstream_query = URL(header[header.index("<") + 1 : header.index(">")]).query
    except ValueError:
        return {}
    return {k: v for k, v in upstream_query.items() if k in ("n", "last") and len(v) <= 512}


def _refused_head(err: UpstreamError) -> bool:
    """Some endpoint refused the HEAD itself (400/403/405/406): a GET may work.

    Not 401 (auth is handled below this), 404 (gone) or 429 (slow down, not retry).
    """
    return any(a.status in (400, 403, 405, 406) for a in err.attempts)


class _WrongDigest(BadGateway):
    """An upstream sent bytes that do not hash to the digest asked for."""


def _discard(running: set[BlobFill], fill: BlobFill, _task: object) -> None:
    running.discard(fill)


def _range_total(content_range: str | None) -> int | None:
    """The complete length in ``Content-Range: bytes a-b/total`` (None: absent or ``*``)."""
    total = (content_range or "").rpartition("/")[2].strip()
    return int(total) if total.isascii() and total.isdigit() and len(total) <= 18 else None


async def finish_fills(fills: list[BlobFill], *, grace: float) -> None:
    """At shutdown: let running downloads finish for ``grace`` seconds, then cancel."""
    tasks = [fill.task for fill in fills if not fill.task.done()]
    if tasks:
        logger.info("waiting up to %.0fs for %d downloads to finish", grace, len(tasks))
        await asyncio.wait(tasks, timeout=grace)
    for task in tasks:
        task.cancel()
    for task in tasks:
        with contextlib.suppress(BaseException):
            await task
