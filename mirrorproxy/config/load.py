"""Load and validate the TOML config into the frozen dataclasses of ``model``.

This is the only code that reads the config file (and the environment, for
``password_env``). Every value is checked here, once, so the rest of the code can
trust it; problems raise ConfigError naming the file, the exact key path and what
is wrong.

Adding an option: add a field (with its default and a comment) to the dataclass in
``model``, read it in the matching ``_load_*`` function with ``Table.take`` /
``Table.convert``, document it in ``config/mirrorproxy.toml``, and add a case to
``tests/unit/test_config.py``.

Over 300 lines because every table's checks live here, one ``_load_*`` function
each, so defaults and validation are applied in exactly one place.
"""

from __future__ import annotations

import os
import ssl
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from mirrorproxy.config.auth import load_access, load_client_auth
from mirrorproxy.config.cluster import load_cluster
from mirrorproxy.config.model import (
    WILDCARD,
    CacheConfig,
    ClientAuth,
    Config,
    ConfigError,
    MetricsConfig,
    Namespace,
    Secret,
    ServerConfig,
    Upstream,
    UpstreamDefaults,
)
from mirrorproxy.config.storage import load_secret, load_storage
from mirrorproxy.config.table import Table, tname
from mirrorproxy.config.values import (
    NS_RE,
    parse_free_space,
    parse_host_pattern,
    parse_listen,
    parse_network,
    parse_upstream_url,
    parse_workers,
)
from mirrorproxy.core.units import parse_duration, parse_size

T = TypeVar("T")


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
    root = Table(data, "", source, base_dir=base_dir, environ=env)
    defaults = _load_defaults(root.table("defaults"))
    cache = _load_cache(root.table("cache"), base_dir)
    server_t = root.table("server")
    auth = load_client_auth(server_t)
    namespaces_t = root.table("namespaces", required=True)
    namespaces: dict[str, Namespace] = {}
    for name in namespaces_t.data:
        key = namespaces_t.sub(name)
        if name != WILDCARD and not NS_RE.fullmatch(name):
            raise ConfigError(
                source, key, "not a registry host name (lower case, e.g. 'docker.io')"
            )
        namespaces[name] = _load_namespace(namespaces_t.table(name), name, cache, defaults, auth)
    namespaces_t.done()
    if not namespaces:
        raise ConfigError(source, "namespaces", "no namespace configured")
    server = replace(_load_server(server_t, namespaces), auth=auth)
    metrics = _load_metrics(root.table("metrics"))
    storage = load_storage(root.table("storage"))
    cluster = load_cluster(root.table("cluster"))
    root.done()
    if server.workers > 1 and cluster is not None:
        raise ConfigError(source, "server.workers", WORKERS_WITH_CLUSTER)
    return Config(server, cache, defaults, namespaces, source, metrics, storage, cluster)


# Workers share the work through an internal cluster of their own; a worker cannot
# also be a member of a cluster of machines (ownership would be per worker, not per
# machine), so the two are refused together.
WORKERS_WITH_CLUSTER = (
    "workers > 1 cannot be combined with [cluster]: run one worker per cluster member"
    " (or more members), or drop [cluster]"
)


def with_overrides(
    config: Config,
    *,
    listen: str | None = None,
    cache_dir: str | None = None,
    offline: bool | None = None,
    workers: str | None = None,
) -> Config:
    """Apply command-line overrides, validated like the file's values."""
    server, cache = config.server, config.cache
    if workers is not None:
        try:
            server = replace(server, workers=parse_workers(workers))
        except ValueError as err:
            raise ConfigError("--workers", "", str(err)) from None
        if server.workers > 1 and config.cluster is not None:
            raise ConfigError(
                "--workers", "", f"{config.source}: [cluster]: {WORKERS_WITH_CLUSTER}"
            )
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


def _load_defaults(t: Table) -> UpstreamDefaults:
    d = UpstreamDefaults()
    out = UpstreamDefaults(
        connect_timeout=t.convert("connect_timeout", parse_duration, d.connect_timeout),
        read_timeout=t.convert("read_timeout", parse_duration, d.read_timeout),
        cooldown=t.convert("cooldown", parse_duration, d.cooldown),
        max_cooldown=t.convert("max_cooldown", parse_duration, d.max_cooldown),
        max_fetches=t.take("max_fetches", int, d.max_fetches),
    )
    t.done()
    if out.max_fetches < 1:
        raise t.error("max_fetches", "must be at least 1")
    if out.max_cooldown < out.cooldown:
        raise t.error("max_cooldown", "must not be shorter than cooldown")
    return out


def _load_cache(t: Table, base_dir: Path) -> CacheConfig:
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
        max_size=t.convert("max_size", parse_size, d.max_size),
    )
    share, free_bytes = t.convert("min_free", parse_free_space, (0.0, 0))
    t.done()
    return replace(out, min_free=share, min_free_bytes=free_bytes)


