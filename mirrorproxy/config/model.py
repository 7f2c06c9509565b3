"""The configuration's data model: frozen dataclasses with their defaults.

Defaults live here and only here; ``load`` fills the fields from TOML.
"""

from __future__ import annotations

import functools
import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

WILDCARD = "*"


@functools.lru_cache(maxsize=256)
def _glob(pattern: str) -> re.Pattern[str]:
    """A host pattern where only ``*`` is special (brackets are IPv6, not classes)."""
    return re.compile(".*".join(re.escape(part) for part in pattern.split("*")))


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
class Access:
    """Who may pull through a namespace once ``[server.auth]`` is set (``access = ...``)."""

    anyone: bool = True  # "anyone" (the default): no credentials asked
    # With anyone False: None means any authenticated client ("authenticated"), else
    # these users (groups from [server.auth.groups] already expanded into them).
    users: frozenset[str] | None = None

    def permits(self, user: str) -> bool:
        """Whether an authenticated ``user`` may pull."""
        return self.anyone or self.users is None or user in self.users


ANYONE = Access()


@dataclass(frozen=True, slots=True)
class ClientAuth:
    """``[server.auth]``: how clients prove who they are (Basic, Bearer, or both)."""

    htpasswd: Path | None = None  # bcrypt entries (htpasswd -B): Basic auth
    token_realm: str | None = None  # the token service clients are sent to (Bearer)
    token_service: str | None = None  # the audience tokens must name
    token_issuer: str | None = None  # the issuer tokens must name
    token_public_keys: Path | None = None  # PEM certificates/public keys, or a JWKS file
    # Group name -> users, for namespace access lists ("group:NAME").
    groups: Mapping[str, frozenset[str]] = field(default_factory=dict)
    max_failed_logins: int = 10  # per client address within failed_login_window
    failed_login_window: float = 60.0  # seconds; failures older than this are forgiven

    @property
    def basic(self) -> bool:
        return self.htpasswd is not None

    @property
    def bearer(self) -> bool:
        return self.token_public_keys is not None


@dataclass(frozen=True, slots=True)
class Namespace:
    """A registry the mirror serves (``docker.io``), or ``*`` for any other."""

    name: str
    upstreams: tuple[Upstream, ...]
    tag_ttl: float  # seconds a tag -> digest answer stays fresh
    # For "*" only, and required there: the registries (host patterns like
    # "*.corp.example") it may serve. An explicit opt-in, never an open proxy.
    allow: tuple[str, ...] = ()
    access: Access = ANYONE  # who may pull through it (only with [server.auth])

    def allows(self, registry: str) -> bool:
        """Whether this namespace may serve ``registry`` (always, unless a wildcard)."""
        if self.name != WILDCARD:
            return registry == self.name
        return any(_glob(pattern).fullmatch(registry) for pattern in self.allow)


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "127.0.0.1"  # safe default: node-local only
    port: int = 5000
    default_namespace: str | None = None  # used when a request carries no ns=
    tls_cert: Path | None = None  # serve HTTPS with this PEM certificate (chain)
    tls_key: Path | None = None  # and this key
    # Client networks allowed to use the mirror (CIDRs); empty: everyone who can connect.
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()
    max_connections: int = 1024  # concurrent client connections
    # Idle keep-alive, header-read limit (slowloris), and how long a blob answer
    # waits on a client that takes no bytes before closing it.
    client_timeout: float = 60.0
    max_header_size: int = 16 * 1024  # bytes of one request header line
    max_url_length: int = 8 * 1024  # bytes of the request line
    auth: ClientAuth | None = None  # [server.auth]; None: no client authentication
    # Serving processes on the one address over the one cache ("auto": usable cores).
    workers: int = 1

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
    max_size: int = 0  # bytes of blobs kept; least recently used go first (0: no limit)
    min_free: float = 0.0  # keep this share (0..1) of the filesystem free
    min_free_bytes: int = 0  # or this many bytes free


@dataclass(frozen=True, slots=True)
class S3Config:
    """[storage.s3]: an S3-compatible bucket holding the cache's content."""

    endpoint: str  # scheme://host[:port] of any S3-compatible service
    bucket: str  # must exist
    region: str = "us-east-1"
    prefix: str = ""  # key prefix inside the bucket ("" or ending in "/")
    access_key: str | None = None  # None: the client's own credential chain
    secret_key: Secret | None = None  # from secret_key, secret_key_file or secret_key_env
    redirect: bool = False  # answer blob GETs with a 307 to a presigned URL


@dataclass(frozen=True, slots=True)
class StorageConfig:
    """[storage]: where content lives; the filesystem under [cache] dir by default."""

    backend: str = "filesystem"  # "filesystem" | "s3"
    s3: S3Config | None = None  # set exactly when backend is "s3"


@dataclass(frozen=True, slots=True)
class UpstreamDefaults:
    connect_timeout: float = 5.0
    read_timeout: float = 30.0
    cooldown: float = 1.0  # first skip after an endpoint fails; doubles per failure
    max_cooldown: float = 60.0  # ceiling of that growth
    max_fetches: int = 64  # concurrent requests to one upstream endpoint


@dataclass(frozen=True, slots=True)
class MetricsConfig:
    # host:port for a separate /metrics listener; None: /metrics on the main listener.
    listen: tuple[str, int] | None = None
    # Client networks allowed to read /metrics; empty: those of [server] allow.
    allow: tuple[ipaddress.IPv4Network | ipaddress.IPv6Network, ...] = ()


@dataclass(frozen=True, slots=True)
class ClusterConfig:
    """[cluster]: mirrors that fetch each blob and tag once between them.

    Exactly one of ``members`` (a static list) and ``members_dns`` (host and port
    whose A/AAAA records are the members, re-resolved every ``refresh``) is set.
    """

    self_url: str  # how the other members reach this one (``self``), normalised
    members: tuple[str, ...] = ()  # normalised http(s)://host:port of every member
    members_dns: tuple[str, int] | None = None  # e.g. a headless Service's name and port
    refresh: float = 10.0  # seconds between lookups of members_dns
    peer_timeout: float = 2.0  # connect timeout to a member; it then cools down
    ca: Path | None = None  # PEM bundle that https:// members' certificates chain to
    # The name every https:// member's certificate is checked against (members from
    # DNS are addresses; one certificate for the Service name then serves them all).
    server_name: str | None = None


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    cache: CacheConfig
    defaults: UpstreamDefaults
    namespaces: Mapping[str, Namespace] = field(default_factory=dict)
    source: str = "<config>"
    metrics: MetricsConfig = field(default_factory=MetricsConfig)
    storage: StorageConfig = field(default_factory=StorageConfig)
    cluster: ClusterConfig | None = None  # [cluster]; None: a mirror on its own

    def namespace(self, name: str) -> Namespace | None:
        """The namespace serving registry ``name``: an exact match, else an allowing wildcard."""
        exact = self.namespaces.get(name)
        if exact is not None:
            return exact
        wildcard = self.namespaces.get(WILDCARD)
        return wildcard if wildcard is not None and wildcard.allows(name) else None
