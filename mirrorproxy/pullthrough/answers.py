"""What the pull-through policy is asked about (``Target``) and what it answers."""

from __future__ import annotations

from dataclasses import dataclass, field

from mirrorproxy.cache import StoredManifest
from mirrorproxy.config import Namespace
from mirrorproxy.core.errors import Unavailable
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.upstream.peers import PeerRoute

HIT, MISS, STALE = "hit", "miss", "stale"
OFFLINE = "the mirror is offline"


@dataclass(frozen=True, slots=True)
class Target:
    """Where a request points: the namespace serving it and the repository."""

    ns: Namespace
    ns_name: str  # the registry the client asked for (ns=), may differ under a wildcard
    repo: str
    forwarded: bool = False  # sent by a cluster member: serve it here, never forward it
    # The client's Authorization, passed on to the owning member (only in a cluster).
    authorization: str | None = field(default=None, repr=False)

    def route(self, key: str, kind: str) -> PeerRoute:
        """How a fetch of ``key`` (``core.rendezvous``) goes through the cluster, if any."""
        return PeerRoute(key, kind, self.forwarded, self.authorization)


@dataclass(frozen=True, slots=True)
class ManifestAnswer:
    """A manifest (or referrers index) and how it was found."""

    manifest: StoredManifest
    result: str  # hit, miss or stale
    upstream: str | None = None  # URL of the endpoint that answered, when one was asked


@dataclass(frozen=True, slots=True)
class BlobHead:
    """What a HEAD learns: the size, and where it came from (for the access log)."""

    size: int | None
    result: str  # HIT or MISS
    upstream: str | None = None  # the endpoint asked, on a MISS


@dataclass(frozen=True, slots=True)
class TagList:
    """An upstream's tag list, passed through."""

    body: bytes
    content_type: str
    link: str | None  # the next page, as a path on this mirror


def count(metrics: Metrics, t: Target, kind: str, result: str) -> None:
    """Count a cache request by namespace, kind and result."""
    metrics.child(metrics.cache_requests, t.ns.name, kind, result).inc()


def cancelled_fetch(_key: object) -> Exception:
    """What requests sharing a fetch get when the request making it was cancelled."""
    return Unavailable("the request fetching this was cancelled; try again")
