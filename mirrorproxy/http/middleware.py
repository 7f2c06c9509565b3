"""Cross-cutting request handling: registry headers and request metrics."""

from __future__ import annotations

import time

from aiohttp import web

from mirrorproxy.core.errors import CLIENT_CLOSED
from mirrorproxy.http import keys
from mirrorproxy.http.errors import Handler, client_gone

UNMEASURED = frozenset({"/metrics", "/healthz", "/readyz"})
MEASURED_METHODS = frozenset({"GET", "HEAD"})


def _kind(path: str) -> str:
    if "/manifests/" in path:
        return "manifest"
    if "/blobs/" in path:
        return "blob"
    return "other"


@web.middleware
async def observe_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Time every API request (to the end of its body), count those in flight and done.

    A request whose client went away before the answer is counted with code 499.
    """
    if request.path in UNMEASURED:
        return await handler(request)
    metrics = request.app[keys.METRICS]
    # Clients choose the method: anything unusual shares one label value.
    method = request.method if request.method in MEASURED_METHODS else "other"
    kind = _kind(request.path)
    metrics.inflight_requests.inc()
    started = time.perf_counter()
    code = "error"  # the handler raised something no middleware turned into an answer
    try:
        resp = await handler(request)
        code = str(resp.status)
        return resp
    except web.HTTPException as exc:
        code = str(exc.status)
        raise
    except Exception as exc:
        if client_gone(request, exc):  # not the mirror's failure: never code="error"
            code = str(CLIENT_CLOSED)
        raise
    finally:
        metrics.inflight_requests.dec()
        duration = time.perf_counter() - started
        metrics.child(metrics.request_duration, method, kind).observe(duration)
        metrics.child(metrics.requests, method, kind, code).inc()


async def add_registry_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every API answer names the API version, and echoes the namespace it routed by."""
    if request.path.startswith("/v2"):
        response.headers["Docker-Distribution-Api-Version"] = "registry/2.0"
        ns = request.query.get("ns")
        # Client text goes back in a header: only printable ASCII (no CR/LF/NUL).
        if ns and ns.isascii() and ns.isprintable() and len(ns) <= 255:
            response.headers["OCI-Namespace"] = ns
