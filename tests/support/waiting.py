"""Bounded waits for background conditions (a file committed, a fake asked, a count reached).

Tests never sleep for a guessed time when they can wait for the condition itself;
every wait has the same upper bound, so a broken condition fails instead of hanging.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

WAIT = 5.0  # upper bound for any wait on a background condition, in seconds


async def wait_for(condition: Callable[[], bool], *, within: float = WAIT) -> None:
    """Poll ``condition`` (cache dir or fake state) until it holds, at most ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            if condition():
                return
            await asyncio.sleep(0.01)


async def wait_until(condition: Callable[[], Awaitable[bool]], *, within: float = WAIT) -> None:
    """``wait_for`` a condition that must be awaited (a metric scraped, a bucket listed)."""
    async with asyncio.timeout(within):
        while True:
            if await condition():
                return
            await asyncio.sleep(0.05)
