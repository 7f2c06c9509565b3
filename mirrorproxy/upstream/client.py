"""UpstreamClient: requests to a namespace's endpoints, in order, with failover.

It knows endpoints, timeouts, cooldowns and HTTP; it knows nothing of the cache.
A request goes to the first endpoint not in cooldown and moves on when one fails
(connection error, timeout, any status but 200/206). An endpoint that failed at
the transport level or with 5xx/429 is skipped for a cooldown that doubles per
consecutive failure, so a dead first mirror does not cost every request a timeout.
An endpoint that sent bytes which failed verification is cooled down the same way,
but only a verified body makes it healthy again (``mark_verified``): its answering
with 200 says nothing about its bytes.
"""

from __future__ import annotations

import asyncio
import json
import logging
import ssl
import time
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass

import aiohttp
from yarl import URL

from mirrorproxy import __version__
from mirrorproxy.config import Config, Namespace, Upstream
from mirrorproxy.core.errors import BadGateway, GatewayTimeout, RegistryError, Relayed, Unavailable
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.upstream.auth import Authenticator, AuthError, parse_www_authenticate, scope_for

logger = logging.getLogger(__name__)

USER_AGENT = f"mirrorproxy/{__version__}"
MAX_RETRY_AFTER = 3600.0


@dataclass(frozen=True, slots=True)
class Attempt:
    """What one endpoint answered, for error messages and the final status."""

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
    """Every endpoint of a namespace failed; carries what each one said."""

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
    """An open upstream response; the caller reads the body and must ``release()``."""

    def __init__(self, upstream: Upstream, resp: aiohttp.ClientResponse, offset: int) -> None:
        self.upstream = upstream
        self.resp = resp
        self.offset = offset  # byte position of the first body byte (Range resumes)

    @property
    def status(self) -> int:
        return self.resp.status

    @property
    def headers(self) -> Mapping[str, str]:
        return self.resp.headers

    @property
    def content_length(self) -> int | None:
        return self.resp.content_length

    def release(self) -> None:
        self.resp.release()

    def close(self) -> None:
        """Drop the connection (after a body error it cannot be reused)."""
        self.resp.close()


@dataclass(slots=True)
class _Health:
    failures: int = 0
    until: float = 0.0
    corrupt: bool = False  # its last failure was bad bytes: only a verified body clears it


