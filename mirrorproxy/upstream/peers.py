"""Peers: the members of a [cluster] asked for a blob or manifest before its upstreams.

For each key (a blob's or manifest's digest, a tag) the members ahead of this one in
rendezvous order are asked first, owner first, with ``X-Mirrorproxy-Forwarded``: the
owner then serves it itself (its cache, else its own shared download from upstream)
and never forwards it again, so members that disagree about the member list cannot
send a request round in circles. What a member answers is treated like an upstream's
answer: its bytes are verified by digest by whoever reads them.

- 200/206: the answer. 404 and other definite 4xx: the answer too (relayed; the
  owner asked the upstream). 401/403: the owner refused the client (its config
  differs): the next member is asked.
- Connection errors, timeouts, 5xx, 429: the member cools down (doubling per
  failure, like an upstream) and the next one is asked; after the last, this
  member's own upstreams. 508: the owner is itself forwarding this key (the member
  lists disagree): the next one is asked, nobody cools down.

It owns the members' session, their health and the cluster metrics; it must not
touch the cache.
"""

from __future__ import annotations

import logging
import ssl
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field

import aiohttp
from yarl import URL

from mirrorproxy.config import ClusterConfig, Upstream, UpstreamDefaults
from mirrorproxy.core.rendezvous import FORWARDED_HEADER, ahead_of
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.upstream.members import Members
from mirrorproxy.upstream.response import (
    Attempt,
    UpstreamError,
    UpstreamResponse,
    error_body,
    range_offset,
)
from mirrorproxy.upstream.sessions import USER_AGENT

logger = logging.getLogger(__name__)

LOOP_STATUS = 508  # "Loop Detected": the owner asked is forwarding this key itself


@dataclass(frozen=True, slots=True)
class Peer(Upstream):
    """A cluster member, as an endpoint a request can be sent to."""


@dataclass(frozen=True, slots=True)
class PeerRoute:
    """What the members need to know of one request: its key, and whether it came
    from a member already (then it is served here and never forwarded)."""

    key: str  # rendezvous key (core.rendezvous.blob_key, tag_key, manifest_key)
    kind: str  # "blob" or "manifest", for the metrics
    forwarded: bool = False
    # The client's own credentials, passed on so the owner checks them again.
    authorization: str | None = field(default=None, repr=False)


@dataclass(slots=True)
class _Health:
    failures: int = 0
    until: float = 0.0


