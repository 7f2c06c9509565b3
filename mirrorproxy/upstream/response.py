"""What an upstream request gives back: an open response, a small body read whole, or
the attempts of every endpoint that failed and the error the client gets for them.

These types carry no aiohttp object out of ``upstream``: an open response offers
the reads its callers need (``readany``, ``read_chunk``, ``iter_chunked``, ``read``,
``read_limited``) and nothing of the connection beneath. Reading may raise
``aiohttp.ClientError`` or ``TimeoutError`` (a cut or stalled upstream), as the
client's own requests do.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from mirrorproxy.config import Upstream
from mirrorproxy.core.errors import BadGateway, GatewayTimeout, RegistryError, Relayed, Unavailable
from mirrorproxy.upstream.bodyreader import BodyReader


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one endpoint answered, for error messages and the final status.

    It owns one endpoint's outcome and whether that was an outage or a refusal; it
    must not hold the response itself (its body is read or released already).
    """

    endpoint: str
    outcome: str  # "404", "503", "timeout", "connection refused", ...
    status: int | None = None  # HTTP status when the endpoint answered
    errors: tuple[Mapping[str, object], ...] = ()  # the OCI error body of a 4xx answer

    def __str__(self) -> str:
        return f"{self.endpoint}: {self.outcome}"

    @property
    def outage(self) -> bool:
        """The endpoint could not answer (transport error, timeout, 5xx, 429)."""
        return self.status is None or self.status >= 500 or self.status == 429

    @property
    def refused(self) -> bool:
        """A definite answer about this request (400, 406, ...): not an outage, not
        a 404, and not about the mirror's own credentials (401/403)."""
        return self.status is not None and not self.outage and self.status not in (401, 403, 404)


class UpstreamError(Exception):
    """Every endpoint of a namespace failed; carries what each one said.

    It owns the judgement of those attempts (not found, outage, refused) and the
    registry error they amount to; it must not decide what to do about them
    (stale copies, retries): that is the pull-through policy's.
    """

    def __init__(self, what: str, attempts: list[Attempt]) -> None:
        self.what = what
        self.attempts = attempts
        summary = "; ".join(str(a) for a in attempts) or "no endpoint tried"
        super().__init__(f"{what}: {summary}")

    @property
    def not_found(self) -> bool:
        """A reachable endpoint said 404 and the others could not answer at all.

        A registry that answers "not found" is the answer that helps the user; an
        unreachable mirror beside it changes nothing about that.
        """
        return any(a.status == 404 for a in self.attempts) and all(
            a.status == 404 or a.outage for a in self.attempts
        )

    @property
    def outage(self) -> bool:
        """Some endpoint could not answer and none refused this request: a stale copy
        may stand in. A 404 beside an outage does not rule that out (a partial
        mirror first in line says 404 while the registry itself is down)."""
        return any(a.outage for a in self.attempts) and not any(a.refused for a in self.attempts)

    def registry_error(self, missing: type[RegistryError] | None = None) -> RegistryError:
        """The error to give the client.

        Args:
            missing: the error for "not found upstream" (BlobUnknown, say); without
                it, or for any other failure, a 4xx an upstream gave for this request
                (relayed), else a 502/503/504 naming the upstreams.
        """
        detail = {"upstreams": [str(a) for a in self.attempts]}
        if missing is not None and self.not_found:
            unreachable = [str(a) for a in self.attempts if a.outage]
            return missing(
                f"{self.what} not found upstream",
                {"unreachable": unreachable} if unreachable else None,
            )
        refused = next((a for a in self.attempts if a.refused), None)
        if refused is not None and refused.status is not None:
            return Relayed(
                refused.status,
                list(refused.errors),
                f"{refused.endpoint} refused {self.what}: {refused.outcome}",
                detail,
            )
        message = f"no upstream could serve {self.what}"
        if any(a.status is not None for a in self.attempts):
            return BadGateway(message, detail)
        if self.attempts and all(a.outcome == "timeout" for a in self.attempts):
            return GatewayTimeout(message, detail)
        return Unavailable(message, detail)


