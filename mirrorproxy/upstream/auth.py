"""Upstream authentication: WWW-Authenticate challenges, Bearer tokens, Basic.

Tokens are cached per (endpoint, scope) until shortly before they expire, and
fetched once for concurrent requests of the same scope. Credentials go only to the
upstream itself or to a token realm over https (or on the upstream's own host): a
realm elsewhere on plain http gets an anonymous token request instead. No secret
ever appears in a log line or an error message.
"""

from __future__ import annotations

import base64
import logging
import re
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

import aiohttp
from yarl import URL

from mirrorproxy.config import Upstream
from mirrorproxy.core.singleflight import SingleFlight

logger = logging.getLogger(__name__)

DEFAULT_EXPIRES_IN = 60.0  # the token spec's default when a server gives none
MIN_LIFETIME = 5.0
MAX_HTTP_TCHARSSPONSE = 1024 * 1024

_HTTP_TCHARS = r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+"
_PARAM_RE = re.compile(rf'\s*({_HTTP_TCHARS})\s*=\s*(?:"((?:[^"\\]|\\.)*)"|({_HTTP_TCHARS}))\s*')
_SCHEME_RE = re.compile(rf"\s*({_HTTP_TCHARS})(?=\s|$|,)")


class AuthError(Exception):
    """Authentication with an upstream failed; the message is safe to show."""


@dataclass(frozen=True, slots=True)
class Challenge:
    scheme: str  # lower-case: "bearer", "basic", ...
    params: dict[str, str] = field(default_factory=dict)


def parse_www_authenticate(headers: Iterable[str]) -> list[Challenge]:
    """Parse every challenge in one or more WWW-Authenticate header values.

    Handles quoted values with escapes and commas, and several challenges in one
    header (``Basic realm="x", Bearer realm="y",scope="a,b"``).
    """
    out: list[Challenge] = []
    for header in headers:
        pos, n = 0, len(header)
        current: Challenge | None = None
        while pos < n:
            m = _PARAM_RE.match(header, pos)
            if m and current is not None:
                value = m.group(2) if m.group(2) is not None else m.group(3)
                current.params[m.group(1).lower()] = re.sub(r"\\(.)", r"\1", value)
                pos = m.end()
            else:
                s = _SCHEME_RE.match(header, pos)
                if s is None:
                    pos += 1  # skip junk rather than fail the whole header
                    continue
                current = Challenge(s.group(1).lower())
                out.append(current)
                pos = s.end()
            while pos < n and header[pos] in " \t,":
                pos += 1
    return out


@dataclass(slots=True)
class _Token:
    value: str
    expires: float


def scope_for(path: str) -> str:
    """The pull scope a request path needs (``repository:<name>:pull``)."""
    for marker in ("/manifests/", "/blobs/", "/tags/"):
        if marker in path:
            return f"repository:{path.split(marker, 1)[0]}:pull"
    return ""


