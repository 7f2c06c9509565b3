"""Garbage does not starve normal clients: the real CLI keeps serving under a hammering.

The mirror runs as ``python -m mirrorproxy serve`` (so server.py's listener and its
knobs are what is exercised). While 200 connections sit idle or trickle half a
request head, a few thousand malformed requests arrive; then a normal pull (the
manifest and every blob) must complete within a few seconds, and the process must
still be healthy, with nothing logged at error level.
"""

from __future__ import annotations

import asyncio
import json
import random
import signal
import time
from pathlib import Path

import aiohttp
import pytest

from tests.support.mirror import FakeFactory
from tests.support.paths import REPO
from tests.support.procs import MirrorProcess, free_port
from tests.support.rawhttp import request, send_raw

IDLE = 200
GARBAGE = 3000
WORKERS = 32
PULL_WITHIN = 5.0  # seconds for the normal pull once the garbage has been sent
BUDGET = 30.0  # seconds for the whole test

GARBAGE_KINDS: list[bytes] = [
    b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(range(64)),
    b"GET /v2/\x00 HTTP/1.1\r\nHost: m\r\n\r\n",
    b"BREW /v2/ HTTP/1.1\r\nHost: m\r\n\r\n",
    request("DELETE", f"/v2/{REPO}/manifests/3?ns=docker.io"),
    request("GET", "/v2/../../etc/passwd/manifests/3"),
    request("GET", f"/v2/{REPO}/manifests/3?ns=169.254.169.254"),
    request("GET", f"/v2/{REPO}/blobs/sha1:{'0' * 40}?ns=docker.io"),
    request("GET", "/v2/" + "a" * 20_000),
    request(headers={"X-Big": "b" * 40_000}),
    request(headers={f"X-{i}": "v" for i in range(300)}),
    request("GET", f"/v2/%2e%2e/%2e%2e/blobs/sha256:{'0' * 64}"),
    b"GET /v2/ HTTP/1.1\r\nHost: m\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
]  # (incomplete heads are the idle connections' business)


def _config(port: int, cache: Path, upstream: str) -> str:
    return (
        "[server]\n"
        f'listen = "127.0.0.1:{port}"\n'
        'default_namespace = "docker.io"\n'
        'client_timeout = "20s"\n'
        "max_connections = 1024\n"
        "[cache]\n"
        f"dir = {json.dumps(str(cache))}\n"
        '[namespaces."docker.io"]\n'
        f"upstreams = [{json.dumps(upstream)}]\n"
    )


async def _idle_connections(port: int) -> list[asyncio.StreamWriter]:
    writers = []
    for i in range(IDLE):
        _, writer = await asyncio.open_connection("127.0.0.1", port)
        if i % 2:  # half of them start a request head and never finish it
            writer.write(b"GET /v2/ HTTP/1.1\r\nHost: m\r\nX-Slow: ")
        writers.append(writer)
    return writers


async def _garbage(port: int) -> None:
    rng = random.Random(7)  # noqa: S311 -- reproducible, not secret
    queue = [rng.choice(GARBAGE_KINDS) for _ in range(GARBAGE)]

    async def worker() -> None:
        while queue:
            raw = queue.pop()
            resp = await send_raw("127.0.0.1", port, raw, within=3.0)
            assert resp is None or resp.status < 500

    await asyncio.gather(*(worker() for _ in range(WORKERS)))


async def test_normal_pull_succeeds_while_hammered(
    start_fake: FakeFactory, tmp_path: Path
) -> None:
    started = time.monotonic()
    fake = await start_fake()
    image = fake.registry.add_image(REPO, "3", layer_sizes=(300_000, 50_000))
    port = free_port()
    proc = await asyncio.to_thread(
        MirrorProcess, tmp_path / "mirror", _config(port, tmp_path / "cache", fake.url), port
    )
    idle: list[asyncio.StreamWriter] = []
    try:
        idle = await _idle_connections(port)
        await _garbage(port)

        pull_started = time.monotonic()
        async with asyncio.timeout(PULL_WITHIN), aiohttp.ClientSession() as session:
            url = f"{proc.url}/v2/{REPO}"
            async with session.get(f"{url}/manifests/3?ns=docker.io") as resp:
                assert resp.status == 200
                assert await resp.read() == image.manifest
            for digest, data in zip(
                [image.config_digest, *image.layer_digests],
                [image.config, *image.layers],
                strict=True,
            ):
                async with session.get(f"{url}/blobs/{digest}?ns=docker.io") as resp:
                    assert resp.status == 200
                    assert await resp.read() == data
        pull_time = time.monotonic() - pull_started

        assert not any(w.is_closing() for w in idle)  # they were all held meanwhile
        assert proc.running
    finally:
        for w in idle:
            w.close()
        await asyncio.to_thread(proc.stop)

    log = proc.log_text()
    assert "Traceback" not in log
    assert " ERROR " not in log
    assert pull_time < PULL_WITHIN
    assert time.monotonic() - started < BUDGET


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
async def test_signal_stops_the_cli_cleanly_after_in_flight_answers(
    start_fake: FakeFactory, tmp_path: Path, sig: signal.Signals
) -> None:
    """A stop signal lets a response in flight finish, then exits 0 without a traceback."""
    fake = await start_fake()
    image = fake.registry.add_image(REPO, "3", layer_sizes=(256 * 1024,))
    fake.registry.faults.chunk_size = 16 * 1024
    fake.registry.faults.chunk_delay = 0.05  # the blob takes ~0.8 s upstream
    port = free_port()
    proc = await asyncio.to_thread(
        MirrorProcess, tmp_path / "mirror", _config(port, tmp_path / "cache", fake.url), port
    )
    try:
        async with aiohttp.ClientSession() as session:
            url = f"{proc.url}/v2/{REPO}/blobs/{image.layer_digests[0]}?ns=docker.io"
            async with session.get(url) as resp:
                assert resp.status == 200
                assert proc.proc is not None
                proc.proc.send_signal(sig)
                assert await resp.read() == image.layers[0]
        code = await asyncio.to_thread(proc.proc.wait, 10)
    finally:
        await asyncio.to_thread(proc.stop)
    assert code == 0
    assert "Traceback" not in proc.log_text()
