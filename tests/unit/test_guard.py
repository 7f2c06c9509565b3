"""Unit tests for the client allowlist decision and the listener's limit knobs."""

from __future__ import annotations

import ipaddress
import resource

import pytest

from mirrorproxy.config import ServerConfig
from mirrorproxy.http.guard import client_allowed, peer_address
from mirrorproxy.http.listener import handler_options, raise_fd_limit, tls_context

NETS = (ipaddress.ip_network("10.0.0.0/8"), ipaddress.ip_network("fd00::/8"))


@pytest.mark.parametrize(
    ("remote", "allowed"),
    [
        ("10.1.2.3", True),
        ("10.255.255.255", True),
        ("11.0.0.1", False),
        ("127.0.0.1", False),
        ("::ffff:10.1.2.3", True),  # IPv4-mapped, from a dual-stack listener
        ("::ffff:127.0.0.1", False),
        ("fd00::1", True),
        ("fe80::1%eth0", False),
        ("::1", False),
        (None, False),
        ("", False),
        ("not-an-ip", False),
        ("/run/mirror.sock", False),
    ],
)
def test_client_allowed(remote: str | None, allowed: bool) -> None:
    assert client_allowed(remote, NETS) is allowed


@pytest.mark.parametrize("remote", ["1.2.3.4", None, "garbage", "::1"])
def test_empty_allowlist_allows_everyone(remote: str | None) -> None:
    assert client_allowed(remote, ())


def test_ipv4_mapped_address_is_unwrapped() -> None:
    assert peer_address("::ffff:192.0.2.1") == ipaddress.ip_address("192.0.2.1")


def test_handler_options_carry_the_limits() -> None:
    server = ServerConfig(client_timeout=7.0, max_header_size=1000, max_url_length=2000)
    opts = handler_options(server)
    assert opts["keepalive_timeout"] == 7.0
    assert opts["max_field_size"] == 1000
    assert opts["max_line_size"] == 2000
    assert opts["lingering_time"] <= 7.0


def test_no_tls_without_a_certificate() -> None:
    assert tls_context(ServerConfig()) is None


@pytest.mark.parametrize(
    ("soft", "hard", "wanted", "expected"),
    [
        (1024, 4096, 2048, 2048),  # raised to what is wanted
        (1024, 1500, 2048, 1500),  # as far as the hard limit allows
        (8192, 65536, 2048, None),  # already enough: left alone
        (1024, resource.RLIM_INFINITY, 2048, 2048),
    ],
)
def test_raise_fd_limit(
    monkeypatch: pytest.MonkeyPatch, soft: int, hard: int, wanted: int, expected: int | None
) -> None:
    calls: list[tuple[int, int]] = []
    monkeypatch.setattr(resource, "getrlimit", lambda _: (soft, hard))
    monkeypatch.setattr(resource, "setrlimit", lambda _, limits: calls.append(limits))
    raise_fd_limit(wanted)
    assert calls == ([] if expected is None else [(expected, hard)])