class UpstreamClient:
    """Failover over a namespace's endpoints, one ClientSession per endpoint."""

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._sessions: dict[Upstream, aiohttp.ClientSession] = {}
        self._health: dict[tuple[str, str], _Health] = {}
        self._auth = Authenticator(clock=clock)

    async def start(self) -> None:
        for ns in self._config.namespaces.values():
            for up in ns.upstreams:
                if up not in self._sessions:
                    self._sessions[up] = aiohttp.ClientSession(
                        auto_decompress=False,  # blob bytes must reach clients untouched
                        # Blob and manifest bytes are passed on as they are: ask for
                        # them as they are (we never decompress).
                        headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
                        # max_fetches: an HTTP/1.1 request holds one connection of
                        # its endpoint's connector from send until its body is read
                        # or released (a streamed blob included), so `limit` caps the
                        # requests in flight to this endpoint; more wait for a slot.
                        connector=aiohttp.TCPConnector(
                            limit=self._config.defaults.max_fetches,
                            ttl_dns_cache=60,
                            ssl=ssl_context(up),
                        ),
                        trust_env=True,  # HTTP(S)_PROXY and NO_PROXY; `proxy =` overrides
                        read_bufsize=4 * 1024 * 1024,  # do not pause the socket per 64 KiB
                    )
                self._metrics.upstream_up.labels(ns.name, up.url).set(1)

    async def close(self) -> None:
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    def in_cooldown(self, ns: Namespace, up: Upstream) -> bool:
        h = self._health.get((ns.name, up.url))
        return h is not None and h.until > self._clock()

    def mark_failed(
        self,
        ns: Namespace,
        up: Upstream,
        *,
        retry_after: float | None = None,
        corrupt: bool = False,
    ) -> None:
        """Put an endpoint in cooldown: given by Retry-After, else doubling per failure.

        ``corrupt``: it sent bytes that failed verification; it stays unhealthy (each
        further failure doubling its cooldown) until ``mark_verified``.
        """
        h = self._health.setdefault((ns.name, up.url), _Health())
        h.failures += 1
        h.corrupt = h.corrupt or corrupt
        d = self._config.defaults
        if retry_after is not None:
            delay = min(retry_after, MAX_RETRY_AFTER)
        else:
            delay = min(d.cooldown * 2 ** (h.failures - 1), d.max_cooldown)
        h.until = self._clock() + delay
        self._metrics.upstream_up.labels(ns.name, up.url).set(0)
        logger.warning("upstream %s (%s) in cooldown for %.1fs", up.url, ns.name, delay)

    def mark_verified(self, ns: Namespace, up: Upstream) -> None:
        """A body from ``up`` matched its digest: whatever it failed before, it is healthy."""
        self._restore(ns, up)

    def _mark_ok(self, ns: Namespace, up: Upstream) -> None:
        """Response headers came: enough to trust a transport again, not its bytes."""
        h = self._health.get((ns.name, up.url))
        if h is not None and not h.corrupt:
            self._restore(ns, up)

    def _restore(self, ns: Namespace, up: Upstream) -> None:
        if self._health.pop((ns.name, up.url), None) is not None:
            self._metrics.upstream_up.labels(ns.name, up.url).set(1)
            logger.info("upstream %s (%s) is healthy again", up.url, ns.name)

    def candidates(self, ns: Namespace, avoid: Collection[str] = ()) -> list[Upstream]:
        """Endpoints to try, in order: those not cooling down, or all if every one is.

        Endpoints named in ``avoid`` (URLs) come last: tried only when no other can serve.
        """
        ready = [u for u in ns.upstreams if not self.in_cooldown(ns, u)] or list(ns.upstreams)
        return [u for u in ready if u.url not in avoid] + [u for u in ready if u.url in avoid]

    def url_for(self, up: Upstream, ns_name: str, path: str) -> URL:
        url = URL(up.origin + up.path + "/" + path, encoded=True)
        return url.update_query(ns=ns_name) if up.ns else url

    async def open(
        self,
        ns: Namespace,
        ns_name: str,
        method: str,
        path: str,
        *,
        what: str,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
        start: int = 0,
        end: int | None = None,
        stream: bool = False,
        avoid: Collection[str] = (),
    ) -> UpstreamResponse:
        """Send a request to the first endpoint that answers 200 (or 206 for a range).

        Args:
            ns: the configured namespace; ns_name: the registry the client asked for.
            path: below the API root, e.g. ``library/alpine/manifests/3`` (validated).
            what: names the object in errors ("manifest library/alpine:3").
            start: resume a blob at this byte with ``Range: bytes=start-``.
            end: with ``start``, the last byte wanted (``Range: bytes=start-end``).
            stream: a blob body (no total timeout, only connect and read timeouts).
            avoid: endpoint URLs to try last (they sent this blob corrupt lately).

        Raises:
            UpstreamError: every candidate endpoint failed.
        """
        attempts: list[Attempt] = []
        req_headers = dict(headers or {})
        if start or end is not None:
            req_headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        ranged = "Range" in req_headers
        for i, up in enumerate(self.candidates(ns, avoid)):
            if i:
                self._metrics.upstream_failovers.labels(ns.name).inc()
            attempt = await self._try(
                ns, ns_name, up, method, path, req_headers, query, start, stream, ranged
            )
            if isinstance(attempt, UpstreamResponse):
                return attempt
            attempts.append(attempt)
        raise UpstreamError(what, attempts)

    async def fetch(
        self,
        ns: Namespace,
        ns_name: str,
        path: str,
        *,
        what: str,
        limit: int,
        headers: Mapping[str, str] | None = None,
        query: Mapping[str, str] | None = None,
    ) -> Fetched:
        """GET a small body (manifest, tag list) with failover that covers the body too.

        A connection cut or timeout while reading the body cools that endpoint down
        and moves on, like a failure before the headers.

        Raises:
            UpstreamError: every candidate endpoint failed.
            TooLarge: an endpoint sent more than ``limit`` bytes.
        """
        attempts: list[Attempt] = []
        for i, up in enumerate(self.candidates(ns)):
            if i:
                self._metrics.upstream_failovers.labels(ns.name).inc()
            attempt = await self._try(
                ns, ns_name, up, "GET", path, dict(headers or {}), query, 0, False, False
            )
            if not isinstance(attempt, UpstreamResponse):
                attempts.append(attempt)
                continue
            try:
                body = await _read_limited(attempt, limit, what)
            except (aiohttp.ClientError, TimeoutError) as err:
                attempt.close()
                self.mark_failed(ns, up)
                outcome = "timeout" if isinstance(err, TimeoutError) else "body cut short"
                attempts.append(Attempt(up.url, outcome))
                continue
            finally:
                attempt.release()
            return Fetched(up, attempt.status, attempt.headers, body)
        raise UpstreamError(what, attempts)

    async def _try(
        self,
        ns: Namespace,
        ns_name: str,
        up: Upstream,
        method: str,
        path: str,
        headers: dict[str, str],
        query: Mapping[str, str] | None,
        start: int,
        stream: bool,
        ranged: bool,
    ) -> UpstreamResponse | Attempt:
        url = self.url_for(up, ns_name, path)
        if query:
            url = url.update_query(query)
        timeout = aiohttp.ClientTimeout(
            total=None if stream else up.connect_timeout + up.read_timeout,
            sock_connect=up.connect_timeout,
            sock_read=up.read_timeout,
        )
        count = self._metrics.upstream_requests
        try:
            resp = await self._send(up, method, url, headers, timeout, scope_for(path))
        except AuthError as err:
            count.labels(ns.name, up.url, "401").inc()
            return Attempt(up.url, f"401 unauthorized: {err}", 401)
        except TimeoutError:
            count.labels(ns.name, up.url, "timeout").inc()
            self.mark_failed(ns, up)
            return Attempt(up.url, "timeout")
        except aiohttp.ClientConnectorError as err:
            count.labels(ns.name, up.url, "error").inc()
            self.mark_failed(ns, up)
            return Attempt(up.url, f"cannot connect ({err.os_error.strerror or err.os_error})")
        except aiohttp.ClientError as err:
            count.labels(ns.name, up.url, "error").inc()
            self.mark_failed(ns, up)
            return Attempt(up.url, f"{type(err).__name__}: {err}"[:200])
        count.labels(ns.name, up.url, str(resp.status)).inc()
        if resp.status == 200 or (resp.status == 206 and ranged):
            offset = _range_offset(resp) if resp.status == 206 else 0
            if offset is None or offset > start:
                resp.close()
                self.mark_failed(ns, up)
                return Attempt(up.url, "bad Content-Range on resume", resp.status)
            self._mark_ok(ns, up)
            return UpstreamResponse(up, resp, offset)
        errors: tuple[Mapping[str, object], ...] = ()
        if 400 <= resp.status < 500 and resp.status not in (401, 404, 429) and method != "HEAD":
            errors = await _error_body(resp)
        resp.release()
        if resp.status == 429:
            self.mark_failed(ns, up, retry_after=_retry_after(resp.headers.get("Retry-After")))
        elif resp.status >= 500:
            self.mark_failed(ns, up)
        logger.info("upstream %s answered %d for %s %s", up.url, resp.status, method, path)
        return Attempt(up.url, str(resp.status), resp.status, errors)

    async def _send(
        self,
        up: Upstream,
        method: str,
        url: URL,
        headers: dict[str, str],
        client_timeout: aiohttp.ClientTimeout,
        scope: str,
    ) -> aiohttp.ClientResponse:
        """Send once; on a 401 with a challenge we can answer, authenticate and resend."""
        session = self._sessions[up]
        auth = self._auth.cached(up, scope)
        resp = await session.request(
            method,
            url,
            headers=headers if auth is None else {**headers, "Authorization": auth},
            timeout=client_timeout,
            proxy=up.proxy,
        )
        if resp.status != 401:
            return resp
        challenges = parse_www_authenticate(resp.headers.getall("WWW-Authenticate", []))
        resp.release()
        fresh = await self._auth.authorize(
            session, up, challenges, scope, rejected=auth, client_timeout=client_timeout
        )
        if fresh is None:
            if up.username is None:
                raise AuthError(f"{up.url} requires credentials and none are configured")
            raise AuthError(f"{up.url} rejected the configured credentials")
        return await session.request(
            method,
            url,
            headers={**headers, "Authorization": fresh},
            timeout=client_timeout,
            proxy=up.proxy,
        )


