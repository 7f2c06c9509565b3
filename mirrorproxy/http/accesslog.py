"""The access log: one line per request, to the ``mirrorproxy.access`` logger.

A line names the client, method, path (only the ``ns`` query value, never others),
status, body bytes, duration, namespace, cache result, upstream used and request
id. The same fields go on the record as ``access`` (a dict) so ``--log-format json``
emits them as JSON keys. Probes and scrapes (/healthz, /readyz, /metrics) are logged
at debug level: orchestrators call them every few seconds.
"""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from mirrorproxy.http.requestctx import logged_path, request_info

ACCESS_LOGGER = "mirrorproxy.access"
QUIET_PATHS = frozenset({"/healthz", "/readyz", "/metrics"})


class AccessLogger(AbstractAccessLogger):
    """aiohttp access logger (``access_log_class``) writing structured lines.

    aiohttp hands over its own logger and format; the lines always go to
    ``mirrorproxy.access``, with fixed fields, whatever runner serves the app.
    """

    def __init__(self, logger: logging.Logger, log_format: str) -> None:
        super().__init__(logging.getLogger(ACCESS_LOGGER), log_format)

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: web.BaseRequest, response: web.StreamResponse, time: float) -> None:
        fields = access_fields(request, response, time)
        level = logging.DEBUG if request.path in QUIET_PATHS else logging.INFO
        self.logger.log(
            level,
            '%s "%s %s" %s %sB %.3fs ns=%s cache=%s upstream=%s',
            fields["remote"],
            fields["method"],
            fields["path"],
            fields["status"],
            fields["bytes"],
            fields["duration"],
            fields["ns"] or "-",
            fields["cache"] or "-",
            fields["upstream"] or "-",
            extra={"access": fields, "request_id": fields["request_id"]},
        )


def access_fields(
    request: web.BaseRequest, response: web.StreamResponse, duration: float
) -> dict[str, Any]:
    """Return everything one access-log line says about a finished request."""
    info = request_info(request)
    return {
        "remote": request.remote or "-",
        "method": request.method,
        "path": logged_path(request),
        "status": response.status,
        "bytes": _body_bytes(request, response, info.body_bytes if info else None),
        "duration": round(duration, 6),
        "ns": info.ns if info else None,
        "cache": info.cache if info else None,
        "upstream": info.upstream if info else None,
        "request_id": info.request_id if info else None,
    }


def _body_bytes(
    request: web.BaseRequest, response: web.StreamResponse, counted: int | None
) -> int:
    """Body bytes sent: as counted by a streaming handler, else the declared length.

    ``body_length`` alone will not do: it includes the headers, and misses what
    sendfile wrote for a cached blob.
    """
    if counted is not None:
        return counted
    if request.method == "HEAD" or response.status in (204, 304):
        return 0
    if response.content_length is not None:
        return response.content_length
    return response.body_length
