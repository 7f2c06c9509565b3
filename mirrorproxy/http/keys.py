"""Every typed application key, in one place."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

if TYPE_CHECKING:
    from mirrorproxy.clientauth.authenticator import Authenticator
    from mirrorproxy.clientauth.policy import Client
    from mirrorproxy.config import Config
    from mirrorproxy.http.requestctx import RequestInfo
    from mirrorproxy.observability.metrics import Metrics
    from mirrorproxy.pullthrough.engine import Engine
    from mirrorproxy.pullthrough.policy import PullThrough

CONFIG: web.AppKey[Config] = web.AppKey("config")
METRICS: web.AppKey[Metrics] = web.AppKey("metrics")
PULLTHROUGH: web.AppKey[PullThrough] = web.AppKey("pullthrough")
ENGINE: web.AppKey[Engine] = web.AppKey("engine")  # readiness of the store
CLIENT_AUTH: web.AppKey[Authenticator] = web.AppKey("client_auth")  # only with [server.auth]
# A worker's private loopback ports, where only the other workers connect (they
# pass the client allowlist: the client was checked where it connected).
INTERNAL_PORTS: web.AppKey[frozenset[int]] = web.AppKey("internal_ports")

# Per request: id, namespace, cache result, upstream used (read by the access log).
REQUEST_INFO: web.RequestKey[RequestInfo] = web.RequestKey("request_info")
CLIENT: web.RequestKey[Client] = web.RequestKey("client")  # who the client proved to be
