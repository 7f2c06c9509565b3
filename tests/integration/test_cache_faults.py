"""Faults around the cache: an unwritable or full disk, wrong bytes, cut connections,
slow clients, and a real tiny tmpfs that fills up or turns read-only.

The mirror must keep answering (streaming blobs through when it cannot cache them),
say so in logs and metrics, never keep a partial file, and recover by itself. The
cache is broken the way a host breaks it: ``tmp/`` replaced by a file (so creating a
temp file fails with ENOTDIR), ``_write_all`` failing with ENOSPC midway, or a
real tmpfs mounted small or remounted read-only (root only; see ``tmpfs``). The
download's disk writer is checked under a held disk (the ``disk`` fixture) at
shutdown, with a disk error that surfaces late, and beside an upstream that stalls:
each failure must be reported as what it is.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import shutil
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from mirrorproxy.core.oci import Digest
from mirrorproxy.http import keys
from tests.fakes.registry import OCI_MANIFEST, payload
from tests.support.downloads import Disk, fill_of, get, get_or_cut, status_and_body, writer_of
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.mounts import Mounts
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.rawhttp import slow_get
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB
PASSTHROUGH = "mirrorproxy_cache_passthrough_total"
WRITE_ERRORS = "mirrorproxy_cache_write_errors_total"
MISMATCHES = "mirrorproxy_digest_mismatches_total"
SIZE = "mirrorproxy_cache_size_bytes"
ACCEPT = {"Accept": OCI_MANIFEST}
# Seconds the mirror streams through after a failed write before it tries the disk
# again: long enough for a test's "meanwhile" steps, short enough to wait out.
WRITE_RETRY = 1.0


async def pull(mirror: Mirror, digest: str) -> bytes:
    """GET a blob through the mirror (bounded), expecting a 200."""
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200, await resp.text()
        data = await resp.read()
    await mirror.settled()  # the last byte goes out a moment before the rename
    return data


async def cut_short(mirror: Mirror, digest: str) -> None:
    """The client gets a 200 whose body ends early: a clean, detectable failure."""
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def pull_until_cached(mirror: Mirror, digest: str, data: bytes) -> int:
    """Pull (always getting the right bytes) until the blob lands in the cache.

    Returns:
        How many pulls it took.
    """
    pulls = 0
    async with asyncio.timeout(WAIT):
        while True:
            assert await pull(mirror, digest) == data
            pulls += 1
            if mirror.blob_path(digest).exists():
                return pulls
            await asyncio.sleep(0.05)


def break_tmp(mirror: Mirror) -> None:
    """Replace ``<cache>/tmp`` by a regular file: creating temp files fails (ENOTDIR)."""
    tmp = mirror.cache_dir / "tmp"
    shutil.rmtree(tmp)
    tmp.write_bytes(b"not a directory")


def repair_tmp(mirror: Mirror) -> None:
    tmp = mirror.cache_dir / "tmp"
    tmp.unlink()
    tmp.mkdir()


def error_logs(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]


async def test_unwritable_cache_streams_through_and_recovers(
    fake: RunningFake, mirror: Mirror, caplog: pytest.LogCaptureFixture
) -> None:
    img = fake.registry.add_image(REPO, "3", layer_sizes=(300 * KIB,))
    (layer,) = img.layers
    (digest,) = img.layer_digests
    mirror.budget.write_retry = WRITE_RETRY
    break_tmp(mirror)

    assert await pull(mirror, digest) == layer
    assert not mirror.blob_path(digest).exists()
    assert await mirror.metric(PASSTHROUGH, reason="write-error") == 1
    assert await mirror.metric(WRITE_ERRORS) == 1
    assert any("cache write failed" in m and "streaming" in m for m in error_logs(caplog))
    # Manifests by digest are still answered (a write error each, not cached). By
    # tag they are not: see test_cache_found_bugs.py.
    resp = await mirror.client.get(manifest_path(REPO, img.digest))
    assert resp.status == 200
    assert await resp.read() == img.manifest
    assert await mirror.metric(WRITE_ERRORS) == 2
    assert mirror.manifest_files() == []
    # While the disk is out, further blobs keep flowing (uncached) to every client.
    bodies = await asyncio.gather(*(pull(mirror, digest) for _ in range(3)))
    assert bodies == [layer] * 3
    assert await mirror.metric_sum(PASSTHROUGH) >= 2
    assert mirror.blob_files() == []

    repair_tmp(mirror)
    await pull_until_cached(mirror, digest, layer)
    assert mirror.blob_path(digest).read_bytes() == layer
    assert mirror.tmp_files() == []
    assert await mirror.metric(SIZE) >= len(layer)
    gets = len(fake.registry.calls("GET", "blobs"))
    assert await pull(mirror, digest) == layer  # a plain hit now
    assert len(fake.registry.calls("GET", "blobs")) == gets


@pytest.mark.parametrize("cached_before", [False, True])
async def test_tag_pulls_survive_an_unwritable_cache(
    fake: RunningFake, start_mirror: MirrorFactory, cached_before: bool
) -> None:
    """A tag pull, new or revalidating a stale tag, is answered when nothing can be
    written to the cache."""
    img = fake.registry.add_image(REPO, "3")
    mirror = await start_mirror([fake.url], tag_ttl="1ms")
    if cached_before:  # a stale tag is revalidated with a HEAD, then re-recorded
        assert (await mirror.client.get(manifest_path(REPO, "3"), headers=ACCEPT)).status == 200
        await asyncio.sleep(0.01)
    break_tmp(mirror)
    resp = await mirror.client.get(manifest_path(REPO, "3"), headers=ACCEPT)
    assert resp.status == 200, await resp.text()
    assert await resp.read() == img.manifest


async def test_passthrough_while_the_disk_is_broken_is_counted_as_write_error(
    fake: RunningFake, mirror: Mirror
) -> None:
    """Blobs streamed through because the disk is broken count as ``write-error``, not
    ``budget``."""
    one, two = (fake.registry.add_blob(payload(10 * KIB, n)) for n in ("one", "two"))
    mirror.budget.write_retry = 30.0
    break_tmp(mirror)
    assert (await status_and_body(mirror, one))[0] == 200
    assert (await status_and_body(mirror, two))[0] == 200
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 0
    assert await mirror.metric(PASSTHROUGH, reason="write-error") == 2


async def test_disk_full_mid_fill(
    fake: RunningFake,
    mirror: Mirror,
    disk_full_after: list[int],
    caplog: pytest.LogCaptureFixture,
) -> None:
    data = payload(12 * MIB, "disk full")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.005
    mirror.budget.write_retry = WRITE_RETRY
    disk_full_after.append(MIB + 1)

    # The clients of the fill that hit the full disk get the rest from memory,
    # verified; nothing partial stays behind.
    assert list(await asyncio.gather(pull(mirror, digest), pull(mirror, digest))) == [data, data]
    await wait_for(lambda: not mirror.tmp_files())
    assert mirror.blob_files() == []
    assert await mirror.metric(WRITE_ERRORS) == 1
    assert any("No space left on device" in m for m in error_logs(caplog))
    assert await mirror.metric(SIZE) == 0
    assert len(fake.registry.calls("GET", "blobs")) == 1

    # A retry is streamed through while the disk is considered full...
    assert await pull(mirror, digest) == data
    assert await mirror.metric_sum(PASSTHROUGH) == 2
    assert mirror.blob_files() == []

    # ... and once space is back, caching resumes by itself.
    disk_full_after.clear()
    await pull_until_cached(mirror, digest, data)
    assert mirror.blob_path(digest).read_bytes() == data
    assert mirror.tmp_files() == []
    assert await mirror.metric(SIZE) == len(data)


async def test_failed_fills_release_their_room_in_the_budget(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    """Cut and corrupt downloads leave no partial file and no leaked reservation."""
    mirror = await start_mirror([fake.url], cache={"max_size": "300KiB"})
    cut, wrong, after = (
        fake.registry.add_blob(payload(250 * KIB, name)) for name in ("cut", "wrong", "after")
    )
    fake.registry.faults.cut_after = 16 * KIB  # every response, resumes included
    await cut_short(mirror, cut)
    await mirror.settled()  # the failed fill lets go of its room as it ends
    fake.registry.faults.clear()
    fake.registry.faults.wrong_bytes = True
    await cut_short(mirror, wrong)
    await mirror.settled()
    fake.registry.faults.clear()
    await wait_for(lambda: not mirror.tmp_files())
    assert mirror.blob_files() == []
    assert await mirror.metric(SIZE) == 0

    # 250 KiB still fits a 300 KiB budget: nothing of the failures is held.
    assert await pull(mirror, after) == payload(250 * KIB, "after")
    assert mirror.blob_path(after).exists()
    assert await mirror.metric_sum(PASSTHROUGH) == 0
    assert await mirror.metric(SIZE) == 250 * KIB


async def test_wrong_bytes_cool_the_endpoint_down_and_the_next_one_serves(
    start_fake: FakeFactory, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    one, two = await start_fake(), await start_fake()
    data = payload(200 * KIB, "liar")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    one.registry.faults.wrong_bytes = True
    mirror = await start_mirror([one.url, two.url], cooldown="1s")

    await cut_short(mirror, digest)
    assert await mirror.metric(MISMATCHES, namespace=NS) == 1
    (logged,) = [m for m in error_logs(caplog) if "discarded" in m]
    assert digest in logged
    assert one.url.rstrip("/") in logged  # which endpoint lied
    await wait_for(lambda: not mirror.tmp_files())
    assert mirror.blob_files() == []

    # The liar is in cooldown: the retry goes to the second endpoint and is cached.
    assert await pull(mirror, digest) == data
    assert len(one.registry.calls("GET", "blobs")) == 1
    assert len(two.registry.calls("GET", "blobs")) == 1
    await wait_for(mirror.blob_path(digest).exists)
    assert mirror.blob_path(digest).read_bytes() == data
    assert await mirror.metric("mirrorproxy_upstream_up", namespace=NS, endpoint=one.url) == 0


async def test_a_slow_client_does_not_slow_the_others(fake: RunningFake, mirror: Mirror) -> None:
    data = payload(6 * MIB, "shared")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.005
    port = mirror.client.port
    assert port is not None

    # The client that starts the download reads its headers, then nothing more.
    async with slow_get(port, blob_path(REPO, digest)) as slow:
        # Fast clients joining the same fetch finish, and so does the fill.
        bodies = await asyncio.gather(*(pull(mirror, digest) for _ in range(3)))
        assert bodies == [data] * 3
        await wait_for(mirror.blob_path(digest).exists)
        assert len(fake.registry.calls("GET", "blobs")) == 1

        # The slow one still gets every byte, at its own pace.
        assert await slow.body(len(data)) == data


# -- the disk writer under faults: shutdown, late errors, upstream stalls ----------


class _LaggingHash:
    """sha256 whose updates wait for ``go``: a hashing thread far behind the download."""

    def __init__(self, algorithm: str, go: threading.Event) -> None:
        self._hash = hashlib.new(algorithm)
        self._go = go

    def update(self, data: Any) -> None:
        self._go.wait(WAIT)
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@pytest.fixture
def hash_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    """Make every hash update wait until the returned event is set."""
    go = threading.Event()

    def hasher(self: Digest) -> Any:
        return _LaggingHash(self.algorithm, go)

    monkeypatch.setattr(Digest, "hasher", hasher)
    yield go
    go.set()


async def _shut_down_during_commit(
    fake: RunningFake, mirror: Mirror, disk: Disk, monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> None:
    """A client got its (verified) blob from memory; the disk is still writing it when
    the server stops and the shutdown grace runs out."""
    mirror.tune(shutdown_grace=0.05)
    data = payload(MIB, "shutdown while the disk writes")
    digest = fake.registry.add_blob(data)
    assert await get(mirror, digest) == data
    fill_of(mirror, digest)  # still committing: waiting for the stalled write
    close = asyncio.create_task(mirror.client.app[keys.PULLTHROUGH].close())
    await asyncio.sleep(0.3)  # the grace ran out: the fill is cancelled
    victim = os.open(tmp / "victim", os.O_RDWR | os.O_CREAT, 0o600)  # takes a free fd
    try:
        disk.go.set()
        await wait_for(lambda: disk.finished == disk.started)
        async with asyncio.timeout(WAIT):
            await close
    finally:
        os.close(victim)


async def test_shutdown_never_closes_the_descriptor_under_a_running_write(
    fake: RunningFake,
    mirror: Mirror,
    disk: Disk,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    """At shutdown, a cancelled download's file descriptor stays open until the write job
    running on it ends: a reused descriptor would take bytes meant for the blob."""
    await _shut_down_during_commit(fake, mirror, disk, monkeypatch, tmp_path)
    assert disk.misuse == []  # once: ['fd N now refers to .../victim']


async def test_a_cancelled_write_fails_the_writer_cleanly(
    fake: RunningFake,
    mirror: Mirror,
    disk: Disk,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A write cancelled at shutdown ends its writer without an exception in a loop callback."""
    await _shut_down_during_commit(fake, mirror, disk, monkeypatch, tmp_path)
    crashed = [r.getMessage() for r in caplog.records if "Exception in callback" in r.getMessage()]
    assert crashed == []


