"""Wiring observability into the app: request ids, config gauges, the metrics listener.

``setup_observability`` runs once from ``create_app``. With ``[metrics] listen`` set,
``/metrics`` (and nothing else) is served on that address by a second small app,
started and stopped in the main app's cleanup context, so it lives exactly as long
as the mirror and shuts down with it on SIGTERM/SIGINT. Metrics themselves are
declared in ``metrics.py``; this module only feeds the ones derived from config
and the filesystem.
"""

from __future__ import annotations

import logging
import os
from collections.abc import AsyncIterator, Callable, Sequence
from pathlib import Path

from aiohttp import web

from mirrorproxy.config import Config
from mirrorproxy.http import handlers, keys
from mirrorproxy.http.accesslog import AccessLogger
from mirrorproxy.http.guard import Network, allowlist_middleware
from mirrorproxy.http.requestctx import echo_request_id, request_context_middleware
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.answers import HIT, MISS, STALE

logger = logging.getLogger(__name__)

SHUTDOWN_TIMEOUT = 5.0  # seconds a scrape in progress may take to finish at shutdown
KINDS = ("manifest", "blob")
RESULTS = (HIT, MISS, STALE)
SOURCES = ("cache", "upstream")


class MetricsListenError(Exception):
    """The metrics address cannot be bound; the message is for the operator."""


def setup_observability(
    app: web.Application, config: Config, metrics: Metrics, *, listener: bool = True
) -> None:
    """Echo request ids, feed the cache-capacity gauges, start the metrics listener
    (unless ``listener`` is False: another worker serves ``[metrics] listen``)."""
    app.on_response_prepare.append(echo_request_id)
    init_namespace_series(metrics, config)
    metrics.cache_max_size_bytes.set(config.cache.max_size)
    watch_filesystem(metrics, config.cache.dir)
    if config.metrics.listen is not None and listener:
        # First in, last out: a taken port fails before any resource is opened.
        allow = config.metrics.allow or config.server.allow
        app.cleanup_ctx.insert(0, metrics_listener(config.metrics.listen, metrics, allow))


def init_namespace_series(metrics: Metrics, config: Config) -> None:
    """Create every namespace's cache series at 0.

    A series that appears only at its first increment hides that increment from
    ``rate()``, and a hit ratio is missing (not 0) until the first hit.
    """
    for ns in (n.name for n in config.namespaces.values()):
        for kind in KINDS:
            for result in RESULTS:
                metrics.cache_requests.labels(ns, kind, result)
        for source in SOURCES:
            metrics.cache_bytes.labels(ns, source)
        metrics.upstream_failovers.labels(ns)


def watch_filesystem(metrics: Metrics, path: Path) -> None:
    """Report the cache filesystem's size and free space at each scrape."""

    def stat() -> os.statvfs_result | None:
        try:
            return os.statvfs(path)
        except OSError:
            return None

    def free() -> float:
        st = stat()
        return float("nan") if st is None else float(st.f_bavail * st.f_frsize)

    def size() -> float:
        st = stat()
        return float("nan") if st is None else float(st.f_blocks * st.f_frsize)

    if not metrics.multiprocess:
        metrics.cache_filesystem_free_bytes.set_function(free)
        metrics.cache_filesystem_size_bytes.set_function(size)
        return

    def refresh() -> None:  # a worker's gauges live in files: set them for the scrape
        metrics.cache_filesystem_free_bytes.set(free())
        metrics.cache_filesystem_size_bytes.set(size())

    metrics.before_scrape.append(refresh)


def metrics_app(metrics: Metrics, allow: Sequence[Network] = ()) -> web.Application:
    """An app serving only ``GET /metrics`` (HEAD too), to ``allow`` (all if empty)."""
    app = web.Application(middlewares=[request_context_middleware, allowlist_middleware(allow)])
    app[keys.METRICS] = metrics
    app.router.add_get("/metrics", handlers.metrics)
    app.on_response_prepare.append(echo_request_id)
    return app


def format_address(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def metrics_listener(
    listen: tuple[str, int], metrics: Metrics, allow: Sequence[Network] = ()
) -> Callable[[web.Application], AsyncIterator[None]]:
    """A cleanup context serving ``metrics_app`` on ``listen`` while the app runs.

    Raises (on startup):
        MetricsListenError: the address cannot be bound.
    """
    host, port = listen
    address = format_address(host, port)

    async def serve_metrics(app: web.Application) -> AsyncIterator[None]:
        runner = web.AppRunner(
            metrics_app(metrics, allow),
            access_log_class=AccessLogger,
            shutdown_timeout=SHUTDOWN_TIMEOUT,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port).start()
        except OSError as err:
            await runner.cleanup()
            raise MetricsListenError(
                f"cannot listen on {address} for metrics: {err.strerror or err}"
            ) from None
        logger.info("metrics on http://%s/metrics", address)
        try:
            yield
        finally:
            await runner.cleanup()

    return serve_metrics
