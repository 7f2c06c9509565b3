"""Who may pull what: the pure decision, and the challenge a refused client gets.

Given a namespace's ``access``, the registry and repository asked for, and who
the client proved to be, either allow, or raise: ``401`` with the
``WWW-Authenticate`` challenges a client needs to log in (Bearer with realm,
service and ``scope="repository:<ns>/<repo>:pull"``; Basic), ``403 DENIED`` for a
known user without access, ``429`` for an address that failed too many logins.
A Bearer token's ``access`` claim must grant ``pull`` on ``<ns>/<repo>``: the
registry name is part of it, so a token for one registry's ``library/app`` says
nothing about another's. No I/O here.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from mirrorproxy.config.model import Access, ClientAuth
from mirrorproxy.core.errors import Denied, RegistryError, Unauthorized

BASIC_REALM = "mirrorproxy"


class AuthRequired(Unauthorized):
    """401: the client must (re)authenticate; carries one challenge per scheme."""

    def __init__(self, message: str, challenges: tuple[str, ...]) -> None:
        super().__init__(message)
        self.challenges = challenges


class TooManyRequests(RegistryError):
    """The client's address failed too many logins lately."""

    code, status = "TOOMANYREQUESTS", 429


@dataclass(frozen=True, slots=True)
class Client:
    """Who a request proved to be."""

    user: str | None = None  # verified user (Basic) or token subject (Bearer)
    scheme: str | None = None  # "basic" or "bearer": what the client sent, if anything
    pulls: frozenset[str] | None = None  # Bearer: the names its token may pull
    refused: str | None = None  # why its credentials were refused (for the log)
    retry_after: float | None = None  # throttled: seconds until it may try again


ANONYMOUS = Client()


def scope_name(ns_name: str, repo: str) -> str:
    """The repository name a token must grant: the registry, then the repository."""
    return f"{ns_name}/{repo}"


def authorize(
    settings: ClientAuth, access: Access, ns_name: str, repo: str, client: Client
) -> None:
    """Allow the pull, or raise.

    Raises:
        TooManyRequests: the address is throttled.
        AuthRequired: no valid credentials, or a token without this scope.
        Denied: a valid user that ``access`` does not list.
    """
    if access.anyone:
        return
    name = scope_name(ns_name, repo)
    scope = f"repository:{name}:pull"
    _check_throttle(client)
    if client.user is None:
        error = "invalid_token" if client.scheme == "bearer" and client.refused else None
        raise AuthRequired(
            f"authentication required to pull from {ns_name}",
            challenges(settings, scope=scope, error=error),
        )
    if client.pulls is not None and name not in client.pulls:
        raise AuthRequired(
            f"the token does not grant pull on {name}",
            challenges(settings, scope=scope, error="insufficient_scope"),
        )
    if not access.permits(client.user):
        raise Denied(f"user {client.user[:64]!r} may not pull from {ns_name}")


def require_login(settings: ClientAuth, client: Client) -> None:
    """The ``/v2/`` check clients log in against: any valid credentials.

    Raises:
        TooManyRequests, AuthRequired: as ``authorize``.
    """
    _check_throttle(client)
    if client.user is None:
        error = "invalid_token" if client.scheme == "bearer" and client.refused else None
        raise AuthRequired("authentication required", challenges(settings, error=error))


def _check_throttle(client: Client) -> None:
    if client.retry_after is not None:
        wait = max(1, math.ceil(client.retry_after))
        raise TooManyRequests(
            "too many failed logins from your address; try again later",
            headers={"Retry-After": str(wait)},
        )


def challenges(
    settings: ClientAuth, *, scope: str | None = None, error: str | None = None
) -> tuple[str, ...]:
    """The ``WWW-Authenticate`` values: Bearer first (clients take the first they
    support, and a token service knows more users), then Basic."""
    out: list[str] = []
    if settings.bearer:
        params = [f'realm="{settings.token_realm}"', f'service="{settings.token_service}"']
        if scope is not None:
            params.append(f'scope="{scope}"')
        if error is not None:
            params.append(f'error="{error}"')
        out.append("Bearer " + ",".join(params))
    if settings.basic:
        out.append(f'Basic realm="{BASIC_REALM}",charset="UTF-8"')
    return tuple(out)
