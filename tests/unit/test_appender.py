"""The temp file's writer: whole blocks past the page cache, every byte in the file at once.

Runs on the test machine's temp directory (a filesystem that takes ``O_DIRECT`` on
the CI machines); the fallback to buffered writes is forced by refusing the direct
write the way a filesystem that cannot do it refuses it (EINVAL).
"""

from __future__ import annotations

import asyncio
import errno
import os
import random
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorproxy.cache import blobs as blobs_module
from mirrorproxy.cache.appender import ALIGN, STAGE, Appender
from mirrorproxy.cache.blobs import BlobWriter, FileBlobStore
from mirrorproxy.core import pages
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.tuning import Tuning
from tests.fakes.registry import payload
from tests.support.waiting import wait_for

KIB = 1024


@pytest.fixture
def target(tmp_path: Path) -> Iterator[tuple[Path, int]]:
    path = tmp_path / "blob.tmp"
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o644)
    yield path, fd
    os.close(fd)


def pieces(data: bytes, sizes: list[int]) -> list[memoryview]:
    """``data`` cut at ``sizes`` (views on one buffer, as the download hands them on)."""
    buf, out, at = bytearray(data), [], 0
    for n in sizes:
        out.append(memoryview(buf)[at : at + n])
        at += n
    return out


def laid_out(data: bytes, lead: int, sizes: list[int]) -> list[memoryview]:
    """``data`` in page-aligned memory from byte ``lead`` of it on, cut at ``sizes``:
    how the upstream body reader lays out a body whose first byte is at a file offset
    congruent to ``lead``."""
    buf = pages.anonymous(lead + len(data))  # as the reader's pieces are made
    buf[lead : lead + len(data)] = data
    out, at = [], lead
    for n in sizes:
        out.append(memoryview(buf)[at : at + n])
        at += n
    return out


