"""CacheIndex: the SQLite record of what the cache holds, and ``reconcile`` with the files.

Each test opens a real index in ``tmp_path``; files are laid out the way the stores
lay them out (``<kind>s/<alg>/<xx>/<hex>``) so ``reconcile`` sees a real cache tree.
"""

from __future__ import annotations

import hashlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from mirrorproxy.cache import index as index_module
from mirrorproxy.cache.index import BLOB, MANIFEST, CacheIndex, Entry


class FakeTime:
    """Stands in for the ``time`` module inside ``mirrorproxy.cache.index``."""

    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def time(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> FakeTime:
    fake = FakeTime()
    monkeypatch.setattr(index_module, "time", fake)
    return fake


@pytest.fixture
def open_index(tmp_path: Path) -> Iterator[Callable[[], CacheIndex]]:
    """Open (another connection to) ``tmp_path/index.db``; all are closed at teardown."""
    opened: list[CacheIndex] = []

    def make() -> CacheIndex:
        idx = CacheIndex(tmp_path / "index.db")
        opened.append(idx)
        return idx

    yield make
    for idx in opened:
        idx.close()


def digest_of(data: bytes, alg: str = "sha256") -> str:
    return f"{alg}:{hashlib.new(alg, data).hexdigest()}"


def put_file(root: Path, kind: str, data: bytes, *, alg: str = "sha256", mtime: float = 0) -> str:
    """Write ``data`` at its content path under ``root``; return its digest."""
    digest = digest_of(data, alg)
    hexpart = digest.split(":", 1)[1]
    path = root / ("blobs" if kind == BLOB else "manifests") / alg / hexpart[:2] / hexpart
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime:
        os.utime(path, (mtime, mtime))
    return digest


def keys(entries: list[Entry]) -> list[tuple[str, str]]:
    return [(e.kind, e.digest) for e in entries]


def test_add_get_remove_and_total(open_index: Callable[[], CacheIndex], clock: FakeTime) -> None:
    idx = open_index()
    assert idx.total_size() == 0
    assert idx.get(BLOB, "sha256:" + "a" * 64) is None
    idx.add(BLOB, "sha256:" + "a" * 64, 100, "docker.io")
    idx.add(MANIFEST, "sha256:" + "a" * 64, 7, "docker.io")  # same digest, other kind
    idx.add(BLOB, "sha256:" + "b" * 64, 50, "ghcr.io")
    assert idx.total_size() == 157
    assert idx.get(BLOB, "sha256:" + "a" * 64) == Entry(
        BLOB, "sha256:" + "a" * 64, 100, "docker.io", clock.now, clock.now
    )
    assert {e.digest for e in idx.entries("ghcr.io")} == {"sha256:" + "b" * 64}
    assert len(idx.entries()) == 3
    assert idx.entries("quay.io") == []

    idx.remove(BLOB, "sha256:" + "a" * 64)
    assert idx.get(BLOB, "sha256:" + "a" * 64) is None
    assert idx.get(MANIFEST, "sha256:" + "a" * 64) is not None
    assert idx.total_size() == 57
    idx.remove(BLOB, "sha256:" + "a" * 64)  # removing twice is harmless
    assert idx.total_size() == 57


def test_add_again_updates_size_and_use_but_keeps_origin(
    open_index: Callable[[], CacheIndex], clock: FakeTime
) -> None:
    idx = open_index()
    d = "sha256:" + "c" * 64
    idx.add(BLOB, d, 10, "docker.io")
    clock.now += 60
    idx.add(BLOB, d, 12, "ghcr.io")
    assert idx.get(BLOB, d) == Entry(BLOB, d, 12, "docker.io", clock.now - 60, clock.now)
    assert idx.total_size() == 12


def test_touch_only_moves_last_use_forward(
    open_index: Callable[[], CacheIndex], clock: FakeTime
) -> None:
    idx = open_index()
    d = "sha256:" + "d" * 64
    idx.add(BLOB, d, 1, "docker.io")
    start = clock.now
    idx.touch_many({(BLOB, d): start + 30, (BLOB, "sha256:" + "e" * 64): start + 99})
    assert idx.get(BLOB, d) == Entry(BLOB, d, 1, "docker.io", start, start + 30)
    idx.touch_many({(BLOB, d): start + 5})  # an older use (a late flush) never rewinds
    entry = idx.get(BLOB, d)
    assert entry is not None
    assert entry.last_used == start + 30
    assert idx.get(BLOB, "sha256:" + "e" * 64) is None  # touching does not create entries


def test_oldest_puts_blobs_before_manifests_then_least_recently_used(
    open_index: Callable[[], CacheIndex], clock: FakeTime
) -> None:
    idx = open_index()
    added: dict[str, str] = {}
    for name, kind in [("m-old", MANIFEST), ("b1", BLOB), ("b2", BLOB), ("m-new", MANIFEST)]:
        added[name] = digest_of(name.encode())
        idx.add(kind, added[name], 10, "docker.io")
        clock.now += 1
    idx.touch_many({(BLOB, added["b1"]): clock.now + 10})  # b1 used last
    assert keys(idx.oldest()) == [
        (BLOB, added["b2"]),
        (BLOB, added["b1"]),
        (MANIFEST, added["m-old"]),
        (MANIFEST, added["m-new"]),
    ]
    assert keys(idx.oldest(limit=1)) == [(BLOB, added["b2"])]


def test_index_survives_reopening_and_is_shared_between_connections(
    open_index: Callable[[], CacheIndex], clock: FakeTime
) -> None:
    """A server and ``mirrorproxy cache`` each hold a connection to the same file."""
    server, cli = open_index(), open_index()
    d = "sha256:" + "f" * 64
    server.add(BLOB, d, 42, "docker.io")
    assert cli.get(BLOB, d) is not None
    cli.remove(BLOB, d)
    assert server.total_size() == 0
    server.add(BLOB, d, 42, "docker.io")
    server.close()
    assert open_index().get(BLOB, d) == Entry(BLOB, d, 42, "docker.io", clock.now, clock.now)


def test_reconcile_adds_unknown_files_and_drops_missing_ones(
    tmp_path: Path, open_index: Callable[[], CacheIndex], clock: FakeTime
) -> None:
    idx = open_index()
    kept = put_file(tmp_path, BLOB, b"kept")
    idx.add(BLOB, kept, 4, "docker.io")
    idx.add(BLOB, digest_of(b"deleted behind our back"), 23, "docker.io")
    idx.add(MANIFEST, digest_of(b"manifest gone"), 13, "docker.io")
    orphan = put_file(tmp_path, BLOB, b"committed, then the process died", mtime=5000.0)
    manifest = put_file(tmp_path, MANIFEST, b"type\n{}", mtime=6000.0)
    sha512 = put_file(tmp_path, BLOB, b"a sha512 blob", alg="sha512", mtime=7000.0)

    assert idx.reconcile(tmp_path) == (3, 2)
    assert sorted(keys(idx.entries())) == sorted(
        [(BLOB, kept), (BLOB, orphan), (MANIFEST, manifest), (BLOB, sha512)]
    )
    # The kept entry keeps what the index knew; found files get their mtime as last use.
    assert idx.get(BLOB, kept) == Entry(BLOB, kept, 4, "docker.io", clock.now, clock.now)
    assert idx.get(BLOB, orphan) == Entry(BLOB, orphan, 32, "", 5000.0, 5000.0)
    assert idx.get(MANIFEST, manifest) == Entry(MANIFEST, manifest, 7, "", 6000.0, 6000.0)
    assert idx.total_size() == 4 + 32 + 7 + 13
    assert idx.reconcile(tmp_path) == (0, 0)  # idempotent


def test_reconcile_fixes_a_size_the_index_got_wrong(
    tmp_path: Path, open_index: Callable[[], CacheIndex], clock: FakeTime
) -> None:
    idx = open_index()
    d = put_file(tmp_path, BLOB, b"12345678")
    idx.add(BLOB, d, 3, "docker.io")
    assert idx.reconcile(tmp_path) == (1, 0)
    entry = idx.get(BLOB, d)
    assert entry is not None
    assert entry.size == 8
    assert idx.total_size() == 8


def test_reconcile_ignores_what_is_not_a_content_file(
    tmp_path: Path, open_index: Callable[[], CacheIndex]
) -> None:
    """Temp files, stray names, unknown algorithms and tag records are not entries."""
    hexpart = "ab" * 32
    strays = [
        tmp_path / "tmp" / f"{hexpart[:16]}-0123.partial",
        tmp_path / "blobs" / "sha256" / "ab" / f"{hexpart}.partial",
        tmp_path / "blobs" / "sha256" / "ab" / hexpart[:-1],
        tmp_path / "blobs" / "md5" / "ab" / ("ab" * 16),
        tmp_path / "blobs" / "sha256" / "stray-file-in-alg-dir",
        tmp_path / "tags" / "ab" / f"{hexpart}.json",
        tmp_path / "quarantine" / f"blob-sha256-{hexpart}",
    ]
    for path in strays:
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"x")
    (tmp_path / "blobs" / "sha256" / "ab" / ("cd" * 32)).mkdir(parents=True)  # a directory
    idx = open_index()
    assert idx.reconcile(tmp_path) == (0, 0)
    assert idx.entries() == []


