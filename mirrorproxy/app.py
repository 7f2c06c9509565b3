"""The aiohttp application, wired in one place.

``create_app`` only builds objects; everything that opens a resource (client
sessions, the cache layout, background downloads) does so in the cleanup
context, and closes it there.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import AsyncIterator

from aiohttp import web

from mirrorproxy import keys
from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.config import Config
from mirrorproxy.errors import error_middleware
from mirrorproxy.metrics import Metrics
from mirrorproxy.middlewares import add_registry_headers, observe_middleware
from mirrorproxy.pullthrough import PullThrough
from mirrorproxy.routes import setup_routes
from mirrorproxy.upstream.client import UpstreamClient

logger = logging.getLogger(__name__)


def create_app(config: Config, *, metrics: Metrics | None = None) -> web.Application:
    app = web.Application(middlewares=[observe_middleware, error_middleware])
    metrics = metrics or Metrics()
    blobs = FileBlobStore(config.cache.dir)
    manifests = FileManifestStore(config.cache.dir, memory_bytes=config.cache.memory_manifests)
    client = UpstreamClient(config, metrics)
    app[keys.CONFIG] = config
    app[keys.METRICS] = metrics
    budget = CacheBudget(config.cache, blobs=blobs, manifests=manifests, metrics=metrics)
    app[keys.PULLTHROUGH] = PullThrough(
        config, blobs=blobs, manifests=manifests, budget=budget, client=client, metrics=metrics
    )

    async def resources(app: web.Application) -> AsyncIterator[None]:
        swept = blobs.prepare()
        manifests.prepare()
        if swept:
            logger.info("removed %d temp files left by an interrupted run", swept)
        budget.open()
        flusher = asyncio.create_task(budget.run_flusher(), name="cache index flusher")
        await client.start()
        yield
        flusher.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await flusher
        await app[keys.PULLTHROUGH].close()
        await budget.close()
        await client.close()

    app.cleanup_ctx.append(resources)
    app.on_response_prepare.append(add_registry_headers)
    setup_routes(app)
    return app
