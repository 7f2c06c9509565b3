"""Following a split of the cache that changes: a cluster over one bucket whose
members come and go (``members_dns``).

When the member list changes, who owns which digest changes at once (``owns`` is
asked against the live list), so the budget's part of the index is recounted at
once; and the members now owning digests others wrote must learn of them, so the
bucket is listed again and merged into the index, but only once the list held
still for a while (a rolling update changes it several times; one listing then
serves them all). It owns that task and the index work it runs in a thread; it
must not evict (the budget does, given each change of its part).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Callable, Iterable
from functools import partial

from mirrorproxy.cache import Content
from mirrorproxy.cache.index import CacheIndex

logger = logging.getLogger(__name__)


class Resplit:
    """Recount now, re-list later, for one budget's index.

    Args:
        contents: lists the stores (blocking; run in a thread).
        counted: told by how much the budget's part changed, on the loop; a change
            is always told, even when the task was cancelled while the thread ran.
    """

    def __init__(
        self,
        index: CacheIndex,
        contents: Callable[[], Iterable[Content]],
        counted: Callable[[int], None],
    ) -> None:
        self._index, self._contents, self._counted = index, contents, counted
        self._task: asyncio.Task[None] | None = None
        self._work: asyncio.Future[int] | None = None
        self._removed: set[str] | None = None  # removed while a listing runs
        self.relists = 0  # listings merged (for tests and the log)

    def changed(self, *, relist_after: float) -> None:
        """The split changed: recount now, list the store once no other change came
        for ``relist_after`` seconds (each change restarts that wait)."""
        if self._task is not None:
            self._task.cancel()  # index work under way still finishes, and counts
        self._task = asyncio.create_task(self._follow(relist_after), name="cache relist")

    def removed(self, digest: str) -> None:
        """An entry was removed (evicted, vanished): a listing under way must not
        bring it back."""
        if self._removed is not None:
            self._removed.add(digest)

    async def close(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self._work is not None:  # the thread must be done with the index
            await asyncio.wait([self._work])

    async def _follow(self, relist_after: float) -> None:
        await self._run(self._index.recount)
        await asyncio.sleep(relist_after)
        removed = self._removed = set()
        try:
            work = partial(
                self._index.merge_listing,
                self._contents(),
                since=time.time(),  # the index's clock
                skip=removed.__contains__,
            )
            await self._run(work)
        finally:
            self._removed = None
        self.relists += 1
        logger.info("cache index merged with a new listing of the store for the new members")

    async def _run(self, work: Callable[[], int]) -> None:
        """Run ``work`` in a thread, one at a time; its change is told even if we
        are cancelled meanwhile."""
        while self._work is not None:
            await asyncio.wait([self._work])
        done = self._work = asyncio.ensure_future(asyncio.to_thread(work))
        done.add_done_callback(self._done)
        await asyncio.shield(done)

    def _done(self, work: asyncio.Future[int]) -> None:
        self._work = None
        if work.cancelled():
            return
        err = work.exception()
        if err is not None:
            logger.error("cannot recount the cache index for the new members: %s", err)
            return
        self._counted(work.result())
