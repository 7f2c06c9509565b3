"""Metrics.child: memoized label children count exactly what labels() would."""

from __future__ import annotations

from mirrorproxy.observability.metrics import Metrics


def test_child_is_looked_up_once_and_counts_into_its_own_sample() -> None:
    m = Metrics()
    a = m.child(m.cache_bytes, "docker.io", "cache")
    assert m.child(m.cache_bytes, "docker.io", "cache") is a
    assert m.child(m.cache_bytes, "quay.io", "cache") is not a
    assert m.child(m.cache_requests, "docker.io", "blob", "hit") is not a

    a.inc(5)
    m.child(m.cache_bytes, "docker.io", "cache").inc(2)
    m.cache_bytes.labels("docker.io", "cache").inc(1)  # the plain way sees the same child
    m.child(m.cache_bytes, "quay.io", "cache").inc(7)

    def sent(ns: str) -> float | None:
        labels = {"namespace": ns, "source": "cache"}
        return m.registry.get_sample_value("mirrorproxy_cache_bytes_total", labels)

    assert sent("docker.io") == 8
    assert sent("quay.io") == 7
