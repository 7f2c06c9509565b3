"""A real Prometheus scrapes the real `mirrorproxy serve` and sees the hit ratio.

Upstreams are Debian's docker-registry; the mirror runs as the CLI with
``[metrics] listen`` and ``--log-format json``; Prometheus (Debian's package)
scrapes the metrics listener every second and loads docker/prometheus-rules.yaml.
Pulls are plain HTTP GETs of a manifest and its blobs, as containerd sends them.
"""

from __future__ import annotations

import json
import os
import re
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tests.support import images
from tests.support.procs import MirrorFactory, RegistryFactory, free_port, mirror_config
from tests.support.prometheus import Prometheus, PrometheusError, missing_prometheus
from tests.support.requirements import REQUIRE_E2E_ENV

T = TypeVar("T")

REPO = Path(__file__).resolve().parents[2]
RULES = REPO / "docker" / "prometheus-rules.yaml"
DASHBOARD = REPO / "docker" / "grafana-dashboard.json"
WAIT = 30.0  # bound for every wait on Prometheus (scrapes and rule evaluations are 1 s)
KiB = 1024
HIT_RATIO = (
    'sum by (namespace) (mirrorproxy_cache_requests_total{result="hit"})'
    " / sum by (namespace) (mirrorproxy_cache_requests_total)"
)
# Grafana's variables, as a dashboard showing every mirror and namespace expands them.
GRAFANA_VARS = {
    "$__rate_interval": "1m",
    "$__range": "5m",
    "$instance": ".*",
    "$namespace": ".*",
}


