"""The mirror serving from an S3 bucket: a real SeaweedFS, the whole app, no mocks.

Each test gets a key prefix of its own in the session's bucket (so a fresh, empty
store); the outage test gets a SeaweedFS of its own, which it stops and starts.
"""

from __future__ import annotations

import asyncio
import io
import re
import subprocess
import sys
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import aiohttp

from mirrorproxy.cache import BlobInfo
from mirrorproxy.cache.s3blobs import S3BlobStore
from mirrorproxy.commands.cache import cmd_du, cmd_ls, cmd_prune, cmd_verify
from mirrorproxy.core.oci import OCI_MANIFEST, Digest, parse_digest
from mirrorproxy.http import keys
from mirrorproxy.pullthrough.answers import Target
from mirrorproxy.pullthrough.source import FileRange
from tests.fakes.registry import payload
from tests.support.mirror import Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.seaweed import SECRET_KEY, SeaweedFS

KIB = 1024
MIB = 1024 * KIB


def storage(server: SeaweedFS, *, redirect: bool = False) -> dict[str, Any]:
    return server.storage(prefix=f"t-{uuid.uuid4().hex}/", redirect=redirect)


def s3_store(mirror: Mirror) -> S3BlobStore:
    store = mirror.client.app[keys.ENGINE].blobs
    assert isinstance(store, S3BlobStore)
    return store


def blob_gets(fake: RunningFake) -> int:
    return len(fake.registry.calls("GET", "blobs"))


async def cached(mirror: Mirror, digest: str) -> None:
    await mirror.settled()
    assert await mirror.stored(digest)


