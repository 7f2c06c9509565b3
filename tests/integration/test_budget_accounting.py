"""The budget's accounting: reservations owned by fills, and a total that loses nothing.

A fill's reservation is its own: a failed fill that is still cleaning up cannot
free the room of the retry that replaced it. The total never drops a commit or an
eviction that happens while the periodic flush reads the index in a worker thread
(a hook holds that read open at a chosen point) or when a blob fills the disk so the
index cannot grow; a flush that fails does not stop the next one; and under a
bounded mixed load the bytes on disk stay within ``max_size`` plus one in-flight
reservation.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import random
import sqlite3
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from mirrorproxy.cache.blobs import BlobWriter, FileBlobStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.index import BLOB, CacheIndex
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import DEFAULT_TUNING
from mirrorproxy.observability.metrics import Metrics
from tests.fakes.registry import payload
from tests.support.downloads import status_and_body
from tests.support.mirror import Mirror, MirrorFactory, RunningFake, mirror_config
from tests.support.mounts import Mounts
from tests.support.paths import NS, REPO, blob_path
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MAX = 300 * KIB
BUDGET = {"max_size": "300KiB"}
SIZE = "mirrorproxy_cache_size_bytes"
PASSTHROUGH = "mirrorproxy_cache_passthrough_total"


async def pull(mirror: Mirror, digest: str) -> bytes:
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200, await resp.text()
        data = await resp.read()
    await mirror.settled()
    return data


def _sizes(paths: Iterator[Path]) -> int:
    total = 0
    for p in paths:
        with contextlib.suppress(FileNotFoundError):  # evicted or renamed meanwhile
            total += p.stat().st_size if p.is_file() else 0
    return total


def disk_bytes(mirror: Mirror) -> int:
    """Content files plus temp files: what the cache holds on disk right now."""
    root = mirror.cache_dir
    return sum(_sizes((root / sub).rglob("*")) for sub in ("blobs", "manifests", "tmp"))


def cached(mirror: Mirror) -> set[str]:
    return {f"sha256:{p.name}" for p in mirror.blob_files()}


def index_total(mirror: Mirror) -> int:
    index = CacheIndex(mirror.cache_dir / "index.db", read_only=True)
    try:
        return index.total_size()
    finally:
        index.close()


# -- item: a reservation belongs to its fill --------------------------------------------


class HeldAbort:
    """Holds the first ``BlobWriter.abort`` (a failed fill cleaning up) until released."""

    def __init__(self, monkeypatch: pytest.MonkeyPatch) -> None:
        self.entered = asyncio.Event()
        self.release = asyncio.Event()
        self.done = asyncio.Event()
        self._used = False
        real = BlobWriter.abort

        async def abort(writer: BlobWriter) -> None:
            if self._used:
                await real(writer)
                return
            self._used = True
            self.entered.set()
            await self.release.wait()
            await real(writer)
            self.done.set()  # the fill releases its reservation right after this

        monkeypatch.setattr(BlobWriter, "abort", abort)


async def fails(mirror: Mirror, digest: str) -> None:
    """A GET whose fill fails: an error status, or a body cut short."""
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        if resp.status == 200:
            with pytest.raises(aiohttp.ClientPayloadError):
                await resp.read()


async def test_a_failed_fill_cleaning_up_keeps_its_hands_off_the_retrys_room(
    fake: RunningFake, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Budget 500 KiB. X (200 KiB) fails and its fill A cleans up slowly; fill B of X
    starts meanwhile. When A is done, B's room must still be reserved, so that Y
    (350 KiB) is not cached next to B (550 KiB > 500 KiB)."""
    mirror = await start_mirror([fake.url], cache={"max_size": "500KiB"}, cooldown="1ms")
    x_data, y_data = payload(200 * KIB, "x"), payload(350 * KIB, "y")
    x, y = fake.registry.add_blob(x_data), fake.registry.add_blob(y_data)
    held = HeldAbort(monkeypatch)
    fake.registry.faults.wrong_bytes = True

    # Fill A of X fails its digest check; its cleanup is held in abort().
    await fails(mirror, x)
    await asyncio.wait_for(held.entered.wait(), WAIT)
    # Fill B of X starts meanwhile (A has left the registry) and reserves room too.
    fake.registry.faults.clear()
    fake.registry.faults.chunk_size = 16 * KIB
    fake.registry.faults.chunk_delay = 0.03
    retry = asyncio.create_task(pull(mirror, x))
    await wait_for(lambda: len(mirror.budget.reservations) == 2)
    # A finishes cleaning up: it releases its own reservation, not B's.
    held.release.set()
    await asyncio.wait_for(held.done.wait(), WAIT)
    assert [(r.digest, r.size) for r in mirror.budget.reservations] == [(x, 200 * KIB)]

    peak = 0

    async def watch() -> None:
        nonlocal peak
        while not retry.done():
            peak = max(peak, disk_bytes(mirror))
            await asyncio.sleep(0.002)

    watcher = asyncio.create_task(watch())
    assert await pull(mirror, y) == y_data  # no room next to B: streamed through
    assert await retry == x_data
    await watcher
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 1
    assert cached(mirror) == {x}
    assert peak <= 500 * KIB
    assert mirror.tmp_files() == []
    assert mirror.budget.reservations == frozenset()
    assert await mirror.metric(SIZE) == 200 * KIB == index_total(mirror)