def ssl_context(up: Upstream) -> ssl.SSLContext | bool:
    """The TLS settings of one upstream: its CA, client certificate, or no checks."""
    if not up.origin.startswith("https:"):
        return True  # plain http: unused
    ctx = ssl.create_default_context(cafile=str(up.ca) if up.ca else None)
    if up.skip_verify:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if up.client_cert is not None:
        ctx.load_cert_chain(up.client_cert, up.client_key)
    return ctx


class TooLarge(Exception):
    """An upstream body went past the size limit for its kind."""


@dataclass(frozen=True, slots=True)
class Fetched:
    """A small upstream answer, read whole."""

    upstream: Upstream
    status: int
    headers: Mapping[str, str]
    body: bytes


async def _read_limited(resp: UpstreamResponse, limit: int, what: str) -> bytes:
    if (resp.content_length or 0) > limit:
        raise TooLarge(f"{what} is larger than the {limit}-byte limit")
    body = bytearray()
    async for chunk in resp.resp.content.iter_chunked(65536):
        body += chunk
        if len(body) > limit:
            raise TooLarge(f"{what} is larger than the {limit}-byte limit")
    return bytes(body)


ERROR_BODY_LIMIT = 16 * 1024


async def _error_body(resp: aiohttp.ClientResponse) -> tuple[Mapping[str, object], ...]:
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


def _range_offset(resp: aiohttp.ClientResponse) -> int | None:
    """The first byte of a 206 body, from ``Content-Range: bytes a-b/n``."""
    value = resp.headers.get("Content-Range", "")
    unit, _, rest = value.partition(" ")
    first = rest.split("-", 1)[0]
    # isdigit() alone takes "²", which int() refuses: ASCII digits only, and few.
    ok = unit == "bytes" and first.isascii() and first.isdigit() and len(first) <= 18
    return int(first) if ok else None


def _retry_after(value: str | None) -> float | None:
    seconds = (value or "").strip()
    if seconds.isascii() and seconds.isdigit() and len(seconds) <= 18:
        return float(seconds)
    return None  # HTTP-date form: fall back to the normal cooldown