@pytest.fixture
def staged(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Sizes of the writes that went through the staging copy."""
    sizes: list[int] = []
    real = Appender._write_staged

    def spy(self: Appender, views: list[memoryview], n: int) -> None:
        sizes.append(n)
        real(self, views, n)

    monkeypatch.setattr(Appender, "_write_staged", spy)
    return sizes


def test_bytes_laid_out_like_the_file_are_written_without_a_copy(
    target: tuple[Path, int], staged: list[int]
) -> None:
    path, fd = target
    data = payload(3 * STAGE + 12_345, "in place")
    out = Appender(path, fd, direct=True)
    out.append([data[:5000]], 0)  # bytes from elsewhere (read-only): staged
    assert staged == [ALIGN]
    staged.clear()
    rest = len(data) - 5000
    # One piece handed on in several reads (joined again), then a second piece.
    sizes = [1000, 300 * KIB, STAGE - 1000 - 300 * KIB, rest - STAGE]
    out.append(laid_out(data[5000:], 5000 % ALIGN, sizes), 5000)
    assert staged == []  # every whole block went from where it was
    assert out.end == len(data)
    out.close()
    assert path.read_bytes() == data


def test_bytes_not_laid_out_like_the_file_are_staged(
    target: tuple[Path, int], staged: list[int]
) -> None:
    path, fd = target
    data = payload(2 * STAGE, "misaligned")
    out = Appender(path, fd, direct=True)
    out.append(laid_out(data, 1, [len(data)]), 0)  # memory one byte off the file's grid
    assert sum(staged) == len(data) // ALIGN * ALIGN
    out.close()
    assert path.read_bytes() == data


@pytest.mark.parametrize("layout", ["one buffer", "laid out or not"])
def test_writes_of_any_size_and_alignment_land_whole_and_in_order(
    target: tuple[Path, int], layout: str
) -> None:
    """Batches cut anywhere, from one plain buffer or from a mix of bytes laid out like
    the file (written in place), laid out off its grid, and read-only bytes."""
    path, fd = target
    rng = random.Random(7)  # noqa: S311 - sizes, not secrets
    data = payload(4 * STAGE + 12_345, f"aligned or not: {layout}")
    out = Appender(path, fd, direct=True)
    at = 0
    while at < len(data):
        choices = [1, 100, ALIGN - 1, ALIGN, 64 * KIB + 3, 300 * KIB, STAGE]
        sizes = [rng.choice(choices) for _ in range(5)]
        sizes = [min(n, len(data) - at - sum(sizes[:i])) for i, n in enumerate(sizes)]
        sizes = [n for n in sizes if n > 0]
        part = data[at : at + sum(sizes)]
        if layout == "one buffer":
            batch: list[memoryview | bytes] = list(pieces(part, sizes))
        else:
            batch = mixed(part, at, sizes, rng)
        out.append(batch, at)
        at += sum(sizes)
        assert out.end == at  # every byte handed over is in the file
        assert os.pread(fd, at, 0) == data[:at]
    assert out.direct  # nothing refused on this filesystem
    out.close()
    assert path.read_bytes() == data


def mixed(data: bytes, at: int, sizes: list[int], rng: random.Random) -> list[memoryview | bytes]:
    """``data`` (at file offset ``at``) cut at ``sizes``: mostly laid out like the file,
    some parts off its grid, some read-only."""
    out: list[memoryview | bytes] = []
    done = 0
    for n in sizes:
        part = data[done : done + n]
        lead = (at + done) % ALIGN if rng.random() < 0.7 else rng.randrange(ALIGN)
        out += [part] if rng.random() < 0.2 else laid_out(part, lead, [n])
        done += n
    return out


def test_a_filesystem_refusing_direct_writes_gets_the_bytes_buffered(
    target: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = target
    refused: list[int] = []

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        refused.append(offset)
        raise OSError(errno.EINVAL, os.strerror(errno.EINVAL))

    monkeypatch.setattr(os, "pwrite", pwrite)
    data = payload(2 * STAGE + 777, "refused")
    out = Appender(path, fd, direct=True)
    out.append(pieces(data[:5000], [5000]), 0)
    out.append(pieces(data[5000:], [STAGE, len(data) - 5000 - STAGE]), 5000)
    assert refused == [0]  # tried once (the first whole block), then never again
    assert not out.direct
    assert out.end == len(data)
    out.close()
    assert path.read_bytes() == data


def test_other_write_errors_are_the_callers(
    target: tuple[Path, int], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, fd = target

    def pwrite(fd: int, data: bytes, offset: int) -> int:
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "pwrite", pwrite)
    out = Appender(path, fd, direct=True)
    with pytest.raises(OSError, match="No space left") as err:
        out.append([bytes(4 * ALIGN)], 0)
    assert err.value.errno == errno.ENOSPC
    assert out.end == 0
    out.close()


def test_buffered_only_when_asked(target: tuple[Path, int]) -> None:
    path, fd = target
    out = Appender(path, fd, direct=False)
    assert not out.direct
    out.append([b"x" * (3 * ALIGN)], 0)
    assert out.end == 3 * ALIGN
    with pytest.raises(ValueError, match="ends at"):
        out.append([b"y"], 0)  # only ever at the end
    out.close()
    assert path.read_bytes() == b"x" * (3 * ALIGN)


async def test_a_writer_falls_back_to_the_page_cache_while_the_disk_lags(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A disk slower than the download must not slow its clients: past
    ``direct_backlog`` bytes queued and not yet written, with direct writes slower
    than the download, batches go buffered."""
    slow = threading.Event()
    slow.set()
    real_pwrite = os.pwrite

    def pwrite(fd: int, data: memoryview, offset: int) -> int:
        if slow.is_set():
            time.sleep(0.02)  # about 13 MB/s for a 256 KiB write: a slow disk
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", pwrite)  # only direct writes use pwrite
    flags = _record_direct(monkeypatch)
    piece = PIECE
    data = payload(40 * piece, "lagging disk")
    writer = _writer(tmp_path, data)
    for at in range(0, 20 * piece, piece):  # queued far faster than the disk writes
        await writer.write(data[at : at + piece])
    await wait_for(lambda: writer.written == writer.queued)
    slow.clear()  # the disk is fast again
    for at in range(20 * piece, len(data), piece):
        await writer.write(data[at : at + piece])
        await wait_for(lambda: writer.written == writer.queued)  # a disk keeping up
    info = await writer.commit()
    assert info.size == len(data)
    assert False in flags[1:20]  # behind a slow disk: through the page cache
    assert flags[-1] is True  # caught up: past the page cache again


async def test_a_writer_short_of_cpu_with_a_fast_disk_stays_direct(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A backlog that built up while the writing thread did not run is not the disk's
    fault: the page cache would only cost more CPU, so writes stay direct."""
    go = threading.Event()
    real = blobs_module._write_all
    flags = _record_direct(monkeypatch)

    def write_all(out: Appender, chunks: list[bytes], offset: int, *, direct: bool) -> None:
        if offset > 0:
            go.wait(10)  # the thread is held after one write: the disk was measured
        real(out, chunks, offset, direct=direct)

    monkeypatch.setattr(blobs_module, "_write_all", write_all)
    # A disk measured at 1 GB/s (its real first writes may be slow to allocate).
    monkeypatch.setattr(Appender, "device_rate", property(lambda self: 1e9))
    piece = PIECE
    data = payload(24 * piece, "starved writer")
    writer = _writer(tmp_path, data)
    await writer.write(data[:piece])
    await wait_for(lambda: writer.written == piece)
    await asyncio.sleep(0.05)  # the download has run a while: 50 MB at the disk's rate
    for at in range(piece, len(data), piece):  # a backlog of 23 pieces builds up
        await writer.write(data[at : at + piece])
    go.set()
    info = await writer.commit()
    assert info.size == len(data)
    assert flags == [True] * 24


PIECE = 256 * KIB


def _writer(tmp_path: Path, data: bytes) -> BlobWriter:
    """A blob writer that may switch past 4 pieces of backlog and never makes its
    caller wait below 64."""
    tuning = Tuning(direct_backlog=4 * PIECE, write_ahead=64 * PIECE, write_ahead_min=64 * PIECE)
    store = FileBlobStore(tmp_path)
    store.prepare()
    return store.begin(Digest.of(data), tuning=tuning)


def _record_direct(monkeypatch: pytest.MonkeyPatch) -> list[bool]:
    """Whether each batch was allowed past the page cache, in order."""
    flags: list[bool] = []
    real = Appender.append

    def append(self: Appender, chunks: list[bytes], offset: int, *, direct: bool = True) -> None:
        flags.append(direct)
        real(self, chunks, offset, direct=direct)

    monkeypatch.setattr(Appender, "append", append)
    return flags
