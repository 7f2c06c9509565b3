"""Clients of a running blob download (followers), and what the download leaves behind.

A client asking for a blob that is being downloaded joins that download: at its
head it gets chunks from memory (live), behind it reads the temp file. Each test
drives one cold blob through the mirror while something happens to the download
(a Range joins mid-way, a client joins just as the commit renames the file, a
client leaves, a resume restarts from byte 0 or lands on wrong content, the
download fails, the server shuts down) and checks what every client receives, and
that afterwards nothing is held (memory, budget, temp files, descriptors, threads).
A download is shared only within its namespace: clients of another namespace wait
for its outcome and, if it fails, share one download of their own.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import threading
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from mirrorproxy.cache import BlobInfo
from mirrorproxy.cache import blobs as blobs_module
from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.core.oci import Digest, parse_digest
from mirrorproxy.http import keys
from tests.fakes.registry import payload
from tests.support.downloads import (
    Disk,
    assert_mirror_holds_nothing,
    assert_nothing_held,
    blob_threads,
    fill_of,
    get,
    get_or_cut,
)
from tests.support.listening import listening, with_server
from tests.support.logs import errors_logged
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake, mirror_config
from tests.support.paths import NS, REPO, blob_path
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB
WRITE_ERRORS = "mirrorproxy_cache_write_errors_total"
MISMATCHES = "mirrorproxy_digest_mismatches_total"


async def test_range_clients_joining_a_download_get_exactly_their_bytes(
    fake: RunningFake, mirror: Mirror, disk: Disk
) -> None:
    """Range clients joining a download get exactly their bytes: an open range at the head
    live from memory, ranges behind it from the file once the disk has them."""
    data = payload(2 * MIB, "ranges")
    size = len(data)
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 128 * KIB
    fake.registry.faults.chunk_delay = 0.01
    whole = asyncio.create_task(get(mirror, digest))
    await wait_for(lambda: bool(mirror.client.app[keys.PULLTHROUGH]._fills))
    fill = fill_of(mirror, digest)
    await wait_for(lambda: fill.received >= MIB)  # nothing is on disk (the disk stalls)

    async def ranged(header: str) -> tuple[int, str, bytes]:
        async with asyncio.timeout(WAIT):
            resp = await mirror.client.get(blob_path(REPO, digest), headers={"Range": header})
            return resp.status, resp.headers.get("Content-Range", ""), await resp.read()

    joined = fill.received - 12345  # mid-chunk, in memory: live
    to_end = asyncio.create_task(ranged(f"bytes={joined}-"))
    middle = asyncio.create_task(ranged("bytes=1000-299999"))  # from the file
    suffix = asyncio.create_task(ranged("bytes=-1000"))  # past the head: from the file
    # Live clients (the whole GET, the open range) finish before the disk has a byte.
    assert await whole == data
    assert await to_end == (206, f"bytes {joined}-{size - 1}/{size}", data[joined:])
    assert not middle.done()
    assert not suffix.done()
    disk.go.set()
    assert await middle == (206, f"bytes 1000-299999/{size}", data[1000:300000])
    assert await suffix == (206, f"bytes {size - 1000}-{size - 1}/{size}", data[-1000:])
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data
    assert len(fake.registry.calls("GET", "blobs")) == 1
    await assert_mirror_holds_nothing(mirror)


def http_get_raw(host: str, port: int, path: str) -> bytes:
    """Everything the server writes for one ``Connection: close`` GET, up to EOF."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\n\r\n"
    chunks = []
    with socket.create_connection((host, port), timeout=WAIT) as sock:
        sock.sendall(request.encode())
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


