"""A client on this machine gets file bytes copied; any other gets them by ``sendfile``.

On loopback the receiving client's copy is the limit, and it is cheaper from the
socket's own buffers than from page-cache pages (``http/blobsend``). Bytes already in
the page cache are read on the loop; bytes that are not (a blob just written past the
page cache, or evicted from it) are read in a thread, and so are all bytes where the
filesystem cannot tell (``RWF_NOWAIT`` refused).
"""

from __future__ import annotations

import asyncio
import errno
import os
from typing import Any

import pytest

from mirrorproxy.core.tuning import DEFAULT_TUNING
from mirrorproxy.http import blobsend
from tests.fakes.registry import payload
from tests.support.mirror import Mirror, MirrorFactory, RunningFake
from tests.support.paths import REPO, blob_path
from tests.support.waiting import WAIT

MIB = 1024 * 1024
PIECE = DEFAULT_TUNING.copy_piece


class Calls:
    """Counts of the ways bytes were read and sent during one GET."""

    def __init__(self) -> None:
        self.sendfile = 0
        self.nowait = 0  # reads served from the page cache on the loop
        self.threaded = 0  # reads in a thread


@pytest.fixture
def calls(monkeypatch: pytest.MonkeyPatch) -> Calls:
    seen = Calls()
    real_preadv, real_pread = os.preadv, os.pread

    def preadv(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        got = real_preadv(fd, buffers, offset, flags)
        if flags & getattr(os, "RWF_NOWAIT", 0):
            seen.nowait += 1
        return got

    def pread(fd: int, n: int, offset: int) -> bytes:
        seen.threaded += 1
        return real_pread(fd, n, offset)

    monkeypatch.setattr(os, "preadv", preadv)
    monkeypatch.setattr(os, "pread", pread)
    return seen


def _count_sendfile(monkeypatch: pytest.MonkeyPatch, seen: Calls) -> None:
    loop = asyncio.get_running_loop()
    real = loop.sendfile

    async def sendfile(*args: Any, **kwargs: Any) -> int:
        seen.sendfile += 1
        return await real(*args, **kwargs)

    monkeypatch.setattr(loop, "sendfile", sendfile)


async def _cached(mirror: Mirror, fake: RunningFake, size: int, name: str) -> tuple[str, bytes]:
    data = payload(size, name)
    digest = fake.registry.add_blob(data)
    assert await _get(mirror, digest) == data
    await mirror.settled()
    assert await mirror.stored(digest)
    return digest, data


async def _get(mirror: Mirror, digest: str, headers: dict[str, str] | None = None) -> bytes:
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest), headers=headers)
        assert resp.status in (200, 206)
        return await resp.read()


def _evict_from_page_cache(mirror: Mirror) -> None:
    for path in mirror.blob_files():
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="RWF_NOWAIT is Linux-only")
async def test_a_loopback_client_gets_copies_from_the_page_cache(
    fake: RunningFake, mirror: Mirror, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, data = await _cached(mirror, fake, 4 * MIB, "copied")
    assert await _get(mirror, digest) == data  # the page cache now holds the file
    _count_sendfile(monkeypatch, calls)
    calls.nowait = calls.threaded = 0
    assert await _get(mirror, digest) == data
    assert calls.sendfile == 0
    assert calls.nowait >= 4 * MIB // PIECE
    assert calls.threaded == 0
    tail = await _get(mirror, digest, {"Range": "bytes=1000000-"})
    assert tail == data[1000000:]


async def test_a_client_elsewhere_gets_sendfile(
    fake: RunningFake, mirror: Mirror, calls: Calls, monkeypatch: pytest.MonkeyPatch
) -> None:
    digest, data = await _cached(mirror, fake, 4 * MIB, "sendfile")
    monkeypatch.setattr(blobsend, "_local_plain", lambda transport: False)
    _count_sendfile(monkeypatch, calls)
    calls.nowait = calls.threaded = 0
    assert await _get(mirror, digest) == data
    assert calls.sendfile >= 1
    assert calls.nowait == calls.threaded == 0


@pytest.mark.skipif(not hasattr(os, "RWF_NOWAIT"), reason="RWF_NOWAIT is Linux-only")
async def test_bytes_not_in_the_page_cache_are_read_in_a_thread(
    fake: RunningFake, mirror: Mirror, calls: Calls
) -> None:
    digest, data = await _cached(mirror, fake, 4 * MIB, "not cached")
    _evict_from_page_cache(mirror)
    calls.nowait = calls.threaded = 0
    assert await _get(mirror, digest) == data
    assert calls.threaded >= 1


async def test_a_filesystem_that_refuses_nowait_reads_in_a_thread(
    fake: RunningFake,
    start_mirror: MirrorFactory,
    calls: Calls,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    mirror = await start_mirror([fake.url])
    digest, data = await _cached(mirror, fake, 2 * MIB, "no nowait")

    def refuse(fd: int, buffers: Any, offset: int, flags: int = 0) -> int:
        raise OSError(errno.EOPNOTSUPP, "Operation not supported")

    monkeypatch.setattr(os, "preadv", refuse)
    calls.threaded = 0
    assert await _get(mirror, digest) == data
    assert calls.threaded >= 2 * MIB // PIECE


@pytest.mark.parametrize(
    ("peer", "tls", "local"),
    [
        (("127.0.0.1", 5000), False, True),
        (("127.9.8.7", 5000), False, True),
        (("::1", 5000, 0, 0), False, True),
        (("::ffff:127.0.0.1", 5000, 0, 0), False, True),
        (("10.0.0.5", 5000), False, False),
        (("fe80::1%eth0", 5000, 0, 2), False, False),
        (("127.0.0.1", 5000), True, False),  # TLS: the copy is made by the TLS layer anyway
        ("/run/mirror.sock", False, False),
        (None, False, False),
    ],
)
def test_which_clients_count_as_on_this_machine(peer: object, tls: bool, local: bool) -> None:
    class Transport:
        def get_extra_info(self, name: str) -> object:
            return {"peername": peer, "sslcontext": object() if tls else None}[name]

    assert blobsend._local_plain(Transport()) is local  # type: ignore[arg-type]
