"""Single-flight: concurrent callers with the same key share one run of a coroutine.

Used for upstream manifest, tag and referrer fetches and for token requests. Pure
asyncio: it knows nothing of what the coroutine does.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class SingleFlight(Generic[K, V]):
    """The calls running now, by key; whoever asks for a running key waits for it.

    It owns only that map: a call's outcome is shared by the callers waiting while it
    runs and then forgotten (nothing is cached; a later caller starts a new run). It
    must not let a waiter's cancellation stop the shared call, nor hand the leader's
    own cancellation to the others: they get ``cancelled(key)`` instead.
    """

    def __init__(self, *, cancelled: Callable[[K], BaseException]) -> None:
        self._cancelled = cancelled
        self._running: dict[K, asyncio.Future[V]] = {}

    def __contains__(self, key: K) -> bool:
        return key in self._running

    async def run(self, key: K, make: Callable[[], Awaitable[V]]) -> V:
        """Run ``make()`` unless a call with ``key`` is running; return its outcome.

        Raises:
            BaseException: whatever the shared call raised (``cancelled(key)`` for a
                waiter whose leader was cancelled).
        """
        running = self._running.get(key)
        if running is not None:
            return await asyncio.shield(running)
        fut: asyncio.Future[V] = asyncio.get_running_loop().create_future()
        self._running[key] = fut
        try:
            result = await make()
        except BaseException as err:
            shared = self._cancelled(key) if isinstance(err, asyncio.CancelledError) else err
            fut.set_exception(shared)
            fut.exception()  # retrieved here: there may be no waiter
            raise
        else:
            fut.set_result(result)
            return result
        finally:
            del self._running[key]