# -- item: the flush never loses a concurrent commit or eviction ------------------------


class PausedIndexRead:
    """Holds the flush's read of the index (in its worker thread) open, once.

    ``when`` is "before" (the read waits, then runs) or "after" (it ran, and the
    flush waits to apply it): the test changes the cache while it is held.
    """

    def __init__(self, monkeypatch: pytest.MonkeyPatch, when: str) -> None:
        loop = asyncio.get_running_loop()
        self.reading = asyncio.Event()
        self.go = threading.Event()
        self._used = False
        real: Callable[[CacheIndex], int] = CacheIndex.external_change

        def hold() -> None:
            loop.call_soon_threadsafe(self.reading.set)
            assert self.go.wait(WAIT)

        def external_change(index: CacheIndex) -> int:
            if self._used:
                return real(index)
            self._used = True
            if when == "before":
                hold()
                return real(index)
            change = real(index)
            hold()
            return change

        monkeypatch.setattr(CacheIndex, "external_change", external_change)


@pytest.mark.parametrize("when", ["before", "after"])
@pytest.mark.parametrize(
    ("first", "second", "evicts"),
    [(100 * KIB, 100 * KIB, False), (150 * KIB, 200 * KIB, True)],
    ids=["commit", "commit-and-evict"],
)
async def test_the_flush_loses_no_change_made_while_it_reads_the_index(
    fake: RunningFake,
    start_mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    when: str,
    first: int,
    second: int,
    evicts: bool,
) -> None:
    mirror = await start_mirror([fake.url], cache=BUDGET)
    a = fake.registry.add_blob(payload(first, "a"))
    b = fake.registry.add_blob(payload(second, "b"))
    await pull(mirror, a)
    paused = PausedIndexRead(monkeypatch, when)

    flush = asyncio.create_task(mirror.budget.flush())
    await asyncio.wait_for(paused.reading.wait(), WAIT)
    assert await pull(mirror, b) == payload(second, "b")  # commits (and evicts) now
    paused.go.set()
    await asyncio.wait_for(flush, WAIT)

    expected = second if evicts else first + second
    assert cached(mirror) == ({b} if evicts else {a, b})
    assert disk_bytes(mirror) == expected
    assert index_total(mirror) == expected
    assert await mirror.metric(SIZE) == expected
    await mirror.budget.flush()  # and the next flush agrees
    assert await mirror.metric(SIZE) == expected


@pytest.mark.parametrize("when", ["before", "after"])
async def test_the_flush_picks_up_another_process_while_the_server_commits(
    fake: RunningFake, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch, when: str
) -> None:
    """``cache prune`` removes A while the server commits B: both are counted once."""
    mirror = await start_mirror([fake.url], cache=BUDGET)
    a = fake.registry.add_blob(payload(100 * KIB, "a"))
    b = fake.registry.add_blob(payload(120 * KIB, "b"))
    await pull(mirror, a)
    paused = PausedIndexRead(monkeypatch, when)

    flush = asyncio.create_task(mirror.budget.flush())
    await asyncio.wait_for(paused.reading.wait(), WAIT)
    other = CacheIndex(mirror.cache_dir / "index.db")
    try:
        entry = other.get(BLOB, a)
        assert entry is not None
        assert other.drop(entry, then=mirror.blob_path(a).unlink)
    finally:
        other.close()
    assert await pull(mirror, b) == payload(120 * KIB, "b")
    paused.go.set()
    await asyncio.wait_for(flush, WAIT)
    await mirror.budget.flush()  # "before": the prune may land in this one

    assert cached(mirror) == {b}
    assert await mirror.metric(SIZE) == 120 * KIB == index_total(mirror) == disk_bytes(mirror)


async def test_blob_published_on_a_full_disk_is_accounted(
    mounts: Mounts, fake: RunningFake, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    """A blob that fills the disk to its last block (the index cannot grow) is counted
    once there is room again."""
    mnt = tmp_path / "fs"
    mounts.tmpfs(mnt, "2m")
    (mnt / "cache").mkdir()
    (tmp_path / "on-tmpfs").mkdir()
    (tmp_path / "on-tmpfs" / "cache").symlink_to(mnt / "cache")
    mirror = await start_mirror([fake.url], name="on-tmpfs")
    warm = fake.registry.add_blob(payload(KIB, "warm"))  # creates the index's WAL
    assert (await status_and_body(mirror, warm))[0] == 200
    st = os.statvfs(mnt)
    (mnt / "ballast").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 8 * KIB))
    st = os.statvfs(mnt)
    data = payload(st.f_bavail * st.f_frsize - 100, "fills the disk")  # all but the index
    digest = fake.registry.add_blob(data)
    assert await status_and_body(mirror, digest) == (200, data)
    assert mirror.blob_path(digest).exists()
    (mnt / "ballast").unlink()
    await mirror.budget.flush()
    assert await mirror.metric(SIZE) == KIB + len(data)


