"""Go's proxy rules: would a Go daemon (containerd, CRI-O) send a request through a proxy?

Go programs take ``HTTP_PROXY``/``HTTPS_PROXY``/``NO_PROXY`` (upper case first, then
lower case; the first non-empty value wins) and decide per request URL, as
golang.org/x/net/http/httpproxy does: the proxy of the URL's scheme, never for
``localhost`` or a loopback IP, and not for a host ``NO_PROXY`` covers. ``NO_PROXY``
entries are ``*``, a CIDR, an IP, a domain (itself and its subdomains), ``.domain`` or
``*.domain`` (subdomains only), each with an optional ``:port``. Pure: environment in,
answer out; malformed entries are skipped, as Go skips them.
"""

from __future__ import annotations

import ipaddress
import urllib.parse
from collections.abc import Mapping
from dataclasses import dataclass

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
_DEFAULT_PORTS = {"http": "80", "https": "443"}


@dataclass(frozen=True, slots=True)
class ProxyEnv:
    """The three settings, each with the variable name Go took it from."""

    http_proxy: tuple[str, str] = ("HTTP_PROXY", "")
    https_proxy: tuple[str, str] = ("HTTPS_PROXY", "")
    no_proxy: tuple[str, str] = ("NO_PROXY", "")

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> ProxyEnv:
        return cls(
            _first(env, "HTTP_PROXY", "http_proxy"),
            _first(env, "HTTPS_PROXY", "https_proxy"),
            _first(env, "NO_PROXY", "no_proxy"),
        )

    def proxy_for(self, url: str) -> tuple[str, str] | None:
        """Return (variable, proxy) Go would use for ``url``, or None for a direct dial."""
        parts = urllib.parse.urlsplit(url)
        name, proxy = self.https_proxy if parts.scheme == "https" else self.http_proxy
        if parts.scheme not in _DEFAULT_PORTS or not proxy:
            return None
        host = parts.hostname or ""
        # urlsplit lower-cases the host; Go compares "localhost" before lower-casing.
        raw = parts.netloc.rpartition("@")[2]
        raw_host = raw[1:].partition("]")[0] if raw.startswith("[") else raw.partition(":")[0]
        try:
            port = str(parts.port) if parts.port is not None else _DEFAULT_PORTS[parts.scheme]
        except ValueError:
            return None
        if raw_host == "localhost" or no_proxy_bypasses(self.no_proxy[1], host, port):
            return None
        return name, proxy


def no_proxy_bypasses(no_proxy: str, host: str, port: str) -> bool:
    """Whether a request to ``host:port`` goes direct: loopback, or covered by NO_PROXY.

    Returns False when the request would use the proxy.
    """
    ip = _parse_ip(host)
    if ip is not None and ip.is_loopback:
        return True
    host = host.strip().lower()
    for entry in no_proxy.split(","):
        entry = entry.strip().lower()
        if not entry:
            continue
        if entry == "*":
            return True
        if _entry_matches(entry, host, port, ip):
            return True
    return False


def _entry_matches(entry: str, host: str, port: str, ip: IPAddress | None) -> bool:
    """Match one NO_PROXY entry the way httpproxy's matchers do."""
    if "/" in entry:
        try:
            net = ipaddress.ip_network(entry, strict=False)
        except ValueError:
            pass
        else:
            return ip is not None and ip.version == net.version and ip in net
    split = _split_host_port(entry)
    if split is not None:
        phost, pport = split
        if not phost:
            return False
        if phost.startswith("[") and phost.endswith("]"):
            phost = phost[1:-1]
    else:
        phost, pport = entry, ""
    pip = _parse_ip(phost)
    if pip is not None:
        return ip is not None and pip == ip and pport in ("", port)
    if not phost:
        return False
    if phost.startswith("*."):
        phost = phost[1:]
    match_host = not phost.startswith(".")
    if match_host:
        phost = "." + phost
    if host.endswith(phost) or (match_host and host == phost[1:]):
        return pport in ("", port)
    return False


def _split_host_port(text: str) -> tuple[str, str] | None:
    """Go's net.SplitHostPort: None where Go returns an error."""
    i = text.rfind(":")
    if i < 0:
        return None
    if text.startswith("["):
        end = text.find("]")
        if end < 0 or end + 1 != i:
            return None
        host, rest_from = text[1:end], end + 1
    else:
        host, rest_from = text[:i], 0
        if ":" in host:
            return None
    if "[" in text[1 if text.startswith("[") else 0 :] or "]" in text[rest_from:]:
        return None
    return host, text[i + 1 :]


def _parse_ip(text: str) -> IPAddress | None:
    """Parse an IP as Go's net.ParseIP does, with IPv4-mapped IPv6 taken as IPv4."""
    try:
        ip = ipaddress.ip_address(text)
    except ValueError:
        return None
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped
    return ip


def _first(env: Mapping[str, str], upper: str, lower: str) -> tuple[str, str]:
    """Return (name, value) of the first non-empty variable, as Go's getEnvAny does."""
    for name in (upper, lower):
        if env.get(name):
            return name, env[name]
    return upper, ""
