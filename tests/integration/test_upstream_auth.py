"""Upstream auth against an in-process token server and a registry that demands tokens.

Covers the anonymous and authenticated Bearer flows, token caching per scope and
expiry, no stampede on the token server, Basic auth, bad credentials (a clean error
naming the upstream, no secret in it), and that a client's Authorization header is
never forwarded upstream.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import secrets
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from mirrorproxy.config import parse_config
from mirrorproxy.http.app import create_app

ServerFactory = Callable[[web.Application], Awaitable[TestServer]]
ClientFactory = Callable[[web.Application], Awaitable[TestClient[web.Request, web.Application]]]

USER, PASSWORD = "robot$ci", "s3cr3t-pa55"
BLOB = secrets.token_bytes(200_000)
BLOB_DIGEST = "sha256:" + hashlib.sha256(BLOB).hexdigest()
MANIFEST = json.dumps(
    {"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}
).encode()
MANIFEST_DIGEST = "sha256:" + hashlib.sha256(MANIFEST).hexdigest()


@dataclass
class AuthRegistry:
    """A registry that wants ``Bearer`` (from its own /token) or ``Basic``."""

    scheme: str = "bearer"
    need_credentials: bool = False
    expires_in: int = 300
    token_delay: float = 0.0
    token_requests: list[dict[str, Any]] = field(default_factory=list)
    seen_auth: list[str] = field(default_factory=list)
    valid: set[str] = field(default_factory=set)
    base: str = ""

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_get("/token", self.token)
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self.manifest)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self.blob)
        return app

    def _basic_ok(self, header: str) -> bool:
        expected = base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode()
        return header == f"Basic {expected}"

    async def token(self, request: web.Request) -> web.Response:
        self.token_requests.append(
            {"query": dict(request.query), "auth": request.headers.get("Authorization", "")}
        )
        await asyncio.sleep(self.token_delay)
        if self.need_credentials and not self._basic_ok(request.headers.get("Authorization", "")):
            return web.json_response({"details": "bad credentials"}, status=401)
        tok = secrets.token_hex(8)
        self.valid.add(tok)
        return web.json_response({"token": tok, "expires_in": self.expires_in})

    def _challenge(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if self.scheme == "basic":
            value = 'Basic realm="registry"'
        else:
            value = (
                f'Bearer realm="{self.base}/token",service="fake",scope="repository:{name}:pull"'
            )
        return web.json_response(
            {"errors": [{"code": "UNAUTHORIZED", "message": "auth"}]},
            status=401,
            headers={"WWW-Authenticate": value},
        )

    def _authorized(self, request: web.Request) -> bool:
        header = request.headers.get("Authorization", "")
        self.seen_auth.append(header)
        if self.scheme == "basic":
            return self._basic_ok(header)
        return header.startswith("Bearer ") and header[7:] in self.valid

    async def manifest(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._challenge(request)
        return web.Response(
            body=MANIFEST,
            headers={
                "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                "Docker-Content-Digest": MANIFEST_DIGEST,
            },
        )

    async def blob(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._challenge(request)
        return web.Response(body=BLOB, content_type="application/octet-stream")


async def _mirror(
    reg: AuthRegistry,
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    **upstream: Any,
) -> TestClient[web.Request, web.Application]:
    server = await aiohttp_server(reg.app())
    reg.base = str(server.make_url("")).rstrip("/")
    config = parse_config(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "namespaces": {"docker.io": {"upstreams": [{"url": reg.base, **upstream}]}},
        },
        source="test",
        base_dir=tmp_path,
    )
    return await aiohttp_client(create_app(config))


async def test_anonymous_token_fetched_once_and_reused(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reg = AuthRegistry()
    client = await _mirror(reg, aiohttp_server, aiohttp_client, tmp_path)
    r = await client.get("/v2/library/app/manifests/1?ns=docker.io")
    assert r.status == 200
    assert await r.read() == MANIFEST
    r = await client.get(f"/v2/library/app/blobs/{BLOB_DIGEST}")
    assert r.status == 200
    assert await r.read() == BLOB
    assert len(reg.token_requests) == 1
    q = reg.token_requests[0]["query"]
    assert q == {"service": "fake", "scope": "repository:library/app:pull"}
    assert reg.token_requests[0]["auth"] == ""  # anonymous: no credentials configured


async def test_concurrent_requests_share_one_token_fetch(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reg = AuthRegistry(token_delay=0.2)
    client = await _mirror(reg, aiohttp_server, aiohttp_client, tmp_path)
    async with asyncio.timeout(10):
        statuses = await asyncio.gather(
            *(client.get(f"/v2/library/app/manifests/t{i}") for i in range(20))
        )
    assert [s.status for s in statuses] == [200] * 20
    assert len(reg.token_requests) == 1


async def test_tokens_are_per_scope_and_renewed_when_rejected(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reg = AuthRegistry(expires_in=1)  # renewed early: lives MIN_LIFETIME seconds
    client = await _mirror(reg, aiohttp_server, aiohttp_client, tmp_path)
    assert (await client.get("/v2/library/a/manifests/1")).status == 200
    assert (await client.get("/v2/library/b/manifests/1")).status == 200
    scopes = [t["query"]["scope"] for t in reg.token_requests]
    assert scopes == ["repository:library/a:pull", "repository:library/b:pull"]
    # The registry revokes every token: the mirror notices the 401 and fetches anew.
    reg.valid.clear()
    assert (await client.get("/v2/library/a/manifests/2")).status == 200
    assert len(reg.token_requests) == 3


async def test_credentials_go_to_the_token_server(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reg = AuthRegistry(need_credentials=True)
    client = await _mirror(
        reg, aiohttp_server, aiohttp_client, tmp_path, username=USER, password=PASSWORD
    )
    r = await client.get("/v2/library/app/manifests/1")
    assert r.status == 200
    assert reg.token_requests[0]["auth"].startswith("Basic ")


async def test_bad_credentials_give_a_clean_error_without_the_secret(
    aiohttp_server: ServerFactory,
    aiohttp_client: ClientFactory,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    reg = AuthRegistry(need_credentials=True)
    client = await _mirror(
        reg, aiohttp_server, aiohttp_client, tmp_path, username=USER, password="wrong-pw-xyz"
    )
    r = await client.get("/v2/library/app/manifests/1")
    assert r.status == 502
    body = await r.json()
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    text = json.dumps(body)
    assert reg.base in text
    assert "401" in text
    assert "wrong-pw-xyz" not in text
    assert "wrong-pw-xyz" not in caplog.text
    metrics = await (await client.get("/metrics")).text()
    assert "wrong-pw-xyz" not in metrics


async def test_no_credentials_for_a_private_upstream_is_a_clean_error(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reg = AuthRegistry(scheme="basic")
    client = await _mirror(reg, aiohttp_server, aiohttp_client, tmp_path)
    r = await client.get("/v2/library/app/manifests/1")
    assert r.status == 502
    detail = (await r.json())["errors"][0]["detail"]["upstreams"][0]
    assert "requires credentials" in detail


async def test_basic_auth_is_sent_up_front_after_the_first_challenge(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reg = AuthRegistry(scheme="basic")
    client = await _mirror(
        reg, aiohttp_server, aiohttp_client, tmp_path, username=USER, password=PASSWORD
    )
    assert (await client.get("/v2/library/app/manifests/1")).status == 200
    assert (await client.get(f"/v2/library/app/blobs/{BLOB_DIGEST}")).status == 200
    # challenge, retry with Basic, then Basic straight away
    assert [a.split(" ")[0] for a in reg.seen_auth] == ["", "Basic", "Basic"]


async def test_client_authorization_is_not_forwarded(
    aiohttp_server: ServerFactory, aiohttp_client: ClientFactory, tmp_path: Path
) -> None:
    reg = AuthRegistry()
    client = await _mirror(reg, aiohttp_server, aiohttp_client, tmp_path)
    r = await client.get(
        "/v2/library/app/manifests/1", headers={"Authorization": "Bearer client-secret"}
    )
    assert r.status == 200
    assert all("client-secret" not in a for a in reg.seen_auth)


async def test_secret_never_shows_in_config_repr(tmp_path: Path) -> None:
    pw = tmp_path / "pw"
    pw.write_text("from-file-secret\n")
    config = parse_config(
        {
            "namespaces": {
                "a.example": {
                    "upstreams": [
                        {"url": "http://127.0.0.1:1", "username": "u", "password_file": "pw"},
                        {"url": "http://127.0.0.1:2", "username": "u", "password_env": "PW"},
                    ]
                }
            }
        },
        source="test",
        base_dir=tmp_path,
        environ={"PW": "from-env-secret"},
    )
    ups = config.namespaces["a.example"].upstreams
    assert ups[0].password is not None
    assert ups[0].password.reveal() == "from-file-secret"
    assert ups[1].password is not None
    assert ups[1].password.reveal() == "from-env-secret"
    assert "secret" not in repr(config)
    assert "secret" not in str(config)
