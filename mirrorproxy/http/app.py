"""The aiohttp application, wired in one place.

``create_app`` only builds objects; everything that opens a resource (client
sessions, the cache layout, background downloads) does so in the cleanup
context, and closes it there.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator

from aiohttp import web

from mirrorproxy.clientauth.middleware import setup_client_auth
from mirrorproxy.config import Config
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning
from mirrorproxy.http import keys
from mirrorproxy.http.errors import error_middleware
from mirrorproxy.http.guard import guard_middleware
from mirrorproxy.http.middleware import add_registry_headers, observe_middleware
from mirrorproxy.http.observability import setup_observability
from mirrorproxy.http.requestctx import request_context_middleware
from mirrorproxy.http.routes import setup_routes
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.engine import Engine, Sharing
from mirrorproxy.upstream.members import Resolver, resolve_addresses

logger = logging.getLogger(__name__)


def create_app(
    config: Config,
    *,
    metrics: Metrics | None = None,
    tuning: Tuning = DEFAULT_TUNING,
    sharing: Sharing | None = None,
    metrics_listener: bool = True,
    resolver: Resolver = resolve_addresses,
) -> web.Application:
    """The mirror's aiohttp app; ``tuning`` bounds how blob bytes move (tests shrink it);
    ``sharing``: one of a server's workers over the same cache (``serve --workers``);
    ``metrics_listener``: False in the workers that leave ``[metrics] listen`` to one;
    ``resolver``: how ``[cluster] members_dns`` is looked up (tests give their own)."""
    app = web.Application(
        middlewares=[
            request_context_middleware,
            observe_middleware,
            guard_middleware,
            error_middleware,
        ]
    )
    metrics = metrics or Metrics()
    engine = Engine(config, metrics, tuning=tuning, sharing=sharing, resolver=resolver)
    app[keys.CONFIG] = config
    app[keys.METRICS] = metrics
    app[keys.PULLTHROUGH] = engine.pullthrough
    app[keys.ENGINE] = engine

    async def resources(app: web.Application) -> AsyncIterator[None]:
        async with engine:
            yield

    app.cleanup_ctx.append(resources)
    app.on_response_prepare.append(add_registry_headers)
    setup_observability(app, config, metrics, listener=metrics_listener)
    setup_routes(app, metrics_route=config.metrics.listen is None)
    setup_client_auth(app, config, metrics)  # innermost middleware; only with [server.auth]
    return app
