"""One set of HTTP rules for blob answers, whichever way the blob is served.

The same request must get the same answer from a cached blob (large: sendfile;
small: one read), a blob still downloading, and a blob streamed through uncached,
with the cache on the local disk or in an S3 bucket (a real SeaweedFS):
RFC 9110 ranges (200 for an unusable or multi-range header, 416 only when nothing
overlaps), the quoted digest as ETag (so ``If-None-Match`` gives 304), and
``Accept-Ranges: bytes`` on every answer, HEAD included.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from mirrorproxy.core.oci import parse_digest
from mirrorproxy.http import keys
from tests.fakes.registry import payload, sha256
from tests.support.mirror import Mirror, MirrorFactory, RunningFake
from tests.support.paths import REPO, blob_path
from tests.support.seaweed import SeaweedFS
from tests.support.waiting import WAIT, wait_for

# Every rule holds whether file bytes are copied (loopback clients) or sent by sendfile.
pytestmark = pytest.mark.usefixtures("send_by")

KIB = 1024
MIB = 1024 * KIB
PATHS = ["cached", "cached-small", "downloading", "streamed", "s3-cached", "s3-downloading"]

Get = Callable[[dict[str, str]], Awaitable[aiohttp.ClientResponse]]


@pytest.fixture(params=PATHS)
async def served(
    request: pytest.FixtureRequest, fake: RunningFake, start_mirror: MirrorFactory
) -> AsyncIterator[tuple[Mirror, str, bytes, Get]]:
    """A blob and a way to GET it that reaches the path under test each time."""
    path = request.param
    size = 20 * KIB if path == "cached-small" else 2 * MIB
    data = payload(size, f"rules {path}")
    digest = fake.registry.add_blob(data)
    cache = {"max_size": "64KiB"} if path == "streamed" else None
    storage = None
    if path.startswith("s3-"):  # the same rules with the blob in an S3 bucket
        server: SeaweedFS = request.getfixturevalue("seaweedfs")
        storage = server.storage(prefix=f"t-{uuid.uuid4().hex}/")
    mirror = await start_mirror([fake.url], cache=cache, storage=storage)
    if path.endswith("cached"):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert await resp.read() == data
        await mirror.settled()
        assert await mirror.stored(digest)
    feeder: list[asyncio.Task[bytes]] = []

    async def get(headers: dict[str, str]) -> aiohttp.ClientResponse:
        if path.endswith("downloading"):
            await mirror.settled()
            if storage is None:
                for f in mirror.blob_files():
                    f.unlink()  # forget it: each request joins a fresh, slow download
            else:
                blobs = mirror.client.app[keys.ENGINE].blobs
                await asyncio.to_thread(blobs.delete, parse_digest(digest))
            fake.registry.faults.chunk_size = 64 * KIB
            fake.registry.faults.chunk_delay = 0.02
            sent = fake.registry.blob_bytes_sent
            feeder.append(asyncio.create_task(_read_all(mirror, digest)))
            await wait_for(lambda: fake.registry.blob_bytes_sent > sent)
        return await mirror.client.get(blob_path(REPO, digest), headers=headers)

    yield mirror, digest, data, get
    for task in feeder:
        await task


async def _read_all(mirror: Mirror, digest: str) -> bytes:
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        return await resp.read()


@pytest.mark.parametrize(
    ("rng", "status", "part"),
    [
        ("bytes=0-9,20-29", 200, None),  # several ranges: the whole blob
        ("bytes=abc", 200, None),  # unparsable: ignored
        ("bytes=5-3", 200, None),  # invalid (last before first): ignored
        ("items=0-5", 200, None),  # another unit: ignored
        ("bytes=10-19", 206, (10, 20)),
        ("bytes=-10", 206, (-10, None)),
        ("bytes=1048576-", 206, (1048576, None)),
        ("bytes=-0", 416, None),  # nothing to send
        ("bytes=100000000-", 416, None),  # past the end
    ],
)
async def test_ranges_get_the_same_answer_on_every_path(
    served: tuple[Mirror, str, bytes, Get],
    rng: str,
    status: int,
    part: tuple[int, int | None] | None,
) -> None:
    _, digest, data, get = served
    if part is not None and part[0] >= len(data):
        rng, part = "bytes=10-19", (10, 20)  # the small blob: a range inside it
    async with asyncio.timeout(WAIT):
        resp = await get({"Range": rng})
        body = await resp.read()
    assert resp.status == status
    assert resp.headers["Accept-Ranges"] == "bytes"
    if status == 416:
        assert resp.headers["Content-Range"] == f"bytes */{len(data)}"
        return
    assert resp.headers["ETag"] == f'"{digest}"'
    assert resp.headers["Docker-Content-Digest"] == digest
    if part is None:
        assert body == data
        assert "Content-Range" not in resp.headers
        return
    start, end = part
    expected = data[start:end]
    assert body == expected
    first = start % len(data)
    assert (
        resp.headers["Content-Range"] == f"bytes {first}-{first + len(expected) - 1}/{len(data)}"
    )


async def test_the_etag_is_the_digest_and_makes_a_304_on_every_path(
    served: tuple[Mirror, str, bytes, Get],
) -> None:
    mirror, digest, data, get = served
    head = await mirror.client.head(blob_path(REPO, digest))
    assert head.status == 200
    assert head.headers["ETag"] == f'"{digest}"'
    assert head.headers["Accept-Ranges"] == "bytes"
    assert head.headers["Content-Length"] == str(len(data))
    for value in (head.headers["ETag"], f"W/{head.headers['ETag']}", "*"):
        resp = await get({"If-None-Match": value})
        assert resp.status == 304
        assert resp.headers["ETag"] == f'"{digest}"'
        assert await resp.read() == b""
        head = await mirror.client.head(blob_path(REPO, digest), headers={"If-None-Match": value})
        assert head.status == 304
    resp = await get({"If-None-Match": '"sha256:other"'})
    assert resp.status == 200
    assert await resp.read() == data
    resp = await get({"If-Match": '"sha256:other"'})
    assert resp.status == 412
    resp = await get({"Range": "bytes=0-9", "If-Range": '"sha256:other"'})
    assert resp.status == 200  # the range is void: the whole blob
    assert await resp.read() == data


async def test_head_of_a_blob_whose_upstream_states_no_length_still_has_one(
    aiohttp_server: AiohttpServer, start_mirror: MirrorFactory
) -> None:
    data = payload(300 * KIB, "no length upstream")
    digest = sha256(data)
    ranges: list[str] = []

    async def blob(request: web.Request) -> web.StreamResponse:
        ranges.append(request.headers.get("Range", ""))
        resp = web.StreamResponse()
        resp.enable_chunked_encoding()  # no Content-Length, not even on HEAD
        await resp.prepare(request)
        if request.method == "GET":
            await resp.write(data)
        await resp.write_eof()
        return resp

    app = web.Application()
    app.router.add_route("*", r"/v2/{name:.+}/blobs/{digest}", blob)
    upstream = await aiohttp_server(app, host="127.0.0.1")
    mirror = await start_mirror([str(upstream.make_url(""))])
    resp = await mirror.client.head(blob_path(REPO, digest))
    assert resp.status == 200
    assert resp.headers["Content-Length"] == str(len(data))
    assert resp.headers["Accept-Ranges"] == "bytes"
    # It ignores ranges too, so the mirror learnt the size by downloading the blob.
    assert ranges == ["", "bytes=0-0", ""]
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data
