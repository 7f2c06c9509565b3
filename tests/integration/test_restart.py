"""A restarted mirror serves what it cached, and sweeps what an interrupted run left."""

from __future__ import annotations

from tests.fakes.registry import OCI_MANIFEST
from tests.support.mirror import MirrorFactory, RunningFake
from tests.support.paths import REPO, blob_path, manifest_path
from tests.support.waiting import wait_for


async def test_restart_serves_the_cache_without_upstream(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    img = fake.registry.add_image(REPO, "3", layer_sizes=(200 * 1024, 3000))
    first = await start_mirror([fake.url])
    accept = {"Accept": OCI_MANIFEST}
    assert (await first.client.head(manifest_path(REPO, "3"), headers=accept)).status == 200
    assert (await first.client.get(manifest_path(REPO, img.digest))).status == 200
    for digest in (img.config_digest, *img.layer_digests):
        resp = await first.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        await resp.read()
        await wait_for(lambda: first.blob_path(digest).exists())  # noqa: B023
    await first.client.close()
    assert len(fake.registry.requests) == 4

    leftover = first.cache_dir / "tmp" / "0123456789abcdef-interrupted.partial"
    leftover.write_bytes(b"half a blob")
    fake.registry.clear_log()
    fake.registry.faults.status = 500  # any upstream request would show, and fail

    second = await start_mirror([fake.url])  # same name: same cache directory
    assert second.cache_dir == first.cache_dir
    assert not leftover.exists()
    assert second.tmp_files() == []

    resp = await second.client.get(manifest_path(REPO, "3"), headers=accept)
    assert resp.status == 200
    assert await resp.read() == img.manifest
    assert resp.headers["Docker-Content-Digest"] == img.digest
    assert "Warning" not in resp.headers  # fresh from the tag record, not stale
    head = await second.client.head(manifest_path(REPO, "3"), headers=accept)
    assert head.headers["Content-Length"] == str(len(img.manifest))
    resp = await second.client.get(manifest_path(REPO, img.digest))
    assert await resp.read() == img.manifest
    for digest, data in zip(
        (img.config_digest, *img.layer_digests), (img.config, *img.layers), strict=True
    ):
        resp = await second.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert await resp.read() == data
        ranged = await second.client.get(blob_path(REPO, digest), headers={"Range": "bytes=5-"})
        assert ranged.status == 206
        assert await ranged.read() == data[5:]
    assert fake.registry.requests == []
