"""No unverified byte completes a response; a corrupting upstream is skipped; a failed
download cuts every client at once; a resume into a corrupt download restarts from 0.

The upstreams are FakeRegistry instances; ``flip_at`` corrupts one byte in the
middle of a blob, as a broken disk or proxy does. Each test asserts what the client
received, what each upstream was asked, and what the cache holds afterwards.
"""

from __future__ import annotations

import asyncio
import json
from dataclasses import dataclass

import aiohttp
import pytest
from multidict import CIMultiDictProxy

from mirrorproxy.http import keys
from mirrorproxy.pullthrough.corruption import CorruptBlobs
from tests.fakes.registry import payload
from tests.support.downloads import assert_mirror_holds_nothing, fill_of, get_or_cut
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.rawhttp import slow_get
from tests.support.waiting import WAIT, wait_for

# Every rule holds whether file bytes are copied (loopback clients) or sent by sendfile.
pytestmark = pytest.mark.usefixtures("send_by")

KIB = 1024
MIB = 1024 * KIB
UP = "mirrorproxy_upstream_up"
MISMATCHES = "mirrorproxy_digest_mismatches_total"


@dataclass
class Got:
    """What a client received: the status, headers, the body bytes, and whether the
    connection was cut before the body was complete."""

    status: int
    headers: CIMultiDictProxy[str]
    body: bytes
    cut: bool


async def fetch(mirror: Mirror, digest: str, headers: dict[str, str] | None = None) -> Got:
    """GET a blob, keeping whatever arrived if the connection is cut (bounded)."""
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest), headers=headers)
        body = bytearray()
        try:
            async for chunk in resp.content.iter_any():
                body += chunk
        except aiohttp.ClientPayloadError:
            return Got(resp.status, resp.headers, bytes(body), cut=True)
        return Got(resp.status, resp.headers, bytes(body), cut=False)


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def slow(fake: RunningFake, *, chunk: int = 128 * KIB, delay: float = 0.01) -> None:
    fake.registry.faults.chunk_size = chunk
    fake.registry.faults.chunk_delay = delay


def blob_gets(fake: RunningFake) -> list[str]:
    """The Range header (or "") of every blob GET the fake received."""
    return [r.headers.get("Range", "") for r in fake.registry.calls("GET", "blobs")]


# -- 1: the last byte of every response waits for the digest -------------------------


@pytest.mark.parametrize("live", [True, False], ids=["live", "file"])
@pytest.mark.parametrize("rng", ["bytes=0-1023", "bytes=100000-199999", "bytes=2000000-"])
async def test_a_range_during_a_corrupt_download_never_completes(
    fake: RunningFake, mirror: Mirror, rng: str, live: bool
) -> None:
    data = payload(4 * MIB, "one flipped byte")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.flip_at = 3 * MIB  # after every range asked for
    slow(fake)
    if not live:
        mirror.tune(live_max=0)
    first = asyncio.create_task(fetch(mirror, digest))
    await wait_for(lambda: fake.registry.blob_bytes_sent >= 256 * KIB)
    got = await fetch(mirror, digest, {"Range": rng})
    assert got.status == 206
    start = int(rng.removeprefix("bytes=").split("-")[0])
    sent = bytearray(data)
    sent[3 * MIB] ^= 0xFF
    assert got.cut  # the range never completes: the blob did not verify
    assert bytes(sent[start:]).startswith(got.body)
    whole = await first
    assert whole.cut
    assert len(whole.body) < len(data)
    await mirror.settled()
    assert mirror.blob_files() == []
    assert mirror.tmp_files() == []
    assert len(fake.registry.calls("GET", "blobs")) == 1


async def test_a_range_of_a_good_download_ends_once_the_blob_is_verified(
    fake: RunningFake, mirror: Mirror
) -> None:
    data = payload(4 * MIB, "verified first")
    digest = fake.registry.add_blob(data)
    slow(fake)
    mirror.tune(live_max=0)
    first = asyncio.create_task(fetch(mirror, digest))
    await wait_for(lambda: fake.registry.blob_bytes_sent >= 256 * KIB)
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest), headers={"Range": "bytes=0-1023"})
        assert resp.status == 206
        assert resp.headers["Accept-Ranges"] == "bytes"
        assert await resp.content.readexactly(1023) == data[:1023]
        last = await resp.content.readexactly(1)
    # The 1024th byte left only after the upstream had sent all 4 MiB.
    assert fake.registry.blob_bytes_sent == len(data)
    assert last == data[1023:1024]
    assert (await first).body == data
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data


