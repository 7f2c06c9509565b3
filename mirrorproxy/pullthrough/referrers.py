"""Referrers (OCI 1.1): the index of what refers to a manifest, cached like a tag.

Fresh for ``tag_ttl``, then fetched again (every page, bounded, merged into one
index); during an outage the last one is served, marked stale. A registry without
the API gets a 404, after which clients use the ``sha256-<hex>`` tag scheme (tags).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable

from mirrorproxy.cache import ManifestStore, StoredManifest, TagEntry
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.config import Config
from mirrorproxy.core.errors import BadGateway, NotFound
from mirrorproxy.core.oci import OCI_INDEX, Digest
from mirrorproxy.core.rendezvous import referrers_key
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
from mirrorproxy.pullthrough.manifests import keep
from mirrorproxy.upstream.client import PeerRoute, TooLarge, UpstreamClient, UpstreamError
from mirrorproxy.upstream.response import next_page

logger = logging.getLogger(__name__)

MAX_REFERRER_PAGES = 10


class ReferrerPolicy:
    """The referrers of a subject: cached index, revalidation, stale on outage.

    It owns the referrers records and their shared fetches; it must not filter by
    artifact type (the HTTP side does, on the cached index) nor speak HTTP.
    """

    def __init__(
        self,
        config: Config,
        *,
        manifests: ManifestStore,
        budget: CacheBudget,
        client: UpstreamClient,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self._config = config
        self._manifests = manifests
        self._budget = budget
        self._client = client
        self._metrics = metrics
        self._clock = clock
        self._fetching: SingleFlight[tuple[object, ...], ManifestAnswer] = SingleFlight(
            cancelled=cancelled_fetch
        )

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
            count(self._metrics, t, "referrers", HIT)
            return ManifestAnswer(cached, HIT)
        if self._config.cache.offline:
            if cached is None:
                raise NotFound(f"referrers of {t.repo}@{subject} are not cached and {OFFLINE}")
            count(self._metrics, t, "referrers", STALE)
            return ManifestAnswer(cached, STALE)
        # A request forwarded by a member never joins one this member forwards (see
        # manifests): members that disagree on the owner would wait on each other.
        route = t.route(referrers_key(t.ns_name, t.repo, str(subject)), "manifest")
        try:
            answer = await self._fetching.run(
                ("r", t.ns_name, t.repo, subject, self._client.forwards(route)),
                lambda: self._fetch_referrers(t, subject, route),
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
        count(self._metrics, t, "referrers", answer.result)
        return answer

    async def _fetch_referrers(
        self, t: Target, subject: Digest, route: PeerRoute
    ) -> ManifestAnswer:
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
                    # The key's owner answers the first page with its merged list.
                    route=None if query else route,
                )
            except TooLarge as err:
                raise BadGateway(str(err)) from None
            upstream = resp.upstream.url
            descriptors += _index_manifests(resp.body, upstream)
            query = next_page(resp.headers.get("Link"))
            if not query:
                break
        doc = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors}
        body = json.dumps(doc, separators=(",", ":")).encode()
        if len(body) > limit:
            raise BadGateway(f"referrers of {t.repo}@{subject} exceed {limit} bytes")
        manifest = StoredManifest(Digest.of(body), OCI_INDEX, body)
        what = f"referrers of {t.repo}@{subject}"
        if await keep(self._manifests, self._budget, self._metrics, manifest, t.ns_name, what):
            entry = TagEntry(manifest.digest, OCI_INDEX, len(body), self._clock())
            try:
                await self._manifests.put_referrers(t.ns_name, t.repo, subject, entry)
            except OSError as err:
                self._metrics.cache_write_errors.inc()
                logger.error("cannot record %s: %s", what, err)
        return ManifestAnswer(manifest, MISS, upstream)


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