def _load_server(t: Table, namespaces: Mapping[str, Namespace]) -> ServerConfig:
    d = ServerConfig()
    host, port = t.convert("listen", parse_listen, (d.host, d.port))
    default_ns = t.take("default_namespace", str, "")
    if default_ns and not NS_RE.fullmatch(default_ns):
        raise t.error("default_namespace", "not a registry host name (lower case)")
    if default_ns and default_ns not in namespaces and WILDCARD not in namespaces:
        raise t.error("default_namespace", f"{default_ns!r} is not a configured namespace")
    if not default_ns and "docker.io" in namespaces:
        default_ns = "docker.io"  # what a client without ns= most likely means
    tls_cert, tls_key = t.file("tls_cert"), t.file("tls_key")
    if (tls_cert is None) != (tls_key is None):
        raise t.error(
            "tls_key" if tls_key is None else "tls_cert", "give both tls_cert and tls_key"
        )
    if tls_cert is not None and tls_key is not None:
        try:
            ssl.create_default_context(ssl.Purpose.CLIENT_AUTH).load_cert_chain(tls_cert, tls_key)
        except (ssl.SSLError, ValueError) as err:
            raise t.error("tls_cert", f"cannot load certificate and key ({err})") from None
    allow = tuple(
        _convert_item(t, "allow", i, parse_network, item)
        for i, item in enumerate(t.take("allow", list, []))
    )
    out = ServerConfig(
        host=host,
        port=port,
        default_namespace=default_ns or None,
        tls_cert=tls_cert,
        tls_key=tls_key,
        allow=allow,
        max_connections=t.take("max_connections", int, d.max_connections),
        client_timeout=t.convert("client_timeout", parse_duration, d.client_timeout),
        max_header_size=t.convert("max_header_size", parse_size, d.max_header_size),
        max_url_length=t.convert("max_url_length", parse_size, d.max_url_length),
        workers=_load_workers(t),
    )
    for key in ("max_connections", "max_header_size", "max_url_length"):
        if getattr(out, key) < 1:
            raise t.error(key, "must be at least 1")
    t.done()
    return out


def _load_workers(t: Table) -> int:
    """``workers``: a number, or "auto" (a TOML integer or string)."""
    raw = t.data.get("workers", 1)
    t.seen.add("workers")
    if isinstance(raw, bool) or not isinstance(raw, (int, str)):
        raise t.error("workers", f'expected a number or "auto", got {tname(raw)}')
    try:
        return parse_workers(str(raw))
    except ValueError as err:
        raise t.error("workers", str(err)) from None


def _load_metrics(t: Table) -> MetricsConfig:
    listen = t.convert("listen", parse_listen, None) if t.data.get("listen") else None
    t.seen.add("listen")
    allow = tuple(
        _convert_item(t, "allow", i, parse_network, item)
        for i, item in enumerate(t.take("allow", list, []))
    )
    t.done()
    return MetricsConfig(listen=listen, allow=allow)


def _convert_item(t: Table, key: str, index: int, parse: Callable[[str], T], item: object) -> T:
    if not isinstance(item, str):
        raise ConfigError(
            t.source, f"{t.sub(key)}[{index}]", f"expected a string, got {tname(item)}"
        )
    try:
        return parse(item)
    except ValueError as err:
        raise ConfigError(t.source, f"{t.sub(key)}[{index}]", str(err)) from None


def _load_namespace(
    t: Table,
    name: str,
    cache: CacheConfig,
    defaults: UpstreamDefaults,
    auth: ClientAuth | None,
) -> Namespace:
    tag_ttl = t.convert("tag_ttl", parse_duration, cache.tag_ttl)
    raw = t.take("upstreams", list, [])
    if not raw:
        raise t.error("upstreams", "no upstreams (give at least one URL)")
    upstreams = tuple(
        _load_upstream(t, item, f"{t.sub('upstreams')}[{i}]", defaults)
        for i, item in enumerate(raw)
    )
    allow = tuple(
        _convert_item(t, "allow", i, parse_host_pattern, item)
        for i, item in enumerate(t.take("allow", list, []))
    )
    if name == WILDCARD and not allow:
        raise t.error(
            "allow", "a wildcard namespace needs an allowlist of registries it may serve"
        )
    if name != WILDCARD and allow:
        raise t.error("allow", "only a wildcard namespace takes an allowlist")
    access = load_access(t, auth)
    t.done()
    return Namespace(name=name, upstreams=upstreams, tag_ttl=tag_ttl, allow=allow, access=access)


def _load_upstream(parent: Table, item: object, key: str, defaults: UpstreamDefaults) -> Upstream:
    source = parent.source
    if isinstance(item, str):
        item = {"url": item}
    if not isinstance(item, dict):
        raise ConfigError(source, key, f"expected a URL string or a table, got {tname(item)}")
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


def _check_tls(t: Table, up: Upstream) -> None:
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


def _load_password(t: Table) -> Secret | None:
    """One of password, password_file (first line) or password_env."""
    return load_secret(t, "password")