async def test_a_miss_is_cached_in_the_bucket_and_a_hit_is_served_from_it(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    data = payload(3 * MIB + 17, "s3 cold and warm")
    digest = fake.registry.add_blob(data)
    mirror = await start_mirror([fake.url], storage=storage(seaweedfs))
    resp = await mirror.client.get(blob_path(REPO, digest))
    assert resp.status == 200
    assert await resp.read() == data
    await cached(mirror, digest)
    assert mirror.blob_files() == []  # nothing kept on the local disk
    assert mirror.tmp_files() == []
    for _ in range(2):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == digest
        assert resp.headers["Content-Length"] == str(len(data))
        assert await resp.read() == data
    assert blob_gets(fake) == 1
    assert await mirror.metric("mirrorproxy_cache_requests_total", kind="blob", result="hit") == 2
    assert await mirror.metric_sum("mirrorproxy_store_request_seconds_count", op="get") >= 2
    assert await mirror.metric_sum("mirrorproxy_store_errors_total") == 0


async def test_ranges_and_conditional_requests_of_a_blob_in_the_bucket(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    data = payload(2 * MIB, "s3 ranges")
    digest = fake.registry.add_blob(data)
    mirror = await start_mirror([fake.url], storage=storage(seaweedfs))
    await (await mirror.client.get(blob_path(REPO, digest))).read()
    await cached(mirror, digest)
    resp = await mirror.client.get(blob_path(REPO, digest), headers={"Range": "bytes=1000-"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 1000-{len(data) - 1}/{len(data)}"
    assert await resp.read() == data[1000:]
    resp = await mirror.client.get(blob_path(REPO, digest), headers={"Range": "bytes=-10"})
    assert await resp.read() == data[-10:]
    resp = await mirror.client.get(
        blob_path(REPO, digest), headers={"If-None-Match": f'"{digest}"'}
    )
    assert resp.status == 304
    head = await mirror.client.head(blob_path(REPO, digest))
    assert head.status == 200
    assert head.headers["Content-Length"] == str(len(data))
    assert blob_gets(fake) == 1


async def test_with_redirect_a_cached_blob_is_a_307_to_a_presigned_url(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    data = payload(MIB + 5, "s3 redirect")
    digest = fake.registry.add_blob(data)
    mirror = await start_mirror([fake.url], storage=storage(seaweedfs, redirect=True))
    resp = await mirror.client.get(blob_path(REPO, digest))
    assert resp.status == 200  # a miss streams as usual
    assert await resp.read() == data
    await cached(mirror, digest)
    resp = await mirror.client.get(blob_path(REPO, digest), allow_redirects=False)
    assert resp.status == 307
    assert resp.headers["Docker-Content-Digest"] == digest
    location = resp.headers["Location"]
    assert location.startswith(seaweedfs.endpoint)
    assert "X-Amz-Expires=1200" in location
    assert SECRET_KEY not in location
    head = await mirror.client.head(blob_path(REPO, digest))
    assert head.status == 200  # HEAD stays with the mirror
    assert head.headers["Content-Length"] == str(len(data))
    resp = await mirror.client.get(blob_path(REPO, digest))  # followed, as clients do
    assert resp.status == 200
    assert await resp.read() == data
    assert blob_gets(fake) == 1


async def test_a_blob_deleted_from_the_bucket_is_forgotten_and_fetched_again(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    data = payload(300 * KIB, "s3 lifecycle")
    digest = fake.registry.add_blob(data)
    mirror = await start_mirror([fake.url], storage=storage(seaweedfs))
    await (await mirror.client.get(blob_path(REPO, digest))).read()
    await cached(mirror, digest)
    assert mirror.budget.total == len(data)
    await asyncio.to_thread(s3_store(mirror).delete, parse_digest(digest))  # a lifecycle rule
    fake.registry.remove_blob(digest)
    resp = await mirror.client.get(blob_path(REPO, digest))
    assert resp.status == 404  # a miss, and the upstream lost it too
    assert mirror.budget.total == 0  # the index noticed on lookup
    fake.registry.add_blob(data)
    resp = await mirror.client.get(blob_path(REPO, digest))
    assert await resp.read() == data
    await cached(mirror, digest)
    assert mirror.budget.total == len(data)


async def test_an_object_gone_between_lookup_and_read_is_a_miss_before_any_header(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    """The index and the HEAD say cached, the GET finds no such key (the owner of the
    blob evicted it meanwhile): the client gets the whole blob, fetched again."""
    data = payload(300 * KIB, "s3 evicted under a reader")
    digest = fake.registry.add_blob(data)
    mirror = await start_mirror([fake.url], storage=storage(seaweedfs))
    assert await (await mirror.client.get(blob_path(REPO, digest))).read() == data
    await cached(mirror, digest)
    store = s3_store(mirror)
    looked_up = store.lookup
    evicted: list[str] = []

    async def lookup_then_evicted(d: Digest) -> BlobInfo | None:
        found = await looked_up(d)
        if found is not None and not evicted:  # deleted in the bucket after the HEAD
            await asyncio.to_thread(store.delete, d)
            evicted.append(str(d))
        return found

    store.lookup = lookup_then_evicted  # type: ignore[method-assign,assignment]  # a fault
    resp = await mirror.client.get(blob_path(REPO, digest))
    assert resp.status == 200
    assert await resp.read() == data  # not a cut response
    assert evicted == [digest]
    assert blob_gets(fake) == 2  # the miss path fetched it again
    await cached(mirror, digest)
    assert mirror.budget.total == len(data)


async def test_the_budget_evicts_objects_from_the_bucket(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    blobs = [payload(200 * KIB, f"s3 budget {i}") for i in range(3)]
    digests = [fake.registry.add_blob(b) for b in blobs]
    mirror = await start_mirror(
        [fake.url], storage=storage(seaweedfs), cache={"max_size": "450KiB"}
    )
    for digest, data in zip(digests, blobs, strict=True):
        assert await (await mirror.client.get(blob_path(REPO, digest))).read() == data
        await cached(mirror, digest)
    assert not await mirror.stored(digests[0])  # least recently used: deleted in the bucket
    assert await mirror.stored(digests[1])
    assert await mirror.stored(digests[2])
    assert mirror.budget.total == 2 * 200 * KIB
    assert await mirror.metric("mirrorproxy_cache_evictions_total", kind="blob") == 1


async def test_an_empty_index_is_rebuilt_from_the_bucket_at_start(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    data = payload(256 * KIB, "s3 rebuild")
    digest = fake.registry.add_blob(data)
    table = storage(seaweedfs)
    first = await start_mirror([fake.url], storage=table, name="first")
    await (await first.client.get(blob_path(REPO, digest))).read()
    await cached(first, digest)
    second = await start_mirror([fake.url], storage=table, name="second")  # new local dir
    assert second.budget.total == len(data)
    resp = await second.client.get(blob_path(REPO, digest))
    assert await resp.read() == data
    assert blob_gets(fake) == 1


def test_serve_with_a_missing_bucket_says_so_in_one_line(
    seaweedfs: SeaweedFS, tmp_path: Path, closed_port_url: str
) -> None:
    config = tmp_path / "mp.toml"
    config.write_text(
        f"""
[server]
listen = "{closed_port_url.removeprefix("http://")}"
[cache]
dir = "{tmp_path / "cache"}"
[storage]
backend = "s3"
[storage.s3]
endpoint = "{seaweedfs.endpoint}"
bucket = "no-such-bucket"
access_key = "mirrorproxy-test"
secret_key = "{SECRET_KEY}"
[namespaces."docker.io"]
upstreams = ["http://127.0.0.1:9"]
"""
    )
    proc = subprocess.run(
        [sys.executable, "-m", "mirrorproxy", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if "Traceback" in line or "mp.toml" in line]
    assert len(lines) == 1, proc.stderr
    assert "mp.toml: storage.s3.bucket:" in lines[0]
    assert "no such bucket" in lines[0]
    assert SECRET_KEY not in proc.stderr


async def test_a_store_outage_is_a_503_that_ends_when_the_store_is_back(
    own_seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    image = fake.registry.add_image(REPO, "1", layer_sizes=(256 * KIB,))
    layer = image.layer_digests[0]
    mirror = await start_mirror([fake.url], storage=storage(own_seaweedfs))
    accept = {"Accept": OCI_MANIFEST}
    assert (await mirror.client.get(manifest_path(REPO, "1"), headers=accept)).status == 200
    await (await mirror.client.get(blob_path(REPO, layer))).read()
    await cached(mirror, layer)
    assert (await mirror.client.get("/readyz")).status == 200

    await asyncio.to_thread(own_seaweedfs.stop)
    await asyncio.sleep(2)  # the readiness answer is remembered for a moment
    resp = await mirror.client.get("/readyz")
    assert resp.status == 503
    body = await resp.json()
    assert body["errors"][0]["code"] == "UNAVAILABLE"
    assert "unreachable" in body["errors"][0]["message"]
    began = time.monotonic()
    resp = await mirror.client.get(blob_path(REPO, layer))
    assert resp.status == 503
    assert "store is unreachable" in (await resp.json())["errors"][0]["message"]
    assert time.monotonic() - began < 10  # fails fast, no hang
    by_digest = await mirror.client.get(manifest_path(REPO, image.digest), headers=accept)
    assert by_digest.status == 200  # hot in memory
    assert await by_digest.read() == image.manifest
    by_tag = await mirror.client.get(manifest_path(REPO, "1"), headers=accept)
    assert by_tag.status == 200
    assert await mirror.metric_sum("mirrorproxy_store_errors_total") >= 1

    await asyncio.to_thread(own_seaweedfs.start)

    async def ready() -> bool:
        return (await mirror.client.get("/readyz")).status == 200

    async with asyncio.timeout(30):
        while not await ready():  # noqa: ASYNC110 - polling another process
            await asyncio.sleep(0.5)
    resp = await mirror.client.get(blob_path(REPO, layer))
    assert resp.status == 200
    assert await resp.read() == image.layers[0]
    assert blob_gets(fake) == 1


async def test_a_client_that_follows_a_redirect_gets_the_same_bytes_as_one_that_does_not(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    data = payload(700 * KIB, "s3 redirect vs stream")
    digest = fake.registry.add_blob(data)
    table = storage(seaweedfs, redirect=True)
    mirror = await start_mirror([fake.url], storage=table)
    await (await mirror.client.get(blob_path(REPO, digest))).read()
    await cached(mirror, digest)
    url = str(mirror.client.make_url(blob_path(REPO, digest)))
    async with aiohttp.ClientSession() as session, session.get(url) as resp:
        assert resp.status == 200
        assert len(resp.history) == 1
        assert resp.history[0].status == 307
        assert await resp.read() == data


async def test_the_cache_commands_work_on_the_bucket(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    image = fake.registry.add_image(REPO, "7", layer_sizes=(100 * KIB,))
    mirror = await start_mirror([fake.url], storage=storage(seaweedfs))
    accept = {"Accept": OCI_MANIFEST}
    assert (await mirror.client.get(manifest_path(REPO, "7"), headers=accept)).status == 200
    for digest in (image.config_digest, *image.layer_digests):
        await (await mirror.client.get(blob_path(REPO, digest))).read()
    await mirror.settled()
    config = mirror.config

    def run(command: Callable[..., int], *args: Any, **kwargs: Any) -> str:
        out = io.StringIO()
        assert command(config, *args, out=out, **kwargs) in (0, 1)
        return out.getvalue()

    listing = await asyncio.to_thread(run, cmd_ls, None)
    assert re.search(rf"docker\.io\s+{REPO}\s+7\s+{image.digest[:19]}", listing), listing
    assert "total" in await asyncio.to_thread(run, cmd_du)
    assert "verified 3 entries, 0 bad" in await asyncio.to_thread(run, cmd_verify)
    pruned = await asyncio.to_thread(run, cmd_prune, older_than=None, to_size=0)
    assert pruned.startswith("pruned 3 entries")
    assert not await mirror.stored(image.layer_digests[0])  # deleted from the bucket


async def test_a_client_joining_a_download_once_it_is_in_the_bucket_reads_it_there(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    data = payload(MIB, "s3 late follower")
    digest = fake.registry.add_blob(data)
    mirror = await start_mirror([fake.url], storage=storage(seaweedfs))
    config = mirror.config
    ns = config.namespace(NS)
    assert ns is not None
    pt = mirror.client.app[keys.PULLTHROUGH]
    source = await pt.blob(Target(ns, NS, REPO), parse_digest(digest))  # joins the download
    assert source.result == "miss"
    await mirror.settled()  # committed to the bucket: its temp file is gone
    stream = await source.open((1000, 200_000))
    assert stream is not None
    got = bytearray()
    with stream:
        while (part := await stream.next()) is not None:
            assert not isinstance(part, FileRange)
            got += part
            stream.advance(stream.pos + len(part))
    assert bytes(got) == data[1000:200_001]
    assert blob_gets(fake) == 1  # from the bucket, not another upstream GET


async def test_a_blob_out_as_a_presigned_url_is_not_evicted_while_the_url_lives(
    seaweedfs: SeaweedFS, fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    lent, newcomer = payload(MIB + 200 * KIB, "lent"), payload(MIB + 200 * KIB, "newcomer")
    a, b = fake.registry.add_blob(lent), fake.registry.add_blob(newcomer)
    mirror = await start_mirror(
        [fake.url], storage=storage(seaweedfs, redirect=True), cache={"max_size": "2MiB"}
    )
    assert await (await mirror.client.get(blob_path(REPO, a))).read() == lent
    await cached(mirror, a)
    resp = await mirror.client.get(blob_path(REPO, a), allow_redirects=False)
    assert resp.status == 307  # the client now reads A from the bucket for 20 minutes
    assert a in mirror.budget.pinned
    # B needs A's room: A is lent, so B is streamed through and A stays.
    assert await (await mirror.client.get(blob_path(REPO, b))).read() == newcomer
    await mirror.settled()
    assert await mirror.stored(a)
    assert not await mirror.stored(b)
    assert await mirror.metric("mirrorproxy_cache_passthrough_total", reason="budget") == 1
    async with aiohttp.ClientSession() as s3, s3.get(resp.headers["Location"]) as got:
        assert got.status == 200  # the URL still works: nothing was deleted under it
        assert await got.read() == lent
