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

from tests.fakes.registry import payload
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory
from tests.support.paths import NS, REPO, blob_path
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB
NEVER_CACHED = {"max_size": "1MiB"}


async def uncached_mirror(start_mirror: MirrorFactory, urls: list[str]) -> Mirror:
    return await start_mirror(urls, cache=NEVER_CACHED)


async def test_a_cut_whole_blob_resumes_on_the_next_upstream(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    data = payload(3 * MIB, "relay resumes")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    cut = 700 * KIB
    one.registry.faults.cut_after = cut
    mirror = await uncached_mirror(start_mirror, [one.url, two.url])

    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        assert resp.content_length == len(data)
        assert await resp.read() == data
    (resumed,) = two.registry.calls("GET", "blobs")
    assert resumed.headers["Range"] == f"bytes={cut}-"
    assert mirror.blob_files() == []  # still not cached
    await wait_for(lambda: not mirror.tmp_files())


async def test_a_cut_range_resumes_within_the_range(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    data = payload(4 * MIB, "range resumes")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    start, end = 1 * MIB, 3 * MIB - 1
    cut = 300 * KIB
    one.registry.faults.cut_after = cut
    mirror = await uncached_mirror(start_mirror, [one.url, two.url])

    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(
            blob_path(REPO, digest), headers={"Range": f"bytes={start}-{end}"}
        )
        assert resp.status == 206
        assert await resp.read() == data[start : end + 1]
    (resumed,) = two.registry.calls("GET", "blobs")
    assert resumed.headers["Range"] == f"bytes={start + cut}-{end}"


async def test_a_resume_that_ignores_range_is_cut_to_the_rest(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    data = payload(2 * MIB, "resume from 0")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    one.registry.faults.cut_after = 500 * KIB
    two.registry.faults.ignore_range = True  # answers 200 with the whole body
    mirror = await uncached_mirror(start_mirror, [one.url, two.url])
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert await resp.read() == data


async def test_wrong_bytes_after_a_resume_never_complete_the_blob(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    data = payload(2 * MIB, "corrupt rest")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    one.registry.faults.cut_after = 500 * KIB
    two.registry.faults.wrong_bytes = True
    mirror = await uncached_mirror(start_mirror, [one.url, two.url])

    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200
        body = bytearray()
        try:
            async for chunk in resp.content.iter_any():
                body += chunk
        except Exception:  # noqa: S110 - the cut is what is expected
            pass
    assert len(body) < len(data)  # the last byte was held back
    mismatches = "mirrorproxy_digest_mismatches_total"
    assert await mirror.metric(mismatches, namespace=NS) == 1


async def test_an_upstream_that_always_cuts_is_resumed_a_bounded_number_of_times(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    fake = await start_fake()
    data = payload(2 * MIB, "always cut")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.cut_after = 64 * KIB
    mirror = await uncached_mirror(start_mirror, [fake.url])

    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        body = bytearray()
        try:
            async for chunk in resp.content.iter_any():
                body += chunk
        except Exception:  # noqa: S110 - the cut is what is expected
            pass
    assert len(body) < len(data)
    gets = fake.registry.calls("GET", "blobs")
    assert 2 <= len(gets) <= 1 + 3 + 1  # the first, at most max_resumes, and no loop
    assert all(re.fullmatch(r"bytes=\d+-", r.headers["Range"]) for r in gets[-2:])
