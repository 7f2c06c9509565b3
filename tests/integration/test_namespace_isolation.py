"""Content cached through a non-public namespace is not served through another one.

The private namespace's upstream holds an image; the open namespace's upstream does
not. After a logged-in client pulled it through the private namespace, anyone who
knows the digests asks through the open namespace: the mirror asks the open
namespace's upstream (a HEAD) and, since it does not have them, answers 404 without
a byte. Once that upstream does have a blob, it is served from the cache, and the
confirmation is remembered for the tag TTL. Public content is shared freely.
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpClient

from mirrorproxy.http import keys
from mirrorproxy.http.app import create_app
from tests.fakes.registry import Image
from tests.support import jwtkeys
from tests.support.authmirror import (
    OPEN,
    PRIVATE,
    USERS,
    AuthFiles,
    auth_config,
    basic,
    make_auth_files,
)
from tests.support.mirror import FakeFactory, Mirror, RunningFake, mirror_config
from tests.support.waiting import WAIT, wait_for

SECRET_REPO = "secret/app"
PROBE_REPO = "library/anything"
BOB = basic("bob", USERS["bob"])


@pytest.fixture(scope="module")
def signer() -> jwtkeys.Signer:
    return jwtkeys.rsa_signer()


@pytest.fixture
async def setup(
    aiohttp_client: AiohttpClient,
    start_fake: FakeFactory,
    tmp_path: Path,
    signer: jwtkeys.Signer,
) -> tuple[Mirror, RunningFake, RunningFake, Image]:
    private, public = await start_fake(), await start_fake()
    image = private.registry.add_image(SECRET_REPO, "1", layer_sizes=(256 * 1024,))
    files: AuthFiles = make_auth_files(tmp_path / "auth", signer)
    config = auth_config(tmp_path / "cache", files, {PRIVATE: private.url, OPEN: public.url})
    client = await aiohttp_client(create_app(config))
    return Mirror(client, config), private, public, image


def _blob(ns: str, digest: str, repo: str = PROBE_REPO) -> str:
    return f"/v2/{repo}/blobs/{digest}?ns={ns}"


async def _pull_privately(mirror: Mirror, image: Image) -> None:
    m = await mirror.client.get(f"/v2/{SECRET_REPO}/manifests/1?ns={PRIVATE}", headers=BOB)
    assert m.status == 200
    for digest in (image.config_digest, *image.layer_digests):
        resp = await mirror.client.get(_blob(PRIVATE, digest, SECRET_REPO), headers=BOB)
        assert resp.status == 200
        await resp.read()
    await mirror.settled()


async def test_private_blob_is_not_served_through_an_open_namespace(
    setup: tuple[Mirror, RunningFake, RunningFake, Image],
) -> None:
    mirror, _, public, image = setup
    await _pull_privately(mirror, image)
    layer = image.layer_digests[0]
    assert mirror.blob_path(layer).exists()  # it is in the shared cache

    resp = await mirror.client.get(_blob(OPEN, layer))
    assert resp.status == 404
    body = await resp.read()
    assert image.layers[0][:64] not in body
    assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    resp = await mirror.client.head(_blob(OPEN, layer))
    assert resp.status == 404
    resp = await mirror.client.get(f"/v2/{PROBE_REPO}/manifests/{image.digest}?ns={OPEN}")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    # The open namespace's upstream was asked (HEAD) and nothing else.
    asked = [(r.method, r.path) for r in public.registry.requests]
    assert asked == [
        ("HEAD", f"/v2/{PROBE_REPO}/blobs/{layer}"),
        ("HEAD", f"/v2/{PROBE_REPO}/blobs/{layer}"),
        ("HEAD", f"/v2/{PROBE_REPO}/manifests/{image.digest}"),
    ]
    assert (
        await mirror.metric("mirrorproxy_isolation_checks_total", namespace=OPEN, result="refused")
        == 3
    )


async def test_shared_blob_is_served_once_the_other_upstream_confirms_it(
    setup: tuple[Mirror, RunningFake, RunningFake, Image],
) -> None:
    mirror, _, public, image = setup
    await _pull_privately(mirror, image)
    layer = image.layer_digests[0]
    public.registry.add_blob(image.layers[0])  # the same bytes are public after all

    for _ in range(3):
        resp = await mirror.client.get(_blob(OPEN, layer))
        assert resp.status == 200
        assert await resp.read() == image.layers[0]
    # One HEAD confirmed it; the bytes came from the cache; the confirmation held.
    assert [(r.method, r.path) for r in public.registry.requests] == [
        ("HEAD", f"/v2/{PROBE_REPO}/blobs/{layer}")
    ]
    assert (
        await mirror.metric(
            "mirrorproxy_isolation_checks_total", namespace=OPEN, result="confirmed"
        )
        == 1
    )


async def test_confirmation_expires_with_the_tag_ttl(
    aiohttp_client: AiohttpClient,
    start_fake: FakeFactory,
    tmp_path: Path,
    signer: jwtkeys.Signer,
) -> None:
    private, public = await start_fake(), await start_fake()
    image = private.registry.add_image(SECRET_REPO, "1")
    files = make_auth_files(tmp_path / "auth", signer)
    config = auth_config(
        tmp_path / "cache", files, {PRIVATE: private.url, OPEN: public.url}, tag_ttl="0s"
    )
    mirror = Mirror(await aiohttp_client(create_app(config)), config)
    await _pull_privately(mirror, image)
    public.registry.add_blob(image.layers[0])
    layer = image.layer_digests[0]
    assert (await mirror.client.get(_blob(OPEN, layer))).status == 200
    public.registry.remove_blob(layer)  # gone upstream: after the TTL it is refused again
    assert (await mirror.client.get(_blob(OPEN, layer))).status == 404


async def test_running_private_download_is_not_joined_by_an_open_namespace(
    setup: tuple[Mirror, RunningFake, RunningFake, Image],
) -> None:
    mirror, private, public, image = setup
    layer = image.layer_digests[0]
    private.registry.faults.chunk_size = 16 * 1024
    private.registry.faults.chunk_delay = 0.05  # about 0.8 s for the layer
    download = asyncio.create_task(
        mirror.client.get(_blob(PRIVATE, layer, SECRET_REPO), headers=BOB)
    )
    await wait_for(lambda: private.registry.blob_bytes_sent > 0)
    assert not mirror.blob_path(layer).exists()  # still downloading
    resp = await mirror.client.get(_blob(OPEN, layer))
    assert resp.status == 404
    async with asyncio.timeout(WAIT):
        first = await download
        assert await first.read() == image.layers[0]
    assert [(r.method, r.path) for r in public.registry.requests] == [
        ("HEAD", f"/v2/{PROBE_REPO}/blobs/{layer}")
    ]


async def test_public_content_is_shared_with_private_namespaces_for_free(
    setup: tuple[Mirror, RunningFake, RunningFake, Image],
) -> None:
    """Cached through the open namespace first: a private namespace asks nobody."""
    mirror, private, public, _ = setup
    data = b"public layer bytes" * 1000
    digest = public.registry.add_blob(data)
    resp = await mirror.client.get(_blob(OPEN, digest))
    assert resp.status == 200
    await resp.read()
    await mirror.settled()
    private.registry.clear_log()
    resp = await mirror.client.get(_blob(PRIVATE, digest, SECRET_REPO), headers=BOB)
    assert resp.status == 200
    assert await resp.read() == data
    assert private.registry.requests == []


async def test_no_isolation_lookups_without_private_namespaces(
    aiohttp_client: AiohttpClient, start_fake: FakeFactory, tmp_path: Path
) -> None:
    """Without [server.auth] every namespace is open: the cache is shared as before."""
    first, second = await start_fake(), await start_fake()
    data = b"shared" * 1000
    digest = first.registry.add_blob(data)
    config = mirror_config(
        tmp_path / "cache", [], namespaces={"a.example": [first.url], OPEN: [second.url]}
    )
    client = await aiohttp_client(create_app(config))
    assert (await client.get(_blob("a.example", digest))).status == 200
    await client.app[keys.PULLTHROUGH].settled()
    resp = await client.get(_blob(OPEN, digest))
    assert resp.status == 200
    assert await resp.read() == data
    assert second.registry.requests == []


async def test_content_of_unknown_origin_is_confirmed_too(
    setup: tuple[Mirror, RunningFake, RunningFake, Image],
) -> None:
    """A cached file the index knows nothing about (a crash before the index write,
    say) may have come through the private namespace: treated like that."""
    mirror, _, public, _ = setup
    data = b"public layer bytes" * 1000
    digest = public.registry.add_blob(data)
    assert (await mirror.client.get(_blob(OPEN, digest))).status == 200
    await mirror.settled()
    index = mirror.budget.index
    assert index is not None
    index.remove("blob", digest)  # as if the entry had never been written
    public.registry.clear_log()
    resp = await mirror.client.get(_blob(OPEN, digest))
    assert resp.status == 200
    assert await resp.read() == data
    assert [(r.method, r.path) for r in public.registry.requests] == [
        ("HEAD", f"/v2/{PROBE_REPO}/blobs/{digest}")
    ]