class UpstreamResponse:
    """An open upstream response (200, or 206 for a range) whose body is still to read.

    It owns one request's connection until ``release()`` (done with it, reusable)
    or ``close()`` (drop it, after a body error); the caller must call one of them.
    It must not be read by two readers at once, and it gives out no aiohttp object.
    """

    def __init__(self, upstream: Upstream, resp: aiohttp.ClientResponse, offset: int) -> None:
        self.upstream = upstream
        self._resp = resp
        self.offset = offset  # byte position of the first body byte (Range resumes)
        self._body: BodyReader | None = None  # reads the body once taken over

    @property
    def status(self) -> int:
        return self._resp.status

    @property
    def headers(self) -> Mapping[str, str]:
        """The response headers (names case-insensitive)."""
        return self._resp.headers

    @property
    def content_length(self) -> int | None:
        return self._resp.content_length

    @property
    def total(self) -> int | None:
        """The blob's size as an answer running to its end states it (from ``offset``)."""
        length = self._resp.content_length
        return None if length is None else self.offset + length

    async def readany(self) -> bytes:
        """The next bytes of the body as they come (any amount); ``b""`` at its end."""
        return await self._resp.content.readany()

    async def read_chunk(self, at_most: int, *, piece: int, limit: int) -> bytes | memoryview:
        """The next bytes of a body read for relaying, at most ``at_most`` once taken
        over (below); ``b""`` at its end.

        Once aiohttp's buffer is drained, a body of known length with at least
        ``at_most`` bytes to come is read by a ``BodyReader``: into buffers of
        ``piece`` bytes (as asked by the latest call; smaller for a shorter body), at
        most ``limit`` of them unread, and no copy on the way
        (the connection is then closed on release, not reused). Otherwise as
        aiohttp reads it, piece by piece as received (``readany`` would join them
        into a new copy).
        """
        if self._body is not None:
            self._body.set_piece(piece)
            return await self._body.read(at_most)
        content = self._resp.content
        data = content.read_nowait()
        if data:
            return data
        remaining = (self.content_length or 0) - content.total_bytes
        conn = self._resp.connection
        if remaining >= at_most and not content.is_eof() and conn is not None:
            transport = conn.transport
            previous = transport.get_protocol() if transport is not None else None
            if isinstance(transport, asyncio.Transport) and previous is not None:
                self._body = BodyReader(
                    transport,
                    previous,
                    remaining=remaining,
                    piece=piece,
                    limit=limit,
                    stall=self.upstream.read_timeout,
                    start=self.offset + content.total_bytes,
                )
                return await self._body.read(at_most)
        while True:
            data, end_of_http_chunk = await content.readchunk()
            if data or not end_of_http_chunk:
                return data

    def iter_chunked(self, n: int) -> AsyncIterator[bytes]:
        """The rest of the body in chunks of at most ``n`` bytes."""
        return self._resp.content.iter_chunked(n)

    async def read(self, n: int = -1) -> bytes:
        """Up to ``n`` bytes of the body (all of it with -1): for small bodies only."""
        return await self._resp.content.read(n)

    async def read_limited(self, limit: int, what: str) -> bytes:
        """The whole body, refused past ``limit`` bytes.

        Raises:
            TooLarge: the body is (or says it is) longer than ``limit``.
        """
        if (self.content_length or 0) > limit:
            raise TooLarge(f"{what} is larger than the {limit}-byte limit")
        body = bytearray()
        async for chunk in self.iter_chunked(65536):
            body += chunk
            if len(body) > limit:
                raise TooLarge(f"{what} is larger than the {limit}-byte limit")
        return bytes(body)

    def release(self) -> None:
        self._resp.release()

    def close(self) -> None:
        """Drop the connection (after a body error it cannot be reused)."""
        self._resp.close()


class TooLarge(Exception):
    """An upstream body went past the size limit for its kind."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A small upstream answer (manifest, tag list), read whole.

    It owns the body and the headers; it must not be used for blobs, which are
    streamed through an ``UpstreamResponse`` and never held in memory.
    """

    upstream: Upstream
    status: int
    headers: Mapping[str, str]
    body: bytes


ERROR_BODY_LIMIT = 16 * 1024


async def error_body(resp: aiohttp.ClientResponse) -> tuple[Mapping[str, object], ...]:
    """The ``errors`` of an upstream's OCI error body, if it sent a small one."""
    try:
        raw = await resp.content.read(ERROR_BODY_LIMIT + 1)
        doc = json.loads(raw) if len(raw) <= ERROR_BODY_LIMIT else None
    except (aiohttp.ClientError, TimeoutError, ValueError):
        return ()
    errors = doc.get("errors") if isinstance(doc, dict) else None
    if not isinstance(errors, list):
        return ()
    out = []
    for e in errors[:10]:
        if isinstance(e, dict) and isinstance(e.get("code"), str):
            out.append({"code": e["code"][:100], "message": str(e.get("message", ""))[:500]})
    return tuple(out)


def range_offset(headers: Mapping[str, str]) -> int | None:
    """The first byte of a 206 body, from ``Content-Range: bytes a-b/n``."""
    value = headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    first = rest.split("-", 1)[0]
    # isdigit() alone takes "²", which int() refuses: ASCII digits only, and few.
    ok = unit == "bytes" and first.isascii() and first.isdigit() and len(first) <= 18
    return int(first) if ok else None


def retry_after(value: str | None) -> float | None:
    """The seconds of a ``Retry-After`` header; None for its date form or junk."""
    seconds = (value or "").strip()
    if seconds.isascii() and seconds.isdigit() and len(seconds) <= 18:
        return float(seconds)
    return None  # HTTP-date form: fall back to the normal cooldown


PAGING_KEYS = ("n", "last")  # what a registry's pagination Link carries that we pass on


def next_page(link: str | None) -> dict[str, str]:
    """The paging query of a ``Link: <...>; rel="next"`` header ({} when there is none).

    Only ``n`` and ``last`` are kept: the rest of an upstream's URL is its own.
    """
    if not link or "<" not in link or ">" not in link:
        return {}
    try:
        query = URL(link[link.index("<") + 1 : link.index(">")]).query
    except ValueError:
        return {}
    return {k: query[k] for k in PAGING_KEYS if k in query and len(query[k]) <= 512}
