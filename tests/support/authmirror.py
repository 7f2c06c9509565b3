"""Building a mirror with ``[server.auth]`` for integration tests.

Owns the htpasswd file (bcrypt entries made with the ``bcrypt`` package at the
lowest cost, so tests stay fast; the e2e tests use ``htpasswd -B``), the token
signer and trusted-key file, and the config: a private namespace, an open one,
and one limited to a user list, each served by its own fake upstream.
"""

from __future__ import annotations

import base64
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import bcrypt

from mirrorproxy.config import Config, parse_config
from tests.support import jwtkeys

PRIVATE = "private.corp"  # access = "authenticated"
TEAM = "team.corp"  # access = ["alice", "group:ops"]
OPEN = "docker.io"  # access left out: "anyone"
USERS = {"alice": "alice-pw-Qm81", "bob": "bob-pw-Zr44", "carol": "carol-pw-Lk90"}
REALM = "https://auth.corp.example/token"


def basic(user: str, password: str) -> dict[str, str]:
    """An Authorization header for Basic credentials."""
    value = base64.b64encode(f"{user}:{password}".encode()).decode()
    return {"Authorization": f"Basic {value}"}


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def write_htpasswd(path: Path, users: Mapping[str, str]) -> Path:
    lines = [
        f"{u}:{bcrypt.hashpw(p.encode(), bcrypt.gensalt(rounds=4)).decode()}"
        for u, p in users.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return path


@dataclass(frozen=True, slots=True)
class AuthFiles:
    htpasswd: Path
    keys: Path  # PEM: the RSA signer's certificate
    signer: jwtkeys.Signer


def make_auth_files(directory: Path, signer: jwtkeys.Signer) -> AuthFiles:
    directory.mkdir(parents=True, exist_ok=True)
    keys = directory / "token-keys.pem"
    keys.write_bytes(signer.cert_pem())
    return AuthFiles(write_htpasswd(directory / "htpasswd", USERS), keys, signer)


def auth_config(
    cache_dir: Path,
    files: AuthFiles,
    upstreams: Mapping[str, str],
    *,
    basic_auth: bool = True,
    token_auth: bool = True,
    auth: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
    metrics: Mapping[str, Any] | None = None,
    cache: Mapping[str, Any] | None = None,
    tag_ttl: str = "5m",
) -> Config:
    """Namespaces PRIVATE, TEAM and OPEN (those given in ``upstreams``, name -> URL)."""
    table: dict[str, Any] = {"groups": {"ops": ["carol"]}, **(auth or {})}
    if basic_auth:
        table["htpasswd"] = str(files.htpasswd)
    if token_auth:
        table |= {
            "token_realm": REALM,
            "token_service": jwtkeys.SERVICE,
            "token_issuer": jwtkeys.ISSUER,
            "token_public_keys": str(files.keys),
        }
    access = {PRIVATE: "authenticated", TEAM: ["alice", "group:ops"], OPEN: "anyone"}
    data: dict[str, Any] = {
        "server": {"auth": table, **(server or {})},
        "cache": {"dir": str(cache_dir), "tag_ttl": tag_ttl, **(cache or {})},
        "defaults": {"connect_timeout": "1s", "read_timeout": "2s", "cooldown": "0.2s"},
        "namespaces": {
            name: {"upstreams": [url], "access": access[name]} for name, url in upstreams.items()
        },
    }
    if metrics is not None:
        data["metrics"] = dict(metrics)
    return parse_config(data, source="test", base_dir=cache_dir.parent)