def test_reconcile_ignores_names_that_are_not_hex(tmp_path: Path) -> None:
    """``reconcile`` skips files under ``blobs/`` whose names are not hex digests."""
    stray = tmp_path / "blobs" / "sha256" / "zz" / ("zz" * 32)
    stray.parent.mkdir(parents=True)
    stray.write_bytes(b"not ours")
    index = CacheIndex(tmp_path / "index.db")
    try:
        assert index.reconcile(tmp_path) == (0, 0)
    finally:
        index.close()


def test_reconcile_of_a_missing_cache_tree_empties_the_index(
    tmp_path: Path, open_index: Callable[[], CacheIndex]
) -> None:
    idx = open_index()
    idx.add(BLOB, digest_of(b"x"), 1, "docker.io")
    assert idx.reconcile(tmp_path / "nothing-here") == (0, 1)
    assert idx.total_size() == 0


# -- several writers: each connection's account, conditional drops, read-only opens --


def test_add_and_remove_say_how_much_the_total_changed(
    open_index: Callable[[], CacheIndex],
) -> None:
    idx = open_index()
    d = "sha256:" + "d" * 64
    assert idx.add(BLOB, d, 100, "docker.io") == 100
    assert idx.add(BLOB, d, 120, "docker.io") == 20  # recorded again, bigger
    assert idx.remove(BLOB, d) == 120
    assert idx.remove(BLOB, d) == 0
    assert idx.external_change() == 0  # all of it was this connection's own


