"""Registry errors in the OCI wire format, rendered in one place.

Code raises a RegistryError subclass; ``error_middleware`` turns it (and anything
unexpected) into ``{"errors": [{"code", "message", "detail"}]}`` with the right
status, so no traceback ever reaches a client.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, ClassVar

import aiohttp
from aiohttp import web

logger = logging.getLogger(__name__)

API_VERSION_HEADER = {"Docker-Distribution-Api-Version": "registry/2.0"}
# The status recorded (access log, metrics) for a request whose client went away
# before its answer could be sent; nginx's convention, never sent on the wire.
CLIENT_CLOSED = 499


class RegistryError(Exception):
    """An error a client is told about, with a distribution-spec error code."""

    code: ClassVar[str] = "UNKNOWN"
    status: ClassVar[int] = 500

    def __init__(
        self, message: str, detail: Any = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.message = message
        self.detail = detail
        self.headers = headers or {}

    def http_status(self) -> int:
        return self.status

    def body(self) -> dict[str, Any]:
        err: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.detail is not None:
            err["detail"] = self.detail
        return {"errors": [err]}


class NameInvalid(RegistryError):
    code, status = "NAME_INVALID", 400


class NameUnknown(RegistryError):
    code, status = "NAME_UNKNOWN", 404


class DigestInvalid(RegistryError):
    code, status = "DIGEST_INVALID", 400


class ManifestUnknown(RegistryError):
    code, status = "MANIFEST_UNKNOWN", 404


class ManifestInvalid(RegistryError):
    code, status = "MANIFEST_INVALID", 502


class BlobUnknown(RegistryError):
    code, status = "BLOB_UNKNOWN", 404


class RangeNotSatisfiable(RegistryError):
    code, status = "RANGE_INVALID", 416


class ResumeRefused(RegistryError):
    """A range past byte 0 of a blob whose download just failed verification: what the
    client holds of it may be corrupt, so it must start again from byte 0."""

    code, status = "RANGE_INVALID", 409


class PreconditionFailed(RegistryError):
    """``If-Match`` names no ETag of the blob (its digest)."""

    code, status = "PRECONDITION_FAILED", 412


class PaginationInvalid(RegistryError):
    """A tag list's ``n`` that is not a page size (distribution's code for it)."""

    code, status = "PAGINATION_NUMBER_INVALID", 400


class Unsupported(RegistryError):
    code, status = "UNSUPPORTED", 405


class BadRequest(RegistryError):
    """An HTTP request too malformed (or too large) to parse."""

    code, status = "UNSUPPORTED", 400


class Denied(RegistryError):
    """The client's address is outside ``[server] allow``, or a logged-in user may
    not pull through that namespace (``access``)."""

    code, status = "DENIED", 403


class NotFound(RegistryError):
    """A path that is not part of the API."""

    code, status = "UNSUPPORTED", 404


class Unauthorized(RegistryError):
    code, status = "UNAUTHORIZED", 401


class BadGateway(RegistryError):
    """Upstreams answered, but not usefully (5xx, 401, bad bytes)."""

    code, status = "UNAVAILABLE", 502


class Unavailable(RegistryError):
    """No upstream could be reached, or the mirror cannot serve right now."""

    code, status = "UNAVAILABLE", 503


class GatewayTimeout(RegistryError):
    code, status = "UNAVAILABLE", 504


class Relayed(RegistryError):
    """An upstream's answer to this very request (400 MANIFEST_INVALID for an Accept
    it cannot satisfy, say), passed on with its status and error codes: it is the
    registry's answer, not an outage of the mirror."""

    code = "UNKNOWN"

    def __init__(
        self,
        status: int,
        errors: list[Mapping[str, object]],
        message: str,
        detail: Any = None,
    ) -> None:
        super().__init__(message, detail)
        self.relayed_status = status
        self.errors = errors

    def http_status(self) -> int:
        return self.relayed_status

    def body(self) -> dict[str, Any]:
        if not self.errors:
            return super().body()
        return {"errors": [{**e, "detail": self.detail} for e in self.errors]}


def error_response(err: RegistryError, *, head: bool = False) -> web.Response:
    body = json.dumps(err.body()).encode()
    headers = {**API_VERSION_HEADER, **err.headers}
    if head:  # a HEAD answer states the length of the body it does not send
        headers["Content-Length"] = str(len(body))
    return web.Response(
        status=err.http_status(),
        body=None if head else body,
        content_type="application/json",
        headers=headers,
    )


class ClientGone(ConnectionResetError):
    """The client closed its connection: nothing can be answered, and nothing failed."""


def client_gone(request: web.BaseRequest, err: BaseException) -> bool:
    """Whether ``err`` means that the client of ``request`` went away.

    A closed client transport says so whatever the exception; otherwise only an
    OS-level reset or broken pipe does. aiohttp's own ``ClientConnectionResetError``
    is a ``ConnectionResetError`` too, but raised by an upstream connection it is
    not the client's doing.
    """
    transport = request.transport
    if transport is None or transport.is_closing():
        return True
    return isinstance(err, ConnectionError) and not isinstance(err, aiohttp.ClientError)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def error_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Render every failure as an OCI error body; log the unexpected ones once."""
    head = request.method == "HEAD"
    try:
        return await handler(request)
    except RegistryError as err:
        return error_response(err, head=head)
    except web.HTTPMethodNotAllowed as err:
        return error_response(
            Unsupported(
                f"{request.method} is not supported by a pull-through mirror",
                headers={"Allow": ",".join(sorted(err.allowed_methods))},
            ),
            head=head,
        )
    except web.HTTPNotFound:
        return error_response(NotFound(f"no such endpoint {request.path[:200]!r}"), head=head)
    except web.HTTPException:
        raise
    except Exception as err:
        if client_gone(request, err):
            # Ordinary (a pull cancelled, a client timing out): nothing to answer.
            logger.debug("client went away during %s %s: %r", request.method, request.path, err)
            raise ClientGone(str(err)) from err
        logger.exception("internal error serving %s %s", request.method, request.path)
        return error_response(RegistryError("internal error"), head=head)
