"""``kill -9`` of the real ``mirrorproxy serve`` in the middle of a large blob.

The mirror runs as a subprocess (MirrorProcess) in front of a slow FakeRegistry
served from this test's event loop. It is killed while a client is mid-download,
restarted on the same cache directory, and then: no temp file survives the start,
nothing partial is ever served, the blob is fetched and verified again,
``mirrorproxy cache verify`` passes and ``cache du`` agrees with the files.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirrorproxy.cache.index import BLOB, CacheIndex
from mirrorproxy.cli import main
from tests.fakes.registry import payload
from tests.support.mirror import FakeFactory
from tests.support.paths import NS, REPO, blob_path
from tests.support.procs import MirrorProcess, free_port, mirror_config
from tests.support.waiting import WAIT

KIB = 1024
MIB = 1024 * KIB
SIZE = 12 * MIB


@pytest.fixture
def mirror_proc(tmp_path: Path) -> Iterator[list[MirrorProcess]]:
    """Holds the test's MirrorProcess; it is stopped at teardown whatever happened."""
    procs: list[MirrorProcess] = []
    yield procs
    for proc in procs:
        proc.stop()


async def test_kill_9_mid_blob_then_restart(
    start_fake: FakeFactory,
    mirror_proc: list[MirrorProcess],
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    fake = await start_fake()
    data = payload(SIZE, "crash")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.02  # about a second for the whole blob
    cache = tmp_path / "cache"
    port = free_port()
    proc = MirrorProcess(
        tmp_path / "mirror", mirror_config(port, cache, {NS: [fake.url]}), port, start=False
    )
    mirror_proc.append(proc)
    await asyncio.to_thread(proc.start)  # the fake upstream keeps running meanwhile
    url = f"{proc.url}{blob_path(REPO, digest)}"

    async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT):
        resp = await session.get(url)
        assert resp.status == 200
        got = 0
        while got < 3 * MIB:
            got += len(await resp.content.readany())
        partials = list((cache / "tmp").glob("*.partial"))
        assert len(partials) == 1, "the fill should be under way"
        assert fake.registry.blob_bytes_sent < SIZE

        assert await asyncio.to_thread(proc.kill) == -signal.SIGKILL
        with pytest.raises(aiohttp.ClientError):
            await resp.read()
        resp.release()
    assert partials[0].exists()  # the crash left it behind
    assert not (cache / "blobs" / "sha256" / digest[7:9] / digest[7:]).exists()

    fake.registry.faults.clear()
    fake.registry.faults.status = 503  # an upstream request now fails: nothing to hide
    await asyncio.to_thread(proc.start)
    assert list((cache / "tmp").iterdir()) == []  # swept before serving
    async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT):
        resp = await session.get(url)
        assert resp.status in (502, 503)  # never the partial bytes
        fake.registry.faults.clear()
        resp = await session.get(url)
        assert resp.status == 200
        assert await resp.read() == data
        assert len(fake.registry.calls("GET", "blobs")) == 3
        # The client has the last byte when the digest matches; the rename follows.
        size = -1.0
        while size != SIZE:
            metrics = await (await session.get(f"{proc.url}/metrics")).text()
            (size,) = (
                s.value
                for family in text_string_to_metric_families(metrics)
                for s in family.samples
                if s.name == "mirrorproxy_cache_size_bytes"
            )
            await asyncio.sleep(0.02)
    blob_file = cache / "blobs" / "sha256" / digest[7:9] / digest[7:]
    assert blob_file.read_bytes() == data

    # The index agrees with the files, and the cache commands with both.
    index = CacheIndex(cache / "index.db")
    try:
        assert [(e.kind, e.digest, e.size, e.namespace) for e in index.entries()] == [
            (BLOB, digest, SIZE, NS)
        ]
    finally:
        index.close()
    assert main(["cache", "verify", "--config", str(proc.config_path)]) == 0
    assert capsys.readouterr().out == "verified 1 entries, 0 bad\n"
    assert main(["cache", "du", "--config", str(proc.config_path)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines()[1].split() == [NS, "1", "12.0MiB", "0", "12.0MiB"]
    assert out.splitlines()[-1] == "total 12.0MiB (no max_size)"

    # Killed again at rest: the committed blob is served from the cache afterwards.
    assert await asyncio.to_thread(proc.kill) == -signal.SIGKILL
    await asyncio.to_thread(proc.start)
    async with aiohttp.ClientSession() as session, asyncio.timeout(WAIT):
        resp = await session.get(url)
        assert resp.status == 200
        assert await resp.read() == data
    assert len(fake.registry.calls("GET", "blobs")) == 3
    assert await asyncio.to_thread(proc.stop) == 0
