"""Who a request is: credentials checked, failed logins counted and throttled.

``Authenticator`` is built from ``[server.auth]`` and lives for the app's lifetime
(its bcrypt executor is closed in the app's cleanup context). ``identify`` turns an
``Authorization`` header and the peer address into a ``policy.Client``; it never
raises for bad credentials (whether they matter depends on the namespace, which
``policy`` decides). Passwords and tokens never reach a log line or a metric label.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from aiohttp import web

from mirrorproxy.clientauth.credentials import Basic, Bearer, Malformed, parse_authorization
from mirrorproxy.clientauth.htpasswd import Htpasswd
from mirrorproxy.clientauth.policy import ANONYMOUS, Client
from mirrorproxy.clientauth.ratelimit import FailedLogins, client_key
from mirrorproxy.clientauth.tokens import InvalidToken, TokenVerifier, load_keys
from mirrorproxy.config.model import ClientAuth
from mirrorproxy.observability.metrics import Metrics

logger = logging.getLogger(__name__)


@dataclass(frozen=True, slots=True)
class AuthTuning:
    """Knobs with sane defaults; tests pass their own."""

    bcrypt_threads: int = 2  # bcrypt runs here, never on the loop or the file threads
    cache_ttl: float = 60.0  # seconds a verified password or token is remembered
    cache_max: int = 4096  # remembered credentials
    reload_interval: float = 5.0  # seconds between checks of the htpasswd file
    leeway: float = 60.0  # clock skew tolerated on token exp/nbf, as the reference registry
    max_tracked: int = 65536  # client addresses whose failed logins are remembered


class Authenticator:
    """Check credentials for ``[server.auth]``."""

    def __init__(
        self,
        settings: ClientAuth,
        metrics: Metrics,
        *,
        tuning: AuthTuning | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        tuning = tuning or AuthTuning()
        self.settings = settings
        self._metrics = metrics
        self._clock = clock
        self._cache_ttl = tuning.cache_ttl
        self._cache_max = tuning.cache_max
        self._executor = ThreadPoolExecutor(tuning.bcrypt_threads, thread_name_prefix="bcrypt")
        self._htpasswd = (
            Htpasswd(
                settings.htpasswd,
                executor=self._executor,
                cache_ttl=tuning.cache_ttl,
                cache_max=tuning.cache_max,
                reload_interval=tuning.reload_interval,
                clock=clock,
            )
            if settings.htpasswd is not None
            else None
        )
        self._tokens = (
            TokenVerifier(
                load_keys(settings.token_public_keys),
                issuer=settings.token_issuer or "",
                service=settings.token_service or "",
                leeway=tuning.leeway,
                clock=wall_clock,
            )
            if settings.token_public_keys is not None
            else None
        )
        self._wall_clock = wall_clock
        self._token_cache: dict[bytes, Client] = {}  # sha256(token) -> verified client
        self._token_expiry: dict[bytes, float] = {}
        self._failed = FailedLogins(
            max_failures=settings.max_failed_logins,
            window=settings.failed_login_window,
            max_tracked=tuning.max_tracked,
            clock=clock,
        )

    async def context(self, app: web.Application) -> AsyncIterator[None]:
        """Cleanup context: stop the bcrypt threads with the app."""
        try:
            yield
        finally:
            self._executor.shutdown(wait=True, cancel_futures=True)

    async def identify(self, authorization: str | None, remote: str | None) -> Client:
        """Who the request proved to be (``ANONYMOUS`` without credentials)."""
        creds = parse_authorization(authorization)
        if creds is None:
            return ANONYMOUS
        scheme = creds.scheme if isinstance(creds, Malformed) else _scheme(creds)
        key = client_key(remote)
        # A throttled address gets no check at all, right credentials included: an
        # answer that differed for them would confirm a guess.
        wait = self._failed.blocked(key)
        if wait is None and isinstance(creds, Basic):
            shortcut = await self._basic_known(creds)
            if shortcut is not None:
                return shortcut  # already verified, or being verified: takes no token
        if wait is None:
            wait = self._failed.take(key)
        if wait is not None:
            self._metrics.client_auth_throttled.inc()
            return Client(scheme=scheme, retry_after=wait)
        if isinstance(creds, Malformed):
            client = Client(scheme=scheme, refused=creds.reason)
        elif isinstance(creds, Basic):
            client = await self._basic(creds)
        else:
            client = self._bearer(creds)
        if client.user is not None:
            self._failed.give_back(key)
            return client
        self._metrics.child(self._metrics.client_auth_failures, scheme).inc()
        logger.info("failed login from %s (%s): %s", key, scheme, client.refused)
        return client

    async def _basic_known(self, creds: Basic) -> Client | None:
        """The outcome without a check of our own: remembered, or being checked now."""
        if self._htpasswd is None:
            return None
        if self._htpasswd.remembered(creds.user, creds.password):
            return Client(user=creds.user, scheme="basic")
        running = self._htpasswd.checking(creds.user, creds.password)
        if running is None:
            return None
        ok = await asyncio.shield(running)
        return _basic_client(creds, ok)

    async def _basic(self, creds: Basic) -> Client:
        if self._htpasswd is None:
            return Client(scheme="basic", refused="Basic auth is not enabled on this mirror")
        return _basic_client(creds, await self._htpasswd.verify(creds.user, creds.password))

    def _bearer(self, creds: Bearer) -> Client:
        if self._tokens is None:
            return Client(scheme="bearer", refused="Bearer tokens are not enabled on this mirror")
        digest = hashlib.sha256(creds.token.encode("utf-8", "replace")).digest()
        known = self._token_cache.get(digest)
        if known is not None and self._token_expiry[digest] > self._clock():
            return known
        try:
            claims = self._tokens.verify(creds.token)
        except InvalidToken as err:
            return Client(scheme="bearer", refused=str(err))
        client = Client(user=claims.subject or "-", scheme="bearer", pulls=claims.pulls)
        # Remember it until it expires (or cache_ttl, whichever is first).
        lifetime = min(self._cache_ttl, claims.expires - self._wall_clock())
        if lifetime > 0:
            if len(self._token_cache) >= self._cache_max:
                self._token_cache.clear()
                self._token_expiry.clear()
            self._token_cache[digest] = client
            self._token_expiry[digest] = self._clock() + lifetime
        return client


def _basic_client(creds: Basic, ok: bool) -> Client:
    if ok:
        return Client(user=creds.user, scheme="basic")
    return Client(scheme="basic", refused=f"wrong password or unknown user {creds.user[:64]!r}")


def _scheme(creds: Basic | Bearer) -> str:
    return "basic" if isinstance(creds, Basic) else "bearer"
