"""No open proxy: a client-supplied ``ns`` never makes the mirror connect anywhere new.

A listener the test owns on 127.0.0.2 stands for a forbidden internal service, and
the event loop's ``sock_connect`` and ``getaddrinfo`` are wrapped to record every
connection attempt and name lookup (169.254.169.254 is only ever looked for in
that record, never dialled). Only configured namespaces reach upstreams, and a
wildcard namespace sends an allowed registry to its own configured upstreams, never
to the host the client named.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from mirrorproxy.config import WILDCARD, Config
from mirrorproxy.http.app import create_app
from tests.support.mirror import FakeFactory, RunningFake, mirror_config
from tests.support.paths import REPO

HEX = "ab" * 32


@dataclass
class Forbidden:
    """A TCP listener on 127.0.0.2 that counts who connects to it."""

    port: int = 0
    connections: int = 0


@dataclass
class ConnectionLog:
    """Every connection attempt and name lookup of the event loop.

    The test's own client dials the mirror through the same loop; ``mirror_port``
    leaves those out of ``dialled``.
    """

    attempts: list[Any] = field(default_factory=list)
    looked_up: list[str] = field(default_factory=list)
    mirror_port: int | None = None

    @property
    def dialled(self) -> list[Any]:
        return [a for a in self.attempts if a[1] != self.mirror_port]

    def clear(self) -> None:
        self.attempts.clear()
        self.looked_up.clear()


@pytest.fixture
async def forbidden() -> AsyncIterator[Forbidden]:
    state = Forbidden()

    def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        state.connections += 1
        writer.close()

    server = await asyncio.start_server(on_connect, "127.0.0.2", 0)
    state.port = server.sockets[0].getsockname()[1]
    try:
        yield state
    finally:
        server.close()
        await server.wait_closed()


@pytest.fixture
async def connection_log(monkeypatch: pytest.MonkeyPatch) -> ConnectionLog:
    log = ConnectionLog()
    loop = asyncio.get_running_loop()
    real_connect, real_lookup = loop.sock_connect, loop.getaddrinfo

    async def sock_connect(sock: Any, address: Any) -> None:
        log.attempts.append(address)
        await real_connect(sock, address)

    async def getaddrinfo(host: Any, *args: Any, **kwargs: Any) -> Any:
        log.looked_up.append(str(host))
        return await real_lookup(host, *args, **kwargs)

    monkeypatch.setattr(loop, "sock_connect", sock_connect)
    monkeypatch.setattr(loop, "getaddrinfo", getaddrinfo)
    return log


def _hostile_ns(port: int) -> list[str]:
    return [
        f"127.0.0.2:{port}",
        "127.0.0.2",
        f"127.0.0.2%3A{port}",  # the colon percent-encoded
        f"localhost:{port}",
        "169.254.169.254",
        "169.254.169.254:80",
        "[::1]:22",
        "[::ffff:169.254.169.254]",
        "metadata.google.internal",
        "0.0.0.0",
        "2852039166",  # 169.254.169.254 as one decimal number
        "0xa9fea9fe",
        f"docker.io@127.0.0.2:{port}",
        f"docker.io%2F..%2F127.0.0.2:{port}",
        f"127.0.0.2:{port}&ns=docker.io",  # a second ns after a forbidden first
        "DOCKER.IO.",
    ]


def _paths(ns: str) -> list[tuple[str, str]]:
    return [
        ("GET", f"/v2/{REPO}/manifests/latest?ns={ns}"),
        ("HEAD", f"/v2/{REPO}/manifests/sha256:{HEX}?ns={ns}"),
        ("GET", f"/v2/{REPO}/blobs/sha256:{HEX}?ns={ns}"),
        ("GET", f"/v2/{REPO}/tags/list?ns={ns}&n=1"),
    ]


async def _assert_refused(client: TestClient[web.Request, web.Application], ns: str) -> None:
    for method, path in _paths(ns):
        resp = await client.request(method, path)
        assert resp.status in (400, 404), (method, path, resp.status)
        if method == "GET":
            code = (await resp.json())["errors"][0]["code"]
            assert code in ("NAME_UNKNOWN", "NAME_INVALID"), (path, code)


async def _mirror(
    aiohttp_client: AiohttpClient, config: Config, log: ConnectionLog
) -> TestClient[web.Request, web.Application]:
    client = await aiohttp_client(create_app(config))
    log.mirror_port = client.port
    log.clear()
    return client


async def test_only_configured_namespaces_reach_upstreams(
    aiohttp_client: AiohttpClient,
    fake: RunningFake,
    forbidden: Forbidden,
    connection_log: ConnectionLog,
    tmp_path: Path,
) -> None:
    fake.registry.add_image(REPO, "latest")
    client = await _mirror(
        aiohttp_client, mirror_config(tmp_path / "cache", [fake.url]), connection_log
    )
    for ns in _hostile_ns(forbidden.port):
        await _assert_refused(client, ns)
    assert forbidden.connections == 0
    assert fake.registry.requests == []
    assert connection_log.dialled == []
    assert connection_log.looked_up == []

    # Positive control: the log does see the mirror dial its configured upstream.
    resp = await client.get(f"/v2/{REPO}/manifests/latest?ns=docker.io")
    assert resp.status == 200
    assert _port_of(fake) in {a[1] for a in connection_log.dialled}
    assert all(a[0] == "127.0.0.1" for a in connection_log.dialled)


def _with_wildcard(config: Config, *allow: str) -> Config:
    namespaces = dict(config.namespaces)
    namespaces[WILDCARD] = replace(namespaces[WILDCARD], allow=allow)
    return replace(config, namespaces=namespaces)


async def test_wildcard_sends_allowed_registries_to_its_upstreams_only(
    aiohttp_client: AiohttpClient,
    start_fake: FakeFactory,
    forbidden: Forbidden,
    connection_log: ConnectionLog,
    tmp_path: Path,
) -> None:
    hub, site = await start_fake(), await start_fake()
    site.registry.add_image(REPO, "latest")
    config = mirror_config(
        tmp_path / "cache",
        [],
        namespaces={"docker.io": [hub.url], WILDCARD: [{"url": site.url, "ns": True}]},
    )
    client = await _mirror(
        aiohttp_client, _with_wildcard(config, "*.corp.example"), connection_log
    )

    for ns in [*_hostile_ns(forbidden.port), "corp.example", "evil.corp.example.attacker.io"]:
        await _assert_refused(client, ns)
    assert forbidden.connections == 0
    assert hub.registry.requests == site.registry.requests == []
    assert connection_log.dialled == []

    # An allowed registry goes to the wildcard's configured upstream, named in ?ns=;
    # the mirror never looks up or dials reg.corp.example itself.
    resp = await client.get(f"/v2/{REPO}/manifests/latest?ns=reg.corp.example")
    assert resp.status == 200
    assert [r.query.get("ns") for r in site.registry.requests] == ["reg.corp.example"]
    assert not any("corp.example" in host for host in connection_log.looked_up)
    assert {a[1] for a in connection_log.dialled} == {_port_of(site)}
    assert hub.registry.requests == []


async def test_wildcard_allowlist_naming_an_internal_host_still_uses_the_upstream(
    aiohttp_client: AiohttpClient,
    fake: RunningFake,
    forbidden: Forbidden,
    connection_log: ConnectionLog,
    tmp_path: Path,
) -> None:
    """Even an operator's allowlist that matches 127.0.0.2 never makes the mirror go there."""
    fake.registry.add_image(REPO, "latest")
    config = mirror_config(
        tmp_path / "cache", [], namespaces={WILDCARD: [{"url": fake.url, "ns": True}]}
    )
    client = await _mirror(aiohttp_client, _with_wildcard(config, "127.0.0.2:*"), connection_log)
    resp = await client.get(f"/v2/{REPO}/manifests/latest?ns=127.0.0.2:{forbidden.port}")
    assert resp.status == 200
    assert forbidden.connections == 0
    assert [r.query.get("ns") for r in fake.registry.requests] == [f"127.0.0.2:{forbidden.port}"]
    assert all(a[1] != forbidden.port for a in connection_log.dialled)


def _port_of(fake: RunningFake) -> int:
    port = fake.server.port
    assert port is not None
    return port