@pytest.fixture
def prometheus_binary(e2e_requirements: None) -> None:
    """Skip without Debian's prometheus, or fail when e2e tests are required."""
    reason = missing_prometheus()
    if reason is None:
        return
    if os.environ.get(REQUIRE_E2E_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture
def start_prometheus(
    prometheus_binary: None, tmp_path: Path
) -> Iterator[Callable[..., Prometheus]]:
    started: list[Prometheus] = []

    def start(targets: list[str]) -> Prometheus:
        prom = Prometheus(tmp_path / "prometheus", targets, rule_files=[RULES])
        started.append(prom)
        prom.start()
        return prom

    yield start
    for prom in started:
        prom.stop()


def eventually(
    probe: Callable[[], T | None],
    what: str,
    timeout: float = WAIT,
    seen: Callable[[], object] = lambda: None,
) -> T:
    """Poll ``probe`` until it returns something other than None (bounded).

    ``seen`` tells what the probe last found, for the failure message.
    """
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            got = probe()
        except PrometheusError as err:
            got, last = None, err
        if got is not None:
            return got
        if time.monotonic() > deadline:
            raise AssertionError(
                f"{what} not seen within {timeout}s (last error: {last}; last seen: {seen()})"
            )
        time.sleep(0.2)


def pull(mirror_url: str, ns: str, repo: str, tag: str, image: images.Image) -> list[str]:
    """GET the manifest by tag and every blob, as a node does; return the request ids."""
    base = f"{mirror_url}/v2/{repo}"
    manifest = images.request(
        "GET", f"{base}/manifests/{tag}?ns={ns}", headers={"Accept": image.media_type}
    )
    assert manifest.body == image.body
    ids = [manifest.headers["x-request-id"]]
    for digest, data in image.blobs.items():
        blob = images.request("GET", f"{base}/blobs/{digest}?ns={ns}")
        assert blob.body == data
        ids.append(blob.headers["x-request-id"])
    return ids


def _json_lines(text: str) -> list[str]:
    return [line for line in text.splitlines() if line.startswith("{")]


def by_namespace(result: list[dict[str, Any]]) -> dict[str, float]:
    return {r["metric"]["namespace"]: float(r["value"][1]) for r in result}


def test_prometheus_sees_hit_ratio_rules_and_dashboard_queries(
    upstream_registry: RegistryFactory,
    mirror_process: MirrorFactory,
    start_prometheus: Callable[[list[str]], Prometheus],
    tmp_path: Path,
) -> None:
    hub, k8s = upstream_registry(), upstream_registry()
    app = images.build_image([64 * KiB, 16 * KiB], seed=21)
    pause = images.build_image([8 * KiB], seed=22)
    images.push(hub.url, "library/app", "1.0", app)
    images.push(k8s.url, "pause", "3.9", pause)

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens: always in cooldown
    port, metrics_port = free_port(), free_port()
    config = mirror_config(
        port,
        tmp_path / "cache",
        {"docker.io": [dead, hub.url], "registry.k8s.io": [k8s.url]},
        extra=f'\n[metrics]\nlisten = "127.0.0.1:{metrics_port}"\n',
    )
    mirror = mirror_process(config, port, args=["--log-format", "json"])
    with pytest.raises(images.RegistryHTTPError) as info:
        images.request("GET", f"{mirror.url}/metrics")
    assert info.value.status == 404  # /metrics moved to its own listener
    prom = start_prometheus([f"127.0.0.1:{metrics_port}"])
    prom.wait_for_scrape()

    # docker.io: one cold pull (all misses) then two warm ones (all hits);
    # registry.k8s.io: one cold pull. Each pull is a manifest and its blobs.
    first_ids = pull(mirror.url, "docker.io", "library/app", "1.0", app)
    for _ in range(2):
        pull(mirror.url, "docker.io", "library/app", "1.0", app)
    pull(mirror.url, "registry.k8s.io", "pause", "3.9", pause)
    expected = {"docker.io": 2 / 3, "registry.k8s.io": 0.0}

    last_ratio: list[dict[str, float]] = []

    def ratio_as_expected() -> dict[str, float] | None:
        got = by_namespace(prom.query(HIT_RATIO))
        last_ratio[:] = [got]
        same = got.keys() == expected.keys() and all(
            abs(got[k] - v) < 1e-9 for k, v in expected.items()
        )
        return got if same else None

    eventually(ratio_as_expected, f"hit ratio {expected}", seen=lambda: last_ratio)
    misses = prom.query('sum(mirrorproxy_cache_requests_total{result="miss"})')
    assert float(misses[0]["value"][1]) == (1 + len(app.blobs)) + (1 + len(pause.blobs))
    saved = by_namespace(
        prom.query('sum by (namespace) (mirrorproxy_cache_bytes_total{source="cache"})')
    )
    assert saved["docker.io"] == 2 * (len(app.body) + sum(map(len, app.blobs.values())))

    # The alert rules evaluate cleanly against real series, and the dead upstream
    # is already pending as down (it fires after its `for:`).
    def rules_healthy() -> list[dict[str, Any]] | None:
        groups = prom.api("rules")["groups"]
        rules: list[dict[str, Any]] = [r for g in groups for r in g["rules"]]
        return rules if rules and all(r["health"] == "ok" for r in rules) else None

    rules = eventually(rules_healthy, "every rule evaluated with health ok")
    assert {r["name"] for r in rules} >= {
        "MirrorproxyUpstreamDown",
        "MirrorproxyHitRatioCollapsed",
        "MirrorproxyCacheNearlyFull",
    }

    def dead_upstream_alert() -> dict[str, Any] | None:
        for alert in prom.api("alerts")["alerts"]:
            if alert["labels"].get("alertname") == "MirrorproxyUpstreamDown":
                labels: dict[str, Any] = alert["labels"]
                return labels
        return None

    labels = eventually(dead_upstream_alert, "MirrorproxyUpstreamDown pending")
    assert (labels["namespace"], labels["endpoint"]) == ("docker.io", dead)

    # Every dashboard query is valid PromQL over these series.
    dashboard = json.loads(DASHBOARD.read_text())
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for var, value in GRAFANA_VARS.items():
                expr = expr.replace(var, value)
            prom.api("query", query=expr)  # raises on a PromQL error
    panel_ratio = next(
        t["expr"]
        for p in dashboard["panels"]
        if p["title"] == "Hit ratio (time range)"
        for t in p["targets"]
    )
    ratio = prom.query(
        panel_ratio.replace("$__range", "10m")
        .replace("$namespace", "docker.io")
        .replace("$instance", ".*")
    )
    assert abs(float(ratio[0]["value"][1]) - 2 / 3) < 0.05  # increase() extrapolates

    # The JSON access log: one object per request, with id, cache result, upstream.
    access = [
        line
        for line in map(json.loads, _json_lines(mirror.log_text()))
        if line["logger"] == "mirrorproxy.access"
    ]
    first = next(a for a in access if a["request_id"] == first_ids[0])
    assert first["path"] == "/v2/library/app/manifests/1.0?ns=docker.io"
    assert (first["status"], first["cache"], first["upstream"]) == (200, "miss", hub.url)
    assert first["bytes"] == len(app.body)
    hits = [a for a in access if a["ns"] == "docker.io" and a["cache"] == "hit"]
    assert len(hits) == 2 * (1 + len(app.blobs))
    assert all(re.fullmatch(r"[0-9a-f]{16}", a["request_id"]) for a in access)
