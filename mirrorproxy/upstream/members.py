"""The members of a [cluster]: the configured list, or a DNS name looked up periodically.

With ``members_dns`` the members are ``<scheme>://<address>:<port>`` for every A/AAAA
record of the name (a Kubernetes headless Service lists its ready pods that way),
sorted, re-resolved every ``refresh``. A failed lookup keeps the last good list: a
DNS hiccup must not turn every member into a cluster of one. It owns that list and
the ``cluster_members`` gauge, and tells ``on_change`` listeners when the list
changed (a cache budget split by owner follows it); it must not send requests to
the members. One per server: everything that needs the list asks this one.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Awaitable, Callable
from urllib.parse import urlsplit

from mirrorproxy.config import ClusterConfig
from mirrorproxy.config.cluster import member_url
from mirrorproxy.observability.metrics import Metrics

logger = logging.getLogger(__name__)

Resolver = Callable[[str, int], Awaitable[list[str]]]
LOOKUP_TIMEOUT = 5.0  # seconds one lookup may take before the last list is kept


async def resolve_addresses(host: str, port: int) -> list[str]:
    """The IP addresses ``host`` resolves to (the loop's resolver, in a thread)."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, port, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


class Members:
    """The current member list (``current``), kept fresh from DNS when configured."""

    def __init__(
        self, cluster: ClusterConfig, metrics: Metrics, *, resolver: Resolver = resolve_addresses
    ) -> None:
        self._cluster = cluster
        self._metrics = metrics
        self._resolver = resolver
        self.current: tuple[str, ...] = cluster.members
        # Called (on the loop) right after ``current`` changed.
        self.on_change: list[Callable[[], None]] = []
        self._task: asyncio.Task[None] | None = None
        metrics.cluster_members.set(len(self.current))

    async def start(self) -> None:
        """Look the members up once (when from DNS), then every ``refresh``."""
        if self._cluster.members_dns is None:
            return
        await self.refresh()
        self._task = asyncio.create_task(self._refresh_forever(), name="cluster members")

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None

    async def refresh(self) -> None:
        """Resolve ``members_dns`` now; on failure keep (and say) the last good list."""
        dns = self._cluster.members_dns
        if dns is None:
            return
        host, port = dns
        scheme = urlsplit(self._cluster.self_url).scheme
        try:
            async with asyncio.timeout(LOOKUP_TIMEOUT):
                addresses = await self._resolver(host, port)
            found = sorted({member_url(f"{scheme}://{_bracket(a)}:{port}") for a in addresses})
        except (OSError, TimeoutError, ValueError) as err:
            logger.warning(
                "cluster: cannot look up members %s:%d (%s); keeping %d members",
                host,
                port,
                str(err) or type(err).__name__,
                len(self.current),
            )
            return
        if not found:
            logger.warning("cluster: %s has no addresses; keeping the last members", host)
            return
        members = tuple(found)
        if members == self.current:
            return
        self.current = members
        self._metrics.cluster_members.set(len(members))
        for listener in self.on_change:
            listener()
        logger.info("cluster: %d members: %s", len(members), ", ".join(members))
        if self._cluster.self_url not in members:
            logger.warning(
                "cluster: this member (%s) is not among the members %s resolves to;"
                " it asks them and serves as the last resort",
                self._cluster.self_url,
                host,
            )

    async def _refresh_forever(self) -> None:
        while True:
            await asyncio.sleep(self._cluster.refresh)
            await self.refresh()


def _bracket(address: str) -> str:
    return f"[{address.split('%', 1)[0]}]" if ":" in address else address
