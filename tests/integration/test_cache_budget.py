"""The cache budget: ``max_size``/``min_free``, LRU eviction by the mirror's own use
tracking, pins on blobs being served or filled, blobs too big to cache, accounting
(manifests included) across restarts, and ``mirrorproxy cache`` run next to a live
server: ``du`` and ``prune`` see manifests as the server recorded them.

Every test talks HTTP to a real mirror app in front of a real FakeRegistry and looks
at the cache directory and ``/metrics``; none reaches into the budget's internals
except to shorten its flush interval or to flush it at once.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from dataclasses import replace
from pathlib import Path
from typing import NamedTuple

import pytest

from mirrorproxy.cli import main
from mirrorproxy.core.tuning import DEFAULT_TUNING
from mirrorproxy.core.units import parse_size
from tests.fakes.registry import OCI_MANIFEST, payload
from tests.support.downloads import status_and_body
from tests.support.mirror import Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.procs import mirror_config
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB
DAY = 86400.0
MAX = 300 * KIB
BUDGET = {"max_size": "300KiB"}
ACCEPT = {"Accept": OCI_MANIFEST}
SIZE = "mirrorproxy_cache_size_bytes"
EVICTIONS = "mirrorproxy_cache_evictions_total"
PASSTHROUGH = "mirrorproxy_cache_passthrough_total"


async def pull(mirror: Mirror, digest: str) -> bytes:
    """GET a blob through the mirror (bounded), expecting a 200."""
    async with asyncio.timeout(WAIT):
        resp = await mirror.client.get(blob_path(REPO, digest))
        assert resp.status == 200, await resp.text()
        data = await resp.read()
    await mirror.settled()  # the last byte goes out a moment before the rename
    return data


def cached(mirror: Mirror) -> set[str]:
    """Digests of the blobs committed in the cache."""
    return {f"{p.parent.parent.name}:{p.name}" for p in mirror.blob_files()}


def disk_bytes(mirror: Mirror) -> int:
    """Bytes of committed content files (blobs and manifests)."""
    return sum(p.stat().st_size for p in mirror.blob_files() + mirror.manifest_files())


def add_blobs(fake: RunningFake, size: int, *names: str) -> list[str]:
    return [fake.registry.add_blob(payload(size, name)) for name in names]


async def test_lru_eviction_follows_the_mirrors_own_use_not_file_times(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], cache=BUDGET)
    a, b, c = add_blobs(fake, 120 * KIB, "a", "b", "c")
    await pull(mirror, a)
    await pull(mirror, b)
    assert cached(mirror) == {a, b}
    # Filesystem times say A is the one nobody used: they must not matter.
    os.utime(mirror.blob_path(a), (1, 1))
    future = mirror.blob_path(b).stat().st_mtime + 3600
    os.utime(mirror.blob_path(b), (future, future))

    assert await pull(mirror, a) == payload(120 * KIB, "a")  # a hit: A is now used last
    assert len(fake.registry.calls("GET", "blobs")) == 2
    await pull(mirror, c)  # 360 KiB > 300 KiB: the least recently used blob goes
    assert cached(mirror) == {a, c}
    assert await mirror.metric(EVICTIONS, kind="blob") == 1
    assert await mirror.metric(SIZE) == 240 * KIB

    # An evicted blob is a plain miss later on, and pushes out the next LRU (A).
    assert await pull(mirror, b) == payload(120 * KIB, "b")
    assert cached(mirror) == {b, c}
    assert await mirror.metric(EVICTIONS, kind="blob") == 2
    assert await mirror.metric(SIZE) == 240 * KIB == disk_bytes(mirror)
    assert len(fake.registry.calls("GET", "blobs")) == 4
    assert mirror.tmp_files() == []


async def test_blobs_go_before_manifests_of_fresh_tags(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    img = fake.registry.add_image(REPO, "3", layer_sizes=(100,))
    mirror = await start_mirror([fake.url], cache=BUDGET)
    accept = {"Accept": OCI_MANIFEST}
    resp = await mirror.client.get(manifest_path(REPO, "3"), headers=accept)
    assert resp.status == 200
    manifest_file = mirror.manifest_file(img.digest)
    assert manifest_file.exists()  # the oldest entry in the cache from here on

    a, b, c = add_blobs(fake, 120 * KIB, "a", "b", "c")
    for digest in (a, b, c):
        await pull(mirror, digest)
    assert cached(mirror) == {b, c}
    assert manifest_file.exists()
    assert await mirror.metric(EVICTIONS, kind="blob") == 1
    assert await mirror.metric(EVICTIONS, kind="manifest") == 0

    # A blob that needs all but a sliver of the budget: every blob goes, then the
    # manifest too. The tag is still answered (re-fetched), never broken.
    (big,) = add_blobs(fake, MAX - 100, "big")
    await pull(mirror, big)
    assert cached(mirror) == {big}
    assert not manifest_file.exists()
    assert await mirror.metric(EVICTIONS, kind="blob") == 3
    assert await mirror.metric(EVICTIONS, kind="manifest") == 1
    assert await mirror.metric(SIZE) <= MAX
    resp = await mirror.client.get(manifest_path(REPO, "3"), headers=accept)
    assert resp.status == 200
    assert await resp.read() == img.manifest
    assert await mirror.metric(SIZE) <= MAX
    assert disk_bytes(mirror) <= MAX


async def test_size_stays_within_max_size_with_blobs_in_flight(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    """Room is reserved before a fill writes a byte: concurrent fills cannot overshoot."""
    mirror = await start_mirror([fake.url], cache=BUDGET)
    digests = add_blobs(fake, 120 * KIB, "one", "two", "three")
    fake.registry.faults.chunk_size = 16 * KIB
    fake.registry.faults.chunk_delay = 0.04  # all three downloads overlap
    peak = 0
    done = asyncio.Event()

    def sample() -> None:
        nonlocal peak
        on_disk = disk_bytes(mirror) + sum(p.stat().st_size for p in mirror.tmp_files())
        peak = max(peak, on_disk)

    async def watch() -> None:
        while not done.is_set():
            sample()
            await asyncio.sleep(0.002)
        sample()

    watcher = asyncio.create_task(watch())
    bodies = await asyncio.gather(*(pull(mirror, d) for d in digests))
    done.set()
    await watcher
    assert bodies == [payload(120 * KIB, n) for n in ("one", "two", "three")]
    assert 0 < peak <= MAX
    # Two fit; the third found no room that could be made (the others were in
    # flight) and went to its client straight from upstream.
    assert len(cached(mirror)) == 2
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 1
    assert await mirror.metric(EVICTIONS, kind="blob") == 0
    assert await mirror.metric(SIZE) == 240 * KIB
    assert len(fake.registry.calls("GET", "blobs")) == 3


async def test_blob_larger_than_the_budget_is_streamed_through(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], cache=BUDGET)
    (small,) = add_blobs(fake, 100 * KIB, "small")
    await pull(mirror, small)
    data = payload(400 * KIB, "too big")
    big = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 32 * KIB
    fake.registry.faults.chunk_delay = 0.005

    bodies = await asyncio.gather(*(pull(mirror, big) for _ in range(3)))
    assert bodies == [data] * 3
    assert await pull(mirror, big) == data  # still not cached: upstream again
    assert cached(mirror) == {small}  # nothing was evicted for a blob that never fits
    assert mirror.tmp_files() == []
    assert len(fake.registry.calls("GET", "blobs")) == 1 + 4
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 2  # one per fill
    assert await mirror.metric(EVICTIONS, kind="blob") == 0
    assert await mirror.metric(SIZE) == 100 * KIB
    resp = await mirror.client.head(blob_path(REPO, big))
    assert resp.headers["Content-Length"] == str(len(data))


class StalledGet(NamedTuple):
    """A raw HTTP GET whose reader stops after the headers (tiny receive buffer)."""

    sock: socket.socket
    head: bytes
    body_start: bytes

    @classmethod
    async def open(cls, port: int, path: str) -> StalledGet:
        loop = asyncio.get_running_loop()
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * KIB)  # no autotuning
        sock.setblocking(False)
        await loop.sock_connect(sock, ("127.0.0.1", port))
        request = f"GET {path} HTTP/1.1\r\nHost: mirror\r\nConnection: close\r\n\r\n"
        await loop.sock_sendall(sock, request.encode())
        buf = b""
        while b"\r\n\r\n" not in buf:
            chunk = await loop.sock_recv(sock, 4096)
            assert chunk, "connection closed before the headers"
            buf += chunk
        head, _, rest = buf.partition(b"\r\n\r\n")
        return cls(sock, head, rest)

    async def read_rest(self) -> bytes:
        loop = asyncio.get_running_loop()
        parts = [self.body_start]
        while chunk := await loop.sock_recv(self.sock, MIB):
            parts.append(chunk)
        self.sock.close()
        return b"".join(parts)


async def test_a_blob_being_served_is_never_evicted(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], cache={"max_size": "24MiB"})
    served = payload(16 * MIB, "served")
    a = fake.registry.add_blob(served)
    (b,) = add_blobs(fake, 10 * MIB, "newcomer")
    await pull(mirror, a)
    assert cached(mirror) == {a}

    port = mirror.client.port
    assert port is not None
    # A client that reads slowly: the cached file is still being sent to it.
    slow = await asyncio.wait_for(StalledGet.open(port, blob_path(REPO, a)), WAIT)
    try:
        assert slow.head.startswith(b"HTTP/1.1 200")
        # B needs A's room, but A is in use: B is streamed through instead.
        assert await pull(mirror, b) == payload(10 * MIB, "newcomer")
        assert cached(mirror) == {a}
        assert await mirror.metric(PASSTHROUGH, reason="budget") == 1
        assert await mirror.metric(EVICTIONS, kind="blob") == 0
        assert await asyncio.wait_for(slow.read_rest(), WAIT) == served
    finally:
        slow.sock.close()

    # Once nobody reads A, it is fair game for the next fill.
    assert await pull(mirror, b) == payload(10 * MIB, "newcomer")
    assert cached(mirror) == {b}
    assert await mirror.metric(EVICTIONS, kind="blob") == 1
    assert await mirror.metric(SIZE) == 10 * MIB


async def test_accounting_and_use_order_survive_a_restart(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    first = await start_mirror([fake.url], cache=BUDGET)
    a, b, c = add_blobs(fake, 120 * KIB, "a", "b", "c")
    await pull(first, a)
    await pull(first, b)
    await pull(first, a)  # last use of A: only in memory until the budget flushes
    size = await first.metric(SIZE)
    assert size == 240 * KIB
    await first.client.close()
    # File times point the other way; the index is what counts.
    os.utime(first.blob_path(a), (1, 1))

    second = await start_mirror([fake.url], cache=BUDGET)
    assert second.cache_dir == first.cache_dir
    assert await second.metric(SIZE) == size
    await pull(second, c)
    assert cached(second) == {a, c}  # B was the least recently used, before the restart
    assert await second.metric(SIZE) == 240 * KIB


async def cache_an_image(mirror: Mirror, fake: RunningFake) -> None:
    """Pull an image's manifest and blobs, and wait until both blobs are committed."""
    img = fake.registry.add_image(REPO, "3", layer_sizes=(2000,))
    assert (await mirror.client.get(manifest_path(REPO, "3"), headers=ACCEPT)).status == 200
    for digest in (img.config_digest, *img.layer_digests):
        assert (await status_and_body(mirror, digest))[0] == 200
    await wait_for(lambda: len(mirror.blob_files()) == 2)


