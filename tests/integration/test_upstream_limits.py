"""``[defaults] max_fetches``: at most that many requests in flight to one endpoint.

A streamed blob holds its slot until its body is read, token requests of the same
endpoint share the budget, and nothing deadlocks when the budget is one.
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass, field, replace
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mirrorproxy.http.app import create_app
from mirrorproxy.http.errors import Handler
from tests.support.mirror import mirror_config
from tests.support.paths import REPO, blob_path

BLOBS = [hashlib.shake_256(b"blob%d" % i).digest(64 * 1024) for i in range(6)]
MANIFEST = b'{"schemaVersion": 2, "mediaType": "application/vnd.oci.image.manifest.v1+json"}'


def _digest(data: bytes) -> str:
    return "sha256:" + hashlib.sha256(data).hexdigest()


@dataclass
class SlowRegistry:
    """Serves blobs slowly and counts the requests it is answering at once."""

    auth: bool = False
    inflight: int = 0
    peak: int = 0
    paths: list[str] = field(default_factory=list)
    base: str = ""

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._count])
        app.router.add_get("/token", self._token)
        app.router.add_get("/v2/{name:.+}/blobs/{digest}", self._blob)
        app.router.add_get("/v2/{name:.+}/manifests/{ref}", self._manifest)
        return app

    @web.middleware
    async def _count(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.paths.append(request.path)
        self.inflight += 1
        self.peak = max(self.peak, self.inflight)
        try:
            return await handler(request)
        finally:
            self.inflight -= 1

    def _challenge(self, request: web.Request) -> web.Response | None:
        if not self.auth or request.headers.get("Authorization") == "Bearer t0k3n":
            return None
        realm = f'Bearer realm="{self.base}/token",service="slow"'
        return web.Response(status=401, headers={"WWW-Authenticate": realm})

    async def _token(self, request: web.Request) -> web.Response:
        await asyncio.sleep(0.02)
        return web.json_response({"token": "t0k3n", "expires_in": 300})

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        if (challenge := self._challenge(request)) is not None:
            return challenge
        data = {_digest(b): b for b in BLOBS}.get(request.match_info["digest"])
        if data is None:
            return web.Response(status=404)
        resp = web.StreamResponse(headers={"Content-Length": str(len(data))})
        await resp.prepare(request)
        for i in range(0, len(data), 16 * 1024):  # the body takes ~0.1 s
            await resp.write(data[i : i + 16 * 1024])
            await asyncio.sleep(0.025)
        await resp.write_eof()
        return resp

    async def _manifest(self, request: web.Request) -> web.Response:
        if (challenge := self._challenge(request)) is not None:
            return challenge
        return web.Response(
            body=MANIFEST,
            headers={
                "Content-Type": "application/vnd.oci.image.manifest.v1+json",
                "Docker-Content-Digest": _digest(MANIFEST),
            },
        )


async def _setup(
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    *,
    max_fetches: int,
    auth: bool = False,
) -> tuple[SlowRegistry, TestClient[web.Request, web.Application]]:
    reg = SlowRegistry(auth=auth)
    server = await aiohttp_server(reg.app(), host="127.0.0.1")
    reg.base = str(server.make_url("")).rstrip("/")
    config = mirror_config(tmp_path / "cache", [reg.base], read_timeout="5s")
    config = replace(config, defaults=replace(config.defaults, max_fetches=max_fetches))
    return reg, await aiohttp_client(create_app(config))


async def _get_all(client: TestClient[web.Request, web.Application]) -> None:
    async def one(data: bytes) -> None:
        resp = await client.get(blob_path(REPO, _digest(data)))
        assert resp.status == 200
        assert await resp.read() == data

    await asyncio.gather(*(one(b) for b in BLOBS))


async def test_streamed_blobs_hold_their_slot(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    reg, client = await _setup(aiohttp_server, aiohttp_client, tmp_path, max_fetches=2)
    await _get_all(client)
    assert reg.peak == 2  # six blobs wanted at once, two at a time upstream
    assert len(reg.paths) == len(BLOBS)


async def test_budget_of_one_with_token_auth_does_not_deadlock(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    reg, client = await _setup(aiohttp_server, aiohttp_client, tmp_path, max_fetches=1, auth=True)

    async def manifest() -> int:
        resp = await client.get(f"/v2/{REPO}/manifests/1?ns=docker.io")
        return resp.status

    async with asyncio.timeout(10):
        _, status = await asyncio.gather(_get_all(client), manifest())
    assert status == 200
    assert reg.peak == 1
    assert "/token" in reg.paths


async def test_default_budget_lets_them_run_together(
    aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    reg, client = await _setup(aiohttp_server, aiohttp_client, tmp_path, max_fetches=64)
    await _get_all(client)
    assert reg.peak == len(BLOBS)
