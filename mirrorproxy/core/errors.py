"""Registry errors as data: a distribution-spec code, an HTTP status, a message.

Pure: code anywhere raises a RegistryError subclass without knowing HTTP, and
``mirrorproxy.http.errors`` renders it (and anything unexpected) as
``{"errors": [{"code", "message", "detail"}]}`` with the right status.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, ClassVar

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


class BodyTooLarge(RegistryError):
    """A request body over the size an internal endpoint accepts."""

    code, status = "SIZE_INVALID", 413


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


class LoopDetected(RegistryError):
    """A request forwarded by a cluster member reached a member that is forwarding
    the same blob itself (their member lists disagree): the sender asks the next one."""

    code, status = "UNAVAILABLE", 508


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
