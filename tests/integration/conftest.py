"""Fixtures for integration tests: real FakeRegistry upstreams and a real mirror app.

``start_fake()`` starts a FakeRegistry on 127.0.0.1 and ``start_mirror(upstreams)``
builds the mirror with ``create_app(mirror_config(...))`` over a cache directory in
``tmp_path``, so every test talks HTTP to both sides and asserts on what the fake
upstreams were asked. Nothing here is shared between tests. The classes and helpers
these fixtures return live in ``tests/support`` (``mirror``, ``paths``, ``waiting``).
"""

from __future__ import annotations

import errno
import os
import shutil
import socket
import subprocess
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mirrorproxy.cache import blobs as blobs_module
from mirrorproxy.cache.appender import Appender
from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning
from mirrorproxy.http import blobsend
from mirrorproxy.http.app import create_app
from mirrorproxy.upstream.members import Resolver, resolve_addresses
from tests.fakes.registry import FakeRegistry
from tests.support.cluster import ClusterFactory, member_ports
from tests.support.downloads import Disk
from tests.support.mirror import (
    FakeFactory,
    Mirror,
    MirrorFactory,
    RunningFake,
    UpstreamSpec,
    mirror_config,
)
from tests.support.mounts import Mounts, umount
from tests.support.requirements import REQUIRE_E2E_ENV
from tests.support.seaweed import SeaweedFS, running_seaweedfs
from tests.support.waiting import WAIT


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

    ``cache`` adds ``[cache]`` keys (``max_size``, ``min_free``, ``offline``, ...);
    ``storage`` is a ``[storage]`` table (``seaweedfs.storage()``: the S3 store).
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
        tuning: Tuning = DEFAULT_TUNING,
        storage: Mapping[str, Any] | None = None,
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
            storage=storage,
        )
        client = await aiohttp_client(create_app(config, tuning=tuning))
        return Mirror(client, config)

    return start


@pytest.fixture
def start_cluster(aiohttp_client: AiohttpClient, tmp_path: Path) -> ClusterFactory:
    """Start a cluster of mirrors, each with its own cache, on fixed loopback ports."""

    async def start(
        upstreams: Sequence[str],
        n: int = 3,
        *,
        members: Mapping[int, Sequence[str | int]] | None = None,
        cluster: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
        storage: Mapping[str, Any] | None = None,
        cache: Mapping[str, Any] | None = None,
        tuning: Tuning = DEFAULT_TUNING,
        dns: Resolver | None = None,
    ) -> list[Mirror]:
        # With ``dns`` every member finds the others by ``members_dns``: member i
        # listens on 127.0.0.<i+1>, all on one port, as pods behind a headless Service.
        hosts = [f"127.0.0.{i + 1}" if dns else "127.0.0.1" for i in range(n)]

        async def member(i: int, ports: list[int], urls: list[str]) -> Mirror:
            listed = (members or {}).get(i, range(n))
            table: dict[str, Any] = {"self": urls[i], "peer_timeout": "1s", **(cluster or {})}
            if dns is None:
                table["members"] = [
                    urls[m] if isinstance(m, int) else m.format(*ports) for m in listed
                ]
            else:
                table["members_dns"] = f"mirrors.test.internal:{ports[i]}"
            config = mirror_config(
                tmp_path / f"member{i}" / "cache",
                upstreams,
                cluster=table,
                server=server,
                storage=storage,
                cache=cache,
            )
            app = create_app(config, tuning=tuning, resolver=dns or resolve_addresses)
            server_kwargs = {"host": hosts[i], "port": ports[i]}
            return Mirror(await aiohttp_client(app, server_kwargs=server_kwargs), config)

        for tries_left in (2, 1, 0):  # a port free a moment ago may be taken before we bind
            ports = member_ports(1) * n if dns else member_ports(n)
            urls = [f"http://{host}:{port}" for host, port in zip(hosts, ports, strict=True)]
            started: list[Mirror] = []
            try:
                for i in range(n):
                    started.append(await member(i, ports, urls))
                return started
            except OSError as err:
                if err.errno != errno.EADDRINUSE or not tries_left:
                    raise
                for m in started:
                    await m.client.close()
        raise AssertionError("unreachable: the last try returns or raises")

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


@pytest.fixture
def disk_full_after(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Make blob writes fail with ENOSPC once this many bytes were written (per run).

    The returned list holds one number, the byte budget; ``[]`` means no failures.
    """
    real = blobs_module._write_all
    budget: list[int] = []

    def write_all(
        out: Appender, chunks: Sequence[blobs_module.Chunk], offset: int, *, direct: bool
    ) -> None:
        if budget and offset + sum(len(c) for c in chunks) > budget[0]:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(out, chunks, offset, direct=direct)

    monkeypatch.setattr(blobs_module, "_write_all", write_all)
    return budget


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    """Hold the cache's writes until ``disk.go`` is set; fail those from ``disk.fail_from``."""
    state = Disk()
    real = blobs_module._write_all

    def write_all(
        out: Appender, chunks: Sequence[blobs_module.Chunk], offset: int, *, direct: bool
    ) -> None:
        state.started += 1
        fd = out.fd
        mine = os.dup(fd)  # keeps the temp file (and its inode number) alive
        try:
            state.go.wait(WAIT)
            try:
                now = os.fstat(fd)
            except OSError as err:
                state.misuse.append(f"fd {fd} was closed under the write job ({err})")
                raise
            if not os.path.samestat(now, os.fstat(mine)):
                target = os.readlink(f"/proc/self/fd/{fd}")
                state.misuse.append(f"fd {fd} now refers to {target}")
                raise OSError(errno.EBADF, "descriptor reused")
            if state.fail_from is not None and offset >= state.fail_from:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(out, chunks, offset, direct=direct)
        finally:
            os.close(mine)
            state.finished += 1

    monkeypatch.setattr(blobs_module, "_write_all", write_all)
    yield state
    state.go.set()  # never leave a writing thread blocked


# -- real mounts (root only): a tiny tmpfs, a read-only view of a directory ------------


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


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One real S3-compatible server for the session; tests use key prefixes of their
    own and never stop it."""
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def own_seaweedfs(tmp_path: Path) -> Iterator[SeaweedFS]:
    """A SeaweedFS of this test's own, which it may stop and start (outages)."""
    with running_seaweedfs(tmp_path / "seaweedfs") as server:
        yield server


@pytest.fixture(params=["copied", "sendfile"])
def send_by(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Both ways a file's bytes reach a client: copied (a client on this machine, as
    every test client is) and ``sendfile`` (a client elsewhere: the mirror is made to
    see the test client so)."""
    if request.param == "sendfile":
        monkeypatch.setattr(blobsend, "_local_plain", lambda transport: False)
    return str(request.param)
