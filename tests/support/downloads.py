"""Looking into the mirror's blob downloads from a test, and a disk the test controls.

``get``/``get_or_cut`` pull a blob (a cut body is ``None``); ``status_and_body``
also waits until its download is committed. ``fill_of`` and ``writer_of`` reach
the running ``BlobFill`` and its ``BlobWriter`` (the tests that steer a download
mid-way need them); ``held`` lists what downloads still hold (write-ahead memory,
budget reservations and pins, temp files, descriptors), which must be nothing once
they are over. ``Disk`` is the state of the ``disk`` fixture
(``tests/integration/conftest.py``), which holds or fails the cache's writes.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import threading
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp

from mirrorproxy.cache.blobs import BlobWriter, FileBlobStore
from mirrorproxy.http import keys
from mirrorproxy.pullthrough.fill import BlobFill
from mirrorproxy.pullthrough.policy import PullThrough
from tests.support.mirror import Mirror
from tests.support.paths import REPO, blob_path
from tests.support.waiting import WAIT, wait_for


async def get(mirror: Mirror, digest: str, headers: dict[str, str] | None = None) -> bytes:
    """GET a blob (bounded); a cut body raises ClientPayloadError."""
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest), headers=headers)
        assert resp.status in (200, 206)
        return await resp.read()


async def status_and_body(mirror: Mirror, digest: str) -> tuple[int, bytes]:
    """GET a blob (bounded), then wait until its download is in place.

    A client gets its last byte a moment before the file is renamed into the cache.
    """
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        out = resp.status, await resp.read()
    await mirror.settled()
    return out


async def get_or_cut(mirror: Mirror, digest: str) -> bytes | None:
    """The body, or None when the mirror cut it short."""
    try:
        return await get(mirror, digest)
    except aiohttp.ClientPayloadError:
        return None


def fill_of(mirror: Mirror, digest: str) -> BlobFill:
    """The running download of ``digest`` (there must be exactly one)."""
    fills = mirror.client.app[keys.PULLTHROUGH]._fills
    (fill,) = (f for d, f in fills.items() if str(d) == digest)
    return fill


def writer_of(fill: BlobFill) -> BlobWriter:
    """The fill's cache writer (once the upstream answered 200)."""
    writer = fill._writer
    assert isinstance(writer, BlobWriter)
    return writer


def blob_threads() -> list[str]:
    """Names of the cache writers' threads still alive."""
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
    """Every download is over and holds nothing (see ``held``)."""
    with contextlib.suppress(TimeoutError):
        await wait_for(lambda: not held(pt, cache_dir), within=1.0)
    assert held(pt, cache_dir) == []


async def assert_mirror_holds_nothing(mirror: Mirror) -> None:
    """``assert_nothing_held`` for an in-process mirror."""
    await assert_nothing_held(mirror.client.app[keys.PULLTHROUGH], mirror.cache_dir)


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
