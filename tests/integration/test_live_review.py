"""The live-client download path under faults: BlobFill's pump, BlobWriter's threads,
_serve_fill.

Each test drives one cold blob through the mirror with a fault around it (a stalled
or failing disk, a lagging hash thread, an upstream cut or stall, a client that goes
away, Range requests, TLS, shutdown) and checks what every client receives and what
the mirror leaves behind. The tests under "regressions" each failed once.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import hashlib
import logging
import os
import shutil
import socket
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from mirrorproxy.cache import blobs as blobs_module
from mirrorproxy.cache.blobs import BlobWriter, FileBlobStore
from mirrorproxy.core.oci import Digest
from mirrorproxy.http import keys
from mirrorproxy.pullthrough.fill import BlobFill
from mirrorproxy.pullthrough.policy import PullThrough
from tests.fakes.registry import payload, sha256
from tests.integration.conftest import (
    NS,
    REPO,
    WAIT,
    FakeFactory,
    Mirror,
    MirrorFactory,
    RunningFake,
    blob_path,
    mirror_config,
    wait_for,
)
from tests.support.listening import listening, with_server
from tests.support.tls import issue_server_cert, make_ca

KIB = 1024
MIB = 1024 * KIB
WRITE_ERRORS = "mirrorproxy_cache_write_errors_total"
MISMATCHES = "mirrorproxy_digest_mismatches_total"
PASSTHROUGH = "mirrorproxy_cache_passthrough_total"


# -- helpers -------------------------------------------------------------------------


async def get(mirror: Mirror, digest: str, headers: dict[str, str] | None = None) -> bytes:
    """GET a blob (bounded); a cut body raises ClientPayloadError."""
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest), headers=headers)
        assert resp.status in (200, 206)
        return await resp.read()


async def get_or_cut(mirror: Mirror, digest: str) -> bytes | None:
    """The body, or None when the mirror cut it short."""
    try:
        return await get(mirror, digest)
    except aiohttp.ClientPayloadError:
        return None


def fill_of(mirror: Mirror, digest: str) -> BlobFill:
    fills = mirror.client.app[keys.PULLTHROUGH]._fills
    (fill,) = (f for d, f in fills.items() if str(d) == digest)
    return fill


def writer_of(fill: BlobFill) -> BlobWriter:
    writer = fill._writer
    assert writer is not None
    return writer


def blob_threads() -> list[str]:
    return [
        t.name for t in threading.enumerate() if t.name.startswith(("blob-write", "blob-hash"))
    ]


def open_tmp_fds(cache_dir: Path) -> list[str]:
    """Descriptors of this process open on files in the cache's tmp/ directory."""
    tmp = str(cache_dir / "tmp")
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:
            continue
        if target.startswith(tmp):
            found.append(target)
    return found


@dataclass
class Disk:
    """``_write_all`` under test control: held until ``go``, failing from ``fail_from``.

    A write job that finds its descriptor closed or pointing at another file when it
    runs is recorded in ``misuse`` (and not performed).
    """

    go: threading.Event = field(default_factory=threading.Event)
    fail_from: int | None = None  # writes at or past this offset fail with ENOSPC
    started: int = 0
    finished: int = 0
    misuse: list[str] = field(default_factory=list)


@pytest.fixture
def disk(monkeypatch: pytest.MonkeyPatch) -> Iterator[Disk]:
    state = Disk()
    real = blobs_module._write_all

    def write_all(fd: int, chunks: Sequence[blobs_module.Chunk], offset: int) -> None:
        state.started += 1
        mine = os.dup(fd)  # keeps the temp file (and its inode number) alive
        try:
            state.go.wait(WAIT)
            try:
                now = os.fstat(fd)
            except OSError as err:
                state.misuse.append(f"fd {fd} was closed under the write job ({err})")
                raise
            if not os.path.samestat(now, os.fstat(mine)):
                target = os.readlink(f"/proc/self/fd/{fd}")
                state.misuse.append(f"fd {fd} now refers to {target}")
                raise OSError(errno.EBADF, "descriptor reused")
            if state.fail_from is not None and offset >= state.fail_from:
                raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
            real(fd, chunks, offset)
        finally:
            os.close(mine)
            state.finished += 1

    monkeypatch.setattr(blobs_module, "_write_all", write_all)
    yield state
    state.go.set()  # never leave a writing thread blocked


class _LaggingHash:
    """sha256 whose updates wait for ``go``: a hashing thread far behind the download."""

    def __init__(self, algorithm: str, go: threading.Event) -> None:
        self._hash = hashlib.new(algorithm)
        self._go = go

    def update(self, data: Any) -> None:
        self._go.wait(WAIT)
        self._hash.update(data)

    def hexdigest(self) -> str:
        return self._hash.hexdigest()


@pytest.fixture
def hash_gate(monkeypatch: pytest.MonkeyPatch) -> Iterator[threading.Event]:
    go = threading.Event()

    def hasher(self: Digest) -> Any:
        return _LaggingHash(self.algorithm, go)

    monkeypatch.setattr(Digest, "hasher", hasher)
    yield go
    go.set()


