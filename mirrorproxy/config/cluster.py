"""Load [cluster]: this member's address and how to find the others.

``self`` may name environment variables as ``${VAR}`` (``http://${POD_IP}:5000``
with Kubernetes' downward API); an unset one is an error naming the key. Member
URLs are normalised (``http(s)://host:port``, lower case, no path) so that the
same member is spelt the same everywhere: rendezvous hashing ranks by the text.
"""

from __future__ import annotations

import re
import ssl
from collections.abc import Mapping
from urllib.parse import urlsplit

from mirrorproxy.config.model import ClusterConfig, ConfigError
from mirrorproxy.config.table import Table, tname
from mirrorproxy.config.values import HOST_RE, parse_listen
from mirrorproxy.core.units import parse_duration

_VAR_RE = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)\}")


def member_url(text: str) -> str:
    """``text`` as a normalised member URL, ``scheme://host:port``.

    Raises:
        ValueError: not an http(s) URL with a host and a port, or with more than that.
    """
    parts = urlsplit(text.strip())
    if parts.scheme.lower() not in ("http", "https") or not parts.hostname:
        raise ValueError(f"not an http(s)://host:port URL: {text!r}")
    if parts.path not in ("", "/") or parts.query or parts.fragment or parts.username:
        raise ValueError(f"a member URL is scheme://host:port and nothing else: {text!r}")
    try:
        port = parts.port
    except ValueError:
        raise ValueError(f"bad port in {text!r}") from None
    if not port:
        raise ValueError(f"a member URL needs its port: {text!r}")
    host = parts.hostname.lower()
    if ":" in host:
        host = f"[{host}]"
    elif not HOST_RE.fullmatch(host):
        raise ValueError(f"bad host name in {text!r}")
    return f"{parts.scheme.lower()}://{host}:{port}"


def _expand(t: Table, key: str, text: str, environ: Mapping[str, str]) -> str:
    """Replace each ``${VAR}`` in ``text`` with the environment's value."""
    for var in _VAR_RE.findall(text):
        if not environ.get(var):
            raise t.error(key, f"environment variable {var!r} (in {text!r}) is not set")
    return _VAR_RE.sub(lambda m: environ[m.group(1)], text)


def load_cluster(t: Table) -> ClusterConfig | None:
    """The [cluster] table, or None when there is none."""
    if not t.data:
        return None
    raw_self = t.take("self", str, "")
    if not raw_self:
        raise t.error("self", "missing (how the other members reach this one)")
    self_url = _convert(t, t.sub("self"), _expand(t, "self", raw_self, t.environ))
    raw = t.take("members", list, [])
    dns = t.convert("members_dns", parse_listen, None) if "members_dns" in t.data else None
    if raw and dns is not None:
        raise t.error("members_dns", "give only one of members and members_dns")
    if not raw and dns is None:
        raise t.error("members", "give the members (a list of URLs) or members_dns")
    members: list[str] = []
    for i, item in enumerate(raw):
        key = f"{t.sub('members')}[{i}]"
        if not isinstance(item, str):
            raise ConfigError(t.source, key, f"expected a URL string, got {tname(item)}")
        url = _convert(t, key, item)
        if url in members:
            raise ConfigError(t.source, key, f"{url} is listed twice")
        members.append(url)
    if raw and self_url not in members:
        raise t.error("self", f"{self_url} is not one of {t.sub('members')}")
    d = ClusterConfig(self_url)
    out = ClusterConfig(
        self_url=self_url,
        members=tuple(members),
        members_dns=dns,
        refresh=t.convert("refresh", parse_duration, d.refresh),
        peer_timeout=t.convert("peer_timeout", parse_duration, d.peer_timeout),
        ca=t.file("ca"),
        server_name=_server_name(t),
    )
    for key in ("refresh", "peer_timeout"):
        if getattr(out, key) <= 0:
            raise t.error(key, "must be longer than 0s")
    if dns is None and "refresh" in t.data:
        raise t.error("refresh", "only with members_dns")
    _check_tls(t, out)
    t.done()
    return out


def _server_name(t: Table) -> str | None:
    name = t.take("server_name", str, "").strip().lower()
    if "server_name" in t.data and not HOST_RE.fullmatch(name):
        raise t.error("server_name", f"not a host name: {name!r}")
    return name or None


def _check_tls(t: Table, c: ClusterConfig) -> None:
    """TLS settings apply to https:// members only, and a bad PEM is an error now."""
    urls = [c.self_url, *c.members]
    https = any(u.startswith("https:") for u in urls)
    for key in ("ca", "server_name"):
        if key in t.data and not https:
            raise t.error(key, "only applies to https:// members (self and members are http)")
    if c.ca is not None:
        try:
            ssl.create_default_context(cafile=str(c.ca))
        except (ssl.SSLError, ValueError) as err:
            raise t.error("ca", f"not a PEM CA bundle ({err})") from None


def _convert(t: Table, key_path: str, text: str) -> str:
    try:
        return member_url(text)
    except ValueError as err:
        raise ConfigError(t.source, key_path, str(err)) from None