async def test_follower_racing_the_commit_rename_gets_the_whole_blob(
    start_fake: FakeFactory,
    start_mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A follower whose cache lookup missed just before the rename is sent the whole blob.

    The interleaving is forced: the commit's publish (in a worker thread) waits until
    the follower's lookup has missed, and that lookup returns only once the rename is
    done, so the follower joins the fill with its temp file already gone.
    """
    fake = await start_fake()
    img = fake.registry.add_image(REPO, "3", layer_sizes=(300_000,))
    layer, digest = img.layers[0], img.layer_digests[0]
    mirror = await start_mirror([fake.url])

    in_publish, looked, renamed = threading.Event(), threading.Event(), threading.Event()
    publish = blobs_module._publish  # no public hook holds the rename: wrap the function

    def held_publish(fd: int, tmp_path: Path, final: Path) -> None:  # a worker thread
        in_publish.set()
        looked.wait(WAIT)
        try:
            publish(fd, tmp_path, final)  # fsync, rename, fsync of the directory
        finally:
            renamed.set()

    lookup = FileBlobStore.lookup
    armed: list[Digest] = []  # the digest whose next lookup is the follower's

    async def racing_lookup(self: FileBlobStore, d: Digest) -> BlobInfo | None:
        info = await lookup(self, d)
        if d in armed:
            armed.clear()
            looked.set()
            # Block the loop (on purpose) until the worker thread has renamed: the
            # follower then goes on with a miss in hand and the temp file gone.
            renamed.wait(WAIT)
        return info

    monkeypatch.setattr(blobs_module, "_publish", held_publish)
    monkeypatch.setattr(FileBlobStore, "lookup", racing_lookup)

    async with asyncio.timeout(WAIT):
        leader = asyncio.create_task(mirror.client.get(blob_path(REPO, digest)))
        await wait_for(in_publish.is_set)
        armed.append(parse_digest(digest))
        caplog.set_level(logging.WARNING)
        server = mirror.client.server
        port = server.port
        assert port is not None
        wire = await asyncio.to_thread(http_get_raw, server.host, port, blob_path(REPO, digest))
        resp = await leader
        assert resp.status == 200
        assert await resp.read() == layer

    assert looked.is_set()
    assert renamed.is_set()
    head, _, body = wire.partition(b"\r\n\r\n")
    status_line, *header_lines = head.decode("latin-1").split("\r\n")
    assert status_line == "HTTP/1.1 200 OK"
    headers = {k.lower(): v.strip() for k, _, v in (h.partition(":") for h in header_lines)}
    assert headers["content-length"] == str(len(layer))
    assert headers["docker-content-digest"] == digest
    assert body == layer  # the whole blob, and nothing after it (no second response)
    assert len(fake.registry.calls("GET", "blobs")) == 1
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == layer
    assert errors_logged(caplog) == []


async def test_a_client_joining_a_verified_download_that_is_committing_is_a_hit(
    start_fake: FakeFactory, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Once every byte is verified the blob costs no upstream byte: a request joining the
    download while it fsyncs and renames counts as a hit, as a lookup a moment later would.

    (A node pulls again right after a pull; the hit ratio must not depend on the disk.)
    """
    fake = await start_fake()
    img = fake.registry.add_image(REPO, "4", layer_sizes=(200_000,))
    layer, digest = img.layers[0], img.layer_digests[0]
    mirror = await start_mirror([fake.url])
    in_publish, release = threading.Event(), threading.Event()
    publish = blobs_module._publish

    def held_publish(fd: int, tmp_path: Path, final: Path) -> None:  # a worker thread
        in_publish.set()
        release.wait(WAIT)
        publish(fd, tmp_path, final)

    monkeypatch.setattr(blobs_module, "_publish", held_publish)
    counts = "mirrorproxy_cache_requests_total"
    try:
        async with asyncio.timeout(WAIT):
            first = await mirror.client.get(blob_path(REPO, digest))
            assert await first.read() == layer  # the last byte goes out before the rename
            await wait_for(in_publish.is_set)
            assert fill_of(mirror, digest).verified
            second = await mirror.client.get(blob_path(REPO, digest))
            assert await second.read() == layer
    finally:
        release.set()
    await mirror.settled()
    text = await (await mirror.client.get("/metrics")).text()
    got = {
        s.labels["result"]: s.value
        for f in text_string_to_metric_families(text)
        for s in f.samples
        if s.name == counts and s.labels["kind"] == "blob" and s.labels["namespace"] == NS
    }
    assert (got["miss"], got["hit"]) == (1.0, 1.0)
    assert len(fake.registry.calls("GET", "blobs")) == 1


async def test_a_live_client_that_goes_away_does_not_disturb_the_others(
    fake: RunningFake, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A live client leaving mid-download leaves the download, the other clients and the
    cached blob intact."""
    data = payload(4 * MIB, "quitter")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 128 * KIB
    fake.registry.faults.chunk_delay = 0.005
    config = with_server(mirror_config(tmp_path / "cache", [fake.url]))
    # The production listener: handlers are not cancelled when their client goes away.
    async with (
        listening(config, handler_cancellation=False) as m,
        aiohttp.ClientSession() as session,
    ):
        pt = m.runner.app[keys.PULLTHROUGH]
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(m.host, m.port)
            path = blob_path(REPO, digest)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            (fill,) = pt._fills.values()
            await wait_for(lambda: fill.live_count == 1)
            writer.close()  # goes away mid-download, while live
            async with session.get(f"{m.url}{path}") as resp:
                assert await resp.read() == data
            await pt.settled()
        assert fill.live_count == 0
        hex_ = digest.split(":", 1)[1]
        assert (config.cache.dir / "blobs" / "sha256" / hex_[:2] / hex_).read_bytes() == data
        assert len(fake.registry.calls("GET", "blobs")) == 1
        await assert_nothing_held(pt, config.cache.dir)
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


async def test_a_resume_that_restarts_from_zero_keeps_live_and_file_clients_right(
    start_fake: FakeFactory, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume answered with the whole body (200 to a Range) still gives live and file
    clients exactly the blob."""
    one, two = await start_fake(), await start_fake()
    data = payload(3 * MIB, "resume from zero")
    digest = one.registry.add_blob(data)
    two.registry.add_blob(data)
    one.registry.faults.cut_after = 700_001
    for reg in (one.registry, two.registry):
        reg.faults.chunk_size = 128 * KIB
        reg.faults.chunk_delay = 0.005
    two.registry.faults.ignore_range = True  # the resume gets 200 and the whole body
    mirror = await start_mirror([one.url, two.url], cooldown="1s")
    mirror.tune(live_max=1)  # one live client, two on the file

    bodies = await asyncio.gather(*(get(mirror, digest) for _ in range(3)))
    assert bodies == [data] * 3
    (resumed,) = two.registry.calls("GET", "blobs")
    assert resumed.headers["Range"] == "bytes=700001-"
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data
    await assert_mirror_holds_nothing(mirror)


async def test_a_resume_on_a_longer_blob_never_completes_a_follower(
    start_fake: FakeFactory, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A resume onto an endpoint with other, longer content under the digest fails the
    download, and the client following the file is cut, not completed."""
    one, two = await start_fake(), await start_fake()
    data = payload(512 * KIB, "right")
    digest = one.registry.add_blob(data)
    # The second endpoint has other, longer content under that digest (a broken mirror).
    two.registry._blobs[digest] = payload(MIB, "wrong and longer")
    one.registry.faults.cut_after = 128 * KIB
    two.registry.faults.chunk_size = 64 * KIB
    two.registry.faults.chunk_delay = 0.03
    mirror = await start_mirror([one.url, two.url], cooldown="1s")
    mirror.tune(live_max=0, write_batch=64 * KIB)  # the client follows the file

    body = await get_or_cut(mirror, digest)
    resumed = two.registry.calls("GET", "blobs")[0]
    assert resumed.headers["Range"] == f"bytes={128 * KIB}-"
    await mirror.settled()
    assert mirror.blob_files() == []  # the fill failed...
    assert body is None, "a complete-looking body that is not the blob"  # ... so must the client


async def test_failed_downloads_leave_no_memory_thread_or_descriptor_behind(
    fake: RunningFake, mirror: Mirror, disk: Disk
) -> None:
    """Failed downloads (digest mismatch, full disk, cut upstream) leave no memory,
    reservation, pin, temp file, descriptor or thread behind."""
    disk.go.set()
    fake.registry.faults.chunk_size = 64 * KIB
    fake.registry.faults.chunk_delay = 0.002
    mirror.budget.write_retry = 0.0  # a write error does not stop the next download
    # Digest mismatch, two clients.
    wrong = fake.registry.add_blob(payload(MIB, "wrong"))
    fake.registry.faults.wrong_bytes = True
    cut_bodies = await asyncio.gather(get_or_cut(mirror, wrong), get_or_cut(mirror, wrong))
    assert list(cut_bodies) == [None, None]
    await mirror.settled()
    fake.registry.faults.wrong_bytes = False
    # The disk fills up a third of the way, with more to come from upstream: the
    # client gets the rest from memory, uncached.
    full = fake.registry.add_blob(payload(12 * MIB, "full"))
    disk.fail_from = 4 * MIB
    assert await get_or_cut(mirror, full) == payload(12 * MIB, "full")
    await mirror.settled()
    disk.fail_from = None
    # Upstream cuts every response.
    cut = fake.registry.add_blob(payload(MIB, "cut"))
    fake.registry.faults.cut_after = 100 * KIB
    fake.registry.faults.cut_pause = 0.01
    assert await get_or_cut(mirror, cut) is None
    await mirror.settled()

    assert await mirror.metric(MISMATCHES, namespace=NS) == 1
    assert await mirror.metric(WRITE_ERRORS) == 1
    assert mirror.blob_files() == []
    await assert_mirror_holds_nothing(mirror)
    await wait_for(lambda: not blob_threads())


async def test_shutdown_cuts_the_clients_of_a_running_download(
    fake: RunningFake, mirror: Mirror, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Shutdown cuts the live and file clients of a running download (never a
    complete-looking body) and leaves nothing behind."""
    mirror.tune(live_max=1)  # one live client, one on the file
    mirror.tune(shutdown_grace=0.05)
    data = payload(4 * MIB, "shutdown")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 64 * KIB
    fake.registry.faults.chunk_delay = 0.01  # about 0.6 s upstream
    pulls = [asyncio.create_task(get_or_cut(mirror, digest)) for _ in range(2)]
    await wait_for(lambda: bool(mirror.client.app[keys.PULLTHROUGH]._fills))
    fill = fill_of(mirror, digest)
    await wait_for(lambda: fill.received >= MIB)
    async with asyncio.timeout(WAIT):
        await mirror.client.app[keys.PULLTHROUGH].close()
    assert await asyncio.gather(*pulls) == [None, None]  # cut, never complete-looking
    assert fill.error is not None
    assert mirror.blob_files() == []
    await assert_mirror_holds_nothing(mirror)
    await wait_for(lambda: not blob_threads())


async def test_in_flight_fill_is_not_shared_across_namespaces(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """A download running for one namespace does not hand its 404 to a client of another
    namespace, whose own upstream has the blob."""
    has_not, has = await start_fake(), await start_fake()
    data = payload(100_000, "cross-namespace")
    digest = has.registry.add_blob(data)
    has_not.registry.faults.delay = 0.3  # its 404 comes late: the fills overlap
    mirror = await start_mirror([], namespaces={"a.io": [has_not.url], "b.io": [has.url]})
    async with asyncio.timeout(5):
        first = asyncio.create_task(mirror.client.get(f"/v2/{REPO}/blobs/{digest}?ns=a.io"))
        await asyncio.sleep(0.1)
        resp = await mirror.client.get(f"/v2/{REPO}/blobs/{digest}?ns=b.io")
        assert (await first).status == 404
    assert resp.status == 200
    assert await resp.read() == data


async def test_waiters_of_a_failed_foreign_fill_share_one_new_fill(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """When another namespace's fill fails, its waiters start one fill: 1 upstream GET."""
    lacking, having = await start_fake(), await start_fake()
    data = payload(1_000_000, "herd")
    digest = having.registry.add_blob(data)
    lacking.registry.faults.delay = 0.3  # its 404 comes late: the herd gathers meanwhile
    having.registry.faults.chunk_delay = 0.01  # the new fill is still running as they join
    mirror = await start_mirror([], namespaces={"a.io": [lacking.url], "b.io": [having.url]})

    async with asyncio.timeout(WAIT):
        first = asyncio.create_task(mirror.client.get(blob_path(REPO, digest, ns="a.io")))
        await wait_for(lambda: bool(lacking.registry.calls("GET", "blobs")))
        herd = [
            asyncio.create_task(mirror.client.get(blob_path(REPO, digest, ns="b.io")))
            for _ in range(5)
        ]
        resp = await first
        assert resp.status == 404
        assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
        for resp in await asyncio.gather(*herd):
            assert resp.status == 200
            assert await resp.read() == data

    assert len(lacking.registry.calls("GET", "blobs")) == 1
    assert len(having.registry.calls("GET", "blobs")) == 1
    await mirror.settled()
    assert mirror.blob_path(digest).read_bytes() == data
