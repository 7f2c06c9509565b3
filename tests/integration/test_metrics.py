"""Metrics move exactly as they should, and /metrics is where the config says.

The counter test takes a full snapshot of ``/metrics`` before and after each step
and compares the whole difference, so a counter that moves when it should not
fails as surely as one that does not move.
"""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from mirrorproxy.config import Config, MetricsConfig
from mirrorproxy.http.app import create_app
from mirrorproxy.http.observability import MetricsListenError
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake, mirror_config
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.waiting import wait_for

Sample = tuple[str, frozenset[tuple[str, str]]]

# Gauges that follow the disk (and the cache engineer's accounting), not requests.
NOT_REQUEST_DRIVEN = frozenset(
    {
        "mirrorproxy_cache_size_bytes",
        "mirrorproxy_cache_filesystem_free_bytes",
        "mirrorproxy_cache_filesystem_size_bytes",
    }
)


def _key(name: str, **labels: str) -> Sample:
    return name, frozenset(labels.items())


def _parse(text: str) -> dict[Sample, float]:
    out: dict[Sample, float] = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            # Timing buckets and sums vary from run to run; _count does not.
            if s.name.endswith(("_created", "_bucket", "_sum")) or s.name in NOT_REQUEST_DRIVEN:
                continue
            out[_key(s.name, **s.labels)] = s.value
    return out


async def _snapshot(mirror: Mirror) -> dict[Sample, float]:
    resp = await mirror.client.get("/metrics")
    assert resp.status == 200
    return _parse(await resp.text())


def _delta(before: dict[Sample, float], after: dict[Sample, float]) -> dict[Sample, float]:
    keys = before.keys() | after.keys()
    diff = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in keys}
    return {k: v for k, v in diff.items() if v}


def _request(kind: str, n: int = 1, method: str = "GET", code: str = "200") -> Iterator[Sample]:
    """The two client-request series one answered request moves (n times)."""
    yield _key("mirrorproxy_requests_total", method=method, kind=kind, code=code)
    yield _key("mirrorproxy_request_duration_seconds_count", method=method, kind=kind)


def _cache(kind: str, result: str) -> Sample:
    return _key("mirrorproxy_cache_requests_total", namespace=NS, kind=kind, result=result)


def _bytes(source: str) -> Sample:
    return _key("mirrorproxy_cache_bytes_total", namespace=NS, source=source)


def _upstream(endpoint: str, code: str) -> Sample:
    return _key("mirrorproxy_upstream_requests_total", namespace=NS, endpoint=endpoint, code=code)


FAILOVER = _key("mirrorproxy_upstream_failovers_total", namespace=NS)


