"""Blobs: miss then hit, Range, verification, resume, single-flight, detached fills."""

from __future__ import annotations

import asyncio
import re

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from tests.fakes.registry import payload, sha256
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB


def _slow(fake: RunningFake, *, chunk: int = 256 * 1024, delay: float = 0.03) -> None:
    """Make blob bodies trickle, so requests overlap with the download."""
    fake.registry.faults.chunk_size = chunk
    fake.registry.faults.chunk_delay = delay


async def _assert_cut_short(mirror: Mirror, digest: str, size: int) -> None:
    """The client gets the headers of a full blob, then a connection cut before the end."""
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert resp.content_length == size
        with pytest.raises(aiohttp.ClientPayloadError):
            await resp.read()


async def test_blob_miss_streams_then_hits_the_cache(fake: RunningFake, mirror: Mirror) -> None:
    data = payload(300 * 1024, "blob")
    digest = fake.registry.add_blob(data)

    resp = await mirror.client.get(blob_path(REPO, digest))
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == digest
    assert resp.headers["Content-Type"] == "application/octet-stream"
    assert resp.content_length == len(data)
    assert await resp.read() == data
    assert [r.path for r in fake.registry.requests] == [f"/v2/{REPO}/blobs/{digest}"]
    (req,) = fake.registry.requests
    assert "Range" not in req.headers

    await wait_for(lambda: mirror.blob_path(digest).exists())
    assert mirror.blob_path(digest).read_bytes() == data
    for method in ("GET", "HEAD"):
        resp = await mirror.client.request(method, blob_path(REPO, digest))
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == digest
        assert resp.headers["Content-Length"] == str(len(data))
        assert await resp.read() == (data if method == "GET" else b"")
    assert len(fake.registry.requests) == 1
    assert mirror.tmp_files() == []


async def test_blob_head_miss_asks_upstream_without_caching(
    fake: RunningFake, mirror: Mirror
) -> None:
    data = payload(5000, "head")
    digest = fake.registry.add_blob(data)
    resp = await mirror.client.head(blob_path(REPO, digest))
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Docker-Content-Digest"] == digest
    assert [r.method for r in fake.registry.requests] == ["HEAD"]
    assert mirror.blob_files() == []


@pytest.mark.parametrize(
    ("header", "start", "end"),
    [("bytes=1000-", 1000, None), ("bytes=10-19", 10, 20), ("bytes=0-0", 0, 1)],
)
async def test_range_on_a_cached_blob(
    fake: RunningFake, mirror: Mirror, header: str, start: int, end: int | None
) -> None:
    data = payload(64 * 1024, "range")
    digest = fake.registry.add_blob(data)
    assert await (await mirror.client.get(blob_path(REPO, digest))).read() == data
    await wait_for(lambda: mirror.blob_path(digest).exists())

    resp = await mirror.client.get(blob_path(REPO, digest), headers={"Range": header})
    assert resp.status == 206
    last = (end or len(data)) - 1
    assert resp.headers["Content-Range"] == f"bytes {start}-{last}/{len(data)}"
    assert await resp.read() == data[start:end]
    assert len(fake.registry.requests) == 1


async def test_range_on_a_miss(fake: RunningFake, mirror: Mirror) -> None:
    """containerd often opens a blob with ``Range: bytes=N-``; the mirror still caches it all."""
    data = payload(100_000, "range-miss")
    digest = fake.registry.add_blob(data)
    resp = await mirror.client.get(blob_path(REPO, digest), headers={"Range": "bytes=100-"})
    assert resp.status == 206
    assert resp.headers["Content-Range"] == f"bytes 100-{len(data) - 1}/{len(data)}"
    assert await resp.read() == data[100:]
    (req,) = fake.registry.requests
    assert "Range" not in req.headers
    await wait_for(mirror.blob_path(digest).exists)
    assert mirror.blob_path(digest).read_bytes() == data


async def test_unsatisfiable_range(fake: RunningFake, mirror: Mirror) -> None:
    data = payload(1000, "416")
    digest = fake.registry.add_blob(data)
    path = blob_path(REPO, digest)
    # The request that starts the download: refused, but the fill goes on.
    resp = await mirror.client.get(path, headers={"Range": "bytes=5000-"})
    assert resp.status == 416
    assert (await resp.json())["errors"][0]["code"] == "RANGE_INVALID"
    await wait_for(mirror.blob_path(digest).exists)
    resp = await mirror.client.get(path, headers={"Range": "bytes=5000-"})
    assert resp.status == 416
    assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
    assert len(fake.registry.requests) == 1


