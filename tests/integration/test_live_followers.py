"""Live clients: the few at the head of a download get each chunk from memory.

They must never wait for the disk, never get the last byte of a blob that does not
verify, fall back to the file when they fall behind, and the bytes a download may
hold in memory for a slow disk stay bounded across every download at once. Over
TLS too, where falling back to the file means sendfile on the TLS transport.
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import socket
import threading
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrorproxy.cache import blobs as blobs_module
from mirrorproxy.cache.appender import Appender
from mirrorproxy.http import keys
from mirrorproxy.pullthrough.chunkwindow import LiveFollower
from mirrorproxy.pullthrough.followers import FillClients
from mirrorproxy.pullthrough.source import ByteSink
from tests.fakes.registry import payload
from tests.support.listening import listening, with_server
from tests.support.mirror import Mirror, RunningFake, mirror_config
from tests.support.paths import REPO, blob_path
from tests.support.rawhttp import slow_get
from tests.support.tls import issue_server_cert, make_ca
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB
TRICKLE = 64 * KIB


@pytest.fixture
def disk_stalled(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Hold every blob write until the returned event is set (a very slow disk)."""
    go = threading.Event()
    real = blobs_module._write_all

    def write_all(
        out: Appender, chunks: Sequence[blobs_module.Chunk], offset: int, *, direct: bool
    ) -> None:
        go.wait(WAIT)
        real(out, chunks, offset, direct=direct)

    monkeypatch.setattr(blobs_module, "_write_all", write_all)
    yield go
    go.set()  # never leave a writing thread blocked


