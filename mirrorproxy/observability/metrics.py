"""Every Prometheus metric, declared against an injected registry.

Labels are bounded: a namespace is a configured name, an endpoint a configured URL;
never a repository or a digest.

With ``[server] workers`` > 1 every worker runs in prometheus-client's multiprocess
mode (the server sets ``PROMETHEUS_MULTIPROC_DIR`` before a worker starts) and a
scrape of any worker sums them all (``render``). Counters and histograms add up;
each gauge says how (``multiprocess_mode``): what is in flight sums over the live
workers, a setting or a fact about the whole cache is the largest any reports.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.metrics import MetricWrapperBase
from prometheus_client.multiprocess import MultiProcessCollector

from mirrorproxy import __version__

M = TypeVar("M", bound=MetricWrapperBase)


class Metrics:
    def __init__(
        self, registry: CollectorRegistry | None = None, *, multiprocess_dir: str | None = None
    ) -> None:
        """``multiprocess_dir``: this is one of a server's workers; scrapes sum them."""
        self.registry = registry if registry is not None else CollectorRegistry()
        self.multiprocess = multiprocess_dir is not None
        self._scraped = self.registry
        if multiprocess_dir is not None:
            self._scraped = CollectorRegistry()
            MultiProcessCollector(self._scraped, path=multiprocess_dir)  # type: ignore[no-untyped-call]
        # Called before each scrape: values read from the system at that moment.
        self.before_scrape: list[Callable[[], None]] = []
        # Children by (metric, label values); bounded because the labels are.
        self._children: dict[tuple[int, tuple[str, ...]], MetricWrapperBase] = {}
        r = self.registry
        self.cache_requests = Counter(
            "mirrorproxy_cache_requests",
            "Manifest and blob requests by how the cache answered them.",
            ["namespace", "kind", "result"],
            registry=r,
        )
        self.cache_bytes = Counter(
            "mirrorproxy_cache_bytes",
            "Bytes sent to clients, by where they came from.",
            ["namespace", "source"],
            registry=r,
        )
        self.upstream_requests = Counter(
            "mirrorproxy_upstream_requests",
            "Requests sent upstream, by HTTP status or error/timeout.",
            ["namespace", "endpoint", "code"],
            registry=r,
        )
        self.upstream_failovers = Counter(
            "mirrorproxy_upstream_failovers",
            "Times a request moved on to the next upstream endpoint.",
            ["namespace"],
            registry=r,
        )
        self.upstream_up = Gauge(
            "mirrorproxy_upstream_up",
            "1 while an endpoint is usable, 0 while it is in cooldown.",
            ["namespace", "endpoint"],
            registry=r,
            multiprocess_mode="livemin",
        )
        self.request_duration = Histogram(
            "mirrorproxy_request_duration_seconds",
            "Time to answer a client request (to the end of the body).",
            ["method", "kind"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60),
        )
        self.inflight_requests = Gauge(
            "mirrorproxy_inflight_requests",
            "Client requests being answered.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.requests = Counter(
            "mirrorproxy_requests",
            "Client requests answered, by method (GET, HEAD, other), kind and HTTP status.",
            ["method", "kind", "code"],
            registry=r,
        )
        self.build_info = Gauge(
            "mirrorproxy_build_info",
            "Always 1; the version is a label.",
            ["version"],
            registry=r,
            multiprocess_mode="max",
        )
        self.build_info.labels(__version__).set(1)
        # Context for the cache-full alerts, set from the config and the filesystem.
        self.cache_max_size_bytes = Gauge(
            "mirrorproxy_cache_max_size_bytes",
            "The configured cache budget ([cache] max_size); 0 when unlimited.",
            registry=r,
            multiprocess_mode="max",
        )
        self.cache_filesystem_free_bytes = Gauge(
            "mirrorproxy_cache_filesystem_free_bytes",
            "Bytes available to the mirror on the cache directory's filesystem.",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.cache_filesystem_size_bytes = Gauge(
            "mirrorproxy_cache_filesystem_size_bytes",
            "Size of the cache directory's filesystem.",
            registry=r,
            multiprocess_mode="livemostrecent",
        )
        self.digest_mismatches = Counter(
            "mirrorproxy_digest_mismatches",
            "Upstream content whose bytes did not hash to the requested digest.",
            ["namespace"],
            registry=r,
        )
        self.cache_size_bytes = Gauge(
            "mirrorproxy_cache_size_bytes",
            "Bytes of blobs and manifests in the cache.",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.cache_evictions = Counter(
            "mirrorproxy_cache_evictions",
            "Entries evicted to stay inside the cache budget.",
            ["kind"],
            registry=r,
        )
        self.cache_passthrough = Counter(
            "mirrorproxy_cache_passthrough",
            "Blobs streamed to a client without being cached, by reason.",
            ["reason"],
            registry=r,
        )
        self.cache_write_errors = Counter(
            "mirrorproxy_cache_write_errors",
            "Cache writes that failed (disk full, read-only, I/O error).",
            registry=r,
        )
        # A remote store ([storage] backend = "s3"): every request it makes, by operation.
        self.store_request_seconds = Histogram(
            "mirrorproxy_store_request_seconds",
            "Time of one request to the content store (S3), by operation.",
            ["op"],
            registry=r,
            buckets=(0.001, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
        )
        self.store_errors = Counter(
            "mirrorproxy_store_errors",
            "Requests to the content store (S3) that failed, by operation.",
            ["op"],
            registry=r,
        )
        # Client authentication ([server.auth]) and namespace isolation.
        self.client_auth_failures = Counter(
            "mirrorproxy_client_auth_failures",
            "Failed client logins (wrong password, unknown user, bad token), by scheme.",
            ["scheme"],
            registry=r,
        )
        self.client_auth_throttled = Counter(
            "mirrorproxy_client_auth_throttled",
            "Logins refused unchecked (429): their address failed too many lately.",
            registry=r,
        )
        self.isolation_checks = Counter(
            "mirrorproxy_isolation_checks",
            "Upstream HEADs confirming content cached through a non-public namespace, by result.",
            ["namespace", "result"],
            registry=r,
        )
        # [cluster]: per member; a dashboard sums them over the members.
        self.cluster_members = Gauge(
            "mirrorproxy_cluster_members",
            "Members of this mirror's cluster as it sees them (itself included).",
            registry=r,
            multiprocess_mode="max",
        )
        self.cluster_forwarded = Counter(
            "mirrorproxy_cluster_forwarded",
            "Requests sent to the member owning a blob or manifest, by how it answered"
            " (ok, not_found, refused, loop, error).",
            ["kind", "result"],
            registry=r,
        )
        self.cluster_owned_fills = Counter(
            "mirrorproxy_cluster_owned_fills",
            "Upstream fetches this member ran as the owner (for itself or for a member).",
            ["kind"],
            registry=r,
        )
        self.cluster_fallbacks = Counter(
            "mirrorproxy_cluster_fallbacks",
            "Upstream fetches this member ran because no member ahead of it could answer.",
            ["kind"],
            registry=r,
        )
        self.cluster_touches_sent = Counter(
            "mirrorproxy_cluster_touches_sent",
            "Blobs of a shared bucket reported to their owner as served or being read here.",
            ["use"],
            registry=r,
        )
        self.cluster_touches_received = Counter(
            "mirrorproxy_cluster_touches_received",
            "Blobs this member owns that another reported as served or being read"
            " (only those in the index count).",
            ["use"],
            registry=r,
        )
        self.cluster_peer_failures = Counter(
            "mirrorproxy_cluster_peer_failures",
            "Members that failed a request and cooled down, by reason.",
            ["reason"],
            registry=r,
        )

        self.workers = Gauge(
            "mirrorproxy_workers",
            "Serving processes alive ([server] workers; 1 without).",
            registry=r,
            multiprocess_mode="livesum",
        )
        self.workers.set(1)

    def observe_store(self, op: str, seconds: float, failed: bool) -> None:
        """One request to the content store (called from the store's own thread)."""
        self.child(self.store_request_seconds, op).observe(seconds)
        if failed:
            self.child(self.store_errors, op).inc()

    def render(self) -> bytes:
        """The text exposition of every metric (of every worker, in multiprocess mode)."""
        for refresh in self.before_scrape:
            refresh()
        return generate_latest(self._scraped)

    def child(self, metric: M, *values: str) -> M:
        """``metric.labels(*values)``, looked up once: labels() locks and rebuilds its
        key on every call, which shows at thousands of requests a second."""
        key = (id(metric), values)
        found = self._children.get(key)
        if found is None:
            found = self._children[key] = metric.labels(*values)
        return found  # type: ignore[return-value]
