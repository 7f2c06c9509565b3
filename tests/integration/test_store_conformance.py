"""The store contract, checked once for every backend (``mirrorproxy.cache``'s Protocols).

Every test sees only ``Stores`` (a ``BlobStore`` and a ``ManifestStore``) and the
few things a backend fixture must say about itself: how to open a second view of
the same storage (another process), how to damage a stored object in place (rot),
and which partial objects it holds (temp files, unfinished uploads). A new backend
joins by adding a factory to ``BACKENDS``; it is done when this file passes.
"""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pytest

from mirrorproxy.cache import (
    BLOB,
    MANIFEST,
    BlobWriterProto,
    DigestMismatch,
    StoredManifest,
    TagEntry,
)
from mirrorproxy.cache.files import content_path
from mirrorproxy.cache.s3client import S3Connection
from mirrorproxy.cache.s3content import S3Content
from mirrorproxy.cache.stores import Stores, open_stores
from mirrorproxy.config import CacheConfig, StorageConfig
from mirrorproxy.core.oci import OCI_INDEX, OCI_MANIFEST, Digest
from tests.support.seaweed import SeaweedFS

KIB = 1024
NS, REPO = "docker.io", "library/alpine"
WAIT = 10.0  # seconds a bounded wait may take on a loaded machine


@dataclass
class Backend:
    """One backend under test and what the suite must know about it."""

    stores: Stores
    reopen: Callable[[], Stores]  # another running process's view of the same storage
    damage: Callable[[str, Digest], None]  # flip one stored byte of an object in place
    leftovers: Callable[[], list[str]]  # partial objects the storage holds right now
    opened: list[Stores] = field(default_factory=list)  # closed after the test


