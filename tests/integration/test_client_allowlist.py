"""``[server] allow``: clients outside the listed networks get ``403 DENIED``.

The test client connects from 127.0.0.1, so an allowlist of 10.0.0.0/8 shuts it
out (except from the liveness probes) and one of 127.0.0.0/8 lets it in.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from mirrorproxy.http.app import create_app
from tests.support.listening import with_server
from tests.support.mirror import RunningFake, mirror_config
from tests.support.paths import NS, REPO, manifest_path


async def _client(
    aiohttp_client: AiohttpClient, fake: RunningFake, tmp_path: Path, *allow: str
) -> TestClient[web.Request, web.Application]:
    config = with_server(
        mirror_config(tmp_path / "cache", [fake.url]),
        allow=tuple(ipaddress.ip_network(a) for a in allow),
    )
    return await aiohttp_client(create_app(config))


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize(
    "path", ["/v2/", manifest_path(REPO, "3"), f"/v2/{REPO}/blobs/sha256:{'0' * 64}", "/metrics"]
)
async def test_client_outside_allowlist_is_denied(
    aiohttp_client: AiohttpClient, fake: RunningFake, tmp_path: Path, method: str, path: str
) -> None:
    fake.registry.add_image(REPO, "3")
    client = await _client(aiohttp_client, fake, tmp_path, "10.0.0.0/8", "fd00::/8")
    resp = await client.request(method, path)
    assert resp.status == 403
    assert resp.content_type == "application/json"
    if method == "GET":
        assert (await resp.json())["errors"][0]["code"] == "DENIED"
    assert fake.registry.requests == []


async def test_denied_before_the_method_check(
    aiohttp_client: AiohttpClient, fake: RunningFake, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, fake, tmp_path, "10.0.0.0/8")
    resp = await client.delete(manifest_path(REPO, "3"))
    assert resp.status == 403  # an outsider learns nothing, not even what is supported


@pytest.mark.parametrize("path", ["/healthz", "/readyz"])
async def test_probes_stay_open_to_loopback(
    aiohttp_client: AiohttpClient, fake: RunningFake, tmp_path: Path, path: str
) -> None:
    client = await _client(aiohttp_client, fake, tmp_path, "10.0.0.0/8")
    resp = await client.get(path)
    assert resp.status == 200


async def test_client_inside_allowlist_is_served(
    aiohttp_client: AiohttpClient, fake: RunningFake, tmp_path: Path
) -> None:
    image = fake.registry.add_image(REPO, "3")
    client = await _client(aiohttp_client, fake, tmp_path, "10.0.0.0/8", "127.0.0.0/8")
    resp = await client.get(manifest_path(REPO, "3"))
    assert resp.status == 200
    assert await resp.read() == image.manifest
    assert [r.path for r in fake.registry.requests] == [f"/v2/{REPO}/manifests/3"]


async def test_no_allowlist_serves_everyone(
    aiohttp_client: AiohttpClient, fake: RunningFake, tmp_path: Path
) -> None:
    client = await _client(aiohttp_client, fake, tmp_path)
    resp = await client.get(f"/v2/?ns={NS}")
    assert resp.status == 200
