"""The listener's limits on a real socket: timeouts, connection cap, parser limits, methods.

Each test starts the mirror with ``mirrorproxy.http.listener.start`` (what the CLI runs)
and talks raw HTTP to it, so aiohttp's own parser and timers are what is tested.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest

from mirrorproxy.config import Config
from tests.support.listening import listening, with_server
from tests.support.mirror import RunningFake, mirror_config
from tests.support.paths import NS, REPO
from tests.support.rawhttp import closed_within, request, send_raw

SLACK = 1.0  # seconds allowed past a deadline on a busy test machine


def _config(tmp_path: Path, fake: RunningFake, **server: object) -> Config:
    return with_server(mirror_config(tmp_path / "cache", [fake.url]), **server)


async def test_trickled_request_head_is_cut_at_client_timeout(
    fake: RunningFake, tmp_path: Path
) -> None:
    """Slowloris: bytes keep coming, but the head never completes; the timer holds."""
    async with listening(_config(tmp_path, fake, client_timeout=0.5)) as m:
        reader, writer = await asyncio.open_connection(m.host, m.port)
        writer.write(b"GET /v2/ HTTP/1.1\r\nHost: mirror\r\n")
        started = time.monotonic()

        async def trickle() -> None:
            try:
                for i in range(200):
                    writer.write(f"X-Slow-{i}: y\r\n".encode())
                    await writer.drain()
                    await asyncio.sleep(0.05)
            except ConnectionError:
                pass

        trickler = asyncio.create_task(trickle())
        try:
            assert await closed_within(reader, 0.5 + SLACK)
            assert 0.4 < time.monotonic() - started < 0.5 + SLACK
        finally:
            trickler.cancel()
            writer.close()
    assert fake.registry.requests == []


async def test_idle_connection_is_closed_after_client_timeout(
    fake: RunningFake, tmp_path: Path
) -> None:
    async with listening(_config(tmp_path, fake, client_timeout=0.4)) as m:
        reader, writer = await asyncio.open_connection(m.host, m.port)
        assert len(m.server.live) == 1
        assert await closed_within(reader, 0.4 + SLACK)
        writer.close()
        await asyncio.sleep(0.05)
        assert m.server.live == set()


async def test_keepalive_connection_is_served_then_idles_out(
    fake: RunningFake, tmp_path: Path
) -> None:
    async with listening(_config(tmp_path, fake, client_timeout=0.4)) as m:
        reader, writer = await asyncio.open_connection(m.host, m.port)
        for _ in range(3):  # each answer re-arms the timer
            writer.write(request("GET", "/v2/", close=False))
            await writer.drain()
            assert (await reader.readline()).startswith(b"HTTP/1.1 200")
            await reader.readuntil(b"{}")
            await asyncio.sleep(0.2)
        assert await closed_within(reader, 0.4 + SLACK)
        writer.close()


async def test_connection_cap_closes_extra_connections(fake: RunningFake, tmp_path: Path) -> None:
    async with listening(_config(tmp_path, fake, max_connections=4, client_timeout=30.0)) as m:
        held = [await asyncio.open_connection(m.host, m.port) for _ in range(4)]
        await asyncio.sleep(0.05)
        extra_reader, extra_writer = await asyncio.open_connection(m.host, m.port)
        assert await closed_within(extra_reader, SLACK)
        extra_writer.close()
        assert len(m.server.live) == 4
        assert m.server.refused == 1

        # The admitted ones still work.
        reader, writer = held[0]
        writer.write(request("GET", "/v2/"))
        await writer.drain()
        assert (await reader.readline()).startswith(b"HTTP/1.1 200")
        await closed_within(reader, SLACK)  # Connection: close
        writer.close()
        await asyncio.sleep(0.05)

        # A slot is free again.
        resp = await send_raw(m.host, m.port, request("GET", "/v2/"))
        assert resp is not None
        assert resp.status == 200
        for _, w in held[1:]:
            w.close()


async def test_burst_of_connections_respects_the_cap(fake: RunningFake, tmp_path: Path) -> None:
    """Connections accepted in one loop tick are counted one by one, not after the fact."""
    async with listening(_config(tmp_path, fake, max_connections=5, client_timeout=30.0)) as m:
        conns = await asyncio.gather(*(asyncio.open_connection(m.host, m.port) for _ in range(40)))
        await asyncio.sleep(0.2)
        assert len(m.server.live) == 5
        assert m.server.refused == 35
        for _, w in conns:
            w.close()


@pytest.mark.parametrize(
    ("limit_key", "head"),
    [
        ("max_header_size", request(headers={"X-Big": "x" * 2000})),
        ("max_url_length", request("GET", "/v2/" + "a" * 2000)),
    ],
)
async def test_oversized_request_is_a_400_oci_error(
    fake: RunningFake, tmp_path: Path, limit_key: str, head: bytes
) -> None:
    async with listening(_config(tmp_path, fake, **{limit_key: 1024})) as m:
        resp = await send_raw(m.host, m.port, head)
        assert resp is not None
        assert resp.status == 400
        assert resp.is_oci_error
        assert resp.json()["errors"][0]["code"] == "UNSUPPORTED"
        # Just under the limit is fine.
        ok = await send_raw(m.host, m.port, request(headers={"X-Big": "x" * 900}))
        assert ok is not None
        assert ok.status == 200
    assert fake.registry.requests == []


@pytest.mark.parametrize(
    "raw",
    [
        b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\x00" * 40,  # TLS to a plain port
        b"GET /v2/\x00 HTTP/1.1\r\nHost: m\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Nul: a\x00b\r\n\r\n",
        b"GET /v2/ HTTP/9.9\r\nHost: m\r\n\r\n",
        b"G ET /v2/ HTTP/1.1\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\n" + b"".join(b"X-%d: y\r\n" % i for i in range(300)) + b"\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /v2/ HTTP/1.1\r\nHost: m\r\n X-Folded: y\r\n\r\n",
    ],
)
async def test_malformed_requests_get_an_oci_error(
    fake: RunningFake, tmp_path: Path, raw: bytes
) -> None:
    async with listening(_config(tmp_path, fake)) as m:
        resp = await send_raw(m.host, m.port, raw)
    assert resp is not None
    assert resp.status == 400
    assert resp.is_oci_error
    assert fake.registry.requests == []


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE"])
@pytest.mark.parametrize(
    "path", ["/v2/", "/healthz", "/nope", f"/v2/{REPO}/manifests/3", f"/v2/{REPO}/blobs/uploads/"]
)
async def test_only_get_and_head_are_served(
    fake: RunningFake, tmp_path: Path, method: str, path: str
) -> None:
    async with listening(_config(tmp_path, fake)) as m:
        resp = await send_raw(m.host, m.port, request(method, f"{path}?ns={NS}"))
    assert resp is not None
    assert resp.status == 405
    assert resp.is_oci_error
    assert resp.json()["errors"][0]["code"] == "UNSUPPORTED"
    assert resp.headers["allow"] == "GET,HEAD"
    assert fake.registry.requests == []
