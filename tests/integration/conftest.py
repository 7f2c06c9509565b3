"""Fixtures for integration tests: real FakeRegistry upstreams and a real mirror app.

``start_fake()`` starts a FakeRegistry on 127.0.0.1 and ``start_mirror(upstreams)``
builds the mirror with ``create_app(parse_config(...))`` over a cache directory in
``tmp_path``, so every test talks HTTP to both sides and asserts on what the fake
upstreams were asked. Nothing here is shared between tests.
"""

from __future__ import annotations

import asyncio
import errno
import os
import shutil
import socket
import subprocess
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Protocol

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mirrorproxy.cache import blobs as blobs_module
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.config import Config, parse_config
from mirrorproxy.core.tuning import Tuning
from mirrorproxy.http import keys
from mirrorproxy.http.app import create_app
from tests.fakes.registry import FakeRegistry
from tests.support.mounts import Mounts as Mounts  # re-exported for the tests
from tests.support.mounts import umount

NS = "docker.io"
REPO = "library/alpine"
WAIT = 5.0  # upper bound for any wait on a background condition, in seconds

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
        """How the app's blob bytes move (``tune`` changes it for new downloads)."""
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
) -> Config:
    """The mirror's config: ``docker.io`` (or ``namespaces``) served by ``upstreams``.

    ``cache`` adds keys to the ``[cache]`` table as the TOML file would give them,
    e.g. ``{"max_size": "300KiB", "min_free": "10%", "offline": True}``; ``server``
    likewise to ``[server]`` (``{"client_timeout": "500ms"}``).
    """
    nss = {NS: upstreams} if namespaces is None else namespaces
    data = {
        **({"server": dict(server)} if server else {}),
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


@pytest.fixture
def start_fake(aiohttp_server: AiohttpServer) -> FakeFactory:
    """Start a FakeRegistry (a new one unless given) on a loopback port."""

    async def start(registry: FakeRegistry | None = None) -> RunningFake:
        registry = registry if registry is not None else FakeRegistry()
        server = await aiohttp_server(registry.app, host="127.0.0.1")
        return RunningFake(registry, server)

    return start


@pytest.fixture
def start_mirror(aiohttp_client: AiohttpClient, tmp_path: Path) -> MirrorFactory:
    """Build and start a mirror; ``name`` picks its cache dir (same name, same cache).

    ``cache`` adds ``[cache]`` keys (``max_size``, ``min_free``, ``offline``, ...).
    """

    async def start(
        upstreams: Sequence[UpstreamSpec],
        *,
        name: str = "mirror",
        tag_ttl: str = "5m",
        cooldown: str = "0.2s",
        read_timeout: str = "2s",
        namespaces: Mapping[str, Sequence[UpstreamSpec]] | None = None,
        cache: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
    ) -> Mirror:
        config = mirror_config(
            tmp_path / name / "cache",
            upstreams,
            tag_ttl=tag_ttl,
            cooldown=cooldown,
            read_timeout=read_timeout,
            namespaces=namespaces,
            cache=cache,
            server=server,
        )
        client = await aiohttp_client(create_app(config))
        return Mirror(client, config)

    return start


@pytest.fixture
async def fake(start_fake: FakeFactory) -> RunningFake:
    return await start_fake()


@pytest.fixture
async def mirror(fake: RunningFake, start_mirror: MirrorFactory) -> Mirror:
    """A mirror whose only upstream is ``fake``."""
    return await start_mirror([fake.url])


@pytest.fixture
def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens (connections are refused)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


async def wait_for(condition: Callable[[], bool], *, within: float = WAIT) -> None:
    """Poll ``condition`` (cache dir or fake state) until it holds, at most ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


@pytest.fixture
def disk_full_after(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make blob writes fail with ENOSPC once this many bytes were written (per run).

    The returned list holds one number, the byte budget; ``[]`` means no failures.
    """
    real = blobs_module._write_all
    budget: list[int] = []

    def write_all(fd: int, chunks: Sequence[blobs_module.Chunk], offset: int) -> None:
        if budget and offset + sum(len(c) for c in chunks) > budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(fd, chunks, offset)

    monkeypatch.setattr(blobs_module, "_write_all", write_all)
    return budget


def manifest_path(repo: str, ref: str, ns: str = NS) -> str:
    return f"/v2/{repo}/manifests/{ref}?ns={ns}"


def blob_path(repo: str, digest: str, ns: str = NS) -> str:
    return f"/v2/{repo}/blobs/{digest}?ns={ns}"


# -- real mounts (root only): a tiny tmpfs, a read-only view of a directory ------------

REQUIRE_E2E_ENV = "MIRRORPROXY_REQUIRE_E2E"


@pytest.fixture(scope="session")
def mount_problem(tmp_path_factory: pytest.TempPathFactory) -> str:
    """Why this environment cannot mount (empty when it can)."""
    if os.geteuid() != 0 or shutil.which("mount") is None:
        return "needs root and mount(8)"
    probe = tmp_path_factory.mktemp("mount-probe")
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
        capture_output=True,
        text=True,
        timeout=10,
        check=False,
    )
    if proc.returncode != 0:
        return f"mount is not permitted here: {proc.stderr.strip()}"
    umount(probe)
    return ""


@pytest.fixture
def mounts(mount_problem: str) -> Iterator[Mounts]:
    """Make real mounts; skip where not permitted (fail if MIRRORPROXY_REQUIRE_E2E=1)."""
    if mount_problem:
        if os.environ.get(REQUIRE_E2E_ENV) == "1":
            pytest.fail(f"{mount_problem} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
        pytest.skip(mount_problem)
    m = Mounts()
    try:
        yield m
    finally:
        m.undo_all()
