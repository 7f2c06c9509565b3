"""Regressions for cache bugs the budget/fault tests found (all fixed).

Tag pulls survive an unwritable cache; manifests are counted as stored; a read-only
full cache streams through; stream-throughs name the broken disk; the index flusher
survives errors; a blob published on a full disk is still accounted; stray files
that are not digests are ignored.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import sqlite3
import time
from pathlib import Path

import pytest

from mirrorproxy.cache import budget as budget_module
from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.index import BLOB, CacheIndex
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.cli import main
from mirrorproxy.core.oci import Digest
from mirrorproxy.observability.metrics import Metrics
from tests.fakes.registry import OCI_MANIFEST, payload
from tests.support.mirror import Mirror, MirrorFactory, RunningFake, mirror_config
from tests.support.mounts import Mounts
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.procs import mirror_config as toml_config
from tests.support.waiting import WAIT, wait_for

KIB = 1024
DAY = 86400.0
ACCEPT = {"Accept": OCI_MANIFEST}
SIZE = "mirrorproxy_cache_size_bytes"
PASSTHROUGH = "mirrorproxy_cache_passthrough_total"


async def pull(mirror: Mirror, digest: str) -> tuple[int, bytes]:
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        out = resp.status, await resp.read()
    await mirror.settled()  # the last byte goes out a moment before the rename
    return out


def break_tmp(mirror: Mirror) -> None:
    """Replace ``<cache>/tmp`` by a regular file: creating temp files fails (ENOTDIR)."""
    shutil.rmtree(mirror.cache_dir / "tmp")
    (mirror.cache_dir / "tmp").write_bytes(b"not a directory")


@pytest.mark.parametrize("cached_before", [False, True])
async def test_tag_pulls_survive_an_unwritable_cache(
    fake: RunningFake, start_mirror: MirrorFactory, cached_before: bool
) -> None:
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
    one, two = (fake.registry.add_blob(payload(10 * KIB, n)) for n in ("one", "two"))
    mirror.budget.write_retry = 30.0
    break_tmp(mirror)
    assert (await pull(mirror, one))[0] == 200
    assert (await pull(mirror, two))[0] == 200
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 0
    assert await mirror.metric(PASSTHROUGH, reason="write-error") == 2


# -- manifest accounting: body length in the server, file size in reconcile ------------


async def cache_an_image(mirror: Mirror, fake: RunningFake) -> None:
    img = fake.registry.add_image(REPO, "3", layer_sizes=(2000,))
    assert (await mirror.client.get(manifest_path(REPO, "3"), headers=ACCEPT)).status == 200
    for digest in (img.config_digest, *img.layer_digests):
        assert (await pull(mirror, digest))[0] == 200
    await wait_for(lambda: len(mirror.blob_files()) == 2)


async def test_restart_reports_the_same_cache_size_with_manifests(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    first = await start_mirror([fake.url])
    await cache_an_image(first, fake)
    before = await first.metric(SIZE)
    await first.client.close()
    second = await start_mirror([fake.url])
    assert await second.metric(SIZE) == before


async def test_cache_du_attributes_manifests_to_their_namespace(
    fake: RunningFake, mirror: Mirror, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await cache_an_image(mirror, fake)
    config = tmp_path / "cli.toml"
    config.write_text(toml_config(5000, mirror.cache_dir, {NS: [fake.url]}))
    assert main(["cache", "du", "--config", str(config)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert [row[0] for row in rows] == [NS]  # no "(unknown)" row
    assert rows[0][3] == "1"  # one manifest


async def test_prune_older_than_keeps_a_manifest_in_use(
    fake: RunningFake, mirror: Mirror, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest written long ago but pulled today is not 'older than 30d'."""
    img = fake.registry.add_image(REPO, "3")
    resp = await mirror.client.get(manifest_path(REPO, img.digest))
    assert resp.status == 200
    manifest_file = mirror.manifest_file(img.digest)
    written = time.time() - 40 * DAY
    os.utime(manifest_file, (written, written))
    await mirror.budget.flush()
    config = tmp_path / "cli.toml"
    config.write_text(toml_config(5000, mirror.cache_dir, {NS: [fake.url]}))
    assert main(["cache", "prune", "--config", str(config), "--older-than", "30d"]) == 0
    capsys.readouterr()
    assert manifest_file.exists()


# -- a read-only cache that is also full --------------------------------------------


async def test_read_only_full_cache_streams_through(
    mounts: Mounts, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], cache={"max_size": "300KiB"})
    old, new = (fake.registry.add_blob(payload(200 * KIB, n)) for n in ("old", "new"))
    assert (await pull(mirror, old))[0] == 200
    mounts.read_only(mirror.cache_dir)
    status, body = await pull(mirror, new)  # needs old's room: eviction fails (EROFS)
    assert status == 200
    assert body == payload(200 * KIB, "new")


# -- the index on a full disk ----------------------------------------------------------


async def test_blob_published_on_a_full_disk_is_accounted(
    mounts: Mounts, fake: RunningFake, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mnt = tmp_path / "fs"
    mounts.tmpfs(mnt, "2m")
    (mnt / "cache").mkdir()
    (tmp_path / "on-tmpfs").mkdir()
    (tmp_path / "on-tmpfs" / "cache").symlink_to(mnt / "cache")
    mirror = await start_mirror([fake.url], name="on-tmpfs")
    warm = fake.registry.add_blob(payload(KIB, "warm"))  # creates the index's WAL
    assert (await pull(mirror, warm))[0] == 200
    st = os.statvfs(mnt)
    (mnt / "ballast").write_bytes(b"\0" * (st.f_bavail * st.f_frsize - 8 * KIB))
    st = os.statvfs(mnt)
    data = payload(st.f_bavail * st.f_frsize - 100, "fills the disk")  # all but the index
    digest = fake.registry.add_blob(data)
    assert await pull(mirror, digest) == (200, data)
    assert mirror.blob_path(digest).exists()
    (mnt / "ballast").unlink()
    await mirror.budget.flush()
    assert await mirror.metric(SIZE) == KIB + len(data)


async def test_flusher_survives_a_failed_flush(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
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
    monkeypatch.setattr(budget_module, "FLUSH_INTERVAL", 0.01)
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


def test_reconcile_ignores_names_that_are_not_hex(tmp_path: Path) -> None:
    stray = tmp_path / "blobs" / "sha256" / "zz" / ("zz" * 32)
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not ours")
    index = CacheIndex(tmp_path / "index.db")
    try:
        assert index.reconcile(tmp_path) == (0, 0)
    finally:
        index.close()