async def test_a_corrupt_blob_streamed_through_uncached_misses_its_last_byte(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], cache={"max_size": "64KiB"})  # never cached
    data = payload(MIB, "streamed and corrupt")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.flip_at = 500_000
    got = await fetch(mirror, digest)
    assert got.status == 200
    assert got.cut
    assert len(got.body) == len(data) - 1  # everything but the last byte
    assert await mirror.metric(MISMATCHES, namespace=NS) == 1
    fake.registry.faults.clear()
    assert (await fetch(mirror, digest)).body == data
    assert mirror.blob_files() == []


@pytest.mark.parametrize("live", [True, False], ids=["live", "from-file"])
async def test_a_range_to_the_end_never_gets_the_last_byte_of_a_corrupt_blob(
    fake: RunningFake, mirror: Mirror, monkeypatch: pytest.MonkeyPatch, live: bool
) -> None:
    """A Range to the end that joins a corrupt download, live or from the file, is cut
    before the last byte."""
    if not live:
        mirror.tune(live_max=0)
        mirror.tune(write_batch=64 * KIB)  # the file grows meanwhile
    data = payload(MIB, "corrupt range")
    sent = bytes(b ^ 0xFF for b in data)  # what the lying upstream sends
    digest = fake.registry.add_blob(data)
    fake.registry.faults.wrong_bytes = True
    fake.registry.faults.chunk_size = 64 * KIB
    fake.registry.faults.chunk_delay = 0.02
    start = 300_001
    whole = asyncio.create_task(get_or_cut(mirror, digest))
    await wait_for(lambda: bool(mirror.client.app[keys.PULLTHROUGH]._fills))
    fill = fill_of(mirror, digest)
    await wait_for(lambda: fill.received > start)  # joins mid-download
    got = bytearray()

    async def read_range() -> None:
        headers = {"Range": f"bytes={start}-"}
        resp = await mirror.client.get(blob_path(REPO, digest), headers=headers)
        assert resp.status == 206
        async for chunk in resp.content.iter_any():
            got.extend(chunk)

    async with asyncio.timeout(WAIT):
        with pytest.raises(aiohttp.ClientPayloadError):
            await read_range()
    assert await whole is None
    assert got == sent[start : start + len(got)]
    if live:
        assert len(got) == len(data) - start - 1  # all but the held-back last byte
    else:
        assert len(got) < len(data) - start  # never the last byte
    await mirror.settled()
    assert mirror.blob_files() == []
    await assert_mirror_holds_nothing(mirror)


# -- 2: a corrupting upstream is skipped -----------------------------------------------


