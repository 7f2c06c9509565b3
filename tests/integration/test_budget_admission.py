"""Admission of a fill: the disk is asked first, and eviction only when it can help.

A blob is cached only if the filesystem has room for it (statvfs, whatever
``min_free`` says). When room must be made, the budget first checks that evicting
what is not in use can make all of it; a blob that cannot fit evicts nothing, so
the image it belongs to (manifests included) stays cached, and the blob goes to
its client straight from upstream.

The filesystem is a simulated one (``FakeDisk`` stands in for ``os.statvfs`` on the
cache directory) or a real tiny tmpfs (root only).
"""

from __future__ import annotations

import asyncio
import os
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirrorproxy.cache.index import CacheIndex, Entry
from tests.fakes.registry import OCI_MANIFEST, Image, payload
from tests.support.mirror import Mirror, MirrorFactory, RunningFake
from tests.support.mounts import Mounts
from tests.support.paths import REPO, blob_path, manifest_path
from tests.support.waiting import WAIT

KIB = 1024
MIB = 1024 * KIB
BLOCK = 4096
ACCEPT = {"Accept": OCI_MANIFEST}
EVICTIONS = "mirrorproxy_cache_evictions_total"
PASSTHROUGH = "mirrorproxy_cache_passthrough_total"
WRITE_ERRORS = "mirrorproxy_cache_write_errors_total"


