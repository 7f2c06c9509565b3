"""The cache index: what is stored, how big, for which registry, last used when.

SQLite in WAL mode (standard library), so ``mirrorproxy cache`` can read and prune
while the server runs. The files are the truth: ``reconcile`` makes the index agree
with them at start (after a crash, say), which is cheap because only verified files
ever sit at a content path.
"""

from __future__ import annotations

import os
import re
import sqlite3
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

BLOB, MANIFEST = "blob", "manifest"
_HEX = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (
    kind TEXT NOT NULL,          -- 'blob' or 'manifest'
    digest TEXT NOT NULL,        -- 'sha256:<hex>'
    size INTEGER NOT NULL,
    namespace TEXT NOT NULL,     -- the registry that first asked for it
    added REAL NOT NULL,
    last_used REAL NOT NULL,     -- tracked by the mirror, not filesystem atime
    PRIMARY KEY (kind, digest)
);
CREATE INDEX IF NOT EXISTS entries_lru ON entries (last_used);
"""


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str
    digest: str
    size: int
    namespace: str
    added: float
    last_used: float


class CacheIndex:
    """Thread-safe wrapper around one SQLite connection."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._db = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable to the last checkpoint
        self._db.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._db.close()

    def add(self, kind: str, digest: str, size: int, namespace: str) -> None:
        now = time.time()
        with self._lock, self._db:
            self._db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, digest) "
                "DO UPDATE SET size = excluded.size, last_used = excluded.last_used",
                (kind, digest, size, namespace, now, now),
            )

    def remove(self, kind: str, digest: str) -> None:
        with self._lock, self._db:
            self._db.execute("DELETE FROM entries WHERE kind = ? AND digest = ?", (kind, digest))

    def touch_many(self, used: dict[tuple[str, str], float]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "UPDATE entries SET last_used = max(last_used, ?) WHERE kind = ? AND digest = ?",
                [(ts, kind, digest) for (kind, digest), ts in used.items()],
            )

    def total_size(self) -> int:
        with self._lock:
            row = self._db.execute("SELECT coalesce(sum(size), 0) FROM entries").fetchone()
        return int(row[0])

    def oldest(self, limit: int = 256) -> list[Entry]:
        """Eviction candidates: blobs before manifests, least recently used first."""
        with self._lock:
            rows = self._db.execute(
                "SELECT * FROM entries ORDER BY kind = 'manifest', last_used LIMIT ?", (limit,)
            ).fetchall()
        return [Entry(*row) for row in rows]

    def entries(self, namespace: str | None = None) -> list[Entry]:
        with self._lock:
            if namespace is None:
                rows = self._db.execute("SELECT * FROM entries").fetchall()
            else:
                rows = self._db.execute(
                    "SELECT * FROM entries WHERE namespace = ?", (namespace,)
                ).fetchall()
        return [Entry(*row) for row in rows]

    def get(self, kind: str, digest: str) -> Entry | None:
        with self._lock:
            row = self._db.execute(
                "SELECT * FROM entries WHERE kind = ? AND digest = ?", (kind, digest)
            ).fetchone()
        return Entry(*row) if row else None

    def reconcile(self, root: Path) -> tuple[int, int]:
        """Make the index match the files under ``root``; return (added, dropped)."""
        on_disk: dict[tuple[str, str], tuple[int, float]] = {}
        for kind, sub in ((BLOB, "blobs"), (MANIFEST, "manifests")):
            for digest, size, mtime in _scan(root / sub):
                on_disk[(kind, digest)] = (size, mtime)
        with self._lock, self._db:
            known = {
                (k, d): s for k, d, s in self._db.execute("SELECT kind, digest, size FROM entries")
            }
            dropped = [key for key in known if key not in on_disk]
            self._db.executemany("DELETE FROM entries WHERE kind = ? AND digest = ?", dropped)
            added = [
                (k, d, size, "", mtime, mtime)
                for (k, d), (size, mtime) in on_disk.items()
                if (k, d) not in known
            ]
            self._db.executemany("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", added)
            resized = [
                (size, k, d)
                for (k, d), (size, _) in on_disk.items()
                if (k, d) in known and known[(k, d)] != size
            ]
            # Keep namespace and last use: only the size was off.
            self._db.executemany(
                "UPDATE entries SET size = ? WHERE kind = ? AND digest = ?", resized
            )
        return len(added) + len(resized), len(dropped)


def _scan(base: Path) -> Iterator[tuple[str, int, float]]:
    """(digest, size, mtime) of every content file under ``<base>/<alg>/<xx>/<hex>``."""
    try:
        algs = list(os.scandir(base))
    except FileNotFoundError:
        return
    for alg in algs:
        if alg.name not in _HEX or not alg.is_dir():
            continue
        for shard in os.scandir(alg.path):
            if not shard.is_dir():
                continue
            for f in os.scandir(shard.path):
                if len(f.name) == _HEX[alg.name] and _HEX_RE.fullmatch(f.name) and f.is_file():
                    st = f.stat()
                    yield f"{alg.name}:{f.name}", st.st_size, st.st_mtime
