"""Offline mode (``[cache] offline = true`` or ``serve --offline``).

A mirror fills its cache online; an offline mirror on the same cache directory then
answers from it alone: tags past their TTL too (with ``Warning: 110``), and a clear
OCI error naming the offline mode for anything not cached. A tag record another
process rewrites (``mirrorproxy import`` next to the running server) is read again
within ``TAG_RECHECK``. The FakeRegistry's request log proves the upstream is never
contacted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrorproxy.bundle import CONTAINERD_KEY
from mirrorproxy.cache import StoredManifest, TagEntry
from mirrorproxy.cache.manifests import TAG_RECHECK, FileManifestStore
from mirrorproxy.core.oci import CONTAINERD_ACCEPT, parse_digest
from tests.fakes.registry import OCI_MANIFEST, Image
from tests.support.mirror import FakeFactory, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.procs import MirrorProcess, free_port, mirror_config
from tests.support.waiting import WAIT

ACCEPT = {"Accept": OCI_MANIFEST}
STALE = '110 - "Response is Stale"'
MISSING = "sha256:" + "0" * 64


async def fill_cache(fake: RunningFake, start_mirror: MirrorFactory) -> tuple[Image, Path]:
    """Pull an image through an online mirror named "shared", then stop that mirror.

    Returns:
        The image, and the cache directory it is now in.
    """
    img = fake.registry.add_image(REPO, "3", layer_sizes=(100_000, 2000))
    online = await start_mirror([fake.url], name="shared")
    async with asyncio.timeout(WAIT):
        assert (await online.client.get(manifest_path(REPO, "3"), headers=ACCEPT)).status == 200
        for digest in (img.config_digest, *img.layer_digests):
            resp = await online.client.get(blob_path(REPO, digest))
            assert resp.status == 200
            await resp.read()
    await online.client.close()
    fake.registry.clear_log()
    fake.registry.add_image(REPO, "not-cached")
    return img, online.cache_dir


async def error_of(resp: aiohttp.ClientResponse) -> dict[str, Any]:
    body = await resp.json()
    (err,) = body["errors"]
    assert isinstance(err, dict)
    return err


@pytest.mark.parametrize(("tag_ttl", "stale"), [("5m", False), ("1ms", True)])
async def test_offline_serves_the_cache_and_never_calls_upstream(
    fake: RunningFake, start_mirror: MirrorFactory, tag_ttl: str, stale: bool
) -> None:
    img, _ = await fill_cache(fake, start_mirror)
    await asyncio.sleep(0.01)  # past a 1 ms TTL
    mirror = await start_mirror(
        [fake.url], name="shared", tag_ttl=tag_ttl, cache={"offline": True}
    )

    for method in ("GET", "HEAD"):
        resp = await mirror.client.request(method, manifest_path(REPO, "3"), headers=ACCEPT)
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == img.digest
        assert resp.headers.get("Warning") == (STALE if stale else None)
        assert await resp.read() == (img.manifest if method == "GET" else b"")
    resp = await mirror.client.get(manifest_path(REPO, img.digest))
    assert resp.status == 200
    assert "Warning" not in resp.headers  # content by digest is never stale
    assert await resp.read() == img.manifest
    for digest, data in zip(img.layer_digests, img.layers, strict=True):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert await resp.read() == data
        resp = await mirror.client.head(blob_path(REPO, digest))
        assert resp.headers["Content-Length"] == str(len(data))
    assert fake.registry.requests == []


@pytest.mark.parametrize(
    ("path", "status", "code"),
    [
        (manifest_path(REPO, "not-cached"), 404, "MANIFEST_UNKNOWN"),
        (manifest_path("library/never-seen", "3"), 404, "MANIFEST_UNKNOWN"),
        (manifest_path(REPO, MISSING), 404, "MANIFEST_UNKNOWN"),
        (blob_path(REPO, MISSING), 404, "BLOB_UNKNOWN"),
        (f"/v2/{REPO}/tags/list?ns={NS}", 503, "UNAVAILABLE"),
    ],
)
async def test_offline_misses_are_oci_errors_naming_the_offline_mode(
    fake: RunningFake, start_mirror: MirrorFactory, path: str, status: int, code: str
) -> None:
    await fill_cache(fake, start_mirror)
    mirror = await start_mirror([fake.url], name="shared", cache={"offline": True})
    resp = await mirror.client.get(path, headers=ACCEPT)
    assert resp.status == status
    err = await error_of(resp)
    assert err["code"] == code
    assert "offline" in err["message"]
    head = await mirror.client.head(path, headers=ACCEPT)
    assert head.status == status
    assert fake.registry.requests == []


async def test_offline_with_an_unreachable_upstream(
    fake: RunningFake, start_mirror: MirrorFactory, closed_port_url: str
) -> None:
    """Offline is about the mirror's own choice, not about upstream health."""
    img, _ = await fill_cache(fake, start_mirror)
    mirror = await start_mirror([closed_port_url], name="shared", cache={"offline": True})
    resp = await mirror.client.get(manifest_path(REPO, "3"), headers=ACCEPT)
    assert resp.status == 200
    assert await resp.read() == img.manifest
    resp = await mirror.client.get(blob_path(REPO, img.layer_digests[1]))
    assert await resp.read() == img.layers[1]
    resp = await mirror.client.get(blob_path(REPO, MISSING))
    assert resp.status == 404
    assert "offline" in (await error_of(resp))["message"]