class Peers:
    """The members ahead of this one for a key, and requests to them."""

    def __init__(
        self,
        cluster: ClusterConfig,
        members: Members,
        defaults: UpstreamDefaults,
        metrics: Metrics,
        clock: Callable[[], float],
    ) -> None:
        """``members``: the server's member list (started and closed by its owner)."""
        self.self_url = cluster.self_url
        self.members = members
        self._cluster, self._defaults = cluster, defaults
        self._metrics, self._clock = metrics, clock
        self._peers: dict[str, Peer] = {}
        self._health: dict[str, _Health] = {}
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False,
            headers={"User-Agent": USER_AGENT, "Accept-Encoding": "identity"},
            connector=aiohttp.TCPConnector(
                limit=0, limit_per_host=self._defaults.max_fetches, ssl=self._tls()
            ),
            trust_env=False,  # members talk directly, never through an HTTP proxy
            read_bufsize=4 * 1024 * 1024,
        )

    def _tls(self) -> ssl.SSLContext | bool:
        """How https:// members are checked: the system's CAs, or ``[cluster] ca``."""
        ca = self._cluster.ca
        return ssl.create_default_context(cafile=str(ca)) if ca is not None else True

    def _server_name(self, url: str) -> str | None:
        """The name an https:// member's certificate is checked against, if not its own."""
        return self._cluster.server_name if url.startswith("https:") else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()
            self._session = None

    def is_peer(self, url: str | None) -> bool:
        return url in self._peers

    def ahead(self, route: PeerRoute | None) -> list[Peer]:
        """The members to ask for ``route``, owner first; those cooling down left out."""
        if route is None or route.forwarded:
            return []
        now = self._clock()
        return [
            self._peer(url)
            for url in ahead_of(self.self_url, route.key, self.members.current)
            if self._health.get(url, _Health()).until <= now
        ]

    def forwards(self, route: PeerRoute | None) -> bool:
        """Whether a fetch for ``route`` would ask another member first."""
        return bool(self.ahead(route))

    def count_fetch(self, route: PeerRoute | None, asked: bool) -> None:
        """Count an upstream fetch by this member: as the owner, or as a fallback."""
        if route is None:
            return
        ranked = ahead_of(self.self_url, route.key, self.members.current)
        if asked or (ranked and not route.forwarded):
            self._metrics.cluster_fallbacks.labels(route.kind).inc()
        else:
            self._metrics.cluster_owned_fills.labels(route.kind).inc()

    def _peer(self, url: str) -> Peer:
        peer = self._peers.get(url)
        if peer is None:
            d, c = self._defaults, self._cluster
            peer = self._peers[url] = Peer(
                url=url,
                origin=url,
                path="/v2",
                ns=True,
                connect_timeout=c.peer_timeout,
                # The owner answers once its own upstream did: allow for that wait.
                read_timeout=d.connect_timeout + d.read_timeout,
            )
        return peer

    def mark_failed(self, peer: Upstream, reason: str) -> None:
        """Cool ``peer`` down: ``defaults.cooldown``, doubling per failure."""
        h = self._health.setdefault(peer.url, _Health())
        h.failures += 1
        delay = min(self._defaults.cooldown * 2 ** (h.failures - 1), self._defaults.max_cooldown)
        h.until = self._clock() + delay
        self._metrics.cluster_peer_failures.labels(reason).inc()
        logger.warning("cluster member %s (%s) in cooldown for %.1fs", peer.url, reason, delay)

    def mark_ok(self, peer: Upstream) -> None:
        if self._health.pop(peer.url, None) is not None:
            logger.info("cluster member %s is answering again", peer.url)

    async def post_json(self, member: str, path: str, body: bytes) -> bool:
        """POST ``body`` (JSON) to ``member``'s internal ``path``, marked as from a
        member; whether it answered 2xx. A failure cools nobody down: it is a report,
        not a request a client waits for."""
        assert self._session is not None  # noqa: S101 - started before any report
        headers = {FORWARDED_HEADER: self.self_url, "Content-Type": "application/json"}
        timeout = aiohttp.ClientTimeout(total=self._cluster.peer_timeout * 2)
        try:
            async with self._session.post(
                f"{member}{path}",
                data=body,
                headers=headers,
                timeout=timeout,
                server_hostname=self._server_name(member),
            ) as resp:
                await resp.read()
                ok = 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError) as err:
            logger.info("cluster member %s: cannot report use: %r", member, err)
            return False
        if not ok:
            logger.info("cluster member %s answered %d to a report", member, resp.status)
        return ok

    async def open(
        self,
        route: PeerRoute | None,
        ns_name: str,
        method: str,
        path: str,
        *,
        what: str,
        headers: Mapping[str, str],
        start: int,
        stream: bool,
        attempts: list[Attempt],
    ) -> UpstreamResponse | None:
        """Ask the members ahead of this one; None: none could, fetch it yourself.

        Failed members' outcomes are appended to ``attempts``.

        Raises:
            UpstreamError: a member gave a definite answer (404, 400, ...).
        """
        peers = self.ahead(route)
        if route is None or not peers:
            if method == "GET" and not start:
                self.count_fetch(route, asked=False)
            return None
        for peer in peers:
            got = await self._try(route, peer, ns_name, method, path, headers, start, stream)
            if isinstance(got, UpstreamResponse):
                return got
            attempts.append(got)
            if got.status is not None and _definite(got.status):
                raise UpstreamError(what, attempts)
        if method == "GET" and not start:
            self.count_fetch(route, asked=True)
        return None

    async def _try(
        self,
        route: PeerRoute,
        peer: Peer,
        ns_name: str,
        method: str,
        path: str,
        headers: Mapping[str, str],
        start: int,
        stream: bool,
    ) -> UpstreamResponse | Attempt:
        assert self._session is not None  # noqa: S101 - started before any request
        url = URL(f"{peer.origin}/v2/{path}", encoded=True).update_query(ns=ns_name)
        sent = {**headers, FORWARDED_HEADER: self.self_url}
        if route.authorization:
            sent["Authorization"] = route.authorization
        timeout = aiohttp.ClientTimeout(
            total=None if stream else peer.connect_timeout + peer.read_timeout,
            sock_connect=peer.connect_timeout,
            sock_read=peer.read_timeout,
        )
        count = self._metrics.cluster_forwarded
        try:
            resp = await self._session.request(
                method,
                url,
                headers=sent,
                timeout=timeout,
                server_hostname=self._server_name(str(url)),
            )
        except (aiohttp.ClientError, TimeoutError) as err:
            reason = "timeout" if isinstance(err, TimeoutError) else "unreachable"
            count.labels(route.kind, "error").inc()
            self.mark_failed(peer, reason)
            return Attempt(peer.url, reason if reason == "timeout" else f"cannot connect ({err})")
        ranged = "Range" in headers
        if resp.status == 200 or (resp.status == 206 and ranged):
            offset = range_offset(resp.headers) if resp.status == 206 else 0
            if offset is None or offset > start:
                resp.close()
                count.labels(route.kind, "error").inc()
                self.mark_failed(peer, "status")
                return Attempt(peer.url, "bad Content-Range on resume", resp.status)
            count.labels(route.kind, "ok").inc()
            self.mark_ok(peer)
            return UpstreamResponse(peer, resp, offset)
        status = resp.status
        errors: tuple[Mapping[str, object], ...] = ()
        if 400 <= status < 500 and method != "HEAD":
            errors = await error_body(resp)
        resp.release()
        if status == LOOP_STATUS:
            result = "loop"
        elif status >= 500 or status == 429:
            result = "error"
            self.mark_failed(peer, "status")
        else:
            result = "not_found" if status == 404 else "refused"
        count.labels(route.kind, result).inc()
        logger.info("cluster member %s answered %d for %s %s", peer.url, status, method, path)
        return Attempt(peer.url, str(status), status, errors)


def _definite(status: int) -> bool:
    """A member's answer that settles the request (relayed): a 4xx about it, not
    about the client's credentials (401/403) or the member's load (429)."""
    return 400 <= status < 500 and status not in (401, 403, 429)