@dataclass
class FakeDisk:
    """``os.statvfs`` for a simulated filesystem of ``size`` bytes under the cache.

    What is used: every file under the cache directory (content, temp files, the
    index) plus ``other`` bytes that something else keeps there.
    """

    root: Path
    size: int
    other: int = 0

    def used(self) -> int:
        return self.other + sum(p.stat().st_size for p in self.root.rglob("*") if p.is_file())

    def statvfs(self, path: str | os.PathLike[str]) -> os.statvfs_result:
        free = max(0, self.size - self.used()) // BLOCK
        fields = (BLOCK, BLOCK, self.size // BLOCK, free, free, 1000, 1000, 1000, 0, 255)
        return os.statvfs_result(fields)


def fake_disk(monkeypatch: pytest.MonkeyPatch, mirror: Mirror, size: int) -> FakeDisk:
    disk = FakeDisk(mirror.cache_dir, size)
    real = os.statvfs

    def statvfs(path: str | os.PathLike[str]) -> os.statvfs_result:
        return disk.statvfs(path) if Path(path) == mirror.cache_dir else real(path)

    monkeypatch.setattr(os, "statvfs", statvfs)
    return disk


async def pull(mirror: Mirror, digest: str) -> bytes:
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200, await resp.text()
        data = await resp.read()
    await mirror.settled()
    return data


async def cache_image(mirror: Mirror, img: Image) -> None:
    resp = await mirror.client.get(manifest_path(REPO, img.tag), headers=ACCEPT)
    assert resp.status == 200
    for digest in (img.config_digest, *img.layer_digests):
        await pull(mirror, digest)


def index_entries(mirror: Mirror) -> list[Entry]:
    index = CacheIndex(mirror.cache_dir / "index.db", read_only=True)
    try:
        return sorted(index.entries(), key=lambda e: (e.kind, e.digest))
    finally:
        index.close()


def content_files(mirror: Mirror) -> list[Path]:
    return mirror.blob_files() + mirror.manifest_files()


async def assert_image_still_cached(mirror: Mirror, fake: RunningFake, img: Image) -> None:
    """The tag, manifest and blobs are answered from the cache (no upstream request)."""
    before = len(fake.registry.requests)
    resp = await mirror.client.get(manifest_path(REPO, img.tag), headers=ACCEPT)
    assert resp.status == 200
    assert await resp.read() == img.manifest
    for digest, data in zip(
        (img.config_digest, *img.layer_digests), (img.config, *img.layers), strict=True
    ):
        assert await pull(mirror, digest) == data
    assert len(fake.registry.requests) == before


@pytest.mark.parametrize("min_free", ["0%", "10%"])
async def test_a_blob_that_cannot_fit_evicts_nothing(
    fake: RunningFake,
    start_mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    min_free: str,
) -> None:
    """2 MiB disk, 1 MiB of it taken by something else, 0.7 MiB of cache: a 1.2 MiB
    blob would need more room than evicting the whole cache could give."""
    mirror = await start_mirror([fake.url], cache={"min_free": min_free})
    disk = fake_disk(monkeypatch, mirror, 2 * MIB)
    img = fake.registry.add_image(REPO, "3", layer_sizes=(100 * KIB,))
    await cache_image(mirror, img)
    for name in ("a", "b"):
        await pull(mirror, fake.registry.add_blob(payload(300 * KIB, name)))
    files, entries = content_files(mirror), index_entries(mirror)
    assert len(files) == len(entries) == 5
    disk.other = MIB

    data = payload(1200 * KIB, "too big for this disk")
    big = fake.registry.add_blob(data)
    assert await pull(mirror, big) == data
    assert await pull(mirror, big) == data  # still not cached, still nothing evicted
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 2
    assert await mirror.metric(WRITE_ERRORS) == 0
    assert await mirror.metric_sum(EVICTIONS) == 0
    assert content_files(mirror) == files
    assert index_entries(mirror) == entries
    assert mirror.tmp_files() == []
    await assert_image_still_cached(mirror, fake, img)


async def test_min_free_zero_still_keeps_a_fill_from_filling_the_disk(
    fake: RunningFake, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without ``min_free`` a blob bigger than the free space used to be written until
    ENOSPC cut its clients; it is now seen before a byte is written."""
    mirror = await start_mirror([fake.url])
    fake_disk(monkeypatch, mirror, 512 * KIB)
    data = payload(600 * KIB, "bigger than the disk")
    digest = fake.registry.add_blob(data)
    assert await pull(mirror, digest) == data
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 1
    assert await mirror.metric(WRITE_ERRORS) == 0
    assert mirror.blob_files() == []
    assert mirror.tmp_files() == []


async def test_eviction_makes_just_the_room_a_fitting_blob_needs(
    fake: RunningFake, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """When eviction can make the room, the least recently used go, and no more."""
    mirror = await start_mirror([fake.url])
    fake_disk(monkeypatch, mirror, 2 * MIB)
    a, b, c = (fake.registry.add_blob(payload(500 * KIB, n)) for n in "abc")
    for digest in (a, b, c):
        await pull(mirror, digest)
    await pull(mirror, a)  # B is now the least recently used
    data = payload(600 * KIB, "needs one eviction")
    digest = fake.registry.add_blob(data)
    assert await pull(mirror, digest) == data
    await mirror.settled()
    cached = {f"sha256:{p.name}" for p in mirror.blob_files()}
    assert cached == {a, c, digest}
    assert await mirror.metric(EVICTIONS, kind="blob") == 1


async def test_real_small_filesystem_keeps_the_cache_when_a_blob_cannot_fit(
    mounts: Mounts, fake: RunningFake, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    """The same on a real 2 MiB tmpfs that something else half fills."""
    mnt = tmp_path / "fs"
    mounts.tmpfs(mnt, "2m")
    (mnt / "cache").mkdir()
    (tmp_path / "on-tmpfs").mkdir()
    (tmp_path / "on-tmpfs" / "cache").symlink_to(mnt / "cache")
    mirror = await start_mirror([fake.url], name="on-tmpfs")
    img = fake.registry.add_image(REPO, "3", layer_sizes=(200 * KIB,))
    await cache_image(mirror, img)
    files, entries = content_files(mirror), index_entries(mirror)
    (mnt / "other").write_bytes(b"\0" * MIB)

    data = payload(1200 * KIB, "cannot fit")
    big = fake.registry.add_blob(data)
    assert await pull(mirror, big) == data
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 1
    assert await mirror.metric(WRITE_ERRORS) == 0
    assert await mirror.metric_sum(EVICTIONS) == 0
    assert content_files(mirror) == files
    assert index_entries(mirror) == entries
    assert mirror.tmp_files() == []
    await assert_image_still_cached(mirror, fake, img)
