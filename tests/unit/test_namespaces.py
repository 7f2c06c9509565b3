"""Unit tests for mirrorproxy.core.namespaces.resolve: which namespace serves a request."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from mirrorproxy.config import WILDCARD, Config, parse_config
from mirrorproxy.core.errors import NameInvalid, NameUnknown
from mirrorproxy.core.namespaces import resolve, route


def make_config(*names: str, default_namespace: str | None = None) -> Config:
    data: dict[str, Any] = {
        "namespaces": {
            name: {
                "upstreams": [f"http://upstream-{i}.example"],
                **({"allow": ["*.*", "*:*", "localhost*"]} if name == WILDCARD else {}),
            }
            for i, name in enumerate(names)
        }
    }
    if default_namespace is not None:
        data["server"] = {"default_namespace": default_namespace}
    return parse_config(data, source="test.toml", base_dir=Path("/"))


@pytest.mark.parametrize(
    ("ns_param", "expected"),
    [
        ("docker.io", "docker.io"),
        ("quay.io", "quay.io"),
        ("Quay.IO", "quay.io"),
        ("  quay.io  ", "quay.io"),
        ("127.0.0.1:5000", "127.0.0.1:5000"),
        ("[::1]:5000", "[::1]:5000"),
        ("localhost", "localhost"),
    ],
)
def test_configured_namespace(ns_param: str, expected: str) -> None:
    config = make_config("docker.io", "quay.io", "127.0.0.1:5000", "[::1]:5000", "localhost")
    ns, name = resolve(config, ns_param)
    assert name == expected
    assert ns is config.namespaces[expected]


@pytest.mark.parametrize("ns_param", [None, "", "   "])
def test_absent_ns_uses_default(ns_param: str | None) -> None:
    config = make_config("docker.io", "quay.io")
    ns, name = resolve(config, ns_param)
    assert name == "docker.io"
    assert ns is config.namespaces["docker.io"]


def test_explicit_default_namespace() -> None:
    config = make_config("docker.io", "quay.io", default_namespace="quay.io")
    ns, name = resolve(config, None)
    assert (ns, name) == (config.namespaces["quay.io"], "quay.io")
    assert resolve(config, "docker.io")[1] == "docker.io"


def test_absent_ns_without_default_is_unknown() -> None:
    config = make_config("quay.io", "ghcr.io")
    assert config.server.default_namespace is None
    with pytest.raises(NameUnknown, match=r"ns=") as info:
        resolve(config, None)
    assert info.value.status == 404
    assert info.value.code == "NAME_UNKNOWN"


def test_default_namespace_served_by_wildcard() -> None:
    config = make_config(WILDCARD, default_namespace="quay.io")
    ns, name = resolve(config, None)
    assert (ns, name) == (config.namespaces[WILDCARD], "quay.io")


def test_wildcard_serves_unconfigured_registries() -> None:
    config = make_config("docker.io", WILDCARD)
    ns, name = resolve(config, "registry.k8s.io")
    assert ns is config.namespaces[WILDCARD]
    assert name == "registry.k8s.io"


def test_exact_match_beats_wildcard() -> None:
    config = make_config(WILDCARD, "docker.io")
    assert resolve(config, "docker.io")[0] is config.namespaces["docker.io"]


@pytest.mark.parametrize(
    "ns_param", ["quay.io", "docker.io.evil.example", "127.0.0.1:22", "127.0.0.1", "[::1]:22"]
)
def test_unconfigured_namespace_is_refused(ns_param: str) -> None:
    config = make_config("docker.io")
    with pytest.raises(NameUnknown) as info:
        resolve(config, ns_param)
    assert info.value.detail == {"namespace": ns_param}
    assert "not configured" in info.value.message


def test_literal_wildcard_ns_is_invalid() -> None:
    with pytest.raises(NameInvalid):
        resolve(make_config("docker.io", WILDCARD), WILDCARD)


HOSTILE_NS = [
    "127.0.0.1:22/x",
    "a b",
    "%2F",
    "docker.io%2Fx",
    "docker.io/library",
    "docker.io/../x",
    "http://docker.io",
    "https://127.0.0.1:22",
    "docker.io?x=1",
    "docker.io#x",
    "user@docker.io",
    "user:pw@docker.io",
    "..",
    ".",
    "../etc",
    "/",
    "/docker.io",
    "docker.io\x00",
    "docker.io\x00.evil",
    "docker.io\r\nHost: evil",
    "docker.io\\x",
    "-docker.io",
    "docker-.io",
    "docker.io.",
    ".docker.io",
    "docker..io",
    "docker_io",
    "docker.io:",
    "docker.io:123456",
    "docker.io:-1",
    "docker.io:port",
    "[::1",
    "::1",
    "[::1]:",
    "[localhost]:5000",
    "\uff44ocker.io",  # full-width d
    "dock\u0435r.io",  # Cyrillic e
    "docker\u3002io",  # ideographic full stop
    "a" * 64 + ".io",
    ("a" * 63 + ".") * 4 + "io",
    "*.docker.io",
]


@pytest.mark.parametrize("ns_param", HOSTILE_NS)
def test_invalid_ns_is_refused_even_with_wildcard(ns_param: str) -> None:
    config = make_config("docker.io", WILDCARD)
    with pytest.raises(NameInvalid) as info:
        resolve(config, ns_param)
    assert info.value.status == 400
    assert info.value.code == "NAME_INVALID"


def test_invalid_ns_message_is_truncated() -> None:
    with pytest.raises(NameInvalid) as info:
        resolve(make_config(WILDCARD), "a" * 10_000)
    assert len(info.value.message) < 200


UPSTREAMS = {"upstreams": ["http://127.0.0.1:1"]}


def test_ns_with_unicode_lookalike_is_invalid(tmp_path: Path) -> None:
    """An ``ns`` that lower-cases to a configured one only through Unicode is invalid."""
    config = parse_config({"namespaces": {"docker.io": UPSTREAMS}}, source="t", base_dir=tmp_path)
    with pytest.raises(NameInvalid):
        resolve(config, "doc\u212aer.io")  # KELVIN SIGN lower-cases to "k"


@pytest.mark.parametrize(
    "ns_param", ["localhost:5000", "my-registry.example:443", "10.0.0.5", "[fd00::5]:5000"]
)
def test_valid_host_forms_reach_the_wildcard(ns_param: str) -> None:
    """(The allowlist here is deliberately broad; see the allowlist tests.)"""
    config = make_config(WILDCARD)
    assert resolve(config, ns_param) == (config.namespaces[WILDCARD], ns_param)


def test_wildcard_only_serves_its_allowlist() -> None:
    data: dict[str, Any] = {
        "namespaces": {
            "*": {"upstreams": ["http://site.example"], "allow": ["*.corp.example", "[fd00::5]:*"]}
        }
    }
    config = parse_config(data, source="test.toml", base_dir=Path("/"))
    assert resolve(config, "reg.corp.example")[1] == "reg.corp.example"
    assert resolve(config, "[fd00::5]:5000")[1] == "[fd00::5]:5000"
    for refused in ("127.0.0.1:22", "169.254.169.254", "corp.example.evil.io", "f"):
        with pytest.raises(NameUnknown):
            resolve(config, refused)


def test_route_by_path_prefix_only_without_ns() -> None:
    config = parse_config(
        {
            "server": {"default_namespace": "docker.io"},
            "namespaces": {
                "docker.io": {"upstreams": ["https://registry-1.docker.io"]},
                "quay.io": {"upstreams": ["https://quay.io"]},
                "myregistry:5000": {"upstreams": ["http://10.0.0.1:5000"]},
            },
        },
        source="t",
        base_dir=Path("/"),
    )
    assert route(config, None, "quay.io/org/tool")[1:] == ("quay.io", "org/tool")
    assert route(config, None, "myregistry:5000/x")[1:] == ("myregistry:5000", "x")
    assert route(config, "docker.io", "quay.io/org/tool")[1:] == ("docker.io", "quay.io/org/tool")
    assert route(config, None, "library/alpine")[1:] == ("docker.io", "library/alpine")
    assert route(config, None, "ghcr.io/x")[1:] == ("docker.io", "ghcr.io/x")  # not configured
    assert route(config, None, "quay.io")[1:] == ("docker.io", "quay.io")  # nothing after it