def _filesystem(tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    config = CacheConfig(dir=tmp_path / "cache")

    def reopen() -> Stores:
        return open_stores(config)

    def damage(kind: str, digest: Digest) -> None:
        path = content_path(config.dir, kind, str(digest))
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0x01
        path.write_bytes(data)

    def leftovers() -> list[str]:
        return sorted(p.name for p in (config.dir / "tmp").iterdir())

    stores = open_stores(config)
    stores.blobs.prepare()
    stores.manifests.prepare()
    return Backend(stores, reopen, damage, leftovers)


def _s3(tmp_path: Path, request: pytest.FixtureRequest) -> Backend:
    """A fresh key prefix in the session's bucket: each test sees an empty store."""
    server: SeaweedFS = request.getfixturevalue("seaweedfs")
    storage = StorageConfig("s3", server.config(prefix=f"t-{uuid.uuid4().hex}/"))
    cache = CacheConfig(dir=tmp_path / "work")
    opened: list[Stores] = []

    def reopen() -> Stores:
        stores = open_stores(cache, storage)
        opened.append(stores)
        return stores

    def damage(kind: str, digest: Digest) -> None:
        store = reopen().of(kind)
        assert isinstance(store, S3Content)
        conn, key = store.conn, store.key_of(digest)
        data = conn.run(conn.get_bytes(key))
        assert data is not None
        flipped = bytearray(data)
        flipped[len(flipped) // 2] ^= 0x01
        conn.run(conn.put_bytes(key, bytes(flipped)))

    def leftovers() -> list[str]:
        conn = probe
        uploads = [f"upload:{key}" for key, _, _ in conn.run(conn.uploads())]
        return sorted([*(p.name for p in (cache.dir / "tmp").iterdir()), *uploads])

    stores = reopen()
    stores.blobs.prepare()
    stores.manifests.prepare()
    assert isinstance(stores.blobs, S3Content)
    probe: S3Connection = stores.blobs.conn
    return Backend(stores, reopen, damage, leftovers, opened)


BACKENDS: dict[str, Callable[[Path, pytest.FixtureRequest], Backend]] = {
    "filesystem": _filesystem,
    "s3": _s3,
}


@pytest.fixture(params=sorted(BACKENDS))
def backend(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Backend]:
    made = BACKENDS[request.param](tmp_path, request)
    yield made
    for stores in made.opened:
        stores.close()


def blob(n: int, seed: str = "x") -> bytes:
    pattern = f"{seed}:{n}:".encode()
    return (pattern * (n // len(pattern) + 1))[:n]


def manifest(seed: str = "a", size: int = 0) -> StoredManifest:
    doc = {"schemaVersion": 2, "mediaType": OCI_MANIFEST, "seed": seed, "pad": "p" * size}
    body = json.dumps(doc).encode()
    return StoredManifest(Digest.of(body), OCI_MANIFEST, body)


def entry(m: StoredManifest, fetched: float = 1000.0) -> TagEntry:
    return TagEntry(m.digest, m.media_type, len(m.body), fetched)


async def put_blob(stores: Stores, data: bytes, digest: Digest | None = None) -> None:
    writer = stores.blobs.begin(digest or Digest.of(data))
    await writer.write(data)
    await writer.commit()


def read_blob(stores: Stores, digest: Digest) -> bytes:
    with stores.blobs.open(digest) as f:
        return f.read()


async def until_written(writer: BlobWriterProto, n: int) -> None:
    async with asyncio.timeout(WAIT):
        while True:
            if writer.written >= n:
                return
            await asyncio.sleep(0.005)


def listed(stores: Stores) -> set[tuple[str, Digest, int]]:
    return {
        (c.kind, c.digest, c.size)
        for c in [*stores.blobs.contents(), *stores.manifests.contents()]
    }


# -- blobs: put, lookup, read ----------------------------------------------------


async def test_a_committed_blob_is_found_read_and_listed(backend: Backend) -> None:
    data = blob(300 * KIB)
    digest = Digest.of(data)
    await put_blob(backend.stores, data)
    for stores in (backend.stores, backend.reopen()):
        info = await stores.blobs.lookup(digest)
        assert info is not None
        assert info.size == len(data)
        assert stores.blobs.size(digest) == len(data)
        assert read_blob(stores, digest) == data
        assert (BLOB, digest, len(data)) in listed(stores)
    assert backend.leftovers() == []


async def test_an_absent_blob_is_absent_everywhere(backend: Backend) -> None:
    digest = Digest.of(b"never stored")
    blobs = backend.stores.blobs
    assert await blobs.lookup(digest) is None
    assert blobs.size(digest) is None
    assert blobs.check(digest) is None
    assert blobs.delete(digest) is False
    with pytest.raises(FileNotFoundError):
        blobs.open(digest)
    assert listed(backend.stores) == set()


async def test_a_stored_blob_is_streamed_by_range(backend: Backend) -> None:
    data = blob(300 * KIB)
    digest = Digest.of(data)
    await put_blob(backend.stores, data)
    blobs = backend.stores.blobs
    part = [c async for c in blobs.read(digest, 1000, 200_000)]
    assert b"".join(part) == data[1000:200_000]
    assert max(len(c) for c in part) <= 1024 * KIB  # bounded chunks, never the whole blob
    assert b"".join([c async for c in blobs.read(digest, 0, len(data))]) == data
    with pytest.raises(FileNotFoundError):
        async for _ in blobs.read(Digest.of(b"never stored"), 0, 10):
            pass


async def test_a_usable_store_says_it_is_ready(backend: Backend) -> None:
    assert await backend.stores.blobs.probe() is None


async def test_a_blob_being_written_is_invisible_until_committed(backend: Backend) -> None:
    data = blob(256 * KIB)
    digest = Digest.of(data)
    writer = backend.stores.blobs.begin(digest)
    await writer.write(data[:100_000])
    await until_written(writer, 100_000)
    reader = writer.reader()  # followers read what is written so far
    assert reader is not None
    with reader:
        assert reader.read(100_000) == data[:100_000]
    for stores in (backend.stores, backend.reopen()):
        assert await stores.blobs.lookup(digest) is None
        assert stores.blobs.size(digest) is None
        assert listed(stores) == set()
    await writer.write(data[100_000:])
    info = await writer.commit()
    assert info.size == len(data)
    assert read_blob(backend.reopen(), digest) == data


async def test_wrong_bytes_are_never_committed(backend: Backend) -> None:
    digest = Digest.of(blob(64 * KIB))
    writer = backend.stores.blobs.begin(digest)
    await writer.write(blob(64 * KIB, "other"))
    with pytest.raises(DigestMismatch):
        await writer.commit()
    assert await backend.stores.blobs.lookup(digest) is None
    assert backend.stores.blobs.size(digest) is None
    assert backend.leftovers() == []


async def test_verify_refuses_wrong_bytes_before_any_commit(backend: Backend) -> None:
    digest = Digest.of(b"right")
    writer = backend.stores.blobs.begin(digest)
    await writer.write(b"wrong")
    with pytest.raises(DigestMismatch):
        await writer.verify()
    await writer.abort()
    assert await backend.stores.blobs.lookup(digest) is None
    assert backend.leftovers() == []


async def test_an_aborted_blob_leaves_nothing(backend: Backend) -> None:
    data = blob(128 * KIB)
    writer = backend.stores.blobs.begin(Digest.of(data))
    await writer.write(data[:50_000])
    await writer.abort()
    assert await backend.stores.blobs.lookup(Digest.of(data)) is None
    assert backend.leftovers() == []


async def test_concurrent_writers_of_one_digest_all_commit_the_same_blob(
    backend: Backend,
) -> None:
    data = blob(512 * KIB)
    digest = Digest.of(data)
    writers = [backend.stores.blobs.begin(digest) for _ in range(4)]
    for start in range(0, len(data), 64 * KIB):  # interleaved, chunk by chunk
        for w in writers:
            await w.write(data[start : start + 64 * KIB])
    infos = await asyncio.gather(*(w.commit() for w in writers))
    assert {i.size for i in infos} == {len(data)}
    assert read_blob(backend.stores, digest) == data
    assert [c.digest for c in backend.stores.blobs.contents()] == [digest]
    assert backend.leftovers() == []


async def test_a_writer_that_aborts_does_not_hurt_one_that_commits(backend: Backend) -> None:
    data = blob(200 * KIB)
    digest = Digest.of(data)
    good, bad = backend.stores.blobs.begin(digest), backend.stores.blobs.begin(digest)
    await good.write(data)
    await bad.write(data[:1000])
    await asyncio.gather(good.commit(), bad.abort())
    assert read_blob(backend.stores, digest) == data
    assert backend.leftovers() == []


async def test_a_dead_writers_leftovers_are_swept_at_start(backend: Backend) -> None:
    writer = backend.stores.blobs.begin(Digest.of(b"crash"))
    await writer.write(b"cra")
    await until_written(writer, 3)
    assert backend.leftovers() != []
    assert backend.reopen().blobs.prepare() >= 1  # the next start of this process
    assert backend.leftovers() == []
    await writer.abort()


# -- blobs: bulk import (stage, publish) ---------------------------------------------


async def test_a_staged_blob_is_invisible_until_published(backend: Backend) -> None:
    data = blob(100 * KIB)
    digest = Digest.of(data)
    blobs = backend.stores.blobs
    staged = await asyncio.to_thread(blobs.stage, digest, [data[:10], data[10:]])
    assert staged.size == len(data)
    assert await blobs.lookup(digest) is None
    assert listed(backend.stores) == set()
    await asyncio.to_thread(staged.publish)
    assert read_blob(backend.reopen(), digest) == data
    assert backend.leftovers() == []


async def test_a_discarded_or_wrong_stage_leaves_nothing(backend: Backend) -> None:
    data = blob(10 * KIB)
    blobs = backend.stores.blobs
    staged = blobs.stage(Digest.of(data), [data])
    staged.discard()
    with pytest.raises(DigestMismatch):
        blobs.stage(Digest.of(data), [data[:-1]])

    def broken() -> Iterator[bytes]:
        yield data[:100]
        raise OSError("the source went away")

    with pytest.raises(OSError, match="went away"):
        blobs.stage(Digest.of(data), broken())
    assert await blobs.lookup(Digest.of(data)) is None
    assert backend.leftovers() == []


# -- blobs: checking, deleting, quarantine --------------------------------------------


async def test_check_finds_a_damaged_blob_and_quarantine_hides_it(backend: Backend) -> None:
    data = blob(64 * KIB)
    digest = Digest.of(data)
    await put_blob(backend.stores, data)
    blobs = backend.stores.blobs
    assert blobs.check(digest) is True
    backend.damage(BLOB, digest)
    assert blobs.check(digest) is False
    where = blobs.quarantine(digest)
    assert where
    assert await blobs.lookup(digest) is None
    assert blobs.check(digest) is None
    assert listed(backend.stores) == set()


async def test_a_deleted_blob_is_gone(backend: Backend) -> None:
    data = blob(KIB)
    digest = Digest.of(data)
    await put_blob(backend.stores, data)
    assert backend.stores.blobs.delete(digest) is True
    for stores in (backend.stores, backend.reopen()):
        assert await stores.blobs.lookup(digest) is None
        assert listed(stores) == set()
    assert backend.stores.blobs.delete(digest) is False


# -- manifests ----------------------------------------------------------------------


async def test_a_stored_manifest_is_read_back_exactly(backend: Backend) -> None:
    m = manifest()
    size = await backend.stores.manifests.put(m)
    assert size >= len(m.body)
    for stores in (backend.stores, backend.reopen()):
        assert await stores.manifests.get(m.digest) == m
        assert stores.manifests.load(m.digest) == m
        assert stores.manifests.size(m.digest) == size
        assert stores.manifests.check(m.digest) is True
        assert (MANIFEST, m.digest, size) in listed(stores)
    assert backend.leftovers() == []


async def test_an_absent_manifest_is_absent(backend: Backend) -> None:
    manifests = backend.stores.manifests
    digest = manifest("nowhere").digest
    assert await manifests.get(digest) is None
    assert manifests.load(digest) is None
    assert manifests.check(digest) is None
    assert manifests.delete(digest) is False


async def test_a_damaged_manifest_reads_as_absent(backend: Backend) -> None:
    m = manifest()
    await backend.stores.manifests.put(m)
    backend.damage(MANIFEST, m.digest)
    other = backend.reopen().manifests  # nothing in memory: it reads the store
    assert other.load(m.digest) is None
    assert other.check(m.digest) is False
    assert await other.get(m.digest) is None
    assert other.size(m.digest) is None  # get dropped the damaged copy


async def test_readers_see_a_manifest_whole_or_not_at_all(backend: Backend) -> None:
    m = manifest(size=4 * 1024 * 1024)
    other = backend.reopen().manifests
    seen: list[StoredManifest | None] = []
    put = asyncio.create_task(backend.stores.manifests.put(m))
    async with asyncio.timeout(WAIT):
        while not put.done():
            seen.append(other.load(m.digest))
            await asyncio.sleep(0)
    await put
    assert {s.body if s else None for s in seen} <= {None, m.body}
    assert other.load(m.digest) == m
    assert backend.leftovers() == []


async def test_many_manifests_are_stored_in_one_batch(backend: Backend) -> None:
    batch = [manifest(str(i)) for i in range(20)]
    sizes = await asyncio.to_thread(backend.stores.manifests.put_many, batch)
    assert len(sizes) == len(batch)
    stores = backend.reopen()
    for m, size in zip(batch, sizes, strict=True):
        assert stores.manifests.load(m.digest) == m
        assert (MANIFEST, m.digest, size) in listed(stores)
    assert backend.leftovers() == []


async def test_a_deleted_manifest_is_gone_from_memory_too(backend: Backend) -> None:
    m = manifest()
    await backend.stores.manifests.put(m)
    assert await backend.stores.manifests.get(m.digest) == m  # now hot in memory
    assert backend.stores.manifests.delete(m.digest) is True
    assert await backend.stores.manifests.get(m.digest) is None
    assert backend.reopen().manifests.load(m.digest) is None


async def test_a_quarantined_manifest_is_gone_from_memory_too(backend: Backend) -> None:
    m = manifest()
    await backend.stores.manifests.put(m)
    assert await backend.stores.manifests.get(m.digest) == m
    assert backend.stores.manifests.quarantine(m.digest)
    assert await backend.stores.manifests.get(m.digest) is None
    assert listed(backend.stores) == set()


# -- tag records ----------------------------------------------------------------------


async def test_tag_variants_are_kept_side_by_side(backend: Backend) -> None:
    manifests = backend.stores.manifests
    one, index = manifest("one"), manifest("index")
    assert await manifests.get_tag(NS, REPO, "3") == {}
    await asyncio.gather(
        manifests.put_tag(NS, REPO, "3", OCI_MANIFEST, entry(one)),
        manifests.put_tag(NS, REPO, "3", OCI_INDEX, entry(index)),
    )
    want = {OCI_MANIFEST: entry(one), OCI_INDEX: entry(index)}
    assert await manifests.get_tag(NS, REPO, "3") == want
    assert await backend.reopen().manifests.get_tag(NS, REPO, "3") == want
    assert await manifests.get_tag(NS, REPO, "4") == {}
    assert await manifests.get_tag("ghcr.io", REPO, "3") == {}


async def test_a_tag_written_elsewhere_is_seen(backend: Backend) -> None:
    m = manifest()
    await backend.reopen().manifests.put_tag(NS, REPO, "edge", OCI_MANIFEST, entry(m))
    assert await backend.stores.manifests.get_tag(NS, REPO, "edge") == {OCI_MANIFEST: entry(m)}


async def test_bulk_tags_write_only_what_changed(backend: Backend) -> None:
    manifests = backend.stores.manifests
    a, b = manifest("a"), manifest("b")
    items = [((NS, REPO, f"t{i}"), OCI_MANIFEST, entry(a)) for i in range(10)]
    assert await asyncio.to_thread(manifests.put_tags, items) == 10
    assert await asyncio.to_thread(manifests.put_tags, items) == 0  # already so
    changed = [((NS, REPO, "t0"), OCI_MANIFEST, entry(b)), *items[1:]]
    assert await asyncio.to_thread(manifests.put_tags, changed) == 1
    other = backend.reopen().manifests
    assert await other.get_tag(NS, REPO, "t0") == {OCI_MANIFEST: entry(b)}
    assert await other.get_tag(NS, REPO, "t9") == {OCI_MANIFEST: entry(a)}
    assert backend.leftovers() == []


async def test_tag_records_are_listed(backend: Backend) -> None:
    manifests = backend.stores.manifests
    a, b = manifest("a"), manifest("b")
    await manifests.put_tag(NS, REPO, "1", OCI_MANIFEST, entry(a))
    await manifests.put_tag(NS, REPO, "1", OCI_INDEX, entry(b))
    await manifests.put_tag("ghcr.io", "x/y", "2", OCI_MANIFEST, entry(b))
    records = {
        (r.namespace, r.repository, r.tag): dict(r.entries)
        for r in backend.reopen().manifests.tag_records()
    }
    assert records == {
        (NS, REPO, "1"): {OCI_MANIFEST: entry(a), OCI_INDEX: entry(b)},
        ("ghcr.io", "x/y", "2"): {OCI_MANIFEST: entry(b)},
    }


# -- referrers records ------------------------------------------------------------------


async def test_referrers_records_are_stored_replaced_and_listed(backend: Backend) -> None:
    manifests = backend.stores.manifests
    subject, first, second = manifest("subject"), manifest("r1"), manifest("r2")
    assert await manifests.get_referrers(NS, REPO, subject.digest) is None
    await manifests.put_referrers(NS, REPO, subject.digest, entry(first))
    await manifests.put_referrers(NS, REPO, subject.digest, entry(second, 2000.0))
    other = backend.reopen().manifests
    assert await other.get_referrers(NS, REPO, subject.digest) == entry(second, 2000.0)
    assert await other.get_referrers("ghcr.io", REPO, subject.digest) is None
    (record,) = other.referrers_records()
    assert (record.namespace, record.repository, record.subject) == (NS, REPO, subject.digest)
    assert record.entry == entry(second, 2000.0)
    assert backend.leftovers() == []
