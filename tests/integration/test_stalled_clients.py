"""A client that stops reading is closed after ``client_timeout``; one that leaves is
no error.

A response that makes no progress for ``[server] client_timeout`` is closed, which
releases its cache pin and file handle: a blob it held can be evicted again, and a
new blob that needs the room is cached. Clients that go away mid-body are logged at
INFO, never as errors.
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

import aiohttp
import pytest

from mirrorproxy.http import keys
from tests.fakes.registry import payload
from tests.support.listening import listening, with_server
from tests.support.mirror import Mirror, MirrorFactory, RunningFake, mirror_config
from tests.support.paths import REPO, blob_path
from tests.support.rawhttp import slow_get
from tests.support.waiting import WAIT, wait_for

# Every rule holds whether file bytes are copied (loopback clients) or sent by sendfile.
pytestmark = pytest.mark.usefixtures("send_by")

KIB = 1024
MIB = 1024 * KIB
STALL = {"client_timeout": "500ms"}
PASSTHROUGH = "mirrorproxy_cache_passthrough_total"


async def pull(mirror: Mirror, digest: str) -> bytes:
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        data = await resp.read()
    await mirror.settled()
    return data


def open_in_this_process(path: Path) -> bool:
    """Whether this process holds ``path`` open."""
    fds = Path("/proc/self/fd")
    for fd in fds.iterdir():
        try:
            if os.readlink(fd) == str(path):
                return True
        except OSError:
            continue
    return False


async def closed_by_mirror(port: int, path: str, caplog: pytest.LogCaptureFixture) -> int:
    """GET ``path``, read a little and stop until the mirror gives up on us; return
    how many body bytes arrived in all (what was in flight comes after the close)."""
    caplog.set_level(logging.INFO, logger="mirrorproxy")
    async with slow_get(port, path) as reader:
        await reader.body(64 * KIB)
        await wait_for(lambda: any("stopped reading" in m for m in caplog.messages))
        with pytest.raises(ConnectionError):
            await reader.body(10**12)
        return len(reader.received)


async def test_a_stalled_client_of_a_cached_blob_releases_its_pin(
    fake: RunningFake, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    mirror = await start_mirror([fake.url], cache={"max_size": "40MiB"}, server=STALL)
    old, new = payload(30 * MIB, "held"), payload(20 * MIB, "needs its room")
    old_digest, new_digest = fake.registry.add_blob(old), fake.registry.add_blob(new)
    assert await pull(mirror, old_digest) == old
    port = mirror.client.port
    assert port is not None

    got = await closed_by_mirror(port, blob_path(REPO, old_digest), caplog)
    assert got < len(old)
    assert not open_in_this_process(mirror.blob_path(old_digest))
    # Its pin is gone: the new blob evicts it and is cached.
    assert await pull(mirror, new_digest) == new
    assert mirror.blob_path(new_digest).exists()
    assert not mirror.blob_path(old_digest).exists()
    assert await mirror.metric_sum(PASSTHROUGH) == 0


async def test_a_stalled_client_of_a_download_does_not_hold_it_up(
    fake: RunningFake, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    mirror = await start_mirror([fake.url], server=STALL)
    mirror.tune(live_max=0)
    data = payload(24 * MIB, "download on")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.02
    port = mirror.client.port
    assert port is not None
    got = await closed_by_mirror(port, blob_path(REPO, digest), caplog)
    assert got < len(data)
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data
    assert len(fake.registry.calls("GET", "blobs")) == 1


async def test_a_stalled_client_of_a_blob_streamed_through_lets_the_upstream_go(
    fake: RunningFake, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    mirror = await start_mirror([fake.url], cache={"max_size": "1MiB"}, server=STALL)
    data = payload(32 * MIB, "uncached, unread")
    digest = fake.registry.add_blob(data)
    port = mirror.client.port
    assert port is not None
    got = await closed_by_mirror(port, blob_path(REPO, digest), caplog)
    assert got < len(data)
    await wait_for(lambda: fake.registry.blob_bytes_sent > 0)
    assert fake.registry.blob_bytes_sent < len(data)  # the upstream response was closed
    assert mirror.blob_files() == []


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "downloading"])
async def test_a_client_leaving_mid_body_is_logged_as_routine(
    fake: RunningFake, tmp_path: Path, caplog: pytest.LogCaptureFixture, cached: bool
) -> None:
    caplog.set_level(logging.INFO, logger="mirrorproxy")
    data = payload(64 * MIB, "gone")  # more than socket buffers take
    digest = fake.registry.add_blob(data)
    if not cached:
        fake.registry.faults.chunk_size = 256 * KIB
        fake.registry.faults.chunk_delay = 0.01
    config = with_server(mirror_config(tmp_path / "cache", [fake.url]))
    # The production listener: a handler is not cancelled when its client goes away,
    # so its next write fails (a reset or a broken pipe).
    async with (
        listening(config, handler_cancellation=False) as m,
        aiohttp.ClientSession() as session,
    ):
        url = f"{m.url}{blob_path(REPO, digest)}"
        if cached:
            async with session.get(url) as resp:
                assert await resp.read() == data
        for _ in range(3):
            async with asyncio.timeout(WAIT), session.get(url) as resp:
                await resp.content.readexactly(MIB)
                resp.close()  # gone mid-body
        await wait_for(lambda: sum("client went away" in m for m in caplog.messages) >= 3)
        await m.runner.app[keys.PULLTHROUGH].settled()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]
    assert errors == []
    assert (tmp_path / "cache").exists()
