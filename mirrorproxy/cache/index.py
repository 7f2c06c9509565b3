"""The cache index: what is stored, how big, for which registry, last used when.

SQLite in WAL mode (standard library), so ``mirrorproxy cache`` can read and prune
while the server runs. The files are the truth: ``reconcile`` makes the index agree
with them when the server starts (after a crash, say), which is cheap because only
verified files ever sit at a content path. Only the server reconciles: run next to
it, a reconcile would race its renames and evictions.

Several processes write the index (the server; ``cache prune``/``verify`` and
``import`` from the command line). Each connection knows the total size it has
seen plus its own changes, so ``external_change`` tells the server exactly what
the others did, however its own writes interleave with that read.

A connection given ``owns`` (a serving worker, which accounts for a share of the
cache) sees only the entries whose digest it owns in every total, change and
eviction candidate; the table itself stays whole for everyone. When ``owns``
changes (a cluster's member list did), ``recount`` and ``merge_listing`` say by
how much its part changed.

Over 300 lines because every way the total changes (writes, other processes, a
new split, a merged listing) goes through the one account of what was seen.
"""

from __future__ import annotations

import contextlib
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from itertools import chain
from pathlib import Path

from mirrorproxy.cache import BLOB as BLOB
from mirrorproxy.cache import MANIFEST as MANIFEST
from mirrorproxy.cache import Content
from mirrorproxy.cache.files import contents_of

INDEX_FILE = "index.db"  # in the cache directory, on every member's local disk

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

_SUM = "SELECT coalesce(sum(size), 0) FROM entries"
_OLDEST = "SELECT * FROM entries ORDER BY kind = 'manifest', last_used LIMIT ?"
# The same, over the entries a connection given ``owns`` accounts for.
_SUM_MINE = "SELECT coalesce(sum(size), 0) FROM entries WHERE mp_owns(digest)"
_OLDEST_MINE = (
    "SELECT * FROM entries WHERE mp_owns(digest) ORDER BY kind = 'manifest', last_used LIMIT ?"
)


@dataclass(frozen=True, slots=True)
class Entry:
    kind: str
    digest: str
    size: int
    namespace: str
    added: float
    last_used: float