async def test_offline_server_rereads_a_tag_another_process_moved(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """A running offline server serves the tag ``import`` rewrote, after TAG_RECHECK."""
    fake = await start_fake()
    v1 = fake.registry.add_image(REPO, "3")
    accept = {"Accept": CONTAINERD_ACCEPT}
    online = await start_mirror([fake.url], name="shared")
    assert (await online.client.get(manifest_path(REPO, "3"), headers=accept)).status == 200

    offline = await start_mirror([fake.url], name="shared", cache={"offline": True})
    resp = await offline.client.get(manifest_path(REPO, "3"), headers=accept)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == v1.digest  # now remembered in memory

    # What `mirrorproxy import` does from another process: store v2, move the tag.
    v2 = fake.registry.add_image(REPO, "3", seed="v2")
    other = FileManifestStore(offline.cache_dir)
    d2 = parse_digest(v2.digest)
    await other.put(StoredManifest(d2, OCI_MANIFEST, v2.manifest))
    entry = TagEntry(d2, OCI_MANIFEST, len(v2.manifest), time.time())
    await other.put_tag(NS, REPO, "3", CONTAINERD_KEY, entry)
    fake.registry.clear_log()

    async with asyncio.timeout(TAG_RECHECK + WAIT):
        while True:
            resp = await offline.client.get(manifest_path(REPO, "3"), headers=accept)
            assert resp.status == 200
            body = await resp.read()
            if resp.headers["Docker-Content-Digest"] == v2.digest:
                break
            assert body == v1.manifest  # until the recheck: the remembered record
            await asyncio.sleep(0.05)
    assert body == v2.manifest
    assert fake.registry.requests == []  # offline: the cache alone answered


@pytest.fixture
def procs() -> Iterator[list[MirrorProcess]]:
    started: list[MirrorProcess] = []
    yield started
    for proc in started:
        proc.stop()


async def test_serve_offline_flag(
    fake: RunningFake,
    start_mirror: MirrorFactory,
    tmp_path: Path,
    procs: list[MirrorProcess],
) -> None:
    """``mirrorproxy serve --offline`` overrides a config that says online."""
    img, cache_dir = await fill_cache(fake, start_mirror)
    port = free_port()
    config = mirror_config(port, cache_dir, {NS: [fake.url]}, tag_ttl="1ms")
    proc = MirrorProcess(tmp_path / "offline", config, port, args=["--offline"], start=False)
    procs.append(proc)
    await asyncio.to_thread(proc.start)

    async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT):
        resp = await session.get(f"{proc.url}{manifest_path(REPO, '3')}", headers=ACCEPT)
        assert resp.status == 200
        assert resp.headers["Warning"] == STALE
        assert await resp.read() == img.manifest
        resp = await session.get(f"{proc.url}{blob_path(REPO, img.layer_digests[0])}")
        assert await resp.read() == img.layers[0]
        resp = await session.get(f"{proc.url}{blob_path(REPO, MISSING)}")
        assert resp.status == 404
        assert "offline" in (await error_of(resp))["message"]
    assert fake.registry.requests == []
