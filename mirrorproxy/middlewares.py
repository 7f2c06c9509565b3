"""Cross-cutting request handling: registry headers and request metrics."""

from __future__ import annotations

import time

from aiohttp import web

from mirrorproxy import keys
from mirrorproxy.errors import Handler

UNMEASURED = frozenset({"/metrics", "/healthz", "/readyz"})


def _kind(path: str) -> str:
    if "/manifests/" in path:
        return "manifest"
    if "/blobs/" in path:
        return "blob"
    return "other"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every API request (to the end of its body) and count those in flight."""
    if request.path in UNMEASURED:
        return await handler(request)
    metrics = request.app[keys.METRICS]
    metrics.inflight_requests.inc()
    started = time.perf_counter()
    try:
        return await handler(request)
    finally:
        metrics.inflight_requests.dec()
        metrics.request_duration.labels(request.method, _kind(request.path)).observe(
            time.perf_counter() - started
        )


async def add_registry_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every API answer names the API version, and echoes the namespace it routed by."""
    if request.path.startswith("/v2"):
        response.headers["Docker-Distribution-Api-Version"] = "registry/2.0"
        ns = request.query.get("ns")
        if ns:
            response.headers["OCI-Namespace"] = ns
