"""Failed logins per client address: a token bucket that throttles guessing.

Each address (an IPv6 client by its /64, which one host can fill) may fail
``max_failures`` logins, refilled evenly over ``window`` seconds. A login attempt
takes a token before its credentials are checked and gives it back when they were
right, so even a burst of concurrent guesses gets at most ``max_failures`` checks
(credentials known to be right, or being checked for a request already, take none);
with no token left, credentials are not checked at all (no bcrypt spent) until the
bucket refills. Other addresses are never affected. Pure bookkeeping: the caller
decides what a throttled request gets.
"""

from __future__ import annotations

import ipaddress
import time
from collections import OrderedDict
from collections.abc import Callable

from mirrorproxy.http.guard import peer_address

IPV6_PREFIX = 64


def client_key(remote: str | None) -> str:
    """The bucket a client address falls into (its /64 for IPv6)."""
    addr = peer_address(remote)
    if addr is None:
        return remote or "-"
    if isinstance(addr, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((addr, IPV6_PREFIX), strict=False))
    return str(addr)


class FailedLogins:
    """Per-address login budgets; at most ``max_tracked`` addresses are remembered."""

    def __init__(
        self,
        *,
        max_failures: int,
        window: float,
        max_tracked: int,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._capacity = float(max_failures)
        self._rate = max_failures / window  # tokens regained per second
        self._max_tracked = max_tracked
        self._clock = clock
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()  # tokens, when

    def blocked(self, key: str) -> float | None:
        """Seconds until ``key`` may try again, or None if it may now (takes nothing)."""
        tokens = self._tokens(key, self._clock())
        return None if tokens >= 1.0 else (1.0 - tokens) / self._rate

    def take(self, key: str) -> float | None:
        """Take a token for one login attempt: None if granted, else seconds to wait."""
        now = self._clock()
        tokens = self._tokens(key, now)
        if tokens < 1.0:
            self._store(key, tokens, now)
            return (1.0 - tokens) / self._rate
        self._store(key, tokens - 1.0, now)
        return None

    def give_back(self, key: str) -> None:
        """The attempt succeeded: it does not count as a failure."""
        now = self._clock()
        tokens = min(self._capacity, self._tokens(key, now) + 1.0)
        if tokens >= self._capacity:
            self._buckets.pop(key, None)  # full again: nothing to remember
        else:
            self._store(key, tokens, now)

    def _tokens(self, key: str, now: float) -> float:
        found = self._buckets.get(key)
        if found is None:
            return self._capacity
        tokens, since = found
        return min(self._capacity, tokens + (now - since) * self._rate)

    def _store(self, key: str, tokens: float, now: float) -> None:
        self._buckets[key] = (tokens, now)
        self._buckets.move_to_end(key)
        while len(self._buckets) > self._max_tracked:
            # The least recently seen address goes first (its bucket is the fullest).
            self._buckets.popitem(last=False)