async def test_range_on_an_in_flight_blob(fake: RunningFake, mirror: Mirror) -> None:
    data = payload(3 * MIB, "inflight-range")
    digest = fake.registry.add_blob(data)
    _slow(fake)

    async def full() -> bytes:
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        return await resp.read()

    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(full())
        await wait_for(lambda: fake.registry.blob_bytes_sent >= int(1.5 * MIB))
        cases = [
            ("bytes=1048576-", 1048576, len(data)),  # open-ended, runs past the download
            ("bytes=100-199", 100, 200),  # already written
            ("bytes=2500000-2600000", 2500000, 2600001),  # not yet downloaded
        ]
        responses = await asyncio.gather(
            *(
                mirror.client.get(blob_path(REPO, digest), headers={"Range": h})
                for h, _, _ in cases
            )
        )
        assert fake.registry.blob_bytes_sent < len(data), "download already over"
        for resp, (_, start, end) in zip(responses, cases, strict=True):
            assert resp.status == 206
            assert resp.headers["Content-Range"] == f"bytes {start}-{end - 1}/{len(data)}"
            assert resp.content_length == end - start
            assert await resp.read() == data[start:end]
        assert await first == data
    assert len(fake.registry.calls("GET", "blobs")) == 1


async def test_wrong_bytes_are_not_cached_nor_delivered_whole(
    fake: RunningFake, mirror: Mirror
) -> None:
    data = payload(200 * 1024, "wrong")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.wrong_bytes = True
    mismatches = "mirrorproxy_digest_mismatches_total"
    assert await mirror.metric(mismatches, namespace=NS) == 0

    await _assert_cut_short(mirror, digest, len(data))
    await wait_for(lambda: not mirror.tmp_files())
    assert mirror.blob_files() == []
    assert await mirror.metric(mismatches, namespace=NS) == 1

    # Not cached: the next request goes upstream again (and fails the same way).
    await _assert_cut_short(mirror, digest, len(data))
    assert len(fake.registry.calls("GET", "blobs")) == 2
    await wait_for(lambda: not mirror.tmp_files())
    assert mirror.blob_files() == []
    assert await mirror.metric(mismatches, namespace=NS) == 2

    # Once the upstream is honest again, the blob comes through and is kept.
    fake.registry.faults.clear()
    resp = await mirror.client.get(blob_path(REPO, digest))
    assert await resp.read() == data
    await wait_for(lambda: mirror.blob_path(digest).exists())


