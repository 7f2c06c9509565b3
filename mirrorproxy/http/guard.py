"""Who may use the mirror, and how: the client allowlist and the method policy.

A request from an address outside ``[server] allow`` gets ``403 DENIED``; any method
but GET and HEAD gets ``405 UNSUPPORTED``, whatever the path, before any handler
runs. The peer address of the TCP connection decides; ``X-Forwarded-For``
and friends are never trusted. ``/healthz`` and ``/readyz`` stay open to loopback
clients so a local probe works on a site mirror whose allowlist leaves out
loopback; they reveal nothing but liveness. ``/metrics`` answers to ``[metrics] allow``
instead when that is set (on the main listener, and on a separate metrics listener,
which otherwise takes ``[server] allow``). Which namespaces a request may reach is
``namespaces``' and ``clientauth``'s business, not this module's.
"""

from __future__ import annotations

import ipaddress
import logging
from collections.abc import Sequence

from aiohttp import web
from aiohttp.typedefs import Middleware

from mirrorproxy.core.errors import Denied, Unsupported
from mirrorproxy.core.touches import TOUCHES_PATH
from mirrorproxy.http import keys
from mirrorproxy.http.errors import Handler, error_response

logger = logging.getLogger(__name__)

ALLOWED_METHODS = ("GET", "HEAD")
PROBES = frozenset({"/healthz", "/readyz"})
METRICS_PATH = "/metrics"

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
Address = ipaddress.IPv4Address | ipaddress.IPv6Address


def peer_address(remote: str | None) -> Address | None:
    """The client's IP address; an IPv4-mapped IPv6 address becomes the IPv4 one."""
    if not remote:
        return None
    try:
        addr = ipaddress.ip_address(remote)
    except ValueError:
        return None  # a unix socket or something else that is not an IP address
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def client_allowed(remote: str | None, allow: Sequence[Network]) -> bool:
    """Whether a client at ``remote`` may use the mirror (everyone, if ``allow`` is empty)."""
    if not allow:
        return True
    addr = peer_address(remote)
    return addr is not None and any(addr in net for net in allow)


def _loopback(remote: str | None) -> bool:
    addr = peer_address(remote)
    return addr is not None and addr.is_loopback


def _from_a_worker(request: web.Request) -> bool:
    """A request another worker of this server forwarded, on a private port."""
    ports = request.app.get(keys.INTERNAL_PORTS)
    if not ports or not _loopback(request.remote) or request.transport is None:
        return False
    local = request.transport.get_extra_info("sockname")
    return isinstance(local, tuple) and local[1] in ports


def _a_report(request: web.Request) -> bool:
    """A member's report of use (its handler checks it is from a member)."""
    return request.method == "POST" and request.path == TOUCHES_PATH


@web.middleware
async def guard_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Refuse clients outside the allowlist, then every method but GET and HEAD."""
    head = request.method == "HEAD"
    config = request.app[keys.CONFIG]
    allow = config.server.allow
    if request.path == METRICS_PATH and config.metrics.allow:
        allow = config.metrics.allow  # [metrics] allow replaces [server] allow there
    if (
        not client_allowed(request.remote, allow)
        and not (request.path in PROBES and _loopback(request.remote))
        and not _from_a_worker(request)
    ):
        logger.debug("denied %s from %s: not in [server] allow", request.method, request.remote)
        return error_response(Denied("this mirror does not serve your address"), head=head)
    if request.method not in ALLOWED_METHODS and not _a_report(request):
        return error_response(
            Unsupported(
                f"{request.method[:20]} is not supported by a pull-through mirror",
                headers={"Allow": ",".join(ALLOWED_METHODS)},
            )
        )
    return await handler(request)


def allowlist_middleware(allow: Sequence[Network]) -> Middleware:
    """Only ``allow`` (everyone if empty): for the separate ``/metrics`` listener."""

    @web.middleware
    async def allowlist(request: web.Request, handler: Handler) -> web.StreamResponse:
        if not client_allowed(request.remote, allow):
            logger.debug("denied %s from %s: not in the allowlist", request.path, request.remote)
            return error_response(
                Denied("this mirror does not serve your address"), head=request.method == "HEAD"
            )
        return await handler(request)

    return allowlist
