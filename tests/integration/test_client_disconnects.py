"""Clients that go away are ordinary: never an error line, never ``code="error"``.

The mirror runs behind ``mirrorproxy.http.listener.start`` (what ``serve`` runs), so
aiohttp's own connection handling and our request-error hook are what is tested.
Clients connect with raw sockets, send a request and close (or reset) the
connection before the answer's headers can arrive, while a cached blob is sent, or
while they wait for a download's disk.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import struct
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirrorproxy.config import Config
from mirrorproxy.http import keys
from tests.fakes.registry import OCI_MANIFEST, payload
from tests.support.downloads import Disk
from tests.support.listening import Listening, listening, with_server
from tests.support.mirror import RunningFake, mirror_config
from tests.support.paths import REPO, blob_path, manifest_path
from tests.support.rawhttp import RawResponse, request, send_raw
from tests.support.waiting import WAIT

# Every rule holds whether file bytes are copied (loopback clients) or sent by sendfile.
pytestmark = pytest.mark.usefixtures("send_by")

CLIENTS = 200
UPSTREAM_DELAY = 0.3  # seconds the upstream waits: every client is gone by then
MIB = 1024 * 1024


def _config(tmp_path: Path, fake: RunningFake) -> Config:
    return with_server(mirror_config(tmp_path / "cache", [fake.url]), max_connections=1000)


async def _abort(port: int, path: str, *, reset: bool) -> None:
    """Send one GET and close before the answer (with a TCP reset when ``reset``)."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        head = f"GET {path} HTTP/1.1\r\nHost: mirror\r\nAccept: {OCI_MANIFEST}\r\n\r\n"
        await loop.sock_sendall(sock, head.encode())
        if reset:
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


async def _get(m: Listening, path: str) -> RawResponse:
    resp = await send_raw(m.host, m.port, request("GET", path, headers={"Accept": OCI_MANIFEST}))
    assert resp is not None
    return resp


async def _samples(m: Listening, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    resp = await _get(m, "/metrics")
    assert resp.status == 200
    found: dict[tuple[tuple[str, str], ...], float] = {}
    for family in text_string_to_metric_families(resp.body.decode()):
        for sample in family.samples:
            if sample.name == name:
                found[tuple(sorted(sample.labels.items()))] = sample.value
    return found


async def _settled(m: Listening, answered: int) -> None:
    """Wait (bounded) until ``answered`` requests were counted and none is in flight."""
    async with asyncio.timeout(WAIT + UPSTREAM_DELAY):
        while True:
            done = sum((await _samples(m, "mirrorproxy_requests_total")).values())
            inflight = sum((await _samples(m, "mirrorproxy_inflight_requests")).values())
            # The /metrics scrapes themselves are not measured.
            if done >= answered and inflight == 0:
                return
            await asyncio.sleep(0.05)


@pytest.mark.parametrize("kind", ["blob", "manifest"])
async def test_clients_that_close_before_the_headers_are_not_errors(
    fake: RunningFake, tmp_path: Path, caplog: pytest.LogCaptureFixture, kind: str
) -> None:
    caplog.set_level(logging.INFO)
    data = payload(256 * 1024, "aborted")
    digest = fake.registry.add_blob(data)
    fake.registry.add_image(REPO, "3")
    path = blob_path(REPO, digest) if kind == "blob" else manifest_path(REPO, "3")
    fake.registry.faults.delay = UPSTREAM_DELAY
    async with listening(_config(tmp_path, fake)) as m:
        await asyncio.gather(*(_abort(m.port, path, reset=i % 2 == 1) for i in range(CLIENTS)))
        await _settled(m, CLIENTS)
        codes = {
            dict(labels)["code"]: value
            for labels, value in (await _samples(m, "mirrorproxy_requests_total")).items()
        }
        fake.registry.faults.clear()
        # The mirror still answers, and the request every client asked for was
        # completed once upstream for the cache.
        resp = await _get(m, path)
        assert resp.status == 200
        if kind == "blob":
            assert resp.body == data
    # 499 when the mirror saw the client gone before it answered; 200 when the
    # headers went out to a socket whose reset had not arrived yet.
    assert set(codes) <= {"200", "499"}, codes
    assert sum(codes.values()) == CLIENTS
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in noisy] == []


async def _reset_mid_body(port: int, path: str) -> None:
    """Read the head and a little of the body, then reset the connection."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        await loop.sock_sendall(sock, request("GET", path))
        async with asyncio.timeout(WAIT):
            got = b""
            while b"\r\n\r\n" not in got or len(got) < 64 * 1024:
                chunk = await loop.sock_recv(sock, 65536)
                assert chunk, "closed before the body"
                got += chunk
        assert got.startswith(b"HTTP/1.1 200")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    finally:
        sock.close()


async def test_clients_that_reset_while_a_cached_blob_is_sent_are_not_errors(
    fake: RunningFake, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    data = payload(16 * 1024 * 1024, "sent by sendfile")
    digest = fake.registry.add_blob(data)
    path = blob_path(REPO, digest)
    async with listening(_config(tmp_path, fake)) as m:
        assert (await _get(m, path)).body == data  # now cached: served from the file
        caplog.set_level(logging.INFO)
        caplog.clear()
        await asyncio.gather(*(_reset_mid_body(m.port, path) for _ in range(20)))
        await _settled(m, 21)
        codes = {
            dict(labels)["code"]: value
            for labels, value in (await _samples(m, "mirrorproxy_requests_total")).items()
        }
    assert "error" not in codes, codes
    assert sum(codes.values()) == 21
    noisy = [r for r in caplog.records if r.levelno >= logging.WARNING]
    assert [r.getMessage() for r in noisy] == []


async def test_a_client_gone_while_waiting_for_the_disk_is_not_an_error(
    fake: RunningFake,
    tmp_path: Path,
    disk: Disk,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A client following the file that leaves while the disk has nothing yet is an INFO
    line, not an error."""
    caplog.set_level(logging.INFO, logger="mirrorproxy")
    data = payload(MIB, "gone while waiting")
    digest = fake.registry.add_blob(data)
    config = with_server(mirror_config(tmp_path / "cache", [fake.url]))
    # The production listener: handlers are not cancelled when their client goes away.
    async with listening(config, handler_cancellation=False) as m:
        m.tune(live_max=0)  # the client follows the file
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(m.host, m.port)
            path = blob_path(REPO, digest)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writer.close()  # gone while the disk has nothing yet
            await asyncio.sleep(0.1)
            disk.go.set()
            await m.runner.app[keys.PULLTHROUGH].settled()
            await asyncio.sleep(0.05)  # the handler wakes up and gives up
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []  # once: "... after an unexpected error" + traceback
    gone = [r for r in caplog.records if "client went away" in r.getMessage()]
    assert gone
    assert all(r.levelno == logging.INFO for r in gone)
