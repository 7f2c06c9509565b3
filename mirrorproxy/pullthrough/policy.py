"""PullThrough: the one object the HTTP side and ``preload`` ask, in front of the policies.

- Digests (manifests and blobs) are local-first: immutable, so a cached copy is
  always right. A miss is fetched, verified against the digest, and stored.
- Tags are remote-first once stale: fresh for ``tag_ttl``, then revalidated with a
  HEAD; when every upstream fails, the last known answer is served, marked stale.
- Concurrent misses for the same thing share one upstream request.

Each kind has its own module (``manifests``, ``referrers``, ``tagslist``,
``blobs``); this one builds them over the same stores, budget and client.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping

from mirrorproxy.cache import BlobStore, ManifestStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.config import Config
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.answers import BlobHead, ManifestAnswer, TagList, Target
from mirrorproxy.pullthrough.blobs import BlobPolicy
from mirrorproxy.pullthrough.corruption import CorruptBlobs
from mirrorproxy.pullthrough.isolation import Isolation
from mirrorproxy.pullthrough.manifests import ManifestPolicy
from mirrorproxy.pullthrough.referrers import ReferrerPolicy
from mirrorproxy.pullthrough.source import BlobSource
from mirrorproxy.pullthrough.tagslist import TagLists
from mirrorproxy.upstream.client import UpstreamClient


class PullThrough:
    """The pull-through policy as one object: manifests, referrers, tag lists, blobs.

    It owns nothing of its own but the wiring: each question goes to the policy
    for that kind. It must not speak HTTP (it returns answers and blob sources, and
    raises registry errors) nor reach a store other than through those policies.
    """

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
        tuning: Tuning = DEFAULT_TUNING,
        scratch: BlobStore | None = None,
    ) -> None:
        """``scratch``: cluster members share these stores (``Stores.scratch``)."""
        self.budget = budget
        isolation = Isolation(config, client=client, budget=budget, metrics=metrics)
        self._manifests = ManifestPolicy(
            config,
            manifests=manifests,
            budget=budget,
            client=client,
            metrics=metrics,
            isolation=isolation,
            clock=clock,
        )
        self._referrers = ReferrerPolicy(
            config,
            manifests=manifests,
            budget=budget,
            client=client,
            metrics=metrics,
            clock=clock,
        )
        self._tags = TagLists(config, client=client)
        self._blob_policy = BlobPolicy(
            config,
            blobs=blobs,
            budget=budget,
            client=client,
            metrics=metrics,
            isolation=isolation,
            corrupt=CorruptBlobs(),
            tuning=tuning,
            scratch=scratch,
        )
        # What tests look at: the blob store, the downloads by digest, every running one.
        self._blobs = blobs
        self._fills = self._blob_policy.fills
        self._running = self._blob_policy.running

    @property
    def tuning(self) -> Tuning:
        """How blob bytes move: for downloads and responses started from now on."""
        return self._blob_policy.tuning

    @tuning.setter
    def tuning(self, tuning: Tuning) -> None:
        self._blob_policy.tuning = tuning

    @property
    def corrupt(self) -> CorruptBlobs:
        """Recent digest mismatches (replaceable in tests)."""
        return self._blob_policy.corrupt

    @corrupt.setter
    def corrupt(self, corrupt: CorruptBlobs) -> None:
        self._blob_policy.corrupt = corrupt

    async def settled(self) -> None:
        """Wait until every running download is in place (or failed and cleaned up)."""
        await self._blob_policy.settled()

    async def close(self) -> None:
        """Let running downloads finish for ``tuning.shutdown_grace`` s, then cancel them."""
        await self._blob_policy.close()

    async def manifest(self, t: Target, ref: str | Digest, accept: str | None) -> ManifestAnswer:
        """Answer a manifest request by tag or digest (see ``ManifestPolicy.manifest``)."""
        return await self._manifests.manifest(t, ref, accept)

    async def referrers(self, t: Target, subject: Digest) -> ManifestAnswer:
        """The referrers index of ``subject`` (see ``ReferrerPolicy.referrers``)."""
        return await self._referrers.referrers(t, subject)

    async def tags_list(self, t: Target, params: Mapping[str, str]) -> TagList:
        """An upstream's tag list, passed through (see ``TagLists.tags_list``)."""
        return await self._tags.tags_list(t, params)

    async def blob(self, t: Target, digest: Digest, *, first_byte: int = 0) -> BlobSource:
        """A cached blob or a shared download, as a source (see ``BlobPolicy.blob``)."""
        return await self._blob_policy.blob(t, digest, first_byte=first_byte)

    async def blob_head(self, t: Target, digest: Digest) -> BlobHead:
        """A blob's size for a HEAD (see ``BlobPolicy.head``)."""
        return await self._blob_policy.head(t, digest)