@pytest.fixture
def live_count(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Record, after each ``go_live``, how many clients are live on that download."""
    counts: list[int] = []
    real = FillClients.go_live

    def go_live(self: FillClients, sink: ByteSink, pos: int, end: int) -> LiveFollower | None:
        live = real(self, sink, pos, end)
        counts.append(self.live_count)
        return live

    monkeypatch.setattr(FillClients, "go_live", go_live)
    return counts


async def get(mirror: Mirror, digest: str) -> bytes:
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        return await resp.read()


async def test_a_live_client_gets_the_whole_blob_before_the_disk_does(
    fake: RunningFake, mirror: Mirror, disk_stalled: threading.Event
) -> None:
    data = payload(6 * MIB, "ahead of the disk")
    digest = fake.registry.add_blob(data)

    # Every byte, the verified last one included, while nothing is on disk yet.
    assert await get(mirror, digest) == data
    (tmp,) = mirror.tmp_files()
    assert tmp.stat().st_size == 0
    assert not mirror.blob_path(digest).exists()

    disk_stalled.set()
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data
    assert mirror.tmp_files() == []
    assert len(fake.registry.calls("GET", "blobs")) == 1


async def test_a_corrupt_blob_never_reaches_a_live_client_whole(
    fake: RunningFake, mirror: Mirror, disk_stalled: threading.Event
) -> None:
    data = payload(6 * MIB, "liar")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.wrong_bytes = True

    got = bytearray()

    async def read_all() -> None:
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        async for chunk in resp.content.iter_any():
            got.extend(chunk)

    async with asyncio.timeout(WAIT):
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_all()
    # Never whole: the last byte is held back. Bytes still queued for the client when
    # the digest fails go with the connection (it is cut at once), so it may be less.
    assert 0 < len(got) <= len(data) - 1
    disk_stalled.set()
    await wait_for(lambda: not mirror.tmp_files())
    assert mirror.blob_files() == []


async def test_clients_beyond_the_live_ones_read_the_file(
    fake: RunningFake, mirror: Mirror, live_count: list[int]
) -> None:
    data = payload(8 * MIB, "herd")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.01

    live_max = mirror.fill_tuning.live_max
    bodies = await asyncio.gather(*(get(mirror, digest) for _ in range(2 * live_max)))
    assert bodies == [data] * (2 * live_max)
    assert max(live_count) == live_max
    assert len(fake.registry.calls("GET", "blobs")) == 1


async def test_a_live_client_that_falls_behind_reads_on_from_the_file(
    fake: RunningFake, mirror: Mirror, monkeypatch: pytest.MonkeyPatch, live_count: list[int]
) -> None:
    mirror.tune(live_buffer=512 * KIB)
    data = payload(8 * MIB, "dawdler")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.002
    port = mirror.client.port
    assert port is not None

    async with slow_get(port, blob_path(REPO, digest)) as client:
        await asyncio.sleep(0.5)  # the download runs ahead; the mirror stops feeding us
        assert await client.body(len(data)) == data
    assert live_count[0] == 1  # live from the start...
    assert len(live_count) >= 2  # ... left when it fell behind, and read on


async def test_memory_held_for_a_slow_disk_is_bounded_over_all_downloads(
    start_fake_blobs: tuple[Mirror, list[str], list[bytes]],
    disk_stalled: threading.Event,
) -> None:
    mirror, digests, datas = start_fake_blobs
    store = mirror.client.app[keys.PULLTHROUGH]._blobs
    assert isinstance(store, blobs_module.FileBlobStore)
    peak = 0

    async def watch() -> None:
        nonlocal peak
        while True:
            peak = max(peak, store.in_flight)
            await asyncio.sleep(0.005)

    watcher = asyncio.create_task(watch())
    pulls = [asyncio.create_task(get(mirror, d)) for d in digests]
    try:
        # The downloads stall once the bound is reached (nothing reaches the disk).
        await wait_for(lambda: store.in_flight >= mirror.fill_tuning.write_ahead)
        await asyncio.sleep(0.3)
    finally:
        watcher.cancel()
        disk_stalled.set()
    assert await asyncio.gather(*pulls) == datas
    # Over the bound by at most the batch each download queued before it waited
    # (a batch: WRITE_BATCH and the chunk that crossed it).
    batch = mirror.fill_tuning.write_batch + TRICKLE
    assert peak <= mirror.fill_tuning.write_ahead + len(digests) * batch
    await mirror.settled()
    assert store.in_flight == 0
    for d, data in zip(digests, datas, strict=True):
        assert mirror.blob_path(d).read_bytes() == data


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_tls_live_clients_and_a_slow_one_get_every_byte(
    fake: RunningFake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """Over TLS, live clients and a slow one that falls back to the file (sendfile on the
    TLS transport) all get the whole blob from one upstream GET."""
    ca = make_ca(tmp_path / "pki")
    cert = issue_server_cert(ca, tmp_path / "pki")
    data = payload(16 * MIB, "over tls")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 512 * KIB
    fake.registry.faults.chunk_delay = 0.01
    config = with_server(
        mirror_config(tmp_path / "cache", [fake.url]), tls_cert=cert.cert, tls_key=cert.key
    )
    loop = asyncio.get_running_loop()
    real_sendfile = loop.sendfile
    sendfiles: list[str] = []

    async def sendfile(transport: asyncio.WriteTransport, *args: Any, **kwargs: Any) -> int:
        sendfiles.append(type(transport).__name__)
        return await real_sendfile(transport, *args, **kwargs)

    monkeypatch.setattr(loop, "sendfile", sendfile)
    async with listening(config) as m, aiohttp.ClientSession() as session:
        m.tune(live_buffer=256 * KIB)
        url = f"{m.url}{blob_path(REPO, digest)}"

        async def fast() -> bytes:
            async with session.get(url, ssl=ca.ssl_context()) as resp:
                assert resp.status == 200
                return await resp.read()

        async def slow() -> bytes:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KIB)
            sock.setblocking(False)
            await loop.sock_connect(sock, (m.host, m.port))
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=ca.ssl_context(), server_hostname=m.host, limit=32 * KIB
            )
            try:
                path = blob_path(REPO, digest)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                await asyncio.sleep(0.3)  # falls behind: goes back to the file
                return await reader.readexactly(len(data))
            finally:
                writer.close()

        async with asyncio.timeout(WAIT):
            bodies = list(await asyncio.gather(slow(), fast(), fast()))
        assert bodies == [data] * 3
        assert len(fake.registry.calls("GET", "blobs")) == 1
        assert "_SSLProtocolTransport" in sendfiles  # the slow one read the file
        async with asyncio.timeout(WAIT):
            await m.runner.app[keys.PULLTHROUGH].settled()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


@pytest.fixture
async def start_fake_blobs(
    fake: RunningFake, mirror: Mirror
) -> tuple[Mirror, list[str], list[bytes]]:
    """Three 8 MiB blobs sent slowly, and small limits: a 2 MiB bound, 256 KiB batches."""
    mirror.tune(write_ahead=2 * MIB, write_ahead_min=512 * KIB, write_batch=256 * KIB)
    fake.registry.faults.chunk_size = TRICKLE  # chunks come one by one, not merged
    fake.registry.faults.chunk_delay = 0.001
    datas = [payload(8 * MIB, f"bounded {i}") for i in range(3)]
    digests = [fake.registry.add_blob(d) for d in datas]
    return mirror, digests, datas
