"""What only the S3 backend has: credentials really checked and never shown, multipart
commits, range reads. Against a real SeaweedFS (see the ``seaweedfs`` fixture)."""

from __future__ import annotations

import asyncio
import logging
import time
import traceback
import uuid
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import aiohttp
import pytest

from mirrorproxy.cache import DigestMismatch
from mirrorproxy.cache.s3blobs import S3BlobStore
from mirrorproxy.cache.s3client import S3Connection, S3StoreError
from mirrorproxy.cache.stores import open_stores
from mirrorproxy.config import CacheConfig, S3Config, StorageConfig
from mirrorproxy.core.oci import Digest
from tests.support.seaweed import SECRET_KEY, SeaweedFS

MIB = 1024 * 1024
PART = 5 * MIB  # S3's smallest part: a 12 MiB blob takes three


def pattern(n: int) -> bytes:
    unit = bytes(range(251))  # a prime period: no part boundary lines up with it
    return (unit * (n // len(unit) + 1))[:n]


@pytest.fixture
def small_parts(seaweedfs: SeaweedFS, tmp_path: Path) -> Iterator[S3BlobStore]:
    conn = S3Connection(seaweedfs.config(prefix=f"t-{uuid.uuid4().hex}/"), part_size=PART)
    store = S3BlobStore(conn, tmp_path)
    store.prepare()
    try:
        yield store
    finally:
        conn.close()


def test_a_wrong_secret_is_refused_and_never_shown(
    seaweedfs: SeaweedFS, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    wrong = "wrong-" + SECRET_KEY[::-1]
    storage = StorageConfig("s3", seaweedfs.config(secret=wrong))
    caplog.set_level(logging.DEBUG)
    stores = open_stores(CacheConfig(dir=tmp_path), storage)
    try:
        with pytest.raises(S3StoreError) as caught:
            stores.blobs.prepare()
    finally:
        stores.close()
    shown = "".join(traceback.format_exception(caught.value)) + caplog.text + repr(storage)
    assert "refused" in str(caught.value)
    assert caught.value.key == "secret_key"
    assert wrong not in shown
    assert SECRET_KEY not in shown


def test_a_missing_bucket_is_a_clear_error(seaweedfs: SeaweedFS, tmp_path: Path) -> None:
    storage = StorageConfig("s3", replace(seaweedfs.config(), bucket="no-such-bucket"))
    stores = open_stores(CacheConfig(dir=tmp_path), storage)
    try:
        with pytest.raises(S3StoreError, match="no-such-bucket") as caught:
            stores.blobs.prepare()
        assert caught.value.key == "bucket"
    finally:
        stores.close()


async def test_a_blob_over_several_parts_is_committed_whole(small_parts: S3BlobStore) -> None:
    data = pattern(12 * MIB + 123)
    digest = Digest.of(data)
    writer = small_parts.begin(digest)
    for start in range(0, len(data), MIB):
        await writer.write(data[start : start + MIB])
    info = await writer.commit()
    assert info.size == len(data)
    conn = small_parts.conn
    assert conn.run(conn.uploads()) == []
    with small_parts.open(digest) as f:
        f.seek(7 * MIB + 5)  # a range read from inside the second part
        assert f.read(MIB) == data[7 * MIB + 5 : 8 * MIB + 5]
        f.seek(0)
        whole = await asyncio.to_thread(f.read)
    assert whole == data
    assert small_parts.check(digest) is True


async def test_wrong_bytes_over_several_parts_leave_no_upload(small_parts: S3BlobStore) -> None:
    data = pattern(11 * MIB)
    writer = small_parts.begin(Digest.of(b"something else"))
    await writer.write(data)
    with pytest.raises(DigestMismatch):
        await writer.commit()
    conn = small_parts.conn
    assert conn.run(conn.uploads()) == []
    assert conn.run(conn.listing(conn.key(""))) == []


async def test_parts_go_up_during_the_download_and_an_abort_drops_them(
    small_parts: S3BlobStore,
) -> None:
    data = pattern(11 * MIB)
    digest = Digest.of(data)
    conn = small_parts.conn
    writer = small_parts.begin(digest)
    await writer.write(data)  # two full parts are sent before any commit
    for _ in range(200):  # bounded: 10 s
        if conn.run(conn.uploads()):
            break
        await asyncio.sleep(0.05)
    assert [key for key, _, _ in conn.run(conn.uploads())] == [small_parts.key_of(digest)]
    assert await small_parts.lookup(digest) is None
    await writer.abort()
    assert conn.run(conn.uploads()) == []
    assert await small_parts.lookup(digest) is None


async def test_a_presigned_url_gets_the_blob_without_credentials(
    small_parts: S3BlobStore,
) -> None:
    data = pattern(MIB + 7)
    digest = Digest.of(data)
    writer = small_parts.begin(digest)
    await writer.write(data)
    await writer.commit()
    url = await small_parts.url(digest, expires=60)
    assert url is not None
    assert SECRET_KEY not in url
    async with aiohttp.ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 200
            assert await resp.read() == data
        async with session.get(url, headers={"Range": "bytes=10-19"}) as resp:
            assert resp.status == 206
            assert await resp.read() == data[10:20]


def test_orphaned_uploads_are_aborted_at_start_and_young_ones_kept(
    seaweedfs: SeaweedFS, tmp_path: Path
) -> None:
    conn = S3Connection(seaweedfs.config(prefix=f"t-{uuid.uuid4().hex}/"))
    try:
        store = S3BlobStore(conn, tmp_path, stale_upload=3600.0)
        store.prepare()
        started = conn.run(
            conn.client.create_multipart_upload(Bucket=conn.config.bucket, Key=conn.key("blobs/x"))
        )
        assert store.prepare() == 0  # young: it may be a running member's
        assert [u[1] for u in conn.run(conn.uploads())] == [started["UploadId"]]
        store.stale_upload = 0.0
        assert store.prepare() == 1
        assert conn.run(conn.uploads()) == []
    finally:
        conn.close()


def test_an_unreachable_endpoint_fails_fast_naming_the_endpoint(
    closed_port_url: str, tmp_path: Path
) -> None:
    storage = StorageConfig("s3", S3Config(endpoint=closed_port_url, bucket="b"))
    stores = open_stores(CacheConfig(dir=tmp_path), storage)
    try:
        began = time.monotonic()
        with pytest.raises(S3StoreError) as caught:
            stores.blobs.prepare()
        assert time.monotonic() - began < 10
    finally:
        stores.close()
    assert caught.value.key == "endpoint"
    assert "unreachable" in str(caught.value)
