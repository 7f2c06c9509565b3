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
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType

from mirrorproxy.cache import BlobStore, ManifestStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.stores import open_stores
from mirrorproxy.config import Config
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.policy import PullThrough
from mirrorproxy.upstream.client import UpstreamClient

logger = logging.getLogger(__name__)


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
        self._sharing = sharing
        stores = open_stores(config.cache, shared=sharing is not None)
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

    async def start(self) -> None:
        swept = self.blobs.prepare()
        self.manifests.prepare()
        if swept:
            logger.info("removed %d temp files left by an interrupted run", swept)
        self.budget.open(reconcile=self._sharing is None or self._sharing.reconcile)
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
