"""Rendering errors on the wire: OCI error bodies, and the middleware that catches.

``error_middleware`` turns a RegistryError (and anything unexpected) into an OCI
error body with the right status, so no traceback ever reaches a client; a client
that went away is not an error; a content store that cannot be reached is a 503.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable

import aiohttp
from aiohttp import web

from mirrorproxy.cache import StoreUnavailable
from mirrorproxy.core.errors import (
    API_VERSION_HEADER,
    NotFound,
    RegistryError,
    Unavailable,
    Unsupported,
)

logger = logging.getLogger(__name__)


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
    except StoreUnavailable as err:
        # Nothing known about the content asked for: a retry may succeed.
        logger.warning("%s %s: content store unavailable: %s", request.method, request.path, err)
        return error_response(Unavailable(f"the content store is unreachable: {err}"), head=head)
    except Exception as err:
        if client_gone(request, err):
            # Ordinary (a pull cancelled, a client timing out): nothing to answer.
            logger.debug("client went away during %s %s: %r", request.method, request.path, err)
            raise ClientGone(str(err)) from err
        logger.exception("internal error serving %s %s", request.method, request.path)
        return error_response(RegistryError("internal error"), head=head)