async def test_a_late_disk_error_is_not_taken_for_a_digest_mismatch(
    fake: RunningFake,
    mirror: Mirror,
    disk: Disk,
    hash_gate: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """A disk error noticed after the whole body arrived is a write error, not a digest
    mismatch: the upstream stays up and the client gets the verified blob from memory."""
    mirror.tune(write_batch=256 * KIB)
    data = payload(MIB, "late enospc")
    digest = fake.registry.add_blob(data)
    disk.fail_from = 256 * KIB  # the second batch hits a full disk
    pull = asyncio.create_task(get_or_cut(mirror, digest))

    # Every batch is queued (the pump is done) while the disk and the hash lag behind.
    await wait_for(lambda: bool(mirror.client.app[keys.PULLTHROUGH]._fills))
    fill = fill_of(mirror, digest)
    await wait_for(lambda: fill._writer is not None)  # after the upstream's 200
    writer = writer_of(fill)
    await wait_for(lambda: writer.queued == len(data))
    disk.go.set()
    await wait_for(lambda: writer._failure is not None)  # the disk said ENOSPC
    hash_gate.set()

    body = await pull
    await mirror.settled()  # the client is served before the fill reports the disk's failure
    assert await mirror.metric(MISMATCHES, namespace=NS) == 0  # upstream sent good bytes
    assert await mirror.metric(WRITE_ERRORS) == 1
    assert await mirror.metric("mirrorproxy_upstream_up", namespace=NS, endpoint=fake.url) == 1
    assert body == data  # verified from memory, as with a disk error on the last batch


async def test_upstream_timeouts_are_not_cache_write_errors(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    """An upstream stalling mid-body is an upstream failure (resumed, then given up), never
    a cache write error or a stream-through; the next pull caches the blob."""
    data = payload(512 * KIB, "stalls")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 64 * KIB
    fake.registry.faults.chunk_delay = 0.5  # every response stalls after one chunk
    mirror = await start_mirror([fake.url], read_timeout="100ms")

    assert await get_or_cut(mirror, digest) is None
    await mirror.settled()
    assert len(fake.registry.calls("GET", "blobs")) == mirror.fill_tuning.max_resumes + 1
    fake.registry.faults.clear()
    assert await get(mirror, digest) == data
    await mirror.settled()
    assert await mirror.metric(WRITE_ERRORS) == 0
    assert await mirror.metric_sum(PASSTHROUGH) == 0  # once: 30 s of uncached streaming
    assert mirror.blob_path(digest).exists()


# -- real filesystems: a tiny tmpfs, a read-only bind mount --------------------------


@pytest.fixture
def tmpfs_cache(mounts: Mounts, tmp_path: Path) -> Path:
    """A 2 MiB tmpfs holding the cache of ``start_mirror(..., name="on-tmpfs")``."""
    mnt = tmp_path / "fs"
    mounts.tmpfs(mnt, "2m")
    (mnt / "cache").mkdir()
    (tmp_path / "on-tmpfs").mkdir()
    (tmp_path / "on-tmpfs" / "cache").symlink_to(mnt / "cache")  # the config resolves it
    return mnt


async def test_real_full_disk_is_seen_before_the_fill_and_streams_through(
    tmpfs_cache: Path,  # first: unmounted after the mirror is closed
    fake: RunningFake,
    start_mirror: MirrorFactory,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mirror = await start_mirror([fake.url], name="on-tmpfs")
    assert mirror.cache_dir == tmpfs_cache / "cache"
    data = payload(MIB, "real enospc")
    digest = fake.registry.add_blob(data)
    ballast = tmpfs_cache / "ballast"  # something else filled the disk
    ballast.write_bytes(b"\0" * (1536 * KIB))

    # The free space is checked before a byte is written (min_free is 0): the blob
    # goes to its client uncached, and the disk is never written to the brim.
    assert await pull(mirror, digest) == data
    assert await mirror.metric(WRITE_ERRORS) == 0
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 1
    assert error_logs(caplog) == []
    assert mirror.tmp_files() == []
    assert mirror.blob_files() == []
    assert await pull(mirror, digest) == data  # streamed through meanwhile
    assert await mirror.metric_sum(PASSTHROUGH) == 2  # the fill that hit the disk, the retry

    ballast.unlink()  # room again: the next pull caches it
    assert await pull_until_cached(mirror, digest, data) == 1
    assert mirror.blob_path(digest).read_bytes() == data
    assert mirror.tmp_files() == []


async def test_real_read_only_cache_streams_through_and_recovers(
    mounts: Mounts,  # first: unmounted after the mirror is closed
    fake: RunningFake,
    mirror: Mirror,
    caplog: pytest.LogCaptureFixture,
) -> None:
    mirror.budget.write_retry = WRITE_RETRY
    kept, fresh = (payload(200 * KIB, name) for name in ("kept", "fresh"))
    kept_digest = fake.registry.add_blob(kept)
    fresh_digest = fake.registry.add_blob(fresh)
    await pull(mirror, kept_digest)
    await wait_for(mirror.blob_path(kept_digest).exists)

    mounts.read_only(mirror.cache_dir)
    try:
        gets = len(fake.registry.calls("GET", "blobs"))
        assert await pull(mirror, kept_digest) == kept  # hits are still served
        assert len(fake.registry.calls("GET", "blobs")) == gets
        assert await pull(mirror, fresh_digest) == fresh  # misses are streamed through
        assert await pull(mirror, fresh_digest) == fresh
        assert not mirror.blob_path(fresh_digest).exists()
        assert await mirror.metric(PASSTHROUGH, reason="write-error") >= 1
        assert await mirror.metric_sum(PASSTHROUGH) == 2
        assert await mirror.metric(WRITE_ERRORS) == 1
        assert any("Read-only file system" in m for m in error_logs(caplog))
    finally:
        mounts.undo(mirror.cache_dir)
    await pull_until_cached(mirror, fresh_digest, fresh)
    assert mirror.blob_path(fresh_digest).read_bytes() == fresh


async def test_read_only_full_cache_streams_through(
    mounts: Mounts, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    """A full cache that turned read-only cannot evict: a new blob streams through."""
    mirror = await start_mirror([fake.url], cache={"max_size": "300KiB"})
    old, new = (fake.registry.add_blob(payload(200 * KIB, n)) for n in ("old", "new"))
    assert (await status_and_body(mirror, old))[0] == 200
    mounts.read_only(mirror.cache_dir)
    status, body = await status_and_body(mirror, new)  # needs old's room: eviction fails (EROFS)
    assert status == 200
    assert body == payload(200 * KIB, "new")
