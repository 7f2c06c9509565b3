"""A blob that cannot be cached still reaches every client, verified.

A write error in the middle of a download (ENOSPC here) turns it into stream-through
for the clients already following it: the bytes not on disk are kept in memory for
them (bounded; the download waits for the slowest), checked against the digest, and
nothing is cached. A blob streamed through uncached honours ``Range`` by asking the
upstream for that range.
"""

from __future__ import annotations

import asyncio
import errno
import os
import sqlite3
from pathlib import Path

import pytest

from mirrorproxy.cache import blobs as blobs_module
from mirrorproxy.http import keys
from mirrorproxy.pullthrough.fill import BlobFill
from tests.fakes.registry import payload
from tests.support.mirror import Mirror, MirrorFactory, RunningFake
from tests.support.paths import REPO, blob_path
from tests.support.rawhttp import slow_get
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB
PASSTHROUGH = "mirrorproxy_cache_passthrough_total"
WRITE_ERRORS = "mirrorproxy_cache_write_errors_total"


async def get(mirror: Mirror, digest: str, headers: dict[str, str] | None = None) -> bytes:
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest), headers=headers)
        assert resp.status in (200, 206), await resp.text()
        return await resp.read()


def running_fill(mirror: Mirror) -> BlobFill:
    (fill,) = mirror.client.app[keys.PULLTHROUGH]._running
    return fill


def indexed(mirror: Mirror, digest: str) -> bool:
    with sqlite3.connect(mirror.cache_dir / "index.db") as db:
        rows = db.execute("SELECT COUNT(*) FROM entries WHERE digest = ?", (digest,))
        return bool(rows.fetchone()[0])


async def test_a_disk_failing_mid_download_streams_the_rest_to_every_client(
    fake: RunningFake, mirror: Mirror, disk_full_after: list[int]
) -> None:
    data = payload(12 * MIB, "the disk fills up")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.005
    disk_full_after.append(2 * MIB)
    port = mirror.client.port
    assert port is not None
    async with slow_get(port, blob_path(REPO, digest)) as behind:
        await behind.body(64 * KIB)  # it reads the file, far behind the download
        bodies = await asyncio.gather(
            get(mirror, digest),
            get(mirror, digest),
            get(mirror, digest, {"Range": "bytes=5000000-"}),
        )
        assert list(bodies) == [data, data, data[5000000:]]
        assert await behind.body(len(data)) == data
    await mirror.settled()
    assert len(fake.registry.calls("GET", "blobs")) == 1
    assert mirror.blob_files() == []
    assert mirror.tmp_files() == []
    assert not indexed(mirror, digest)
    assert await mirror.metric(WRITE_ERRORS) == 1
    assert await mirror.metric(PASSTHROUGH, reason="write-error") == 1


async def test_memory_for_an_uncached_download_is_bounded_by_its_slowest_client(
    fake: RunningFake, mirror: Mirror, disk_full_after: list[int]
) -> None:
    mirror.tune(stream_buffer=MIB)
    data = payload(64 * MIB, "bounded in memory")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 64 * KIB
    disk_full_after.append(1)  # the first write fails
    port = mirror.client.port
    assert port is not None
    async with slow_get(port, blob_path(REPO, digest)) as slow:
        await slow.body(256 * KIB)
        fill = running_fill(mirror)
        # Until the first write fails the download holds its first write batch, as
        # any download does; the bound is for the memory-only download after it.
        await wait_for(lambda: fill.streaming)
        held: list[int] = []
        for _ in range(30):  # the slow client pauses: the download must wait for it
            held.append(fill.held)
            await asyncio.sleep(0.01)
        assert max(held) <= 2 * MIB
        # The upstream is held back too. What may be sent meanwhile is the buffers
        # on the way: the first write batch (4 MiB), the reader's read_ahead (8 MiB),
        # and four loopback socket buffers (up to 6 MiB to read, 4 MiB to send, each
        # way): about 33 MiB (a bound of 32 of a 40 MiB blob once saw 34.6 sent).
        assert fake.registry.blob_bytes_sent < len(data) - 24 * MIB
        assert await slow.body(len(data)) == data
    await mirror.settled()
    assert mirror.tmp_files() == []


async def test_an_uncached_download_stops_when_its_last_client_leaves(
    fake: RunningFake, mirror: Mirror, disk_full_after: list[int]
) -> None:
    mirror.tune(stream_buffer=MIB)
    data = payload(32 * MIB, "nobody left")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 64 * KIB
    disk_full_after.append(1)
    port = mirror.client.port
    assert port is not None
    async with slow_get(port, blob_path(REPO, digest)) as slow:
        await slow.body(128 * KIB)
    await mirror.settled()  # the download was stopped, not finished for nobody
    assert fake.registry.blob_bytes_sent < len(data)
    assert mirror.tmp_files() == []
    assert mirror.blob_files() == []


async def test_a_range_of_a_blob_streamed_through_is_asked_of_the_upstream(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], cache={"max_size": "1MiB"})  # never cached
    data = payload(16 * MIB, "a late resume")
    digest = fake.registry.add_blob(data)
    start = 12 * MIB
    assert await get(mirror, digest, {"Range": f"bytes={start}-"}) == data[start:]
    ranges = [r.headers.get("Range", "") for r in fake.registry.calls("GET", "blobs")]
    assert ranges[-1] == f"bytes={start}-{len(data) - 1}"
    assert fake.registry.blob_bytes_sent < len(data)  # the whole blob was not sent again
    # An upstream that ignores the range: the mirror cuts the part out itself.
    fake.registry.faults.ignore_range = True
    resp = await mirror.client.get(blob_path(REPO, digest), headers={"Range": "bytes=100-199"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 100-199/{len(data)}"
    assert await resp.read() == data[100:200]
    assert mirror.blob_files() == []
    await wait_for(lambda: not mirror.tmp_files())


async def test_a_commit_the_disk_refuses_still_completes_every_client(
    fake: RunningFake, mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """fsync or rename failing at the very end: the file is whole, the clients finish."""

    def refuse(fd: int, tmp_path: Path, final: Path) -> None:
        raise blobs_module.CacheWriteError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(blobs_module, "_publish", refuse)
    data = payload(6 * MIB, "refused at the end")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.005
    mirror.tune(live_max=1)  # one client from memory, one from the file
    assert list(await asyncio.gather(get(mirror, digest), get(mirror, digest))) == [data, data]
    await mirror.settled()
    assert mirror.blob_files() == []
    assert mirror.tmp_files() == []
    assert await mirror.metric(WRITE_ERRORS) == 1
