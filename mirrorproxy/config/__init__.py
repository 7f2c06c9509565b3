"""Configuration: the data model, and the loader that validates a TOML file into it."""

from mirrorproxy.config.load import load_config, parse_config, with_overrides
from mirrorproxy.config.model import (
    ANYONE,
    WILDCARD,
    Access,
    CacheConfig,
    ClientAuth,
    ClusterConfig,
    Config,
    ConfigError,
    MetricsConfig,
    Namespace,
    S3Config,
    Secret,
    ServerConfig,
    StorageConfig,
    Upstream,
    UpstreamDefaults,
)
from mirrorproxy.config.values import parse_listen, parse_upstream_url

__all__ = [
    "ANYONE",
    "WILDCARD",
    "Access",
    "CacheConfig",
    "ClientAuth",
    "ClusterConfig",
    "Config",
    "ConfigError",
    "MetricsConfig",
    "Namespace",
    "S3Config",
    "Secret",
    "ServerConfig",
    "StorageConfig",
    "Upstream",
    "UpstreamDefaults",
    "load_config",
    "parse_config",
    "parse_listen",
    "parse_upstream_url",
    "with_overrides",
]