async def test_flusher_survives_a_failed_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A failed flush of the index (a full disk) does not stop the flusher: the next
    one records the use."""
    config = mirror_config(tmp_path / "cache", ["http://127.0.0.1:9"])
    blobs = FileBlobStore(config.cache.dir)
    manifests = FileManifestStore(config.cache.dir)
    blobs.prepare()
    manifests.prepare()
    budget = CacheBudget(config.cache, blobs=blobs, manifests=manifests, metrics=Metrics())
    budget.open()
    assert budget.index is not None
    digest = Digest.of(b"x")
    budget.index.add(BLOB, str(digest), 1, NS)
    failures = [sqlite3.OperationalError("database or disk is full")]
    real_touch = CacheIndex.touch_many

    def touch_many(self: CacheIndex, used: dict[tuple[str, str], float]) -> None:
        if failures:
            raise failures.pop()
        real_touch(self, used)

    monkeypatch.setattr(CacheIndex, "touch_many", touch_many)
    budget.flush_interval = 0.01
    flusher = asyncio.create_task(budget.run_flusher())
    try:
        budget.touch(BLOB, digest)
        await wait_for(lambda: not failures or flusher.done())
        used_at = time.time()
        budget.touch(BLOB, digest)  # the disk has room again
        await asyncio.sleep(0.1)
        assert not flusher.done()
        entry = budget.index.get(BLOB, str(digest))
        assert entry is not None
        assert entry.last_used >= used_at
    finally:
        flusher.cancel()
        with contextlib.suppress(BaseException):
            await flusher
        budget.index.close()


# -- a bounded mixed load ----------------------------------------------------------------


async def test_mixed_load_keeps_disk_within_max_size_plus_one_reservation(
    fake: RunningFake, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Six clients pull 150 times from 12 blobs (40-120 KiB) through a 300 KiB cache,
    with the index flushed every 10 ms; the disk is sampled every couple of ms."""
    mirror = await start_mirror(
        [fake.url], cache=BUDGET, tuning=replace(DEFAULT_TUNING, index_flush=0.01)
    )
    rng = random.Random(14)  # noqa: S311 -- reproducible, not secret
    blobs = {}
    for i in range(12):
        data = payload(rng.randrange(40, 121) * KIB, f"mixed {i}")
        blobs[fake.registry.add_blob(data)] = data
    largest = max(len(d) for d in blobs.values())
    fake.registry.faults.chunk_size = 16 * KIB
    fake.registry.faults.chunk_delay = 0.002
    digests = sorted(blobs)
    peak = 0
    over_budget: list[int] = []
    stop = asyncio.Event()

    async def watch() -> None:
        nonlocal peak
        while not stop.is_set():
            peak = max(peak, disk_bytes(mirror))
            budget = mirror.budget
            promised = budget.total + sum(r.size for r in budget.reservations)
            if promised > MAX:
                over_budget.append(promised)
            await asyncio.sleep(0.002)

    async def client(seed: int) -> None:
        picks = random.Random(seed)  # noqa: S311 -- reproducible, not secret
        for _ in range(25):
            digest = picks.choice(digests)
            async with asyncio.timeout(WAIT):
                resp = await mirror.client.get(blob_path(REPO, digest))
                assert resp.status == 200
                assert await resp.read() == blobs[digest]

    watcher = asyncio.create_task(watch())
    try:
        async with asyncio.timeout(60):
            await asyncio.gather(*(client(seed) for seed in range(6)))
    finally:
        stop.set()
        await watcher
    await mirror.settled()
    await mirror.budget.flush()

    assert peak <= MAX + largest
    assert over_budget == []
    assert mirror.tmp_files() == []
    on_disk = disk_bytes(mirror)
    assert 0 < on_disk <= MAX
    assert await mirror.metric(SIZE) == on_disk == index_total(mirror)


async def test_a_member_accounts_only_for_the_digests_it_owns_within_its_share(
    tmp_path: Path,
) -> None:
    """The cluster seam: ``owns`` limits what is counted and evicted, ``share`` the budget."""
    config = mirror_config(tmp_path / "cache", ["http://127.0.0.1:9"], cache={"max_size": "10KiB"})
    blobs = FileBlobStore(config.cache.dir)
    manifests = FileManifestStore(config.cache.dir)
    blobs.prepare()
    manifests.prepare()
    mine, theirs = payload(KIB, "mine"), payload(2 * KIB, "theirs")
    for data in (mine, theirs):
        writer = blobs.begin(Digest.of(data))
        await writer.write(data)
        await writer.commit()
    owned = {Digest.of(mine)}
    budget = CacheBudget(
        config.cache,
        blobs=blobs,
        manifests=manifests,
        metrics=Metrics(),
        owns=owned.__contains__,
        share=0.5,
    )
    budget.open()
    try:
        assert budget.total == KIB  # the other member's blob is not counted
        assert budget.limit == 5 * KIB
        assert budget.reserve(Digest.of(b"big"), 6 * KIB).refused == "budget"
        budget.committed(BLOB, Digest.of(theirs), 2 * KIB, NS)
        assert budget.total == KIB
    finally:
        await budget.close()