async def test_a_corrupting_upstream_is_skipped_by_the_next_fill(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    bad, good = await start_fake(), await start_fake()
    data = payload(2 * MIB, "corrupting first upstream")
    digest = bad.registry.add_blob(data)
    good.registry.add_blob(data)
    bad.registry.faults.flip_at = MIB
    mirror = await start_mirror([bad.url, good.url], cooldown="0.2s")

    first = await fetch(mirror, digest)
    assert first.cut
    await mirror.settled()
    # Even once the cooldown is over, the next fill of this blob goes elsewhere.
    await asyncio.sleep(0.3)
    second = await fetch(mirror, digest)
    assert second.body == data
    assert not second.cut
    await mirror.settled()
    assert blob_gets(bad) == [""]
    assert blob_gets(good) == [""]
    assert mirror.blob_path(digest).read_bytes() == data
    assert mirror.tmp_files() == []


async def test_only_a_verified_body_makes_a_corrupting_upstream_healthy(
    start_fake: FakeFactory, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    bad, good = await start_fake(), await start_fake()
    big = payload(2 * MIB, "big, corrupt at 1 MiB")
    small = payload(64 * KIB, "small, below the flipped byte")
    bad.registry.add_image(REPO, "1", layer_sizes=(1000,))  # a tag for it to answer
    for data in (big, small):
        bad.registry.add_blob(data)
        good.registry.add_blob(data)
    other = payload(3 * MIB, "another corrupt blob")
    bad.registry.add_blob(other)
    good.registry.add_blob(other)
    bad.registry.faults.flip_at = MIB
    mirror = await start_mirror([bad.url, good.url], cooldown="0.2s", tag_ttl="0s")
    big_digest, small_digest, other_digest = (
        bad.registry.add_blob(d) for d in (big, small, other)
    )

    assert (await fetch(mirror, big_digest)).cut
    assert await mirror.metric(UP, namespace=NS, endpoint=bad.url) == 0
    await asyncio.sleep(0.3)  # the cooldown is over: the bad endpoint is asked again
    resp = await mirror.client.get(manifest_path(REPO, "1"))
    assert resp.status == 200
    assert [r.path for r in bad.registry.calls(kind="manifests")] == [f"/v2/{REPO}/manifests/1"]
    # A 200 from it says nothing about its bytes: still down.
    assert await mirror.metric(UP, namespace=NS, endpoint=bad.url) == 0
    # Another mismatch doubles its cooldown.
    assert (await fetch(mirror, other_digest)).cut
    cooldowns = [m for m in caplog.messages if bad.url.rstrip("/") in m and "cooldown" in m]
    assert [c.rsplit(" ", 1)[1] for c in cooldowns[-2:]] == ["0.2s", "0.4s"]
    await asyncio.sleep(0.5)
    # A blob it serves right, verified, makes it healthy again.
    assert (await fetch(mirror, small_digest)).body == small
    assert blob_gets(bad)[-1] == ""
    assert len(bad.registry.calls("GET", "blobs")) == 3
    assert await mirror.metric(UP, namespace=NS, endpoint=bad.url) == 1


# -- 3: a failed download cuts every client at once ------------------------------------


async def test_a_failed_download_cuts_a_slow_client_on_the_file_at_once(
    fake: RunningFake, mirror: Mirror
) -> None:
    """The slow client reads nothing more after the failure, yet its request ends and
    lets go of the temp file: the drop does not wait for the client to take bytes."""
    size = 48 * MIB
    data = payload(size, "cut them all")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.flip_at = size - 10
    fake.registry.faults.chunk_size = MIB
    fake.registry.faults.chunk_delay = 0.002
    port = mirror.client.port
    assert port is not None
    async with slow_get(port, blob_path(REPO, digest)) as reader:
        await reader.body(MIB)  # then it stops reading for a while
        got = await fetch(mirror, digest)  # cut when the download fails
        assert got.cut
        assert len(got.body) <= size - 1
        await mirror.settled()
        await assert_mirror_holds_nothing(mirror)  # before the slow client reads again
        await wait_for(lambda: _inflight(mirror) == 0)
        # The slow client was far behind; it gets no more than what was in flight
        # (socket buffers: a few MiB), not the rest of what is on disk.
        with pytest.raises(ConnectionError):
            await reader.body(size)
        assert len(reader.received) < 16 * MIB
    await mirror.settled()
    assert mirror.tmp_files() == []
    assert mirror.blob_files() == []


def _inflight(mirror: Mirror) -> float:
    metrics = mirror.client.app[keys.METRICS]
    return sum(s.value for family in metrics.inflight_requests.collect() for s in family.samples)


# -- 4: a resume into a corrupt download restarts from byte 0 --------------------------


async def test_a_resume_after_a_corrupt_download_is_refused_then_served_afresh(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    bad, good = await start_fake(), await start_fake()
    data = payload(2 * MIB, "resume after corruption")
    digest = bad.registry.add_blob(data)
    good.registry.add_blob(data)
    bad.registry.faults.flip_at = MIB
    mirror = await start_mirror([bad.url, good.url], cooldown="0.2s")
    clock = Clock()
    mirror.client.app[keys.PULLTHROUGH].corrupt = CorruptBlobs(resume_window=30, clock=clock)

    first = await fetch(mirror, digest)
    assert first.cut
    held = len(first.body)
    # The client resumes where it was cut: refused, nothing is fetched for it.
    resumed = await fetch(mirror, digest, {"Range": f"bytes={held}-"})
    assert resumed.status == 409
    error = json.loads(resumed.body)["errors"][0]
    assert error["code"] == "RANGE_INVALID"
    assert "from byte 0" in error["message"]
    assert len(bad.registry.calls("GET", "blobs")) == 1
    assert good.registry.calls("GET", "blobs") == []
    # From byte 0 it is served, from the good upstream, and cached.
    assert (await fetch(mirror, digest)).body == data
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data
    # Even now, a resume inside the window is refused (its prefix is the bad one)...
    assert (await fetch(mirror, digest, {"Range": "bytes=5-"})).status == 409
    # ... but a range from byte 0 is fine, and after the window any range is.
    early = await fetch(mirror, digest, {"Range": "bytes=0-99"})
    assert (early.status, early.body) == (206, data[:100])
    clock.now += 31
    late = await fetch(mirror, digest, {"Range": f"bytes={held}-"})
    assert (late.status, late.body) == (206, data[held:])
    assert len(good.registry.calls("GET", "blobs")) == 1
