"""UpstreamClient: requests to a namespace's endpoints, in order, with failover.

It knows endpoints, timeouts, sessions and HTTP; it knows nothing of the cache.
A request goes to the first endpoint not in cooldown and moves on when one fails
(connection error, timeout, any status but 200/206). In a [cluster], a request
given a ``PeerRoute`` first goes to the members ahead of this one for its key
(``peers``), then to the upstreams. Cooldowns are ``health``'s;
the answers it gives back (open responses, small bodies, the attempts of a failed
request) are ``response``'s, and this module is where callers import them from.

Over 300 lines because the one failover walk (members, then endpoints; streamed
and small bodies; authentication retries) reads best in one class.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Collection, Mapping

import aiohttp
from yarl import URL

from mirrorproxy.config import Config, Namespace, Upstream
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.upstream.auth import Authenticator, AuthError, parse_www_authenticate, scope_for
from mirrorproxy.upstream.health import EndpointHealth
from mirrorproxy.upstream.members import Members
from mirrorproxy.upstream.peers import Peer, PeerRoute, Peers
from mirrorproxy.upstream.response import (
    Attempt,
    Fetched,
    TooLarge,
    UpstreamError,
    UpstreamResponse,
    error_body,
    range_offset,
    retry_after,
)
from mirrorproxy.upstream.sessions import new_session

__all__ = [
    "Attempt",
    "Fetched",
    "PeerRoute",
    "TooLarge",
    "UpstreamClient",
    "UpstreamError",
    "UpstreamResponse",
]

logger = logging.getLogger(__name__)


class UpstreamClient:
    """Failover over a namespace's endpoints, one ClientSession per endpoint.

    It owns the sessions, the request timeouts, authentication to upstreams and the
    endpoint health; it must not touch the cache or build HTTP responses for the
    mirror's clients (an ``UpstreamError`` says what failed; the caller answers).
    """

    def __init__(
        self,
        config: Config,
        metrics: Metrics,
        *,
        clock: Callable[[], float] = time.monotonic,
        members: Members | None = None,
    ) -> None:
        """``members``: the server's live member list (its owner starts it; without
        one, the configured ``members`` are used as they are)."""
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._sessions: dict[Upstream, aiohttp.ClientSession] = {}
        self._health = EndpointHealth(config.defaults, metrics, clock)
        self._auth = Authenticator(clock=clock)
        cluster = config.cluster
        self._peers = None
        if cluster is not None:
            members = members or Members(cluster, metrics)
            self._peers = Peers(cluster, members, config.defaults, metrics, clock)

    async def start(self) -> None:
        if self._peers is not None:
            await self._peers.start()
        for ns in self._config.namespaces.values():
            for up in ns.upstreams:
                if up not in self._sessions:
                    self._sessions[up] = new_session(up, self._config.defaults.max_fetches)
                self._metrics.upstream_up.labels(ns.name, up.url).set(1)

    async def close(self) -> None:
        if self._peers is not None:
            await self._peers.close()
        sessions, self._sessions = list(self._sessions.values()), {}
        await asyncio.gather(*(s.close() for s in sessions), return_exceptions=True)

    def mark_failed(
        self,
        ns: Namespace,
        up: Upstream,
        *,
        retry_after: float | None = None,
        corrupt: bool = False,
    ) -> None:
        """Cool ``up`` down (see ``EndpointHealth.mark_failed``; a member: ``Peers``)."""
        if isinstance(up, Peer) and self._peers is not None:
            self._peers.mark_failed(up, "corrupt" if corrupt else "body")
            return
        self._health.mark_failed(ns, up, retry_after=retry_after, corrupt=corrupt)

    def mark_verified(self, ns: Namespace, up: Upstream) -> None:
        """A body from ``up`` matched its digest: whatever it failed before, it is healthy."""
        if isinstance(up, Peer) and self._peers is not None:
            self._peers.mark_ok(up)
            return
        self._health.mark_verified(ns, up)

    def forwards(self, route: PeerRoute | None) -> bool:
        """Whether a request for ``route`` would go to another cluster member first."""
        return self._peers is not None and self._peers.forwards(route)

    async def post_member(self, member: str, path: str, body: bytes) -> bool:
        """POST JSON to a cluster member's internal ``path`` (see ``Peers.post_json``)."""
        return self._peers is not None and await self._peers.post_json(member, path, body)

    def is_peer(self, url: str | None) -> bool:
        """Whether ``url`` is a cluster member's (an answer came from a member)."""
        return self._peers is not None and self._peers.is_peer(url)

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
        route: PeerRoute | None = None,
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
            route: in a cluster, which members to ask first (see ``peers``).

        Raises:
            UpstreamError: every candidate endpoint failed, or a member gave a
                definite answer (a 404, say).
        """
        attempts: list[Attempt] = []
        req_headers = dict(headers or {})
        if start or end is not None:
            req_headers["Range"] = f"bytes={start}-{'' if end is None else end}"
        ranged = "Range" in req_headers
        if self._peers is not None:
            got = await self._peers.open(
                route,
                ns_name,
                method,
                path,
                what=what,
                headers=req_headers,
                start=start,
                stream=stream,
                attempts=attempts,
            )
            if got is not None:
                return got
        for i, up in enumerate(self._health.candidates(ns, avoid)):
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
        route: PeerRoute | None = None,
    ) -> Fetched:
        """GET a small body (manifest, tag list) with failover that covers the body too.

        A connection cut or timeout while reading the body cools that endpoint down
        and moves on, like a failure before the headers.

        Raises:
            UpstreamError: every candidate endpoint failed.
            TooLarge: an endpoint sent more than ``limit`` bytes.
        """
        attempts: list[Attempt] = []
        for _ in range(len(self._peers.members.current) if self._peers else 0):
            assert self._peers is not None  # noqa: S101 - the loop runs only then
            resp = await self._peers.open(
                route,
                ns_name,
                "GET",
                path,
                what=what,
                headers=dict(headers or {}),
                start=0,
                stream=False,
                attempts=attempts,
            )
            if resp is None:
                break
            fetched = await self._read_small(ns, resp, limit, what, attempts)
            if fetched is not None:
                return fetched
        for i, up in enumerate(self._health.candidates(ns)):
            if i:
                self._metrics.upstream_failovers.labels(ns.name).inc()
            attempt = await self._try(
                ns, ns_name, up, "GET", path, dict(headers or {}), query, 0, False, False
            )
            if not isinstance(attempt, UpstreamResponse):
                attempts.append(attempt)
                continue
            fetched = await self._read_small(ns, attempt, limit, what, attempts)
            if fetched is not None:
                return fetched
        raise UpstreamError(what, attempts)

    async def _read_small(
        self,
        ns: Namespace,
        resp: UpstreamResponse,
        limit: int,
        what: str,
        attempts: list[Attempt],
    ) -> Fetched | None:
        """Read a small body; None (the endpoint cooled down) when it was cut short."""
        up = resp.upstream
        try:
            body = await resp.read_limited(limit, what)
        except (aiohttp.ClientError, TimeoutError) as err:
            resp.close()
            self.mark_failed(ns, up)
            outcome = "timeout" if isinstance(err, TimeoutError) else "body cut short"
            attempts.append(Attempt(up.url, outcome))
            return None
        finally:
            resp.release()
        return Fetched(up, resp.status, resp.headers, body)

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
            offset = range_offset(resp.headers) if resp.status == 206 else 0
            if offset is None or offset > start:
                resp.close()
                self.mark_failed(ns, up)
                return Attempt(up.url, "bad Content-Range on resume", resp.status)
            self._health.mark_ok(ns, up)
            return UpstreamResponse(up, resp, offset)
        errors: tuple[Mapping[str, object], ...] = ()
        if 400 <= resp.status < 500 and resp.status not in (401, 404, 429) and method != "HEAD":
            errors = await error_body(resp)
        resp.release()
        if resp.status == 429:
            self.mark_failed(ns, up, retry_after=retry_after(resp.headers.get("Retry-After")))
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
