"""Load and validate the TOML config into frozen dataclasses.

This is the only module that reads the config file. Every value is checked here,
once, so the rest of the code can trust it; problems raise ConfigError naming the
file, the exact key path and what is wrong.

Adding an option: add a field (with its default and a comment) to the dataclass,
read it in the matching ``_load_*`` function with ``_Table.take``, document it in
``config/mirrorproxy.example.toml``, and add a case to ``tests/unit/test_config.py``.
"""

from __future__ import annotations

import ipaddress
import json
import os
import re
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mirrorproxy.units import parse_duration, parse_size

T = TypeVar("T")

WILDCARD = "*"
# A registry host as containerd names it: DNS name or IPv4, optional port, or [v6]:port.
_NS_RE = re.compile(
    r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?(?:\.[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?)*"
    r"|\[[0-9a-f:.]+\])(?::[0-9]{1,5})?"
)
_HOST_RE = re.compile(
    r"[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?(?:\.[A-Za-z0-9](?:[A-Za-z0-9-]{0,61}[A-Za-z0-9])?)*"
)


class ConfigError(Exception):
    """A config problem, rendered as one line: ``FILE: KEY: PROBLEM``."""

    def __init__(self, source: str, key: str, message: str) -> None:
        super().__init__(f"{source}: {key}: {message}" if key else f"{source}: {message}")
        self.source = source
        self.key = key
        self.message = message


class Secret:
    """A credential that never shows itself in a repr, a log line or an error."""

    __slots__ = ("_value",)

    def __init__(self, value: str) -> None:
        self._value = value

    def reveal(self) -> str:
        return self._value

    def __repr__(self) -> str:
        return "Secret('***')"

    __str__ = __repr__

    def __eq__(self, other: object) -> bool:
        return isinstance(other, Secret) and other._value == self._value

    def __hash__(self) -> int:
        return hash(self._value)


@dataclass(frozen=True, slots=True)
class Upstream:
    """One endpoint of a namespace."""

    url: str  # as configured (display and metric label); never holds credentials
    origin: str  # scheme://host[:port]
    path: str  # the API root: "/v2", or the path given in the URL (override_path)
    ns: bool = False  # append ?ns=<namespace>, for chaining to another mirror
    connect_timeout: float = 5.0  # seconds to establish a connection
    read_timeout: float = 30.0  # seconds of silence tolerated while reading
    username: str | None = None  # for Basic auth and for Bearer token requests
    password: Secret | None = None  # from password, password_file or password_env
    ca: Path | None = None  # PEM bundle to trust instead of the system CAs
    client_cert: Path | None = None  # PEM client certificate (mutual TLS)
    client_key: Path | None = None  # its key, if not inside client_cert
    skip_verify: bool = False  # accept any server certificate (test setups only)
    proxy: str | None = None  # HTTP proxy for this upstream; else HTTP(S)_PROXY env


@dataclass(frozen=True, slots=True)
class Namespace:
    """A registry the mirror serves (``docker.io``), or ``*`` for any other."""

    name: str
    upstreams: tuple[Upstream, ...]
    tag_ttl: float  # seconds a tag -> digest answer stays fresh


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"  # safe default: node-local only
    port: int = 5000
    default_namespace: str | None = None  # used when a request carries no ns=

    @property
    def listen(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True, slots=True)
class CacheConfig:
    dir: Path = Path("/var/lib/mirrorproxy")
    tag_ttl: float = 300.0  # 5m: how long tag -> digest stays fresh
    max_manifest_size: int = 4 * 1024 * 1024  # the distribution-spec's suggested limit
    memory_manifests: int = 64 * 1024 * 1024  # bytes of hot manifests kept in memory
    offline: bool = False  # never contact upstreams; serve what is cached, tags past TTL too


@dataclass(frozen=True, slots=True)
class UpstreamDefaults:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    cooldown: float = 1.0  # first skip after an endpoint fails; doubles per failure
    max_cooldown: float = 60.0  # ceiling of that growth


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    cache: CacheConfig
    defaults: UpstreamDefaults
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    source: str = "<config>"

    def namespace(self, name: str) -> Namespace | None:
        """Return the namespace serving ``name``: an exact match, else the wildcard."""
        return self.namespaces.get(name) or self.namespaces.get(WILDCARD)


def load_config(path: str | Path) -> Config:
    """Read and validate a config file.

    Raises:
        ConfigError: the file is missing, not TOML, or has a bad value.
    """
    src = str(path)
    try:
        with open(path, "rb") as f:
            data = tomllib.load(f)
    except FileNotFoundError:
        raise ConfigError(src, "", "no such file") from None
    except OSError as err:
        raise ConfigError(src, "", f"cannot read: {err.strerror}") from None
    except tomllib.TOMLDecodeError as err:
        raise ConfigError(src, "", f"not valid TOML: {err}") from None
    except UnicodeDecodeError:
        raise ConfigError(src, "", "not UTF-8 text") from None
    return parse_config(data, source=src, base_dir=Path(path).resolve().parent)


def parse_config(
    data: Mapping[str, Any],
    *,
    source: str,
    base_dir: Path,
    environ: Mapping[str, str] | None = None,
) -> Config:
    """Validate already-parsed TOML data (relative paths resolve against base_dir).

    ``environ`` is where ``password_env`` is looked up (default: the process's).
    """
    env = os.environ if environ is None else environ
    root = _Table(data, "", source, base_dir=base_dir, environ=env)
    defaults = _load_defaults(root.table("defaults"))
    cache = _load_cache(root.table("cache"), base_dir)
    namespaces_t = root.table("namespaces", required=True)
    namespaces: dict[str, Namespace] = {}
    for name in namespaces_t.data:
        key = namespaces_t.sub(name)
        if name != WILDCARD and not _NS_RE.fullmatch(name):
            raise ConfigError(
                source, key, "not a registry host name (lower case, e.g. 'docker.io')"
            )
        namespaces[name] = _load_namespace(namespaces_t.table(name), name, cache, defaults)
    namespaces_t.done()
    if not namespaces:
        raise ConfigError(source, "namespaces", "no namespace configured")
    server = _load_server(root.table("server"), namespaces)
    root.done()
    return Config(server, cache, defaults, namespaces, source)


def with_overrides(
    config: Config,
    *,
    listen: str | None = None,
    cache_dir: str | None = None,
    offline: bool | None = None,
) -> Config:
    """Apply command-line overrides, validated like the file's values."""
    server, cache = config.server, config.cache
    if listen is not None:
        try:
            host, port = parse_listen(listen)
        except ValueError as err:
            raise ConfigError("--listen", "", str(err)) from None
        server = replace(server, host=host, port=port)
    if cache_dir is not None:
        cache = replace(cache, dir=Path(cache_dir).resolve())
    if offline is not None:
        cache = replace(cache, offline=offline)
    return replace(config, server=server, cache=cache)


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
    elif not _HOST_RE.fullmatch(host):
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
    if ":" not in parts.hostname and not _HOST_RE.fullmatch(parts.hostname):
        raise ValueError(f"bad host name in {text!r}")
    host = f"[{parts.hostname}]" if ":" in parts.hostname else parts.hostname
    origin = f"{parts.scheme}://{host}" + (f":{port}" if port else "")
    path = parts.path.rstrip("/") or "/v2"
    return origin, path


class _Table:
    """A TOML table being read: typed access, key paths in errors, unknown keys caught."""

    def __init__(
        self,
        data: Mapping[str, Any],
        path: str,
        source: str,
        *,
        base_dir: Path = Path("."),
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.data = data
        self.path = path
        self.source = source
        self.base_dir = base_dir
        self.environ: Mapping[str, str] = environ or {}
        self.seen: set[str] = set()

    def sub(self, key: str) -> str:
        k = key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else json.dumps(key)
        return f"{self.path}.{k}" if self.path else k

    def error(self, key: str, message: str) -> ConfigError:
        return ConfigError(self.source, self.sub(key), message)

    def table(self, key: str, *, required: bool = False) -> _Table:
        self.seen.add(key)
        value = self.data.get(key)
        if value is None:
            if required:
                raise self.error(key, "missing")
            value = {}
        if not isinstance(value, dict):
            raise self.error(key, f"expected a table, got {_tname(value)}")
        return self.child(value, self.sub(key))

    def child(self, data: Mapping[str, Any], path: str) -> _Table:
        return _Table(data, path, self.source, base_dir=self.base_dir, environ=self.environ)

    def file(self, key: str) -> Path | None:
        """A path to an existing readable file, relative to the config's directory."""
        raw = self.take(key, str, "")
        if not raw:
            return None
        path = (self.base_dir / Path(raw).expanduser()).resolve()
        if not path.is_file() or not os.access(path, os.R_OK):
            raise self.error(key, f"no readable file at {str(path)!r}")
        return path

    def take(self, key: str, kind: type[T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        # bool is an int in Python; a float key should still accept 5.
        ok = isinstance(value, kind) and not (kind is not bool and isinstance(value, bool))
        if kind is float and isinstance(value, int) and not isinstance(value, bool):
            value, ok = float(value), True
        if not ok:
            raise self.error(key, f"expected {kind.__name__}, got {_tname(value)}")
        return value  # type: ignore[no-any-return]

    def convert(self, key: str, parse: Callable[[str], T], default: T) -> T:
        self.seen.add(key)
        if key not in self.data:
            return default
        value = self.data[key]
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            value = str(value)
        if not isinstance(value, str):
            raise self.error(key, f"expected a string, got {_tname(value)}")
        try:
            return parse(value)
        except ValueError as err:
            raise self.error(key, str(err)) from None

    def done(self) -> None:
        unknown = [k for k in self.data if k not in self.seen]
        if unknown:
            raise self.error(unknown[0], "unknown key")


def _tname(value: object) -> str:
    return {dict: "a table", list: "an array", str: "a string", bool: "a boolean"}.get(
        type(value), type(value).__name__
    )


def _load_defaults(t: _Table) -> UpstreamDefaults:
    d = UpstreamDefaults()
    out = UpstreamDefaults(
        connect_timeout=t.convert("connect_timeout", parse_duration, d.connect_timeout),
        read_timeout=t.convert("read_timeout", parse_duration, d.read_timeout),
        cooldown=t.convert("cooldown", parse_duration, d.cooldown),
        max_cooldown=t.convert("max_cooldown", parse_duration, d.max_cooldown),
    )
    t.done()
    if out.max_cooldown < out.cooldown:
        raise t.error("max_cooldown", "must not be shorter than cooldown")
    return out


def _load_cache(t: _Table, base_dir: Path) -> CacheConfig:
    d = CacheConfig()
    raw_dir = t.take("dir", str, str(d.dir))
    if not raw_dir:
        raise t.error("dir", "must not be empty")
    out = CacheConfig(
        dir=(base_dir / Path(raw_dir).expanduser()).resolve(),
        tag_ttl=t.convert("tag_ttl", parse_duration, d.tag_ttl),
        max_manifest_size=t.convert("max_manifest_size", parse_size, d.max_manifest_size),
        memory_manifests=t.convert("memory_manifests", parse_size, d.memory_manifests),
        offline=t.take("offline", bool, d.offline),
    )
    t.done()
    return out


def _load_server(t: _Table, namespaces: Mapping[str, Namespace]) -> ServerConfig:
    host, port = t.convert("listen", parse_listen, ("127.0.0.1", 5000))
    default_ns = t.take("default_namespace", str, "")
    if default_ns and not _NS_RE.fullmatch(default_ns):
        raise t.error("default_namespace", "not a registry host name (lower case)")
    if default_ns and default_ns not in namespaces and WILDCARD not in namespaces:
        raise t.error("default_namespace", f"{default_ns!r} is not a configured namespace")
    if not default_ns and "docker.io" in namespaces:
        default_ns = "docker.io"  # what a client without ns= most likely means
    t.done()
    return ServerConfig(host=host, port=port, default_namespace=default_ns or None)


def _load_namespace(
    t: _Table, name: str, cache: CacheConfig, defaults: UpstreamDefaults
) -> Namespace:
    tag_ttl = t.convert("tag_ttl", parse_duration, cache.tag_ttl)
    raw = t.take("upstreams", list, [])
    if not raw:
        raise t.error("upstreams", "no upstreams (give at least one URL)")
    upstreams = tuple(
        _load_upstream(t, item, f"{t.sub('upstreams')}[{i}]", defaults)
        for i, item in enumerate(raw)
    )
    t.done()
    return Namespace(name=name, upstreams=upstreams, tag_ttl=tag_ttl)


def _load_upstream(parent: _Table, item: object, key: str, defaults: UpstreamDefaults) -> Upstream:
    source = parent.source
    if isinstance(item, str):
        item = {"url": item}
    if not isinstance(item, dict):
        raise ConfigError(source, key, f"expected a URL string or a table, got {_tname(item)}")
    t = parent.child(item, key)
    url = t.take("url", str, "")
    if not url:
        raise ConfigError(source, f"{key}.url", "missing")
    try:
        origin, path = parse_upstream_url(url)
    except ValueError as err:
        raise ConfigError(source, f"{key}.url", str(err)) from None
    proxy = t.take("proxy", str, "") or None
    if proxy is not None:
        parts = urlsplit(proxy)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise t.error("proxy", f"not an http(s) proxy URL: {proxy!r}")
    username = t.take("username", str, "") or None
    password = _load_password(t)
    if password is not None and username is None:
        raise t.error("username", "missing (a password needs a username)")
    client_cert, client_key = t.file("client_cert"), t.file("client_key")
    if client_key is not None and client_cert is None:
        raise t.error("client_cert", "missing (client_key needs client_cert)")
    out = Upstream(
        url=url.rstrip("/"),
        origin=origin,
        path=path,
        ns=t.take("ns", bool, False),
        connect_timeout=t.convert("connect_timeout", parse_duration, defaults.connect_timeout),
        read_timeout=t.convert("read_timeout", parse_duration, defaults.read_timeout),
        username=username,
        password=password,
        ca=t.file("ca"),
        client_cert=client_cert,
        client_key=client_key,
        skip_verify=t.take("skip_verify", bool, False),
        proxy=proxy,
    )
    _check_tls(t, out)
    t.done()
    return out


def _check_tls(t: _Table, up: Upstream) -> None:
    """Load the TLS files now, so a bad PEM is a config error naming its key."""
    tls_keys = [k for k in ("ca", "client_cert", "skip_verify") if k in t.data]
    if not up.origin.startswith("https:"):
        if tls_keys:
            raise t.error(tls_keys[0], "only applies to an https:// upstream")
        return
    if up.ca is None and up.client_cert is None:
        return  # nothing to load (building a context costs ~25 ms)
    ctx = ssl.create_default_context()
    try:
        if up.ca is not None:
            ctx.load_verify_locations(cafile=str(up.ca))
    except (ssl.SSLError, ValueError) as err:
        raise t.error("ca", f"not a PEM CA bundle ({err})") from None
    try:
        if up.client_cert is not None:
            ctx.load_cert_chain(up.client_cert, up.client_key)
    except (ssl.SSLError, ValueError) as err:
        raise t.error("client_cert", f"cannot load certificate and key ({err})") from None


def _load_password(t: _Table) -> Secret | None:
    """One of password, password_file (first line) or password_env."""
    given = [k for k in ("password", "password_file", "password_env") if k in t.data]
    if len(given) > 1:
        raise t.error(given[1], "give only one of password, password_file, password_env")
    if not given:
        return None
    key = given[0]
    if key == "password":
        value = t.take("password", str, "")
    elif key == "password_file":
        path = t.file("password_file")
        try:
            value = path.read_text().splitlines()[0] if path else ""
        except (OSError, IndexError, UnicodeDecodeError):
            raise t.error(key, "cannot read a password from that file") from None
    else:
        name = t.take("password_env", str, "")
        if name not in t.environ:
            raise t.error(key, f"environment variable {name!r} is not set")
        value = t.environ[name]
    if not value:
        raise t.error(key, "empty password")
    return Secret(value)
