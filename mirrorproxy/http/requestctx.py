"""Request-scoped context: the request id, and what handling a request found out.

``request_context_middleware`` (outermost) gives every request a ``RequestInfo``
under ``keys.REQUEST_INFO`` and puts its id in a context variable, so that log
records emitted while handling it carry the id (``log.RequestIdFilter``). Handlers
note the namespace, the cache result and the upstream used on it; the access
logger reads it once the response is sent. This module decides nothing about
caching or routing and never logs a query value other than ``ns``.
"""

from __future__ import annotations

import contextvars
import re
import secrets
from dataclasses import dataclass
from urllib.parse import quote

from aiohttp import web

from mirrorproxy.http import keys
from mirrorproxy.http.errors import Handler

REQUEST_ID_HEADER = "X-Request-Id"
MAX_ID_LENGTH = 128
MAX_NS_LENGTH = 255
_SANE_ID = re.compile(rf"[A-Za-z0-9._-]{{1,{MAX_ID_LENGTH}}}")

#: The id of the request being handled; inherited by tasks it starts (a blob fill
#: started by a request logs with that request's id).
current_request_id: contextvars.ContextVar[str | None] = contextvars.ContextVar(
    "mirrorproxy_request_id", default=None
)


@dataclass(slots=True)
class RequestInfo:
    """What the access log says about one request beyond method, path and status."""

    request_id: str
    ns: str | None = None  # the registry asked for (ns=), once known
    cache: str | None = None  # hit, miss or stale; None when the cache was not asked
    upstream: str | None = None  # the endpoint URL that answered (never credentials)
    body_bytes: int | None = None  # bytes actually streamed, when a handler counted them


def request_id_from(value: str | None) -> str:
    """Return an incoming id if it is sane (bounded, ``[A-Za-z0-9._-]``), else a new one."""
    if value is not None and _SANE_ID.fullmatch(value):
        return value
    return secrets.token_hex(8)


def safe_ns(value: str | None) -> str | None:
    """A client-sent ns value fit for a log line: bounded, percent-encoded."""
    if not value:
        return None
    return quote(value[:MAX_NS_LENGTH], safe=":/.@-_[]")


def logged_path(request: web.BaseRequest) -> str:
    """The path as sent (still percent-encoded), with ``ns`` as its only query value."""
    ns = safe_ns(request.query.get("ns"))
    path = request.rel_url.raw_path
    return f"{path}?ns={ns}" if ns else path


def request_info(request: web.BaseRequest) -> RequestInfo | None:
    """The request's info, if the middleware ran (it does for every routed request)."""
    info: RequestInfo | None = request.get(keys.REQUEST_INFO)
    return info


def note_ns(request: web.BaseRequest, ns_name: str) -> None:
    """Record the registry a request was routed to."""
    info = request_info(request)
    if info is not None:
        info.ns = safe_ns(ns_name)


def note_cache(request: web.BaseRequest, result: str, upstream: str | None = None) -> None:
    """Record how the cache answered and which upstream endpoint, if any, was used."""
    info = request_info(request)
    if info is not None:
        info.cache = result
        if upstream is not None:
            info.upstream = upstream


def note_body_bytes(request: web.BaseRequest, sent: int) -> None:
    """Record the body bytes a streaming handler really sent (a cut stream sends fewer)."""
    info = request_info(request)
    if info is not None:
        info.body_bytes = sent


@web.middleware
async def request_context_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Give the request an id and a RequestInfo; make the id visible to logging."""
    info = RequestInfo(
        request_id=request_id_from(request.headers.get(REQUEST_ID_HEADER)),
        ns=safe_ns(request.query.get("ns")),
    )
    request[keys.REQUEST_INFO] = info
    token = current_request_id.set(info.request_id)
    try:
        return await handler(request)
    finally:
        current_request_id.reset(token)


async def echo_request_id(request: web.Request, response: web.StreamResponse) -> None:
    """Send the request id back (``on_response_prepare``: error answers included)."""
    info = request_info(request)
    if info is not None:
        response.headers[REQUEST_ID_HEADER] = info.request_id
