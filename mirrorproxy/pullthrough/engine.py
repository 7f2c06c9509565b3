"""The pull-through engine without HTTP: stores, budget, upstream client and policy.

The server wires it into the aiohttp app; ``preload`` runs it on its own. Building
it opens nothing; ``start`` prepares the cache directory, the index and the client
sessions, and ``close`` undoes that.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import partial
from types import TracebackType

from mirrorproxy.cache import BlobStore, ManifestStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.stores import open_stores
from mirrorproxy.config import Config
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.rendezvous import blob_key, owner
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.policy import PullThrough
from mirrorproxy.upstream.client import UpstreamClient

logger = logging.getLogger(__name__)

READY_FOR = 1.5  # seconds a readiness answer of the store is reused


@dataclass(frozen=True, slots=True)
class Sharing:
    """This engine is one of several over the same cache directory (a server's workers).

    The stores are then shared (a blob another worker owns is relayed from it, not
    written again), and the budget accounts for and evicts only what ``owns`` says,
    within ``share`` of ``max_size``.
    """

    owns: Callable[[Digest], bool]
    share: float
    reconcile: bool = False  # this one makes the index agree with the files at start


def bucket_sharing(config: Config) -> Sharing | None:
    """The budget's part for a member of a static [cluster] over one bucket.

    Each member accounts for, and evicts, the blobs it owns within 1/N of
    ``max_size``, so the members together hold the bucket to ``max_size``. With
    ``members_dns`` the member count is not known at start: each member then
    accounts for the whole bucket (see README, "Object storage").
    """
    cluster = config.cluster
    if cluster is None or not cluster.members or config.storage.s3 is None:
        return None
    members, me = cluster.members, cluster.self_url

    def mine(digest: Digest) -> bool:
        return owner(blob_key(str(digest)), members) == me

    return Sharing(owns=mine, share=1 / len(members), reconcile=True)


class Engine:
    """The pull-through machinery for one cache directory: stores, budget, client, policy.

    It owns their lifetime (``start``, ``close``); it must not serve HTTP (the app
    or ``preload`` drive it) nor keep state of its own beyond the parts it built.
    """

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        *,
        tuning: Tuning = DEFAULT_TUNING,
        sharing: Sharing | None = None,
    ) -> None:
        self.config = config
        sharing = sharing if sharing is not None else bucket_sharing(config)
        self._sharing = sharing
        stores = open_stores(
            config.cache,
            config.storage,
            observe=metrics.observe_store,
            shared=sharing is not None,
        )
        self._stores = stores
        self.blobs: BlobStore = stores.blobs
        self.manifests: ManifestStore = stores.manifests
        self.client = UpstreamClient(config, metrics)
        self.budget = CacheBudget(
            config.cache,
            blobs=self.blobs,
            manifests=self.manifests,
            metrics=metrics,
            flush_interval=tuning.index_flush,
            owns=sharing.owns if sharing is not None else None,
            share=sharing.share if sharing is not None else 1.0,
        )
        self.pullthrough = PullThrough(
            config,
            blobs=self.blobs,
            manifests=self.manifests,
            budget=self.budget,
            client=self.client,
            metrics=metrics,
            tuning=tuning,
            shared=stores.shared,
        )
        self._flusher: asyncio.Task[None] | None = None
        self._ready: tuple[float, str | None] | None = None  # (when, answer) of the last probe

    async def start(self) -> None:
        """Make the stores usable, open the index, start the client.

        Raises:
            StoreUnavailable: the content store cannot be used (the S3 bucket is
                missing, refuses our keys or cannot be reached).
        """
        # Blocking calls (a bucket check and listing, say) in a thread: the
        # loop may already serve another app (tests) or a metrics listener.
        try:
            swept = await asyncio.to_thread(self.blobs.prepare)
            await asyncio.to_thread(self.manifests.prepare)
            if swept:
                logger.info("removed %d temp files or uploads left by an interrupted run", swept)
            reconcile = self._sharing is None or self._sharing.reconcile
            await asyncio.to_thread(partial(self.budget.open, reconcile=reconcile))
        except BaseException:
            await asyncio.to_thread(self._stores.close)
            raise
        self._flusher = asyncio.create_task(self.budget.run_flusher(), name="index flusher")
        await self.client.start()

    async def close(self) -> None:
        if self._flusher is not None:
            self._flusher.cancel()
            with contextlib.suppress(BaseException):
                await self._flusher
            self._flusher = None
        try:
            await self.pullthrough.close()
            try:
                await self.budget.close()
            except (OSError, sqlite3.Error) as err:
                logger.error("cannot save the cache index on shutdown: %s", err)
        finally:
            await self.client.close()
            await asyncio.to_thread(self._stores.close)

    async def ready(self) -> str | None:
        """Whether the content store can be used now: None, or why not.

        The answer is remembered for ``READY_FOR`` seconds, so probes hammering
        /readyz cost the store one request a second or two.
        """
        now = time.monotonic()
        if self._ready is not None and now - self._ready[0] < READY_FOR:
            return self._ready[1]
        answer = await self.blobs.probe()
        self._ready = (time.monotonic(), answer)
        return answer

    async def __aenter__(self) -> Engine:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()
