"""Wiring client authentication into the app: the middleware and the routing hook.

``setup_client_auth`` does nothing without ``[server.auth]`` (node-local mirrors
stay exactly as they were). With it, ``client_auth_middleware`` (innermost, inside
the error middleware) identifies every API request's client once; ``/v2/`` demands
valid credentials, which is what ``docker login``/``podman login`` test; and
``authorize_target``, called where a request is routed to its namespace and
repository, applies that namespace's ``access``. A 401 carries one
``WWW-Authenticate`` line per scheme, which a plain error header cannot, so this
middleware renders it. ``/healthz``, ``/readyz`` and ``/metrics`` never ask for
credentials (the allowlists cover them).
"""

from __future__ import annotations

from aiohttp import web

from mirrorproxy.clientauth.authenticator import Authenticator, AuthTuning
from mirrorproxy.clientauth.policy import ANONYMOUS, AuthRequired, authorize, require_login
from mirrorproxy.config import Config, Namespace
from mirrorproxy.http import keys
from mirrorproxy.http.errors import Handler, error_response
from mirrorproxy.observability.metrics import Metrics

OPEN_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})
LOGIN_PATHS = frozenset({"/v2", "/v2/"})


def setup_client_auth(
    app: web.Application, config: Config, metrics: Metrics, *, tuning: AuthTuning | None = None
) -> None:
    """Add the middleware and the authenticator when ``[server.auth]`` is set."""
    settings = config.server.auth
    if settings is None:
        return
    authenticator = Authenticator(settings, metrics, tuning=tuning)
    app[keys.CLIENT_AUTH] = authenticator
    app.middlewares.append(client_auth_middleware)
    app.cleanup_ctx.append(authenticator.context)


@web.middleware
async def client_auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Identify the client; answer a login check on ``/v2/``; render challenges."""
    if request.path in OPEN_PATHS:
        return await handler(request)
    authenticator = request.app[keys.CLIENT_AUTH]
    client = await authenticator.identify(request.headers.get("Authorization"), request.remote)
    request[keys.CLIENT] = client
    try:
        if request.path in LOGIN_PATHS:
            require_login(authenticator.settings, client)
        return await handler(request)
    except AuthRequired as err:
        resp = error_response(err, head=request.method == "HEAD")
        for challenge in err.challenges:
            resp.headers.add("WWW-Authenticate", challenge)
        return resp


def authorize_target(request: web.Request, ns: Namespace, ns_name: str, repo: str) -> None:
    """Apply the namespace's ``access`` to the request's client (no-op without auth).

    Raises:
        AuthRequired, Denied, TooManyRequests: see ``policy.authorize``.
    """
    authenticator = request.app.get(keys.CLIENT_AUTH)
    if authenticator is None:
        return
    client = request.get(keys.CLIENT, ANONYMOUS)
    authorize(authenticator.settings, ns.access, ns_name, repo, client)
