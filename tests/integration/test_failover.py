"""Failover across a namespace's upstreams, and the cooldown of failed ones.

A body cut mid-way is a failed upstream like a 5xx or a refused connection.
"""

from __future__ import annotations

import asyncio
import logging

import pytest

from tests.fakes.registry import Image
from tests.fakes.variants import CuttingRegistry
from tests.support.logs import errors_logged
from tests.support.mirror import FakeFactory, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path, manifest_path

FAILOVERS = "mirrorproxy_upstream_failovers_total"


async def _two_with_image(start_fake: FakeFactory) -> tuple[RunningFake, RunningFake, Image]:
    """Two fakes holding the same image (same seed: same digests)."""
    one, two = await start_fake(), await start_fake()
    img = one.registry.add_image(REPO, "3")
    assert two.registry.add_image(REPO, "3") == img
    return one, two, img


async def test_first_upstream_500_second_serves(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two, img = await _two_with_image(start_fake)
    one.registry.faults.status = 500
    mirror = await start_mirror([one.url, two.url])

    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 200
    assert await resp.read() == img.manifest
    resp = await mirror.client.get(blob_path(REPO, img.layer_digests[0]))
    assert resp.status == 200
    assert await resp.read() == img.layers[0]

    # The manifest went to one first; the blob came while one was cooling down.
    assert [r.path for r in one.registry.requests] == [f"/v2/{REPO}/manifests/3"]
    assert [(r.method, r.kind) for r in two.registry.requests] == [
        ("GET", "manifests"),
        ("GET", "blobs"),
    ]
    assert await mirror.metric(FAILOVERS, namespace=NS) == 1


async def test_first_upstream_down_second_serves(
    start_fake: FakeFactory, start_mirror: MirrorFactory, closed_port_url: str
) -> None:
    two = await start_fake()
    img = two.registry.add_image(REPO, "3")
    mirror = await start_mirror([closed_port_url, two.url])
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 200
    assert await resp.read() == img.manifest
    resp = await mirror.client.get(blob_path(REPO, img.config_digest))
    assert await resp.read() == img.config
    assert len(two.registry.requests) == 2
    # Only the first request paid for the dead endpoint; the second skipped it.
    assert await mirror.metric(FAILOVERS, namespace=NS) == 1
    up = await mirror.metric("mirrorproxy_upstream_up", namespace=NS, endpoint=closed_port_url)
    assert up == 0


async def test_cut_manifest_body_fails_over_to_the_next_upstream(
    start_fake: FakeFactory, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut manifest body moves on to the healthy second upstream, logging no error."""
    cutting = CuttingRegistry()
    cutting.cut = {"manifests"}
    one, two = await start_fake(cutting), await start_fake()
    img = one.registry.add_image(REPO, "3")
    assert two.registry.add_image(REPO, "3") == img
    mirror = await start_mirror([one.url, two.url])
    caplog.set_level(logging.WARNING)

    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 200, await resp.text()
    assert await resp.read() == img.manifest
    assert resp.headers["Docker-Content-Digest"] == img.digest
    assert len(one.registry.calls("GET", "manifests")) == 1  # tried, and cut
    assert len(two.registry.calls("GET", "manifests")) == 1
    assert errors_logged(caplog) == []

    # The whole manifest was stored under its digest: served without asking upstream.
    one.registry.clear_log()
    two.registry.clear_log()
    resp = await mirror.client.get(manifest_path(REPO, img.digest))
    assert resp.status == 200
    assert await resp.read() == img.manifest
    assert one.registry.requests == two.registry.requests == []


async def test_all_upstreams_404(start_fake: FakeFactory, start_mirror: MirrorFactory) -> None:
    one, two = await start_fake(), await start_fake()
    mirror = await start_mirror([one.url, two.url])
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"

    digest = "sha256:" + "ab" * 32
    resp = await mirror.client.get(blob_path(REPO, digest))
    assert resp.status == 404
    assert resp.content_type == "application/json"
    assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"

    for fake in (one, two):
        assert [(r.method, r.kind) for r in fake.registry.requests] == [
            ("GET", "manifests"),
            ("GET", "blobs"),
        ]
    # A 404 is an answer, not a failure: nobody is cooling down.
    assert await mirror.metric("mirrorproxy_upstream_up", namespace=NS, endpoint=one.url) == 1


async def test_cooldown_skips_a_failed_upstream_then_retries_it(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two, img = await _two_with_image(start_fake)
    one.registry.faults.status = 500
    # tag_ttl 0: every request revalidates upstream, so each one picks an endpoint.
    mirror = await start_mirror([one.url, two.url], tag_ttl="0s", cooldown="0.2s")
    path = manifest_path(REPO, "3")

    assert (await mirror.client.get(path)).status == 200
    assert len(one.registry.requests) == 1
    for _ in range(3):  # within the cooldown: one is not contacted
        resp = await mirror.client.get(path)
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == img.digest
    assert len(one.registry.requests) == 1
    assert [r.method for r in two.registry.requests] == ["GET", "HEAD", "HEAD", "HEAD"]

    await asyncio.sleep(0.25)
    one.registry.faults.clear()
    assert (await mirror.client.get(path)).status == 200
    assert [r.method for r in one.registry.requests] == ["GET", "HEAD"]
    assert len(two.registry.requests) == 4  # one is healthy again and first in line


async def test_cooldown_doubles_while_the_upstream_keeps_failing(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two, _ = await _two_with_image(start_fake)
    one.registry.faults.status = 503
    mirror = await start_mirror([one.url, two.url], tag_ttl="0s", cooldown="0.2s")
    path = manifest_path(REPO, "3")
    assert (await mirror.client.get(path)).status == 200
    await asyncio.sleep(0.25)
    assert (await mirror.client.get(path)).status == 200
    assert len(one.registry.requests) == 2  # retried after 0.2 s, failed again
    await asyncio.sleep(0.25)  # inside the doubled (0.4 s) cooldown
    assert (await mirror.client.get(path)).status == 200
    assert len(one.registry.requests) == 2


async def test_429_with_retry_after_cools_the_upstream_down(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two, img = await _two_with_image(start_fake)
    one.registry.faults.status = 429
    one.registry.faults.retry_after = "30"
    mirror = await start_mirror([one.url, two.url], tag_ttl="0s", cooldown="0.2s")
    path = manifest_path(REPO, "3")

    resp = await mirror.client.get(path)
    assert resp.status == 200
    assert await resp.read() == img.manifest
    assert len(one.registry.requests) == 1
    # Past the configured cooldown, but Retry-After asked for 30 s.
    await asyncio.sleep(0.3)
    one.registry.faults.clear()
    for _ in range(2):
        assert (await mirror.client.get(path)).status == 200
    assert len(one.registry.requests) == 1
    assert len(two.registry.requests) == 3


async def test_slow_upstreams_time_out_with_504(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    fake.registry.add_image(REPO, "3")
    fake.registry.faults.delay = 0.6
    mirror = await start_mirror([fake.url], read_timeout="200ms")
    async with asyncio.timeout(2):
        resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 504
    err = (await resp.json())["errors"][0]
    assert err["detail"]["upstreams"] == [f"{fake.url}: timeout"]


async def test_slow_first_upstream_fails_over(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two, img = await _two_with_image(start_fake)
    one.registry.faults.delay = 0.6
    mirror = await start_mirror([one.url, two.url], read_timeout="200ms")
    async with asyncio.timeout(2):
        resp = await mirror.client.get(manifest_path(REPO, "3"))
        assert await resp.read() == img.manifest
    assert len(one.registry.requests) == 1
    assert len(two.registry.requests) == 1
    assert await mirror.metric(FAILOVERS, namespace=NS) == 1