# -- regressions: each of these once failed ---------------------------------------------


async def _shut_down_during_commit(
    fake: RunningFake, mirror: Mirror, disk: Disk, monkeypatch: pytest.MonkeyPatch, tmp: Path
) -> None:
    """A client got its (verified) blob from memory; the disk is still writing it when
    the server stops and the shutdown grace runs out."""
    mirror.tune(shutdown_grace=0.05)
    data = payload(MIB, "shutdown while the disk writes")
    digest = fake.registry.add_blob(data)
    assert await get(mirror, digest) == data
    fill_of(mirror, digest)  # still committing: waiting for the stalled write
    close = asyncio.create_task(mirror.client.app[keys.PULLTHROUGH].close())
    await asyncio.sleep(0.3)  # the grace ran out: the fill is cancelled
    victim = os.open(tmp / "victim", os.O_RDWR | os.O_CREAT, 0o600)  # takes a free fd
    try:
        disk.go.set()
        await wait_for(lambda: disk.finished == disk.started)
        async with asyncio.timeout(WAIT):
            await close
    finally:
        os.close(victim)


async def test_shutdown_never_closes_the_descriptor_under_a_running_write(
    fake: RunningFake,
    mirror: Mirror,
    disk: Disk,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    await _shut_down_during_commit(fake, mirror, disk, monkeypatch, tmp_path)
    assert disk.misuse == []  # once: ['fd N now refers to .../victim']


async def test_a_cancelled_write_fails_the_writer_cleanly(
    fake: RunningFake,
    mirror: Mirror,
    disk: Disk,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    await _shut_down_during_commit(fake, mirror, disk, monkeypatch, tmp_path)
    crashed = [r.getMessage() for r in caplog.records if "Exception in callback" in r.getMessage()]
    assert crashed == []


async def test_a_late_disk_error_is_not_taken_for_a_digest_mismatch(
    fake: RunningFake,
    mirror: Mirror,
    disk: Disk,
    hash_gate: threading.Event,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mirror.tune(write_batch=256 * KIB)
    data = payload(MIB, "late enospc")
    digest = fake.registry.add_blob(data)
    disk.fail_from = 256 * KIB  # the second batch hits a full disk
    pull = asyncio.create_task(get_or_cut(mirror, digest))

    # Every batch is queued (the pump is done) while the disk and the hash lag behind.
    await wait_for(lambda: bool(mirror.client.app[keys.PULLTHROUGH]._fills))
    fill = fill_of(mirror, digest)
    await wait_for(lambda: fill._writer is not None)  # after the upstream's 200
    writer = writer_of(fill)
    await wait_for(lambda: writer.queued == len(data))
    disk.go.set()
    await wait_for(lambda: writer._failure is not None)  # the disk said ENOSPC
    hash_gate.set()

    body = await pull
    await mirror.settled()  # the client is served before the fill reports the disk's failure
    assert await mirror.metric(MISMATCHES, namespace=NS) == 0  # upstream sent good bytes
    assert await mirror.metric(WRITE_ERRORS) == 1
    assert await mirror.metric("mirrorproxy_upstream_up", namespace=NS, endpoint=fake.url) == 1
    assert body == data  # verified from memory, as with a disk error on the last batch


async def test_a_resume_on_a_longer_blob_never_completes_a_follower(
    start_fake: FakeFactory, start_mirror: MirrorFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
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


async def test_upstream_timeouts_are_not_cache_write_errors(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    data = payload(512 * KIB, "stalls")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 64 * KIB
    fake.registry.faults.chunk_delay = 0.5  # every response stalls after one chunk
    mirror = await start_mirror([fake.url], read_timeout="100ms")

    assert await get_or_cut(mirror, digest) is None
    await mirror.settled()
    assert len(fake.registry.calls("GET", "blobs")) == mirror.fill_tuning.max_resumes + 1
    fake.registry.faults.clear()
    assert await get(mirror, digest) == data
    await mirror.settled()
    assert await mirror.metric(WRITE_ERRORS) == 0
    assert await mirror.metric_sum(PASSTHROUGH) == 0  # once: 30 s of uncached streaming
    assert mirror.blob_path(digest).exists()


async def test_a_blob_without_content_length_reaches_the_client_intact(
    aiohttp_server: AiohttpServer, start_mirror: MirrorFactory
) -> None:
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


async def test_a_client_gone_while_waiting_for_the_disk_is_not_an_error(
    fake: RunningFake,
    tmp_path: Path,
    disk: Disk,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO, logger="mirrorproxy")
    data = payload(MIB, "gone while waiting")
    digest = fake.registry.add_blob(data)
    config = with_server(mirror_config(tmp_path / "cache", [fake.url]))
    # The production listener: handlers are not cancelled when their client goes away.
    async with listening(config, handler_cancellation=False) as m:
        m.tune(live_max=0)  # the client follows the file
        async with asyncio.timeout(WAIT):
            reader, writer = await asyncio.open_connection(m.host, m.port)
            path = blob_path(REPO, digest)
            writer.write(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
            assert (await reader.readuntil(b"\r\n\r\n")).startswith(b"HTTP/1.1 200")
            writer.close()  # gone while the disk has nothing yet
            await asyncio.sleep(0.1)
            disk.go.set()
            await m.runner.app[keys.PULLTHROUGH].settled()
            await asyncio.sleep(0.05)  # the handler wakes up and gives up
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []  # once: "... after an unexpected error" + traceback
    gone = [r for r in caplog.records if "client went away" in r.getMessage()]
    assert gone
    assert all(r.levelno == logging.INFO for r in gone)


# -- TLS -----------------------------------------------------------------------------


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")
async def test_tls_live_clients_and_a_slow_one_get_every_byte(
    fake: RunningFake,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ca = make_ca(tmp_path / "pki")
    cert = issue_server_cert(ca, tmp_path / "pki")
    data = payload(16 * MIB, "over tls")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 512 * KIB
    fake.registry.faults.chunk_delay = 0.01
    config = with_server(
        mirror_config(tmp_path / "cache", [fake.url]), tls_cert=cert.cert, tls_key=cert.key
    )
    loop = asyncio.get_running_loop()
    real_sendfile = loop.sendfile
    sendfiles: list[str] = []

    async def sendfile(transport: asyncio.WriteTransport, *args: Any, **kwargs: Any) -> int:
        sendfiles.append(type(transport).__name__)
        return await real_sendfile(transport, *args, **kwargs)

    monkeypatch.setattr(loop, "sendfile", sendfile)
    async with listening(config) as m, aiohttp.ClientSession() as session:
        m.tune(live_buffer=256 * KIB)
        url = f"{m.url}{blob_path(REPO, digest)}"

        async def fast() -> bytes:
            async with session.get(url, ssl=ca.ssl_context()) as resp:
                assert resp.status == 200
                return await resp.read()

        async def slow() -> bytes:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KIB)
            sock.setblocking(False)
            await loop.sock_connect(sock, (m.host, m.port))
            reader, writer = await asyncio.open_connection(
                sock=sock, ssl=ca.ssl_context(), server_hostname=m.host, limit=32 * KIB
            )
            try:
                path = blob_path(REPO, digest)
                writer.write(f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
                head = await reader.readuntil(b"\r\n\r\n")
                assert head.startswith(b"HTTP/1.1 200")
                await asyncio.sleep(0.3)  # falls behind: goes back to the file
                return await reader.readexactly(len(data))
            finally:
                writer.close()

        async with asyncio.timeout(WAIT):
            bodies = list(await asyncio.gather(slow(), fast(), fast()))
        assert bodies == [data] * 3
        assert len(fake.registry.calls("GET", "blobs")) == 1
        assert "_SSLProtocolTransport" in sendfiles  # the slow one read the file
        async with asyncio.timeout(WAIT):
            await m.runner.app[keys.PULLTHROUGH].settled()
    errors = [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == []


# -- behaviour verified correct --------------------------------------------------------


def held(pt: PullThrough, cache_dir: Path) -> list[str]:
    """What downloads still hold: write-ahead memory, reservations, pins, temp files, fds."""
    assert isinstance(pt._blobs, FileBlobStore)
    found = [f"in flight: {pt._blobs.in_flight}"] if pt._blobs.in_flight else []
    found += [f"reserved: {r.digest}" for r in pt.budget.reservations]
    found += [f"pinned: {d}" for d in pt.budget.pinned]
    found += [f"temp file: {p.name}" for p in (cache_dir / "tmp").iterdir()]
    found += [f"open: {p}" for p in open_tmp_fds(cache_dir)]
    return found


async def assert_nothing_held(pt: PullThrough, cache_dir: Path) -> None:
    # A failed fill leaves the registry (so settled() returns) before abort() is done.
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: not held(pt, cache_dir), within=1.0)
    assert held(pt, cache_dir) == []


async def assert_mirror_holds_nothing(mirror: Mirror) -> None:
    await assert_nothing_held(mirror.client.app[keys.PULLTHROUGH], mirror.cache_dir)


async def test_range_clients_joining_a_download_get_exactly_their_bytes(
    fake: RunningFake, mirror: Mirror, disk: Disk
) -> None:
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


@pytest.mark.parametrize("live", [True, False], ids=["live", "from-file"])
async def test_a_range_to_the_end_never_gets_the_last_byte_of_a_corrupt_blob(
    fake: RunningFake, mirror: Mirror, monkeypatch: pytest.MonkeyPatch, live: bool
) -> None:
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


async def test_a_live_client_that_goes_away_does_not_disturb_the_others(
    fake: RunningFake, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
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


async def test_failed_downloads_leave_no_memory_thread_or_descriptor_behind(
    fake: RunningFake, mirror: Mirror, disk: Disk
) -> None:
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
