"""A blob relayed uncached resumes where its upstream cut it, as a download does.

Stream-through (the blob cannot be cached: here it is larger than ``max_size``)
reads one upstream response per client. When that response is cut, the relay asks
the next usable endpoint for the rest with ``Range`` and the client sees one body;
a whole blob's hash runs on across the seam, so bytes that do not add up to the
digest still never get their last byte out.
"""

from __future__ import annotations

import asyncio
import re
from dataclasses import dataclass

import aiohttp

from tests.fakes.registry import payload
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB


@dataclass
class Setup:
    """A never-caching mirror over ``upstreams``, each holding ``data``; the first
    cuts every response after ``cut`` bytes."""

    mirror: Mirror
    upstreams: list[RunningFake]
    data: bytes
    digest: str


async def cut_first(
    start_fake: FakeFactory, start_mirror: MirrorFactory, *, size: int, cut: int, n: int = 2
) -> Setup:
    upstreams = [await start_fake() for _ in range(n)]
    data = payload(size, f"cut at {cut} of {size}")
    digests = {fake.registry.add_blob(data) for fake in upstreams}
    upstreams[0].registry.faults.cut_after = cut
    urls = [fake.url for fake in upstreams]
    mirror = await start_mirror(urls, cache={"max_size": "1MiB"})  # never cached
    return Setup(mirror, upstreams, data, digests.pop())


async def read_until_cut(mirror: Mirror, digest: str) -> bytes:
    """What a client gets before the mirror cuts the body (all of it if none)."""
    body = bytearray()
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        try:
            async for chunk in resp.content.iter_any():
                body += chunk
        except aiohttp.ClientPayloadError:
            pass
    return bytes(body)


async def test_a_cut_whole_blob_resumes_on_the_next_upstream(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    cut = 700 * KIB
    s = await cut_first(start_fake, start_mirror, size=3 * MIB, cut=cut)
    async with asyncio.timeout(WAIT):
        resp = await s.mirror.client.get(blob_path(REPO, s.digest))
        assert resp.status == 200
        assert resp.content_length == len(s.data)
        assert await resp.read() == s.data
    (resumed,) = s.upstreams[1].registry.calls("GET", "blobs")
    assert resumed.headers["Range"] == f"bytes={cut}-"
    assert s.mirror.blob_files() == []  # still not cached
    await wait_for(lambda: not s.mirror.tmp_files())


async def test_a_cut_range_resumes_within_the_range(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    cut = 300 * KIB
    s = await cut_first(start_fake, start_mirror, size=4 * MIB, cut=cut)
    start, end = 1 * MIB, 3 * MIB - 1
    async with asyncio.timeout(WAIT):
        resp = await s.mirror.client.get(
            blob_path(REPO, s.digest), headers={"Range": f"bytes={start}-{end}"}
        )
        assert resp.status == 206
        assert await resp.read() == s.data[start : end + 1]
    (resumed,) = s.upstreams[1].registry.calls("GET", "blobs")
    assert resumed.headers["Range"] == f"bytes={start + cut}-{end}"


async def test_a_resume_that_ignores_range_is_cut_to_the_rest(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    s = await cut_first(start_fake, start_mirror, size=2 * MIB, cut=500 * KIB)
    s.upstreams[1].registry.faults.ignore_range = True  # answers 200 with the whole body
    assert await read_until_cut(s.mirror, s.digest) == s.data


async def test_wrong_bytes_after_a_resume_never_complete_the_blob(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    s = await cut_first(start_fake, start_mirror, size=2 * MIB, cut=500 * KIB)
    s.upstreams[1].registry.faults.wrong_bytes = True
    body = await read_until_cut(s.mirror, s.digest)
    assert len(body) == len(s.data) - 1  # all but the last byte, held back
    mismatches = "mirrorproxy_digest_mismatches_total"
    assert await s.mirror.metric(mismatches, namespace=NS) == 1


async def test_an_upstream_that_always_cuts_is_resumed_a_bounded_number_of_times(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    s = await cut_first(start_fake, start_mirror, size=2 * MIB, cut=64 * KIB, n=1)
    body = await read_until_cut(s.mirror, s.digest)
    assert len(body) < len(s.data)
    gets = s.upstreams[0].registry.calls("GET", "blobs")
    assert 2 <= len(gets) <= 1 + 3 + 1  # the first, at most max_resumes, and no loop
    assert all(re.fullmatch(r"bytes=\d+-", r.headers["Range"]) for r in gets[1:])
