"""CacheBudget: keeps the cache inside ``max_size``, ``min_free`` and the disk.

A fill reserves its size before writing a byte and gets a ``Reservation`` of its
own. Before admitting it the budget asks the filesystem (statvfs) too; room is made
by evicting the least recently used entries (blobs before manifests, never one
being served or filled), but only when eviction can make all of it: a blob that
can never fit evicts nothing and is streamed through uncached.

The in-memory total is the sum of committed entries: every change the server makes
is applied to it in the same step as to the index, and what other processes change
(``cache prune``/``verify``, ``import``) is picked up by the flush as a difference
(``CacheIndex.external_change``), never by overwriting the total with a read that a
concurrent commit could outdate. Last use is kept in memory and written to the
index in batches, off the hot path.

With S3 the index stays local, is rebuilt from the bucket's listing at start, and
eviction deletes objects (never one out as a presigned URL: ``lend``); objects a
lifecycle rule deleted are forgotten when a lookup misses (``vanished``).

Budgets splitting one cache (``[server] workers``; a [cluster] over one bucket)
get ``owns`` and ``share``: each accounts for, and evicts, only the entries whose
digest it owns (whoever wrote them), within ``share`` of ``max_size``. Members
report their use to the owner (``used_elsewhere``, which pins what they read:
``remotepins``); when the members change, ``reshare`` recounts (``resplit``).

Over 300 lines: admission, accounting and eviction share one total, the pins and
the reservations. It reaches content only through the store Protocols and the index.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections import Counter
from collections.abc import Callable, Iterator
from itertools import chain

from mirrorproxy.cache import BLOB, MANIFEST, BlobStore, Content, ManifestStore
from mirrorproxy.cache.index import CacheIndex, Entry
from mirrorproxy.cache.ownership import OwnedDigests
from mirrorproxy.cache.remotepins import RemoteUse
from mirrorproxy.cache.reservation import Reservation as Reservation
from mirrorproxy.cache.resplit import Resplit
from mirrorproxy.cache.room import disk_shortfall
from mirrorproxy.config import CacheConfig
from mirrorproxy.core.oci import Digest, parse_digest
from mirrorproxy.core.tuning import DEFAULT_TUNING
from mirrorproxy.observability.metrics import Metrics

logger = logging.getLogger(__name__)

BUDGET, WRITE_ERROR = "budget", "write-error"  # why a blob was not cached
WRITE_RETRY = 30.0  # after a failed cache write, stream through this long, then try again


class CacheBudget:
    def __init__(
        self,
        config: CacheConfig,
        *,
        blobs: BlobStore,
        manifests: ManifestStore,
        metrics: Metrics,
        clock: Callable[[], float] = time.time,
        flush_interval: float = DEFAULT_TUNING.index_flush,
        owns: Callable[[Digest], bool] | None = None,
        share: float | Callable[[], float] = 1.0,
        remote: RemoteUse | None = None,
    ) -> None:
        """``owns``: the digests this budget accounts for and may evict (None: all);
        ``share``: its part of ``max_size`` (0 < share <= 1), or what gives it now;
        ``remote``: what the other members of a cluster over one bucket use."""
        self._config = config
        self._owned = None if owns is None else OwnedDigests(owns)
        self._share = share
        self.remote = remote
        self.flush_interval = flush_interval  # seconds between index flushes
        self._blobs = blobs
        self._manifests = manifests
        self._metrics = metrics
        self._clock = clock
        self.index: CacheIndex | None = None
        self.total = 0  # bytes of committed entries
        self._reservations: set[Reservation] = set()  # room promised to running fills
        self._pins: Counter[str] = Counter()  # digests being served or filled
        self._lent = RemoteUse()  # digests out as presigned URLs, until those expire
        self._used: dict[tuple[str, str], float] = {}
        self._blocked_until = 0.0  # set by a failed write (disk full, read-only)
        self._unindexed: dict[tuple[str, str], tuple[int, str]] = {}  # retried by flush
        self.write_retry = WRITE_RETRY
        self._resplit: Resplit | None = None  # set by open

    @property
    def limit(self) -> int:
        """The bytes this budget may hold: its share of ``max_size`` now (0: no limit)."""
        share = self._share() if callable(self._share) else self._share
        return int(self._config.max_size * share)

    def open(self, *, reconcile: bool = True) -> None:
        """Open the index and make it agree with the stores (run once at start;
        ``reconcile=False``: another process serving this cache did that)."""
        self.index = CacheIndex.of_cache(self._config.dir, owns=self._owned)
        self._resplit = Resplit(self.index, self._contents, self._recounted)
        added, dropped = self.index.reconcile_with(self._contents()) if reconcile else (0, 0)
        if added or dropped:
            logger.info("cache index reconciled: %d entries added, %d dropped", added, dropped)
        self.total = self.index.total_size()
        self._metrics.cache_size_bytes.set(self.total)

    def _contents(self) -> Iterator[Content]:
        return chain(self._blobs.contents(), self._manifests.contents())

    async def close(self) -> None:
        if self._resplit is not None:
            await self._resplit.close()
        try:
            await self.flush()
        finally:
            if self.index is not None:
                self.index.close()
                self.index = None

    async def run_flusher(self) -> None:
        """Background task: persist last-use times, and pick up changes by the CLI."""
        while True:
            await asyncio.sleep(self.flush_interval)
            try:
                await self.flush()
            except (OSError, sqlite3.Error) as err:  # a full disk, say: try again later
                logger.error("cannot update the cache index: %s", err)

    async def flush(self) -> None:
        if self.index is None:
            return
        used, self._used = self._used, {}
        index = self.index
        for (kind, digest), (size, namespace) in list(self._unindexed.items()):
            # Counted in the total when committed: recording it changes nothing.
            await asyncio.to_thread(index.add, kind, digest, size, namespace)
            del self._unindexed[(kind, digest)]
        if used:
            await asyncio.to_thread(index.touch_many, used)
        change = await asyncio.to_thread(index.external_change)
        if change:
            logger.info("cache changed by another process: %+d bytes", change)
            self.total += change
        self._metrics.cache_size_bytes.set(self.total)

    def reshare(self, *, relist_after: float) -> None:
        """Who owns what changed: recount now, list the store again later (``Resplit``)."""
        if self._owned is not None:
            self._owned.forget()
        if self._resplit is not None:
            self._resplit.changed(relist_after=relist_after)

    def _recounted(self, change: int) -> None:
        self.total += change
        self._make_room(0)  # a smaller share, say
        self._metrics.cache_size_bytes.set(self.total)

    async def used_elsewhere(
        self, served: set[str], reading: set[str], *, pin_for: float
    ) -> set[str]:
        """Other members served or read these: used now, those read pinned ``pin_for``
        seconds (unless reported again). Only entries the index holds: returned."""
        if self.index is None or self.remote is None:
            return set()
        known = await asyncio.to_thread(self.index.known, BLOB, served | reading)
        now = self._clock()
        self._used.update(dict.fromkeys([(BLOB, digest) for digest in known], now))
        self.remote.hold(known & reading, until=now + pin_for)
        return known

    def now(self) -> float:
        """The budget's clock (wall-clock seconds), for ``vanished``'s ``since``."""
        return self._clock()

    def vanished(self, kind: str, digest: Digest, *, since: float) -> None:
        """A lookup begun at ``since`` found no ``digest``: if the index still counts
        it (a bucket lifecycle rule deleted it, say), forget it.

        An entry recorded or used since then is kept: it was committed again while
        the lookup ran.
        """
        key = str(digest)
        if self.index is None or key in self._pins:
            return
        entry = self.index.get(kind, key)
        if entry is None or max(entry.last_used, self._used.get((kind, key), 0.0)) >= since:
            return
        try:
            removed = self.index.remove(kind, key)
        except sqlite3.Error as err:
            logger.error("cannot update the cache index: %s", err)
            return
        if self._resplit is not None:
            self._resplit.removed(key)
        self.total -= removed
        self._metrics.cache_size_bytes.set(self.total)
        logger.info("%s %s left the store behind the index's back: forgotten", kind, digest)

    def touch(self, kind: str, digest: Digest) -> None:
        self._used[(kind, str(digest))] = self._clock()
        if self.remote is not None and kind == BLOB:
            self.remote.note(str(digest))  # for the report to its owner

    def pin(self, digest: Digest) -> None:
        self._pins[str(digest)] += 1

    def unpin(self, digest: Digest) -> None:
        key = str(digest)
        self._pins[key] -= 1
        if self._pins[key] <= 0:
            del self._pins[key]

    def lend(self, digest: Digest, seconds: float) -> None:
        """A presigned URL of ``digest`` is out for ``seconds``: pinned until then."""
        self._lent.hold([str(digest)], until=self._clock() + seconds)

    @property
    def pinned(self) -> frozenset[str]:
        """Digests being served, filled or lent (never evicted)."""
        return frozenset(self._pins) | self._lent.held(self._clock())

    @property
    def reservations(self) -> frozenset[Reservation]:
        """Reservations held by running fills."""
        return frozenset(self._reservations)

    def write_failed(self, err: OSError) -> None:
        """The disk refused a write: stream through for a while, then try again."""
        if self._clock() >= self._blocked_until:
            logger.error(
                "cache write failed (%s): streaming blobs through uncached for %.0fs",
                err.strerror or err,
                self.write_retry,
            )
        self._blocked_until = self._clock() + self.write_retry

    def reserve(self, digest: Digest, size: int | None) -> Reservation:
        """Promise room for a blob about to be written, if eviction can make all of it
        (a blob another budget of a split accounts for needs room on the disk only).

        Returns:
            The fill's reservation; its ``refused`` is None when the blob may be
            cached, else why not ("budget" or "write-error": stream it through).
        """
        key = str(digest)
        if self._clock() < self._blocked_until:
            return Reservation(key, 0, refused=WRITE_ERROR)
        need = size or 0
        limit = self.limit
        if limit and need > limit:
            logger.info("blob %s (%d bytes) exceeds the cache budget: not cached", digest, need)
            return Reservation(key, 0, refused=BUDGET)
        if not self._make_room(need, mine=self.index is None or self.index.accounts_for(key)):
            if self._clock() < self._blocked_until:
                return Reservation(key, 0, refused=WRITE_ERROR)  # eviction hit a broken disk
            logger.warning("no room in the cache for blob %s (%d bytes): not cached", digest, need)
            return Reservation(key, 0, refused=BUDGET)
        reservation = Reservation(key, need, on_release=self._reservations.discard)
        self._reservations.add(reservation)
        return reservation

    def committed(
        self,
        kind: str,
        digest: Digest,
        size: int,
        namespace: str,
        *,
        reservation: Reservation | None = None,
    ) -> None:
        """Account for an entry that reached its content path (and end its reservation).

        The reservation ends and the entry counts in the same step: the budget
        never sees the bytes twice, nor not at all.
        """
        if reservation is not None:
            reservation.release()
        if self.index is None:
            return
        try:
            change = self.index.add(kind, str(digest), size, namespace)
        except sqlite3.Error as err:
            # The file is in place and verified: count it now so the budget holds,
            # and record it when the index can be written again (flush).
            logger.error("cannot record %s %s in the cache index: %s", kind, digest, err)
            self._unindexed[(kind, str(digest))] = (size, namespace)
            change = size if self.index.accounts_for(str(digest)) else 0
        self.total += change
        self._metrics.cache_size_bytes.set(self.total)
        self._make_room(0)  # its size was not known up front (or a manifest)

    def _shortfall(self, need: int, *, mine: bool = True) -> int:
        """Bytes that must be freed before ``need`` more fit (0 or less: it fits).

        Both the budget (for what it accounts for: ``mine``) and the disk are asked.
        Room reserved by running fills counts as taken, though part of it may be
        written already: on a tight disk that errs toward streaming through.
        """
        index, reserved = self.index, sum(r.size for r in self._reservations)
        ours = sum(r.size for r in self._reservations if index and index.accounts_for(r.digest))
        limit = self.limit
        short = self.total + ours + (need if mine else 0) - limit if limit else 0
        disk = disk_shortfall(self._config, need + reserved)
        return short if disk is None else max(short, disk)

    def _reclaimable(self) -> int:
        """Bytes eviction could free now: indexed entries that are not in use."""
        if self.index is None:
            return 0
        index = self.index
        in_use = sum(
            entry.size
            for digest in self._in_use()
            if index.accounts_for(digest)
            for entry in (index.get(BLOB, digest), index.get(MANIFEST, digest))
            if entry is not None
        )
        unindexed = sum(
            size
            for (_, digest), (size, _) in self._unindexed.items()
            if self.index.accounts_for(digest)
        )
        return self.total - unindexed - in_use

    def _make_room(self, need: int, *, mine: bool = True) -> bool:
        """Evict least recently used entries until ``need`` more bytes fit.

        Nothing is evicted unless evicting what is not in use can make all the
        room: a blob that cannot fit must not empty the cache on its way out.
        """
        if self.index is None:
            return True
        target = self._shortfall(need, mine=mine)
        if target <= 0:
            return True
        reclaimable = self._reclaimable()
        if target > reclaimable:
            logger.info(
                "%d more bytes needed in the cache, %d could be evicted: evicting nothing",
                target,
                reclaimable,
            )
            return False
        if self._used:  # eviction must see the latest uses, not the last flush
            used, self._used = self._used, {}
            self.index.touch_many(used)
        freed = 0
        in_use = self._in_use()
        while self._shortfall(need, mine=mine) > 0:
            if freed >= target:
                return False  # deleting files frees less than it should (held open?)
            victims = [e for e in self.index.oldest() if e.digest not in in_use]
            if not victims:
                return False
            for entry in victims:
                if not self._evict(entry):
                    return False
                freed += entry.size
                if self._shortfall(need, mine=mine) <= 0 or freed >= target:
                    break
        return True

    def _in_use(self) -> set[str]:
        """Digests never evicted now: served or filled here, reserved, read elsewhere."""
        held = self.pinned | {r.digest for r in self._reservations}
        if self.remote is not None:
            held |= self.remote.held(self._clock())
        return set(held)

    def _evict(self, entry: Entry) -> bool:
        """Delete one entry; False when the disk refused (read-only, say)."""
        try:
            digest = parse_digest(entry.digest)
        except Exception:
            digest = None
        try:
            if digest is not None:
                (self._blobs if entry.kind == BLOB else self._manifests).delete(digest)
            # What the index held (0: another process removed it, and the flush
            # accounts for that as its change).
            removed = self.index.remove(entry.kind, entry.digest) if self.index else 0
        except OSError as err:
            self.write_failed(err)
            return False
        except sqlite3.Error as err:
            logger.error("cannot update the cache index while evicting: %s", err)
            return False
        self._used.pop((entry.kind, entry.digest), None)
        if self._resplit is not None:
            self._resplit.removed(entry.digest)
        self.total -= removed
        self._metrics.cache_size_bytes.set(self.total)
        self._metrics.cache_evictions.labels(entry.kind).inc()
        logger.info("evicted %s %s (%d bytes)", entry.kind, entry.digest, entry.size)
        return True
