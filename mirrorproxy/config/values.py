"""Parsers for config values: addresses, URLs, networks, host patterns, shares.

Pure; each raises ValueError with a message the loader prefixes with file and key.
"""

from __future__ import annotations

import ipaddress
import os
import re
from urllib.parse import urlsplit

from mirrorproxy.core.units import parse_size

# A registry host as containerd names it: DNS name or IPv4, optional port, or [v6]:port.
NS_RE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
)
HOST_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)
_PATTERN_RE = re.compile(r"[a-z0-9*.:\[\]-]+")


def parse_listen(text: str) -> tuple[str, int]:
    """Split "127.0.0.1:5000" or "[::1]:5000" into host and port."""
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d+)|([^:\[\]]+):(\d+)", text.strip())
    if m is None:
        raise ValueError(f"bad listen address {text!r} (use host:port or [v6]:port)")
    host = m.group(1) or m.group(3)
    port = int(m.group(2) or m.group(4))
    if m.group(1):
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"bad IPv6 address in {text!r}") from None
    elif not HOST_RE.fullmatch(host):
        raise ValueError(f"bad host in listen address {text!r}")
    if not 0 < port < 65536:
        raise ValueError(f"port {port} out of range")
    return host, port


def parse_upstream_url(text: str) -> tuple[str, str]:
    """Return (origin, api_path) for an upstream URL; raise ValueError if unusable."""
    parts = urlsplit(text)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s) URL: {text!r}")
    if parts.username or parts.password:
        raise ValueError("credentials do not belong in the URL")
    if parts.query or parts.fragment:
        raise ValueError(f"an upstream URL takes no query or fragment: {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if port == 0:
        raise ValueError(f"bad port in {text!r}")
    if ":" not in parts.hostname and not HOST_RE.fullmatch(parts.hostname):
        raise ValueError(f"bad host name in {text!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    origin = f"{parts.scheme}://{host}" + (f":{port}" if port else "")
    path = parts.path.rstrip("/") or "/v2"
    return origin, path


def parse_network(text: str) -> ipaddress.IPv4Network | ipaddress.IPv6Network:
    """A CIDR ("10.0.0.0/8") or a single address."""
    try:
        return ipaddress.ip_network(text.strip(), strict=False)
    except ValueError:
        raise ValueError(f"not a network or address: {text!r}") from None


def parse_host_pattern(text: str) -> str:
    """A registry host pattern for a wildcard namespace ("*.corp.example", "docker.io")."""
    pattern = text.strip().lower()
    if not pattern or not _PATTERN_RE.fullmatch(pattern) or pattern == "*":
        raise ValueError(
            f"not a registry host pattern: {text!r} (e.g. '*.corp.example'; a bare '*' "
            "would make the mirror an open proxy)"
        )
    return pattern


def parse_free_space(text: str) -> tuple[float, int]:
    """Either a share ("10%") or a size ("20GiB") of disk to keep free."""
    s = text.strip()
    if s.endswith("%"):
        try:
            share = float(s[:-1]) / 100
        except ValueError:
            raise ValueError(f"bad percentage {text!r}") from None
        if not 0 <= share < 1:
            raise ValueError(f"percentage out of range: {text!r}")
        return share, 0
    return 0.0, parse_size(s)


MAX_WORKERS = 256  # far beyond any machine's cores: a typo, not a plan


def parse_workers(text: str) -> int:
    """``"auto"`` (the cores this process may run on) or a count from 1 to MAX_WORKERS."""
    if text.strip().lower() == "auto":
        return max(1, len(os.sched_getaffinity(0)))
    if not text.strip().isdigit():
        raise ValueError(f'expected a number of processes or "auto", got {text!r}')
    count = int(text)
    if not 1 <= count <= MAX_WORKERS:
        raise ValueError(f"must be between 1 and {MAX_WORKERS}, got {count}")
    return count
