"""Which endpoints of a namespace to try, and in what order: cooldowns per endpoint.

An endpoint that failed at the transport level or with 5xx/429 is skipped for a
cooldown that doubles per consecutive failure (or lasts what Retry-After says), so
a dead first mirror does not cost every request a timeout. An endpoint that sent
bytes which failed verification is cooled down the same way, but only a verified
body makes it healthy again: its answering with 200 says nothing about its bytes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass

from mirrorproxy.config import Namespace, Upstream, UpstreamDefaults
from mirrorproxy.observability.metrics import Metrics

logger = logging.getLogger(__name__)

MAX_RETRY_AFTER = 3600.0  # seconds: an upstream's Retry-After is believed up to this


@dataclass(slots=True)
class _Health:
    failures: int = 0
    until: float = 0.0
    corrupt: bool = False  # its last failure was bad bytes: only a verified body clears it


class EndpointHealth:
    """The cooldown state of every (namespace, endpoint) pair, and the order to try them.

    It owns the failure counts, the cooldown deadlines and the ``upstream_up`` gauge.
    It must not send requests or judge answers: the client tells it what happened.
    """

    def __init__(
        self, defaults: UpstreamDefaults, metrics: Metrics, clock: Callable[[], float]
    ) -> None:
        self._defaults = defaults
        self._metrics = metrics
        self._clock = clock
        self._health: dict[tuple[str, str], _Health] = {}

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
        d = self._defaults
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

    def mark_ok(self, ns: Namespace, up: Upstream) -> None:
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
