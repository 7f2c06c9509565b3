"""WWW-Authenticate parsing, token lifetimes and the realm credential policy."""

from __future__ import annotations

import pytest
from yarl import URL

from mirrorproxy.config import Secret, Upstream
from mirrorproxy.upstream.auth import (
    Authenticator,
    Challenge,
    _realm_allowed,
    _Token,
    parse_www_authenticate,
    scope_for,
)


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        (
            'Bearer realm="https://auth.docker.io/token",service="registry.docker.io",'
            'scope="repository:library/alpine:pull"',
            [
                Challenge(
                    "bearer",
                    {
                        "realm": "https://auth.docker.io/token",
                        "service": "registry.docker.io",
                        "scope": "repository:library/alpine:pull",
                    },
                )
            ],
        ),
        (
            'Basic realm="Harbor", Bearer realm="https://h/t",scope="a:b:pull,push"',
            [
                Challenge("basic", {"realm": "Harbor"}),
                Challenge("bearer", {"realm": "https://h/t", "scope": "a:b:pull,push"}),
            ],
        ),
        (
            'Bearer realm="a\\"b" , error=invalid_token',
            [Challenge("bearer", {"realm": 'a"b', "error": "invalid_token"})],
        ),
        ("Negotiate", [Challenge("negotiate", {})]),
        ("", []),
        ("=,=,", []),
    ],
)
def test_parse_www_authenticate(header: str, expected: list[Challenge]) -> None:
    assert parse_www_authenticate([header]) == expected


def test_scope_for_paths() -> None:
    assert scope_for("library/alpine/manifests/3") == "repository:library/alpine:pull"
    assert scope_for("a/b/c/blobs/sha256:x") == "repository:a/b/c:pull"
    assert scope_for("x/tags/list") == "repository:x:pull"
    assert scope_for("") == ""


def _up(origin: str = "https://reg.example", **kw: object) -> Upstream:
    return Upstream(url=origin, origin=origin, path="/v2", **kw)  # type: ignore[arg-type]


def test_cached_token_expires_by_the_clock() -> None:
    now = [1000.0]
    auth = Authenticator(clock=lambda: now[0])
    up = _up()
    auth._tokens[(up.url, "s")] = _Token("tok", expires=1010.0)
    assert auth.cached(up, "s") == "Bearer tok"
    assert auth.cached(up, "other") is None
    now[0] = 1010.0
    assert auth.cached(up, "s") is None


def test_credentials_only_to_https_or_same_host_realms() -> None:
    http_up = _up("http://10.0.0.5", username="u", password=Secret("p"))
    assert _realm_allowed(http_up, URL("https://auth.example/token"))
    assert _realm_allowed(http_up, URL("http://10.0.0.5/service/token"))
    assert not _realm_allowed(http_up, URL("http://evil.example/token"))