def test_external_change_is_what_other_connections_did(
    open_index: Callable[[], CacheIndex],
) -> None:
    server, cli = open_index(), open_index()
    a, b, c = ("sha256:" + x * 64 for x in "abc")
    server.add(BLOB, a, 100, "docker.io")
    assert cli.add(BLOB, b, 30, "docker.io") == 30
    server.add(BLOB, c, 5, "docker.io")  # interleaved with the other's writes
    assert cli.remove(BLOB, a) == 100  # removed under the server's feet
    assert server.remove(BLOB, a) == 0
    assert server.external_change() == 30 - 100
    assert server.external_change() == 0  # reported once


def test_drop_removes_only_the_entry_that_was_looked_at(
    open_index: Callable[[], CacheIndex], clock: FakeTime
) -> None:
    server, cli = open_index(), open_index()
    d = "sha256:" + "e" * 64
    server.add(BLOB, d, 10, "docker.io")
    seen = cli.get(BLOB, d)
    assert seen is not None
    server.remove(BLOB, d)  # evicted ...
    clock.now += 1
    server.add(BLOB, d, 10, "docker.io")  # ... and fetched again meanwhile
    ran: list[str] = []
    assert not cli.drop(seen, then=lambda: ran.append("unlink"))
    assert ran == []
    assert server.get(BLOB, d) is not None

    fresh = cli.get(BLOB, d)
    assert fresh is not None
    assert cli.drop(fresh, then=lambda: ran.append("unlink"))
    assert ran == ["unlink"]
    assert server.get(BLOB, d) is None
    assert server.external_change() == -10


def test_drop_keeps_the_entry_when_deleting_the_file_fails(
    open_index: Callable[[], CacheIndex],
) -> None:
    idx = open_index()
    d = "sha256:" + "f" * 64
    idx.add(BLOB, d, 10, "docker.io")
    entry = idx.get(BLOB, d)
    assert entry is not None

    def refuse() -> None:
        raise PermissionError("read-only")

    with pytest.raises(PermissionError):
        idx.drop(entry, then=refuse)
    assert idx.get(BLOB, d) == entry
    assert idx.external_change() == 0


def test_read_only_index_reads_and_refuses_to_write(
    tmp_path: Path, open_index: Callable[[], CacheIndex]
) -> None:
    with pytest.raises(sqlite3.OperationalError):
        CacheIndex(tmp_path / "index.db", read_only=True)  # not created by a reader
    assert not (tmp_path / "index.db").exists()
    writer = open_index()
    d = "sha256:" + "1" * 64
    writer.add(BLOB, d, 10, "docker.io")
    reader = CacheIndex(tmp_path / "index.db", read_only=True)
    try:
        assert reader.total_size() == 10
        with pytest.raises(sqlite3.OperationalError):
            reader.add(BLOB, "sha256:" + "2" * 64, 1, "docker.io")
        writer.add(BLOB, "sha256:" + "3" * 64, 5, "docker.io")
        assert reader.total_size() == 15  # sees the writer's commits
    finally:
        reader.close()
