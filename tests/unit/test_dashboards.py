"""The Grafana dashboard and the alert rules only use metrics the code exports.

Names are checked against the exposition of a fresh ``Metrics()`` in which every
labelled metric has one child, so ``_total``, ``_bucket``, ``_count`` and ``_sum``
series exist exactly as Prometheus would scrape them.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client import generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.parser import text_string_to_metric_families

from mirrorproxy.observability.metrics import Metrics

DOCKER = Path(__file__).resolve().parents[2] / "docker"
DASHBOARD = DOCKER / "grafana-dashboard.json"
RULES = DOCKER / "prometheus-rules.yaml"
METRIC_NAME = re.compile(r"(?<![A-Za-z0-9_:])mirrorproxy_[A-Za-z0-9_]+")

# The names and labels the observability issue promises operators.
PROMISED: dict[str, set[str] | None] = {
    "mirrorproxy_cache_requests_total": {"namespace", "kind", "result"},
    "mirrorproxy_cache_bytes_total": {"namespace", "source"},
    "mirrorproxy_upstream_requests_total": {"namespace", "endpoint", "code"},
    "mirrorproxy_upstream_failovers_total": {"namespace"},
    "mirrorproxy_upstream_up": {"namespace", "endpoint"},
    "mirrorproxy_request_duration_seconds_bucket": {"method", "kind", "le"},
    "mirrorproxy_inflight_requests": set(),
    "mirrorproxy_cache_size_bytes": set(),
    "mirrorproxy_cache_evictions_total": None,  # labels are the cache's business
    "mirrorproxy_digest_mismatches_total": None,
}


def exported_series() -> dict[str, set[str]]:
    """Every series name a scrape can return, with its label names."""
    metrics = Metrics()
    for value in vars(metrics).values():
        if isinstance(value, MetricWrapperBase) and value._labelnames:
            value.labels(*("x" for _ in value._labelnames))
    text = generate_latest(metrics.registry).decode()
    return {
        sample.name: set(sample.labels)
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def names_in(expr: str) -> set[str]:
    return set(METRIC_NAME.findall(expr))


def dashboard_exprs(dashboard: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target and every templating query."""
    for panel in dashboard["panels"]:
        for target in panel.get("targets", []):
            yield f"panel {panel['title']!r}", target["expr"]
    for var in dashboard["templating"]["list"]:
        if var["type"] == "query":
            query = var["query"]
            yield f"variable {var['name']}", query["query"] if isinstance(query, dict) else query


def rule_exprs(rules: dict[str, Any]) -> Iterator[tuple[str, str]]:
    for group in rules["groups"]:
        for rule in group["rules"]:
            yield f"rule {rule.get('alert') or rule.get('record')}", rule["expr"]


def unknown_names(exprs: Iterator[tuple[str, str]], exported: set[str]) -> list[str]:
    return [f"{where}: {name}" for where, e in exprs for name in names_in(e) - exported]


def load_dashboard() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def load_rules() -> dict[str, Any]:
    data: dict[str, Any] = yaml.safe_load(RULES.read_text())
    return data


def test_the_promised_metrics_are_exported_with_their_labels() -> None:
    exported = exported_series()
    for name, labels in PROMISED.items():
        assert name in exported, name
        if labels is not None:
            assert exported[name] == labels, name


def test_dashboard_queries_use_only_exported_metrics() -> None:
    exprs = list(dashboard_exprs(load_dashboard()))
    assert len(exprs) >= 20
    assert unknown_names(iter(exprs), set(exported_series())) == []


def test_rules_use_only_exported_metrics() -> None:
    exprs = list(rule_exprs(load_rules()))
    assert len(exprs) >= 5
    assert unknown_names(iter(exprs), set(exported_series())) == []


def test_the_check_catches_a_wrong_name() -> None:
    exported = set(exported_series())
    exprs = [
        ("typo", 'sum(rate(mirrorproxy_cache_request_total{result="hit"}[5m]))'),
        ("suffix", "mirrorproxy_upstream_up_total"),
        ("histogram", "rate(mirrorproxy_request_duration_seconds[5m])"),
        ("fine", "histogram_quantile(0.9, mirrorproxy_request_duration_seconds_bucket)"),
    ]
    assert unknown_names(iter(exprs), exported) == [
        "typo: mirrorproxy_cache_request_total",
        "suffix: mirrorproxy_upstream_up_total",
        "histogram: mirrorproxy_request_duration_seconds",
    ]


def test_dashboard_covers_what_operators_asked_for() -> None:
    dashboard = load_dashboard()
    used = {name for _, e in dashboard_exprs(dashboard) for name in names_in(e)}
    assert {
        "mirrorproxy_cache_requests_total",  # hit ratio per namespace
        "mirrorproxy_cache_bytes_total",  # bytes from cache vs upstream
        "mirrorproxy_upstream_requests_total",  # upstream errors
        "mirrorproxy_upstream_failovers_total",
        "mirrorproxy_request_duration_seconds_bucket",  # latency quantiles
        "mirrorproxy_cache_size_bytes",
    } <= used
    ids = [p["id"] for p in dashboard["panels"]]
    assert len(ids) == len(set(ids))
    for panel in dashboard["panels"]:
        if panel["type"] != "row":
            assert panel["targets"], panel["title"]
            assert panel["datasource"]["uid"] == "${datasource}", panel["title"]


@pytest.mark.parametrize(
    "alert",
    ["MirrorproxyUpstreamDown", "MirrorproxyHitRatioCollapsed", "MirrorproxyCacheNearlyFull"],
)
def test_rules_have_the_asked_for_alerts(alert: str) -> None:
    rules = {r["alert"]: r for g in load_rules()["groups"] for r in g["rules"]}
    rule = rules[alert]
    assert rule["labels"]["severity"] in {"info", "warning", "critical"}
    assert rule["annotations"]["summary"]
