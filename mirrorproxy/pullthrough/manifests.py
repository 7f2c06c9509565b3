"""Manifests by digest and by tag: local-first for digests, remote-first for stale tags.

- By digest: immutable, so a cached copy is always right. A miss is fetched (every
  manifest type asked for), its digest checked (a wrong body cools its endpoint
  down and the next one is asked), and stored.
- By tag: fresh for ``tag_ttl``, then revalidated with a HEAD (a GET where HEAD is
  refused); when every upstream is out, the last answer for the same Accept set
  (or the same variant) is served, marked stale. A registry that answered (404,
  400, ...) is believed, never bridged.
- Concurrent misses for the same thing share one upstream request. In a [cluster]
  the owner of the digest or tag is asked first (``upstream.peers``).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping

from mirrorproxy.cache import ManifestStore, StoredManifest, TagEntry
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.index import MANIFEST
from mirrorproxy.config import Config
from mirrorproxy.core.errors import BadGateway, ManifestInvalid, ManifestUnknown
from mirrorproxy.core.oci import (
    MANIFEST_TYPES,
    Digest,
    accept_types,
    manifest_digest,
    manifest_media_type,
    parse_digest,
    same_variant,
)
from mirrorproxy.core.rendezvous import manifest_key, tag_key
from mirrorproxy.core.singleflight import SingleFlight
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.answers import (
    HIT,
    MISS,
    OFFLINE,
    STALE,
    ManifestAnswer,
    Target,
    cancelled_fetch,
    count,
)
from mirrorproxy.pullthrough.isolation import Isolation
from mirrorproxy.upstream.client import TooLarge, UpstreamClient, UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)


async def keep(
    manifests: ManifestStore,
    budget: CacheBudget,
    metrics: Metrics,
    manifest: StoredManifest,
    namespace: str,
    what: str,
) -> bool:
    """Store a fetched manifest in the cache and budget; False (logged) if the disk refused."""
    try:
        stored = await manifests.put(manifest)
        budget.committed(MANIFEST, manifest.digest, stored, namespace)
    except OSError as err:
        metrics.cache_write_errors.inc()
        logger.error("cannot cache %s: %s", what, err)
        return False
    return True


class ManifestPolicy:
    """The manifest policy: when to trust the cache, when to ask, what to store.

    It owns the tag records' freshness and the shared fetches of manifests. It must
    not speak HTTP to clients (it returns answers and raises registry errors) nor
    write cache files other than through the manifest store.
    """

    def __init__(
        self,
        config: Config,
        *,
        manifests: ManifestStore,
        budget: CacheBudget,
        client: UpstreamClient,
        metrics: Metrics,
        isolation: Isolation,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._manifests = manifests
        self._budget = budget
        self._client = client
        self._metrics = metrics
        self._isolation = isolation
        self._clock = clock
        self._fetching: SingleFlight[tuple[object, ...], ManifestAnswer] = SingleFlight(
            cancelled=cancelled_fetch
        )

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
        count(self._metrics, t, "manifest", answer.result)
        return answer

    async def _manifest_by_digest(
        self, t: Target, digest: Digest, accept: str | None
    ) -> ManifestAnswer:
        cached = await self._manifests.get(digest)
        if cached is not None:
            await self._isolation.check(t, MANIFEST, digest)  # cached via a private namespace?
            self._budget.touch(MANIFEST, digest)
            return ManifestAnswer(cached, HIT)
        if self._config.cache.offline:
            raise ManifestUnknown(f"manifest {t.repo}@{digest} is not cached and {OFFLINE}")
        # Ask for every manifest type: content by digest is fixed, and some
        # registries refuse an index to a client whose Accept lacks it.
        wanted = ", ".join(dict.fromkeys([*accept_types(accept), *MANIFEST_TYPES]))
        # A request forwarded by a member never joins one this member forwards: in
        # a cluster whose members disagree on the owner, that would wait on itself.
        route = t.route(manifest_key(str(digest)), "manifest")
        try:
            answer = await self._fetching.run(
                ("m", t.ns_name, t.repo, digest, self._client.forwards(route)),
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
            self._budget.touch(MANIFEST, cached.digest)
            return ManifestAnswer(cached, HIT)
        if self._config.cache.offline:
            stale = await self._stale(entries, key, accept)
            if stale is None:
                raise ManifestUnknown(f"manifest {t.repo}:{tag} is not cached and {OFFLINE}")
            return ManifestAnswer(stale, STALE)
        route = t.route(tag_key(t.ns_name, t.repo, tag), "manifest")
        try:
            return await self._fetching.run(
                ("t", t.ns_name, t.repo, tag, key, self._client.forwards(route)),
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
                    route=t.route(tag_key(t.ns_name, t.repo, tag), "manifest"),
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
        key = tag_key(t.ns_name, t.repo, ref) if expect is None else manifest_key(ref)
        try:
            resp = await self._client.fetch(
                t.ns,
                t.ns_name,
                f"{t.repo}/manifests/{ref}",
                what=what,
                limit=self._config.cache.max_manifest_size,
                headers={"Accept": accept} if accept else {},
                route=t.route(key, "manifest"),
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
        await keep(self._manifests, self._budget, self._metrics, manifest, t.ns_name, what)
        return ManifestAnswer(manifest, MISS, resp.upstream.url)


def _refused_head(err: UpstreamError) -> bool:
    """Some endpoint refused the HEAD itself (400/403/405/406): a GET may work.

    Not 401 (auth is handled below this), 404 (gone) or 429 (slow down, not retry).
    """
    return any(a.status in (400, 403, 405, 406) for a in err.attempts)


class _WrongDigest(BadGateway):
    """An upstream sent bytes that do not hash to the digest asked for."""
