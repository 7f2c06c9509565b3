"""An in-process mirror and its fake upstreams, as the integration tests drive them.

``RunningFake`` is a FakeRegistry listening on a loopback port; ``Mirror`` is the
mirror app (``create_app(parse_config(...))``) behind aiohttp's test client, with
ways to look at its cache directory and ``/metrics``; ``mirror_config`` builds the
config the way a TOML file would give it. The fixtures that start them live in
``tests/integration/conftest.py``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families

from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.config import Config, parse_config
from mirrorproxy.core.oci import parse_digest
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning
from mirrorproxy.http import keys
from tests.fakes.registry import FakeRegistry
from tests.support.paths import NS
from tests.support.waiting import WAIT

MirrorClient = TestClient[web.Request, web.Application]
UpstreamSpec = str | Mapping[str, Any]


@dataclass
class RunningFake:
    """A running FakeRegistry and where it listens."""

    registry: FakeRegistry
    server: TestServer

    @property
    def url(self) -> str:
        return str(self.server.make_url(""))


@dataclass
class Mirror:
    """A running mirror app, with helpers to look at its cache and metrics."""

    client: MirrorClient
    config: Config

    @property
    def cache_dir(self) -> Path:
        return self.config.cache.dir

    async def stored(self, digest: str) -> bool:
        """Whether the mirror's blob store holds ``digest`` (a file or an object)."""
        found = await self.client.app[keys.ENGINE].blobs.lookup(parse_digest(digest))
        return found is not None

    async def settled(self) -> None:
        """Wait until downloads are in place: a client gets its last byte when the
        digest matches, a moment before the file is renamed into the cache."""
        async with asyncio.timeout(WAIT):
            await self.client.app[keys.PULLTHROUGH].settled()

    def blob_files(self) -> list[Path]:
        """Files committed under ``cache/blobs``."""
        return sorted(p for p in (self.cache_dir / "blobs").rglob("*") if p.is_file())

    def tmp_files(self) -> list[Path]:
        return sorted((self.cache_dir / "tmp").iterdir())

    def blob_path(self, digest: str) -> Path:
        alg, hex_ = digest.split(":", 1)
        return self.cache_dir / "blobs" / alg / hex_[:2] / hex_

    def manifest_files(self) -> list[Path]:
        """Files committed under ``cache/manifests``."""
        return sorted(p for p in (self.cache_dir / "manifests").rglob("*") if p.is_file())

    def manifest_file(self, digest: str) -> Path:
        alg, hex_ = digest.split(":", 1)
        return self.cache_dir / "manifests" / alg / hex_[:2] / hex_

    @property
    def fill_tuning(self) -> Tuning:
        """How the app's downloads share bytes (``tune`` changes it for new downloads)."""
        return self.client.app[keys.PULLTHROUGH].tuning

    def tune(self, **changes: Any) -> None:
        """Change ``Tuning`` values (e.g. ``write_batch``) for downloads started after."""
        pt = self.client.app[keys.PULLTHROUGH]
        pt.tuning = replace(pt.tuning, **changes)

    @property
    def budget(self) -> CacheBudget:
        """The app's CacheBudget (to shorten ``write_retry`` or ``flush()`` in a test)."""
        return self.client.app[keys.PULLTHROUGH].budget

    async def metric(self, name: str, **labels: str) -> float:
        """A sample's value from ``/metrics`` (0.0 when the sample does not exist)."""
        resp = await self.client.get("/metrics")
        assert resp.status == 200
        text = await resp.text()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    return float(sample.value)
        return 0.0

    async def metric_sum(self, name: str, **labels: str) -> float:
        """The sum of a metric's samples over the labels not given (0.0 if none)."""
        resp = await self.client.get("/metrics")
        assert resp.status == 200
        total = 0.0
        for family in text_string_to_metric_families(await resp.text()):
            for sample in family.samples:
                if sample.name == name and all(
                    sample.labels.get(k) == v for k, v in labels.items()
                ):
                    total += sample.value
        return total


class FakeFactory(Protocol):
    def __call__(self, registry: FakeRegistry | None = None) -> Awaitable[RunningFake]: ...


class MirrorFactory(Protocol):
    def __call__(
        self,
        upstreams: Sequence[UpstreamSpec],
        *,
        name: str = "mirror",
        tag_ttl: str = "5m",
        cooldown: str = "0.2s",
        read_timeout: str = "2s",
        namespaces: Mapping[str, Sequence[UpstreamSpec]] | None = None,
        cache: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
        tuning: Tuning = DEFAULT_TUNING,
        storage: Mapping[str, Any] | None = None,
    ) -> Awaitable[Mirror]: ...


def mirror_config(
    cache_dir: Path,
    upstreams: Sequence[UpstreamSpec],
    *,
    tag_ttl: str = "5m",
    cooldown: str = "0.2s",
    read_timeout: str = "2s",
    namespaces: Mapping[str, Sequence[UpstreamSpec]] | None = None,
    cache: Mapping[str, Any] | None = None,
    server: Mapping[str, Any] | None = None,
    cluster: Mapping[str, Any] | None = None,
    storage: Mapping[str, Any] | None = None,
) -> Config:
    """The mirror's config: ``docker.io`` (or ``namespaces``) served by ``upstreams``.

    ``cache`` adds keys to the ``[cache]`` table as the TOML file would give them,
    e.g. ``{"max_size": "300KiB", "min_free": "10%", "offline": True}``; ``server``
    likewise to ``[server]`` (``{"client_timeout": "500ms"}``); ``cluster`` is the
    ``[cluster]`` table; ``storage`` is the ``[storage]`` table
    (``SeaweedFS.storage()`` gives one for the test bucket).
    """
    nss = {NS: upstreams} if namespaces is None else namespaces
    data = {
        **({"server": dict(server)} if server else {}),
        **({"cluster": dict(cluster)} if cluster else {}),
        **({"storage": dict(storage)} if storage else {}),
        "cache": {"dir": str(cache_dir), "tag_ttl": tag_ttl, **(cache or {})},
        "defaults": {
            "connect_timeout": "1s",
            "read_timeout": read_timeout,
            "cooldown": cooldown,
            "max_cooldown": "1s",
        },
        "namespaces": {
            name: {"upstreams": list(ups), **({"allow": ["*.io"]} if name == "*" else {})}
            for name, ups in nss.items()
        },
    }
    return parse_config(data, source="test", base_dir=cache_dir.parent)
