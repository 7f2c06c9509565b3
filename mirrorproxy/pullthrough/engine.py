"""The pull-through engine without HTTP: stores, budget, upstream client and policy.

The server wires it into the aiohttp app; ``preload`` runs it on its own. Building
it opens nothing; ``start`` prepares the cache directory, the index and the client
sessions, and ``close`` undoes that. In a [cluster] it holds the one live member
list (``members``) that the client's peers and the budget's split both follow.
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
from mirrorproxy.cache.remotepins import RemoteUse
from mirrorproxy.cache.stores import open_stores
from mirrorproxy.config import Config
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.policy import PullThrough
from mirrorproxy.pullthrough.touchreports import MemberSplit, TouchReporter
from mirrorproxy.upstream.client import UpstreamClient
from mirrorproxy.upstream.members import Members, Resolver, resolve_addresses

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
    share: float | Callable[[], float]  # or what gives it now (the members change)
    reconcile: bool = False  # this one makes the index agree with the files at start


def bucket_split(config: Config, members: Members | None) -> MemberSplit | None:
    """How a member of a [cluster] over one bucket splits it with the others.

    Each member accounts for, and evicts, the blobs it owns within 1/N of
    ``max_size``, by the live member list (``members_dns``: as DNS says now), so
    the members together hold the bucket to ``max_size``.
    """
    cluster = config.cluster
    if cluster is None or members is None or config.storage.s3 is None:
        return None
    return MemberSplit(cluster.self_url, members)


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
        resolver: Resolver = resolve_addresses,
    ) -> None:
        """``resolver``: how ``members_dns`` is looked up (tests give their own)."""
        self.config = config
        cluster = config.cluster
        self.members = Members(cluster, metrics, resolver=resolver) if cluster else None
        split = bucket_split(config, self.members) if sharing is None else None
        if split is not None:
            sharing = Sharing(owns=split.owns, share=split.share, reconcile=True)
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
        self.client = UpstreamClient(config, metrics, members=self.members)
        self.budget = CacheBudget(
            config.cache,
            blobs=self.blobs,
            manifests=self.manifests,
            metrics=metrics,
            flush_interval=tuning.index_flush,
            owns=sharing.owns if sharing is not None else None,
            share=sharing.share if sharing is not None else 1.0,
            remote=RemoteUse() if split is not None else None,
        )
        self.reporter: TouchReporter | None = None
        if split is not None and self.members is not None:
            reshare = partial(self.budget.reshare, relist_after=tuning.relist_after)
            self.members.on_change.append(reshare)
            self.reporter = TouchReporter(split, self.budget, self.client, metrics, tuning)
        self.pullthrough = PullThrough(
            config,
            blobs=self.blobs,
            manifests=self.manifests,
            budget=self.budget,
            client=self.client,
            metrics=metrics,
            tuning=tuning,
            scratch=stores.scratch,
        )
        self._flusher: asyncio.Task[None] | None = None
        self._reporting: asyncio.Task[None] | None = None
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
            if self.members is not None:  # first: the budget's split follows the list
                await self.members.start()
            swept = await asyncio.to_thread(self.blobs.prepare)
            await asyncio.to_thread(self.manifests.prepare)
            if swept:
                logger.info("removed %d temp files or uploads left by an interrupted run", swept)
            reconcile = self._sharing is None or self._sharing.reconcile
            await asyncio.to_thread(partial(self.budget.open, reconcile=reconcile))
        except BaseException:
            if self.members is not None:
                await self.members.close()
            await asyncio.to_thread(self._stores.close)
            raise
        self._flusher = asyncio.create_task(self.budget.run_flusher(), name="index flusher")
        await self.client.start()
        if self.reporter is not None:
            self._reporting = asyncio.create_task(self.reporter.run(), name="touch reports")

    async def close(self) -> None:
        for task in (self._reporting, self._flusher):
            if task is not None:
                task.cancel()
                with contextlib.suppress(BaseException):
                    await task
        self._reporting = self._flusher = None
        if self.members is not None:
            await self.members.close()
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