async def test_restart_reports_the_same_cache_size_with_manifests(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    """A restart reports the cache size it had, manifests included (counted by body
    length when served, by file size when reconciled)."""
    first = await start_mirror([fake.url])
    await cache_an_image(first, fake)
    before = await first.metric(SIZE)
    await first.client.close()
    second = await start_mirror([fake.url])
    assert await second.metric(SIZE) == before


@pytest.mark.parametrize("min_free", ["50%", "1MiB"])
async def test_min_free_keeps_part_of_the_filesystem_free(
    fake: RunningFake,
    start_mirror: MirrorFactory,
    monkeypatch: pytest.MonkeyPatch,
    min_free: str,
) -> None:
    """A simulated 2 MiB filesystem that holds only the cache's content files."""
    fs_size, block = 2 * MIB, 4096
    real_statvfs = os.statvfs
    cache_root: list[Path] = []

    def statvfs(path: str | os.PathLike[str]) -> os.statvfs_result:
        if not cache_root or Path(path) != cache_root[0]:
            return real_statvfs(path)
        root = cache_root[0]
        used = sum(
            p.stat().st_size
            for sub in ("blobs", "manifests", "tmp")
            for p in (root / sub).rglob("*")
            if p.is_file()
        )
        free = (fs_size - used) // block
        fields = (block, block, fs_size // block, free, free, 1000, 1000, 1000, 0, 255)
        return os.statvfs_result(fields)

    monkeypatch.setattr(os, "statvfs", statvfs)
    mirror = await start_mirror([fake.url], cache={"min_free": min_free})
    cache_root.append(mirror.cache_dir)
    a, b, c = add_blobs(fake, 400 * KIB, "a", "b", "c")
    for digest in (a, b):
        await pull(mirror, digest)
    assert cached(mirror) == {a, b}  # 1.2 MiB free
    await pull(mirror, c)  # would leave 0.8 MiB free: A goes first
    assert cached(mirror) == {b, c}
    assert await mirror.metric(EVICTIONS, kind="blob") == 1
    (huge,) = add_blobs(fake, 1100 * KIB, "huge")  # cannot leave 1 MiB free at all
    assert await pull(mirror, huge) == payload(1100 * KIB, "huge")
    assert await mirror.metric(PASSTHROUGH, reason="budget") == 1
    assert huge not in cached(mirror)


# -- mirrorproxy cache next to a running server -------------------------------------


def cli_config(mirror: Mirror, tmp_path: Path) -> Path:
    """A config file for ``mirrorproxy cache`` naming the running mirror's cache."""
    path = tmp_path / "cli.toml"
    text = mirror_config(5000, mirror.cache_dir, {NS: ["http://127.0.0.1:9"]}, cache=BUDGET)
    path.write_text(text)
    return path


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    assert err == ""
    return code, out


async def size_becomes(mirror: Mirror, size: int) -> None:
    """Wait (bounded) until the mirror reports ``size`` cache bytes."""
    async with asyncio.timeout(WAIT):
        while True:
            if await mirror.metric(SIZE) == size:
                return
            await asyncio.sleep(0.02)


FAST_FLUSH = replace(DEFAULT_TUNING, index_flush=0.05)  # the index flushed every 50 ms


async def test_cache_commands_next_to_a_running_server(
    fake: RunningFake,
    start_mirror: MirrorFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mirror = await start_mirror([fake.url], cache=BUDGET, tuning=FAST_FLUSH)
    config = cli_config(mirror, tmp_path)
    old, new = add_blobs(fake, 100 * KIB, "old", "new")
    await pull(mirror, old)
    await pull(mirror, new)
    assert await mirror.metric(SIZE) == 200 * KIB

    code, out = cli(capsys, "cache", "du", "--config", str(config))
    assert code == 0
    assert out.splitlines()[1].split() == [NS, "2", "200.0KiB", "0", "200.0KiB"]
    assert out.splitlines()[-1] == "total 200.0KiB of max_size 300.0KiB"

    # prune removes the least recently used blob; the server notices within a flush.
    code, out = cli(capsys, "cache", "prune", "--config", str(config), "--to", "150KiB")
    assert (code, out) == (0, "pruned 1 entries, freed 100.0KiB, 100.0KiB left\n")
    assert cached(mirror) == {new}
    await size_becomes(mirror, 100 * KIB)
    # A pruned blob is a miss, fetched and cached again, and counted once.
    assert await pull(mirror, old) == payload(100 * KIB, "old")
    assert cached(mirror) == {old, new}
    assert await mirror.metric(SIZE) == 200 * KIB
    assert len(fake.registry.calls("GET", "blobs")) == 3

    # Bit rot in a cached blob: verify quarantines it and the server re-fetches it.
    rotten = bytearray(mirror.blob_path(new).read_bytes())
    rotten[12345] ^= 0x40
    mirror.blob_path(new).write_bytes(rotten)
    code, out = cli(capsys, "cache", "verify", "--config", str(config))
    assert code == 1
    assert out.splitlines()[0].startswith(f"MISMATCH blob {new}: moved to ")
    assert out.splitlines()[-1] == "verified 2 entries, 1 bad"
    assert await pull(mirror, new) == payload(100 * KIB, "new")
    await wait_for(lambda: cached(mirror) == {old, new})
    code, out = cli(capsys, "cache", "verify", "--config", str(config))
    assert (code, out) == (0, "verified 2 entries, 0 bad\n")
    await size_becomes(mirror, 200 * KIB)
    code, out = cli(capsys, "cache", "du", "--config", str(config))
    assert out.splitlines()[-1] == "total 200.0KiB of max_size 300.0KiB"


async def test_cache_ls_next_to_a_running_server(
    fake: RunningFake,
    start_mirror: MirrorFactory,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    img = fake.registry.add_image(REPO, "3.20", layer_sizes=(50 * KIB,))
    app = fake.registry.add_image("other/app", "v1", layer_sizes=(10,))
    mirror = await start_mirror([fake.url], cache=BUDGET)
    config = cli_config(mirror, tmp_path)
    accept = {"Accept": OCI_MANIFEST}
    for repo, tag in ((REPO, "3.20"), ("other/app", "v1")):
        resp = await mirror.client.get(manifest_path(repo, tag), headers=accept)
        assert resp.status == 200
    for digest in (img.config_digest, *img.layer_digests):
        await pull(mirror, digest)

    code, out = cli(capsys, "cache", "ls", "--config", str(config))
    assert code == 0
    rows = [line.split() for line in out.splitlines()[1:]]
    assert [row[:4] for row in rows] == [
        [NS, REPO, "3.20", img.digest[:19]],
        [NS, "other/app", "v1", app.digest[:19]],
    ]
    # Manifest plus config and layer (only the manifest was cached for other/app).
    assert 50 * KIB < parse_size(rows[0][4]) < 52 * KIB
    assert parse_size(rows[1][4]) < KIB
    code, out = cli(capsys, "cache", "ls", "--config", str(config), "--namespace", "ghcr.io")
    assert (code, out.splitlines()[1:]) == (0, [])


async def test_cache_du_attributes_manifests_to_their_namespace(
    fake: RunningFake, mirror: Mirror, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cache du`` counts a served manifest under its namespace, not ``(unknown)``."""
    await cache_an_image(mirror, fake)
    config = tmp_path / "cli.toml"
    config.write_text(mirror_config(5000, mirror.cache_dir, {NS: [fake.url]}))
    assert main(["cache", "du", "--config", str(config)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[1:-1]]
    assert [row[0] for row in rows] == [NS]  # no "(unknown)" row
    assert rows[0][3] == "1"  # one manifest


async def test_prune_older_than_keeps_a_manifest_in_use(
    fake: RunningFake, mirror: Mirror, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A manifest written long ago but pulled today is not 'older than 30d'."""
    img = fake.registry.add_image(REPO, "3")
    resp = await mirror.client.get(manifest_path(REPO, img.digest))
    assert resp.status == 200
    manifest_file = mirror.manifest_file(img.digest)
    written = time.time() - 40 * DAY
    os.utime(manifest_file, (written, written))
    await mirror.budget.flush()
    config = tmp_path / "cli.toml"
    config.write_text(mirror_config(5000, mirror.cache_dir, {NS: [fake.url]}))
    assert main(["cache", "prune", "--config", str(config), "--older-than", "30d"]) == 0
    capsys.readouterr()
    assert manifest_file.exists()
