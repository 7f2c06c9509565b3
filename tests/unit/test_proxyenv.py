"""Go's proxy rules (golang.org/x/net/http/httpproxy), as containerd and CRI-O apply them."""

from __future__ import annotations

import pytest

from mirrorproxy.clientconf.proxyenv import ProxyEnv

PROXY = "http://proxy.corp:3128"


def via(url: str, **env: str) -> str | None:
    """The variable whose proxy Go would use for ``url``, or None for a direct dial."""
    used = ProxyEnv.from_environ(env).proxy_for(url)
    return used[0] if used else None


def test_the_proxy_of_the_urls_scheme() -> None:
    assert via("http://10.0.0.5:5000") is None
    assert via("http://10.0.0.5:5000", HTTP_PROXY=PROXY) == "HTTP_PROXY"
    assert via("https://10.0.0.5:5000", HTTP_PROXY=PROXY) is None
    assert via("https://10.0.0.5:5000", HTTPS_PROXY=PROXY) == "HTTPS_PROXY"
    assert via("http://10.0.0.5:5000", HTTPS_PROXY=PROXY) is None


def test_upper_case_first_then_lower_case() -> None:
    assert via("http://10.0.0.5", http_proxy=PROXY) == "http_proxy"
    assert via("http://10.0.0.5", HTTP_PROXY=PROXY, http_proxy="x") == "HTTP_PROXY"
    assert via("http://10.0.0.5", HTTP_PROXY="", http_proxy=PROXY) == "http_proxy"
    # NO_PROXY wins over no_proxy even when only no_proxy covers the host.
    assert via("http://10.0.0.5", HTTP_PROXY=PROXY, no_proxy="10.0.0.5") is None
    assert via("http://10.0.0.5", HTTP_PROXY=PROXY, NO_PROXY="x", no_proxy="10.0.0.5")


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:5000",
        "http://127.0.0.1:5000",
        "http://127.8.9.10",
        "http://[::1]:5000",
        "http://[::ffff:127.0.0.1]:5000",
    ],
)
def test_loopback_is_never_proxied(url: str) -> None:
    assert via(url, HTTP_PROXY=PROXY) is None


def test_localhost_is_matched_before_lower_casing() -> None:
    # httpproxy compares the URL's host with "localhost" as written.
    assert via("http://LOCALHOST:5000", HTTP_PROXY=PROXY) == "HTTP_PROXY"
    assert via("http://mirror.localhost:5000", HTTP_PROXY=PROXY) == "HTTP_PROXY"


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("*", "http://10.0.0.5:5000", True),
        ("10.0.0.5", "http://10.0.0.5:5000", True),
        (" 10.0.0.9 , 10.0.0.5 ", "http://10.0.0.5:5000", True),
        (",,10.0.0.5,", "http://10.0.0.5:5000", True),
        ("10.0.0.6", "http://10.0.0.5:5000", False),
        ("10.0.0.5:5000", "http://10.0.0.5:5000", True),
        ("10.0.0.5:5001", "http://10.0.0.5:5000", False),
        ("10.0.0.5:80", "http://10.0.0.5", True),  # the scheme's default port
        ("10.0.0.5:443", "https://10.0.0.5", True),
        ("10.0.0.0/8", "http://10.0.0.5:5000", True),
        ("10.0.0.0/8", "http://10.200.1.1:5000", True),
        ("10.0.0.0/24", "http://10.0.1.5:5000", False),
        ("10.0.0.0/8", "http://mirror.corp:5000", False),  # a CIDR matches IPs only
        ("mirror.corp", "http://10.0.0.5:5000", False),  # names are not resolved
        ("mirror.corp", "http://mirror.corp:5000", True),
        ("mirror.corp", "http://MIRROR.corp:5000", True),
        ("MIRROR.CORP", "http://mirror.corp:5000", True),
        ("corp", "http://mirror.corp:5000", True),  # a domain covers its subdomains
        ("corp", "http://mirrorcorp:5000", False),
        (".corp", "http://mirror.corp:5000", True),
        (".corp", "http://corp:5000", False),  # ".domain": subdomains only
        ("*.corp", "http://mirror.corp:5000", True),
        ("*.corp", "http://corp:5000", False),
        ("mirror.corp:5000", "http://mirror.corp:5000", True),
        ("mirror.corp:5001", "http://mirror.corp:5000", False),
        ("fd00::5", "http://[fd00::5]:5000", True),
        ("[fd00::5]:5000", "http://[fd00::5]:5000", True),
        ("[fd00::5]:5001", "http://[fd00::5]:5000", False),
        ("fd00::/16", "http://[fd00::5]:5000", True),
        ("10.0.0.0/8", "http://[fd00::5]:5000", False),
        (":5000", "http://10.0.0.5:5000", False),  # no host part: skipped, as Go does
    ],
)
def test_no_proxy_entries(no_proxy: str, url: str, direct: bool) -> None:
    used = via(url, HTTP_PROXY=PROXY, HTTPS_PROXY=PROXY, NO_PROXY=no_proxy)
    assert (used is None) is direct