async def test_cut_connection_resumes_on_the_next_upstream(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    data = payload(2 * MIB, "resume")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    cut = 300 * 1024
    one.registry.faults.cut_after = cut
    mirror = await start_mirror([one.url, two.url])

    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert resp.content_length == len(data)
        assert await resp.read() == data

    (first,) = one.registry.calls("GET", "blobs")
    assert "Range" not in first.headers
    (resumed,) = two.registry.calls("GET", "blobs")
    assert resumed.headers["Range"] == f"bytes={cut}-"
    await wait_for(lambda: mirror.blob_path(digest).exists())
    assert mirror.blob_path(digest).read_bytes() == data
    assert mirror.tmp_files() == []


async def test_resume_from_an_upstream_that_ignores_range(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    data = payload(MIB, "resume-200")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    one.registry.faults.cut_after = 100 * 1024
    two.registry.faults.ignore_range = True
    mirror = await start_mirror([one.url, two.url])
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert await resp.read() == data
    (resumed,) = two.registry.calls("GET", "blobs")
    assert re.fullmatch(r"bytes=\d+-", resumed.headers["Range"])
    await wait_for(lambda: mirror.blob_path(digest).exists())
    assert mirror.blob_path(digest).read_bytes() == data


async def test_stalled_body_resumes_on_the_next_upstream(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    data = payload(600_000, "stall")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    _slow(one, chunk=100_000, delay=1.0)  # stalls after the first chunk
    mirror = await start_mirror([one.url, two.url], read_timeout="200ms")
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert await resp.read() == data
    (resumed,) = two.registry.calls("GET", "blobs")
    assert resumed.headers["Range"] == "bytes=100000-"


async def test_cut_connection_without_a_resumable_upstream(
    fake: RunningFake, mirror: Mirror
) -> None:
    data = payload(256 * 1024, "cut")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.cut_after = 16 * 1024  # every response dies after 16 KiB

    await _assert_cut_short(mirror, digest, len(data))
    await wait_for(lambda: not mirror.tmp_files())
    assert mirror.blob_files() == []
    gets = fake.registry.calls("GET", "blobs")
    assert len(gets) > 1  # it tried to resume on the only endpoint
    assert all(re.fullmatch(r"bytes=\d+-", r.headers["Range"]) for r in gets[1:])

    fake.registry.faults.clear()
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert await resp.read() == data
    await wait_for(lambda: mirror.blob_path(digest).exists())
    assert mirror.blob_path(digest).read_bytes() == data


async def test_single_flight_for_concurrent_clients(fake: RunningFake, mirror: Mirror) -> None:
    data = payload(2 * MIB, "single-flight")
    digest = fake.registry.add_blob(data)
    _slow(fake, delay=0.02)

    async def pull() -> bytes:
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert resp.content_length == len(data)
        return await resp.read()

    async with asyncio.timeout(WAIT):
        bodies = await asyncio.gather(*(pull() for _ in range(20)))
    assert all(body == data for body in bodies)
    assert len(fake.registry.calls("GET", "blobs")) == 1
    assert fake.registry.blob_bytes_sent == len(data)
    assert (
        await mirror.metric(
            "mirrorproxy_cache_requests_total", namespace=NS, kind="blob", result="miss"
        )
        == 20
    )


async def test_single_flight_failure_reaches_every_client(
    fake: RunningFake, mirror: Mirror
) -> None:
    data = payload(MIB, "single-flight-bad")
    digest = fake.registry.add_blob(data)
    _slow(fake, delay=0.02)
    fake.registry.faults.wrong_bytes = True
    async with asyncio.timeout(WAIT):
        await asyncio.gather(*(_assert_cut_short(mirror, digest, len(data)) for _ in range(10)))
    assert len(fake.registry.calls("GET", "blobs")) == 1
    await wait_for(lambda: not mirror.tmp_files())
    assert mirror.blob_files() == []

    missing = "sha256:" + "0" * 64
    async with asyncio.timeout(WAIT):
        responses = await asyncio.gather(
            *(mirror.client.get(blob_path(REPO, missing)) for _ in range(10))
        )
    assert [r.status for r in responses] == [404] * 10
    assert {(await r.json())["errors"][0]["code"] for r in responses} == {"BLOB_UNKNOWN"}


async def test_client_arriving_mid_download_joins_it(fake: RunningFake, mirror: Mirror) -> None:
    data = payload(3 * MIB, "mid-download")
    digest = fake.registry.add_blob(data)
    _slow(fake)

    async def pull() -> bytes:
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        return await resp.read()

    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(pull())
        await wait_for(lambda: fake.registry.blob_bytes_sent >= int(1.5 * MIB))
        assert fake.registry.blob_bytes_sent < len(data)
        assert await pull() == data
        assert await first == data
    assert len(fake.registry.calls("GET", "blobs")) == 1


async def test_client_disconnect_does_not_stop_the_fill(fake: RunningFake, mirror: Mirror) -> None:
    data = payload(3 * MIB, "disconnect")
    digest = fake.registry.add_blob(data)
    _slow(fake)

    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        await wait_for(lambda: fake.registry.blob_bytes_sent >= int(1.2 * MIB))
        await resp.content.readexactly(1000)  # it got some bytes, then goes away
        resp.close()
    assert fake.registry.blob_bytes_sent < len(data)

    await wait_for(lambda: mirror.blob_path(digest).exists())
    assert mirror.blob_path(digest).read_bytes() == data
    resp = await mirror.client.get(blob_path(REPO, digest))
    assert await resp.read() == data
    assert len(fake.registry.calls("GET", "blobs")) == 1


@pytest.mark.parametrize("size", [4 * 1024, 300 * 1024], ids=["small", "large"])
async def test_blob_answers_carry_the_digest_as_etag(
    fake: RunningFake, mirror: Mirror, size: int
) -> None:
    """A miss (streamed), a HEAD and a small hit (one read) all name the content."""
    digest = fake.registry.add_blob(payload(size, f"etag-{size}"))
    miss = await mirror.client.get(blob_path(REPO, digest))
    await miss.read()
    await mirror.settled()
    head = await mirror.client.head(blob_path(REPO, digest))
    hit = await mirror.client.get(blob_path(REPO, digest))
    await hit.read()
    assert miss.headers["ETag"] == f'"{digest}"'
    assert head.headers["ETag"] == f'"{digest}"'
    assert hit.headers["Docker-Content-Digest"] == digest
    if size <= 64 * 1024:  # larger hits go through FileResponse, with its own validator
        assert hit.headers["ETag"] == f'"{digest}"'


async def test_a_blob_without_content_length_reaches_the_client_intact(
    aiohttp_server: AiohttpServer, start_mirror: MirrorFactory
) -> None:
    """An upstream blob sent chunked, without Content-Length, reaches the client whole
    and at once (the client's chunk parser once waited forever)."""
    data = payload(300 * KIB, "chunked upstream")
    digest = sha256(data)

    async def blob(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()  # no Content-Length, as some proxies send
        await resp.prepare(request)
        for i in range(0, len(data), 64 * KIB):
            await resp.write(data[i : i + 64 * KIB])
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_get(r"/v2/{name:.+}/blobs/{digest}", blob)
    upstream = await aiohttp_server(app, host="127.0.0.1")
    mirror = await start_mirror([str(upstream.make_url(""))])
    async with asyncio.timeout(1.0):  # once: the client's chunk parser waited forever
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert await resp.read() == data