class CacheIndex:
    """Thread-safe wrapper around one SQLite connection.

    Args:
        read_only: open without the right to write (and without creating the file):
            what ``cache ls``/``du`` use, so they cannot change a live server's index.
        owns: which digests (``sha256:<hex>``) this connection accounts for; None: all.

    Raises:
        sqlite3.OperationalError: ``read_only`` and there is no index file.
    """

    def __init__(
        self, path: Path, *, read_only: bool = False, owns: Callable[[str], bool] | None = None
    ) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._owns = owns
        if read_only:
            uri = f"file:{path}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=10.0)
        else:
            self._db = sqlite3.connect(path, check_same_thread=False, timeout=10.0)
            _use_wal(self._db)
            self._db.execute("PRAGMA synchronous=NORMAL")  # WAL: durable to the last checkpoint
            self._db.executescript(_SCHEMA)
        self._sum_sql, self._oldest_sql = _SUM, _OLDEST
        if owns is not None:
            self._db.create_function(
                "mp_owns", 1, lambda digest: 1 if owns(digest) else 0, deterministic=True
            )
            self._sum_sql, self._oldest_sql = _SUM_MINE, _OLDEST_MINE
        # The total size as this connection last read it, plus its own changes since.
        self._seen_total = 0 if read_only else self.total_size()
        # The same for every entry, to skip recounting ours when nobody else wrote.
        self._seen_all = 0 if read_only else self._sum(_SUM)

    @classmethod
    def of_cache(
        cls, cache_dir: Path, *, read_only: bool = False, owns: Callable[[str], bool] | None = None
    ) -> CacheIndex:
        """The index of the cache at ``cache_dir`` (its ``index.db``)."""
        return cls(cache_dir / INDEX_FILE, read_only=read_only, owns=owns)

    def accounts_for(self, digest: str) -> bool:
        """Whether ``digest`` counts in this connection's totals (see ``owns``)."""
        return self._owns is None or self._owns(digest)

    def _sum(self, sql: str) -> int:
        return int(self._db.execute(sql).fetchone()[0])

    def close(self) -> None:
        with self._lock:
            self._db.close()

    @contextlib.contextmanager
    def _write(self, change: list[int], digest: str) -> Iterator[sqlite3.Connection]:
        """One write transaction, holding SQLite's write lock from its first read.

        The block puts by how much it changes the total size in ``change``; this
        connection's account takes it only once the transaction is committed (its
        own total only for a ``digest`` it accounts for).
        """
        with self._lock:
            self._db.execute("BEGIN IMMEDIATE")
            try:
                yield self._db
                self._db.commit()
            except BaseException:
                self._db.rollback()
                raise
            self._seen_all += sum(change)
            if self.accounts_for(digest):
                self._seen_total += sum(change)

    def _size_of(self, kind: str, digest: str) -> int:
        row = self._db.execute(
            "SELECT size FROM entries WHERE kind = ? AND digest = ?", (kind, digest)
        ).fetchone()
        return int(row[0]) if row else 0

    def add(self, kind: str, digest: str, size: int, namespace: str) -> int:
        """Record an entry (again); return by how much the total size changed."""
        now = time.time()
        change: list[int] = []
        with self._write(change, digest) as db:
            change.append(size - self._size_of(kind, digest))
            db.execute(
                "INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, digest) "
                "DO UPDATE SET size = excluded.size, last_used = excluded.last_used",
                (kind, digest, size, namespace, now, now),
            )
        return change[0] if self.accounts_for(digest) else 0

    def remove(self, kind: str, digest: str) -> int:
        """Forget an entry; return its size (0: not recorded, or not accounted for here)."""
        change: list[int] = []
        with self._write(change, digest) as db:
            change.append(-self._size_of(kind, digest))
            db.execute("DELETE FROM entries WHERE kind = ? AND digest = ?", (kind, digest))
        return -change[0] if self.accounts_for(digest) else 0

    def drop(self, entry: Entry, *, then: Callable[[], object]) -> bool:
        """Remove ``entry`` and run ``then`` (delete its file), if nobody changed it.

        Both happen under the index's write lock, so a server recording the same
        digest meanwhile either sees the entry gone or keeps its own (newer) one.

        Returns:
            False (nothing done) when the entry is gone or was recorded anew.
        """
        change: list[int] = []
        with self._write(change, entry.digest) as db:
            row = db.execute(
                "SELECT size, added FROM entries WHERE kind = ? AND digest = ?",
                (entry.kind, entry.digest),
            ).fetchone()
            if row is None or (row[0], row[1]) != (entry.size, entry.added):
                return False
            then()
            db.execute(
                "DELETE FROM entries WHERE kind = ? AND digest = ?", (entry.kind, entry.digest)
            )
            change.append(-entry.size)
        return True

    def external_change(self) -> int:
        """By how much other connections changed the total size since the last call.

        Reading the total and comparing it with this connection's own account
        happen under one lock, so a write of ours running meanwhile is never
        mistaken for someone else's.
        """
        with self._lock:
            every = self._sum(_SUM)
            if every == self._seen_all:
                return 0  # nobody else wrote: no need to recount our share
            self._seen_all = every
            mine = every if self._owns is None else self._sum(self._sum_sql)
            change = mine - self._seen_total
            self._seen_total = mine
        return change

    def _resync(self) -> int:
        """Recount this connection's part (lock held); return by how much it changed
        since last seen. A difference, so the caller's total keeps its own updates."""
        every = self._sum(_SUM)
        mine = every if self._owns is None else self._sum(self._sum_sql)
        change = mine - self._seen_total
        self._seen_total, self._seen_all = mine, every
        return change

    def recount(self) -> int:
        """After ``owns`` changed: by how much the part this connection accounts for
        changed (changes by other processes since ``external_change`` included)."""
        with self._lock:
            return self._resync()

    def merge_listing(
        self, contents: Iterable[Content], *, since: float, skip: Callable[[str], bool]
    ) -> int:
        """Make the index agree with a listing of a store others write too (a bucket)
        taken while this server runs; return by how much this connection's part changed.

        Entries listed but missing are added, sizes corrected; an entry not listed
        is dropped only if it was recorded before ``since`` (when the listing began:
        newer ones were committed meanwhile). ``skip``: digests removed here while
        the listing ran (an eviction), never added back.
        """
        listed: dict[tuple[str, str], tuple[int, float]] = {}
        for c in contents:  # the slow part (a bucket listing), outside the lock
            listed[(c.kind, str(c.digest))] = (c.size, c.stored)
        with self._lock, self._db:
            known = {
                (k, d): (s, a)
                for k, d, s, a in self._db.execute("SELECT kind, digest, size, added FROM entries")
            }
            gone = [k for k, (_, added) in known.items() if k not in listed and added < since]
            self._db.executemany("DELETE FROM entries WHERE kind = ? AND digest = ?", gone)
            new = [
                (k, d, size, "", stored, stored)
                for (k, d), (size, stored) in listed.items()
                if (k, d) not in known and not skip(d)
            ]
            self._db.executemany("INSERT OR IGNORE INTO entries VALUES (?, ?, ?, ?, ?, ?)", new)
            resized = [
                (size, k, d)
                for (k, d), (size, _) in listed.items()
                if (k, d) in known and known[(k, d)][0] != size
            ]
            self._db.executemany(
                "UPDATE entries SET size = ? WHERE kind = ? AND digest = ?", resized
            )
            return self._resync()

    def known(self, kind: str, digests: Iterable[str]) -> set[str]:
        """Which of ``digests`` the index holds (as ``kind``)."""
        wanted = list(dict.fromkeys(digests))
        found: set[str] = set()
        with self._lock:
            for i in range(0, len(wanted), 500):  # under SQLite's variable limit
                part = wanted[i : i + 500]
                marks = ",".join("?" * len(part))
                rows = self._db.execute(
                    f"SELECT digest FROM entries WHERE kind = ? AND digest IN ({marks})",  # noqa: S608
                    (kind, *part),
                )
                found.update(str(row[0]) for row in rows)
        return found

    def touch_many(self, used: dict[tuple[str, str], float]) -> None:
        with self._lock, self._db:
            self._db.executemany(
                "UPDATE entries SET last_used = max(last_used, ?) WHERE kind = ? AND digest = ?",
                [(ts, kind, digest) for (kind, digest), ts in used.items()],
            )

    def total_size(self) -> int:
        """Bytes of the entries this connection accounts for (all, without ``owns``)."""
        with self._lock:
            row = self._db.execute(self._sum_sql).fetchone()
        return int(row[0])

    def oldest(self, limit: int = 256) -> list[Entry]:
        """Eviction candidates: blobs before manifests, least recently used first
        (only those this connection accounts for)."""
        with self._lock:
            rows = self._db.execute(self._oldest_sql, (limit,)).fetchall()
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
        """Make the index match the content files of a filesystem cache at ``root``."""
        return self.reconcile_with(chain(contents_of(root, BLOB), contents_of(root, MANIFEST)))

    def reconcile_with(self, contents: Iterable[Content]) -> tuple[int, int]:
        """Make the index match what the stores hold; return (added, dropped)."""
        on_disk: dict[tuple[str, str], tuple[int, float]] = {}
        for c in contents:
            on_disk[(c.kind, str(c.digest))] = (c.size, c.stored)
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
            self._seen_total = self._sum(self._sum_sql)
            self._seen_all = self._sum(_SUM)
        return len(added) + len(resized), len(dropped)


def _use_wal(db: sqlite3.Connection, tries: int = 50) -> None:
    """Put the index in WAL mode (it stays so in the file).

    Switching asks for a lock that sqlite's busy timeout does not wait for, and
    another process (a server's workers starting together) may hold one: read the
    mode first, and retry the switch a bounded number of times.
    """
    for attempt in range(tries):
        try:
            (mode,) = db.execute("PRAGMA journal_mode").fetchone()
            if str(mode).lower() != "wal":
                db.execute("PRAGMA journal_mode=WAL")
            return
        except sqlite3.OperationalError:
            if attempt == tries - 1:
                raise
            time.sleep(0.1)