class Authenticator:
    """The credentials to send upstream: tokens by (endpoint, scope), Basic by endpoint.

    It owns the token cache and the token requests. It must not send a request to
    the registry itself (the client does, and brings the 401s here) nor put a secret
    in a log line or an error message.
    """

    def __init__(self, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._clock = clock
        self._tokens: dict[tuple[str, str], _Token] = {}
        # Waiters get an error, never the cancellation of the request fetching.
        self._fetching: SingleFlight[tuple[str, str], _Token] = SingleFlight(
            cancelled=lambda key: AuthError(f"token request for {key[0]} was cancelled")
        )
        self._basic: set[str] = set()  # endpoints that asked for Basic

    def cached(self, up: Upstream, scope: str) -> str | None:
        """An Authorization value to send up front, if one is known to work."""
        token = self._tokens.get((up.url, scope))
        if token is not None and token.expires > self._clock():
            return f"Bearer {token.value}"
        if up.url in self._basic:
            return _basic(up)
        return None

    async def authorize(
        self,
        session: aiohttp.ClientSession,
        up: Upstream,
        challenges: list[Challenge],
        scope: str,
        *,
        rejected: str | None,
        client_timeout: aiohttp.ClientTimeout,
    ) -> str | None:
        """Answer a 401: a fresh Authorization value, or None if we have nothing to try.

        Raises:
            AuthError: the token server refused or failed.
        """
        bearer = next((c for c in challenges if c.scheme == "bearer"), None)
        if bearer is not None and bearer.params.get("realm"):
            key = (up.url, scope)
            known = self._tokens.get(key)
            if (
                known is not None
                and rejected != f"Bearer {known.value}"
                and (known.expires > self._clock())
            ):
                return f"Bearer {known.value}"  # another request refreshed it meanwhile
            self._tokens.pop(key, None)
            token = await self._fetch_once(key, session, up, bearer, scope, client_timeout)
            return f"Bearer {token.value}"
        if any(c.scheme == "basic" for c in challenges):
            header = _basic(up)
            if header is None or header == rejected:
                return None
            self._basic.add(up.url)
            return header
        return None

    async def _fetch_once(
        self,
        key: tuple[str, str],
        session: aiohttp.ClientSession,
        up: Upstream,
        challenge: Challenge,
        scope: str,
        client_timeout: aiohttp.ClientTimeout,
    ) -> _Token:
        """Fetch a token once for concurrent requests of the same scope; remember it."""

        async def fetch_and_keep() -> _Token:
            token = await self._fetch(session, up, challenge, scope, client_timeout)
            self._tokens[key] = token
            return token

        return await self._fetching.run(key, fetch_and_keep)

    async def _fetch(
        self,
        session: aiohttp.ClientSession,
        up: Upstream,
        challenge: Challenge,
        scope: str,
        client_timeout: aiohttp.ClientTimeout,
    ) -> _Token:
        realm = URL(challenge.params["realm"])
        if realm.scheme not in ("http", "https") or not realm.host:
            raise AuthError(f"{up.url} named an unusable token realm")
        query = [(k, v) for k, v in realm.query.items()]
        if challenge.params.get("service"):
            query.append(("service", challenge.params["service"]))
        for s in (challenge.params.get("scope") or scope).split(" "):
            if s:
                query.append(("scope", s))
        headers = {}
        basic = _basic(up)
        if basic is not None:
            if _realm_allowed(up, realm):
                headers["Authorization"] = basic
            else:
                logger.warning(
                    "not sending %s credentials to plain-http realm %s", up.url, realm.host
                )
        url = realm.with_query(query)
        try:
            async with session.get(url, headers=headers, timeout=client_timeout) as resp:
                if resp.status != 200:
                    raise AuthError(
                        f"token server {realm.host} answered {resp.status}"
                        + (" (bad credentials?)" if basic and resp.status in (401, 403) else "")
                    )
                data: Any = await resp.json(content_type=None)
        except aiohttp.ClientError as err:
            raise AuthError(f"token server {realm.host} failed: {type(err).__name__}") from None
        except ValueError:
            raise AuthError(f"token server {realm.host} sent no JSON") from None
        value = data.get("token") or data.get("access_token") if isinstance(data, dict) else None
        if not isinstance(value, str) or not value:
            raise AuthError(f"token server {realm.host} sent no token")
        try:
            expires_in = float(data.get("expires_in") or DEFAULT_EXPIRES_IN)
        except (TypeError, ValueError):
            expires_in = DEFAULT_EXPIRES_IN
        # Renew a little early so a token never expires between check and use.
        lifetime = max(MIN_LIFETIME, expires_in - max(5.0, expires_in * 0.1))
        return _Token(value, self._clock() + lifetime)


def _basic(up: Upstream) -> str | None:
    if up.username is None or up.password is None:
        return None
    raw = f"{up.username}:{up.password.reveal()}".encode()
    return "Basic " + base64.b64encode(raw).decode("ascii")


def _realm_allowed(up: Upstream, realm: URL) -> bool:
    """Credentials may go to an https realm, or to the upstream's own host."""
    return realm.scheme == "https" or realm.host == URL(up.origin).host