async def test_counters_move_exactly_for_a_miss_two_hits_a_stale_serve_and_a_failover(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    # `empty` answers 404 (no cooldown, so every upstream request fails over to
    # `full` the same way); tags expire at once, so the last tag GET revalidates.
    empty, full = await start_fake(), await start_fake()
    img = full.registry.add_image(REPO, "3")
    mirror = await start_mirror([empty.url, full.url], tag_ttl="0s")
    layer, size = img.layer_digests[0], len(img.layers[0])
    start = await _snapshot(mirror)
    assert start[_key("mirrorproxy_upstream_up", namespace=NS, endpoint=full.url)] == 1
    assert start[_key("mirrorproxy_inflight_requests")] == 0

    # A miss: asked `empty` (404), failed over to `full`.
    before = start
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert await resp.read() == img.manifest
    after = await _snapshot(mirror)
    assert _delta(before, after) == {
        _cache("manifest", "miss"): 1,
        _bytes("upstream"): len(img.manifest),
        _upstream(empty.url, "404"): 1,
        _upstream(full.url, "200"): 1,
        FAILOVER: 1,
        **dict.fromkeys(_request("manifest"), 1),
    }

    # Two hits: by digest, from the cache alone.
    before = after
    for _ in range(2):
        resp = await mirror.client.get(manifest_path(REPO, img.digest))
        assert await resp.read() == img.manifest
    after = await _snapshot(mirror)
    assert _delta(before, after) == {
        _cache("manifest", "hit"): 2,
        _bytes("cache"): 2 * len(img.manifest),
        **dict.fromkeys(_request("manifest"), 2),
    }

    # A blob miss then a hit: bytes are counted by where they came from.
    before = after
    assert await (await mirror.client.get(blob_path(REPO, layer))).read() == img.layers[0]
    await wait_for(mirror.blob_path(layer).exists)
    assert await (await mirror.client.get(blob_path(REPO, layer))).read() == img.layers[0]
    after = await _snapshot(mirror)
    assert _delta(before, after) == {
        _cache("blob", "miss"): 1,
        _cache("blob", "hit"): 1,
        _bytes("upstream"): size,
        _bytes("cache"): size,
        _upstream(empty.url, "404"): 1,
        _upstream(full.url, "200"): 1,
        FAILOVER: 1,
        **dict.fromkeys(_request("blob"), 2),
    }

    # A stale serve: `full` fails (503, now in cooldown), the last answer is served.
    before = after
    full.registry.faults.status = 503
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 200
    assert resp.headers["Warning"].startswith("110 ")
    assert await resp.read() == img.manifest
    after = await _snapshot(mirror)
    assert _delta(before, after) == {
        _cache("manifest", "stale"): 1,
        _bytes("cache"): len(img.manifest),
        _upstream(empty.url, "404"): 1,
        _upstream(full.url, "503"): 1,
        FAILOVER: 1,
        _key("mirrorproxy_upstream_up", namespace=NS, endpoint=full.url): -1,
        **dict.fromkeys(_request("manifest"), 1),
    }
    assert after[_key("mirrorproxy_upstream_up", namespace=NS, endpoint=full.url)] == 0
    assert after[_key("mirrorproxy_upstream_up", namespace=NS, endpoint=empty.url)] == 1


async def test_transport_failures_are_counted_as_error(
    start_fake: FakeFactory, start_mirror: MirrorFactory, closed_port_url: str
) -> None:
    fake = await start_fake()
    fake.registry.add_image(REPO, "3")
    mirror = await start_mirror([closed_port_url, fake.url])
    assert (await mirror.client.get(manifest_path(REPO, "3"))).status == 200
    metric = "mirrorproxy_upstream_requests_total"
    assert await mirror.metric(metric, namespace=NS, endpoint=closed_port_url, code="error") == 1
    assert await mirror.metric("mirrorproxy_upstream_up", endpoint=closed_port_url) == 0


async def test_client_errors_and_odd_methods_have_bounded_labels(mirror: Mirror) -> None:
    assert (await mirror.client.get(manifest_path(REPO, "nope"))).status == 404
    assert (await mirror.client.request("PUT", "/v2/x/blobs/y")).status == 405
    assert (
        await mirror.metric(
            "mirrorproxy_requests_total", method="GET", kind="manifest", code="404"
        )
        == 1
    )
    assert (
        await mirror.metric("mirrorproxy_requests_total", method="other", kind="blob", code="405")
        == 1
    )
    text = await (await mirror.client.get("/metrics")).text()
    assert 'method="PUT"' not in text
    assert "nope" not in text  # nor a tag, repository or digest


async def test_health_endpoints_answer_and_are_not_measured(mirror: Mirror) -> None:
    for path in ("/healthz", "/readyz"):
        resp = await mirror.client.get(path)
        assert resp.status == 200, path
    await mirror.client.get("/metrics")
    text = await (await mirror.client.get("/metrics")).text()
    assert 'kind="other"' not in text  # no request series for probes or scrapes
    assert await mirror.metric("mirrorproxy_inflight_requests") == 0


async def test_readyz_fails_when_the_cache_cannot_be_written(mirror: Mirror) -> None:
    (mirror.cache_dir / "tmp").rmdir()
    resp = await mirror.client.get("/readyz")
    assert resp.status == 503
    assert "not writable" in (await resp.json())["errors"][0]["message"]
    assert (await mirror.client.get("/healthz")).status == 200  # alive all the same


async def test_static_capacity_gauges(mirror: Mirror) -> None:
    assert await mirror.metric("mirrorproxy_cache_max_size_bytes") == 0  # unlimited
    assert await mirror.metric("mirrorproxy_cache_filesystem_size_bytes") > 0
    free = await mirror.metric("mirrorproxy_cache_filesystem_free_bytes")
    assert 0 < free <= await mirror.metric("mirrorproxy_cache_filesystem_size_bytes")
    assert await mirror.metric("mirrorproxy_build_info") == 1


@pytest.fixture
def metrics_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _with_metrics_listener(config: Config, port: int) -> Config:
    return dataclasses.replace(config, metrics=MetricsConfig(listen=("127.0.0.1", port)))


async def test_metrics_listener_serves_only_metrics(
    fake: RunningFake, aiohttp_client: AiohttpClient, tmp_path: Path, metrics_port: int
) -> None:
    fake.registry.add_image(REPO, "3")
    config = _with_metrics_listener(mirror_config(tmp_path / "cache", [fake.url]), metrics_port)
    client = await aiohttp_client(create_app(config))
    assert (await client.get(manifest_path(REPO, "3"))).status == 200
    assert (await client.get("/metrics")).status == 404  # not on the main listener
    assert (await client.get("/healthz")).status == 200

    base = f"http://127.0.0.1:{metrics_port}"
    async with aiohttp.ClientSession() as session:
        async with session.get(f"{base}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["X-Request-Id"]
            text = await resp.text()
        for path in ("/healthz", "/readyz", "/v2/", f"/v2/{REPO}/manifests/3"):
            async with session.get(base + path) as resp:
                assert resp.status == 404, path
    samples = _parse(text)
    assert samples[_cache("manifest", "miss")] == 1

    await client.close()  # the metrics listener stops with the app
    async with aiohttp.ClientSession() as session:
        with pytest.raises(aiohttp.ClientConnectionError):
            await session.get(f"{base}/metrics")


async def test_metrics_listener_port_taken_is_one_clear_error(
    fake: RunningFake, tmp_path: Path
) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = _with_metrics_listener(mirror_config(tmp_path / "cache", [fake.url]), port)
        server = TestServer(create_app(config), host="127.0.0.1")
        with pytest.raises(MetricsListenError, match=rf"127\.0\.0\.1:{port} for metrics"):
            await server.start_server()
        await server.close()
