"""The route table, and nothing else. GET routes answer HEAD too."""

from __future__ import annotations

from aiohttp import web

from mirrorproxy.core.touches import TOUCHES_PATH
from mirrorproxy.http import handlers, touches


def setup_routes(app: web.Application, *, metrics_route: bool = True) -> None:
    """Add the routes; ``metrics_route=False`` when /metrics has its own listener."""
    r = app.router
    r.add_get("/v2/", handlers.v2_root)
    r.add_get("/v2", handlers.v2_root)
    r.add_get(r"/v2/{name:.+}/manifests/{reference}", handlers.manifest)
    r.add_get(r"/v2/{name:.+}/blobs/{digest}", handlers.blob)
    r.add_get(r"/v2/{name:.+}/tags/list", handlers.tags_list)
    r.add_get(r"/v2/{name:.+}/referrers/{digest}", handlers.referrers)
    # Push, delete and unknown API paths: an OCI error instead of a bare 404.
    r.add_route("*", "/v2/{tail:.*}", handlers.unsupported)
    if metrics_route:
        r.add_get("/metrics", handlers.metrics)
    r.add_get("/healthz", handlers.healthz)
    r.add_get("/readyz", handlers.readyz)
    r.add_post(TOUCHES_PATH, touches.touches)  # between cluster members only
