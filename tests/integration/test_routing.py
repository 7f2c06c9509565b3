"""Where requests go: upstream API paths, ``ns=`` forwarding, chained mirrors, metrics."""

from __future__ import annotations

from pathlib import Path
from urllib.parse import quote

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from mirrorproxy.http.app import create_app
from tests.support.mirror import FakeFactory, MirrorFactory, RunningFake, mirror_config
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.waiting import wait_for


async def test_upstream_url_with_a_path(fake: RunningFake, start_mirror: MirrorFactory) -> None:
    project = "proxy-project"
    img = fake.registry.add_image(f"{project}/{REPO}", "3")
    mirror = await start_mirror([f"{fake.url}/v2/{project}"])

    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 200
    assert await resp.read() == img.manifest
    resp = await mirror.client.get(blob_path(REPO, img.layer_digests[0]))
    assert await resp.read() == img.layers[0]
    resp = await mirror.client.get(f"/v2/{REPO}/tags/list?ns={NS}")
    assert (await resp.json())["tags"] == ["3"]
    assert [r.path for r in fake.registry.requests] == [
        f"/v2/{project}/{REPO}/manifests/3",
        f"/v2/{project}/{REPO}/blobs/{img.layer_digests[0]}",
        f"/v2/{project}/{REPO}/tags/list",
    ]


@pytest.mark.parametrize("ns", [NS, "myregistry:5000"])
async def test_ns_upstream_gets_the_namespace(
    fake: RunningFake, start_mirror: MirrorFactory, ns: str
) -> None:
    img = fake.registry.add_image(REPO, "3")
    mirror = await start_mirror([], namespaces={ns: [{"url": fake.url, "ns": True}]})
    q = quote(ns, safe="")  # containerd sends ns=myregistry%3A5000

    resp = await mirror.client.get(f"/v2/{REPO}/manifests/3?ns={q}")
    assert resp.status == 200
    assert resp.headers["OCI-Namespace"] == ns
    resp = await mirror.client.get(f"/v2/{REPO}/blobs/{img.config_digest}?ns={q}")
    assert await resp.read() == img.config
    resp = await mirror.client.get(f"/v2/{REPO}/tags/list?ns={q}&n=5")
    assert resp.status == 200
    assert len(fake.registry.requests) == 3
    for req in fake.registry.requests:
        assert req.query.getall("ns") == [ns]
    assert fake.registry.requests[2].query["n"] == "5"


async def test_plain_upstream_gets_no_ns(fake: RunningFake, start_mirror: MirrorFactory) -> None:
    fake.registry.add_image(REPO, "3")
    mirror = await start_mirror([fake.url])
    assert (await mirror.client.get(manifest_path(REPO, "3"))).status == 200
    assert "ns" not in fake.registry.requests[0].query


async def test_chained_mirrors(
    start_fake: FakeFactory,
    start_mirror: MirrorFactory,
    aiohttp_server: AiohttpServer,
    tmp_path: Path,
) -> None:
    """node mirror A -> site mirror B (routing by ns=) -> the registries."""
    docker, quay = await start_fake(), await start_fake()
    img = quay.registry.add_image("org/app", "v1", layer_sizes=(300 * 1024,))
    site_config = mirror_config(
        tmp_path / "site" / "cache",
        [],
        namespaces={NS: [docker.url], "quay.io": [quay.url]},
    )
    site_app = create_app(site_config)
    seen: list[str] = []

    async def record(request: web.Request, response: web.StreamResponse) -> None:
        seen.append(request.path_qs)

    site_app.on_response_prepare.append(record)
    site = await aiohttp_server(site_app, host="127.0.0.1")
    node = await start_mirror([], namespaces={"*": [{"url": str(site.make_url("")), "ns": True}]})

    resp = await node.client.get("/v2/org/app/manifests/v1?ns=quay.io")
    assert resp.status == 200
    assert await resp.read() == img.manifest
    resp = await node.client.get(f"/v2/org/app/manifests/{img.digest}?ns=quay.io")
    assert await resp.read() == img.manifest
    for digest, data in zip(img.layer_digests, img.layers, strict=True):
        resp = await node.client.get(f"/v2/org/app/blobs/{digest}?ns=quay.io")
        assert resp.status == 200
        assert await resp.read() == data

    assert seen == [
        "/v2/org/app/manifests/v1?ns=quay.io",
        f"/v2/org/app/blobs/{img.layer_digests[0]}?ns=quay.io",
    ]  # the digest was already known to the node from the tag
    assert [r.path for r in quay.registry.requests] == [
        "/v2/org/app/manifests/v1",
        f"/v2/org/app/blobs/{img.layer_digests[0]}",
    ]
    assert docker.registry.requests == []
    # Both tiers kept the blob.
    hex_ = img.layer_digests[0].split(":")[1]
    for cache in (node.cache_dir, site_config.cache.dir):
        path = cache / "blobs" / "sha256" / hex_[:2] / hex_
        await wait_for(path.exists)


async def test_metrics_count_misses_hits_and_failovers(
    start_fake: FakeFactory, start_mirror: MirrorFactory, closed_port_url: str
) -> None:
    fake = await start_fake()
    img = fake.registry.add_image(REPO, "3")
    mirror = await start_mirror([closed_port_url, fake.url])
    requests = "mirrorproxy_cache_requests_total"

    async def count(kind: str, result: str) -> float:
        return await mirror.metric(requests, namespace=NS, kind=kind, result=result)

    for kind in ("manifest", "blob"):
        assert await count(kind, "miss") == 0
        assert await count(kind, "hit") == 0
    digest = img.layer_digests[0]
    for _ in range(2):
        assert await (await mirror.client.get(manifest_path(REPO, "3"))).read() == img.manifest
        assert await (await mirror.client.get(blob_path(REPO, digest))).read() == img.layers[0]
        await wait_for(mirror.blob_path(digest).exists)
    for kind in ("manifest", "blob"):
        assert await count(kind, "miss") == 1
        assert await count(kind, "hit") == 1
    # The first request paid for the dead endpoint; the blob came while it cooled down.
    assert await mirror.metric("mirrorproxy_upstream_failovers_total", namespace=NS) == 1
    assert (
        await mirror.metric(
            "mirrorproxy_upstream_requests_total", namespace=NS, endpoint=fake.url, code="200"
        )
        == 2
    )
    assert await mirror.metric("mirrorproxy_cache_bytes_total", namespace=NS, source="cache") > 0
