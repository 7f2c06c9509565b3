"""SingleFlight: one run per key for concurrent callers, its outcome shared, then forgotten."""

from __future__ import annotations

import asyncio

import pytest

from mirrorproxy.core.singleflight import SingleFlight

WAIT = 2.0


class Gone(Exception):
    """What waiters get when the call they waited for was cancelled."""


def flight() -> SingleFlight[str, int]:
    return SingleFlight(cancelled=lambda key: Gone(f"{key} was cancelled"))


async def test_concurrent_callers_share_one_run() -> None:
    sf = flight()
    runs = 0
    go = asyncio.Event()

    async def make() -> int:
        nonlocal runs
        runs += 1
        await go.wait()
        return 42

    callers = [asyncio.create_task(sf.run("k", make)) for _ in range(5)]
    await asyncio.sleep(0)
    assert "k" in sf
    go.set()
    async with asyncio.timeout(WAIT):
        assert await asyncio.gather(*callers) == [42] * 5
    assert runs == 1
    assert "k" not in sf


async def test_different_keys_run_separately() -> None:
    sf = flight()
    seen: list[str] = []

    async def make(key: str) -> int:
        seen.append(key)
        await asyncio.sleep(0)
        return len(key)

    async with asyncio.timeout(WAIT):
        got = await asyncio.gather(
            sf.run("a", lambda: make("a")), sf.run("bb", lambda: make("bb"))
        )
    assert list(got) == [1, 2]
    assert sorted(seen) == ["a", "bb"]


async def test_a_failure_reaches_every_caller_and_is_not_remembered() -> None:
    sf = flight()
    go = asyncio.Event()

    async def fail() -> int:
        await go.wait()
        raise ValueError("upstream said no")

    callers = [asyncio.create_task(sf.run("k", fail)) for _ in range(3)]
    await asyncio.sleep(0)
    go.set()
    async with asyncio.timeout(WAIT):
        results = await asyncio.gather(*callers, return_exceptions=True)
    assert [type(r) for r in results] == [ValueError] * 3

    async def ok() -> int:
        return 7

    assert await sf.run("k", ok) == 7  # a later caller starts afresh


async def test_a_cancelled_leader_gives_waiters_an_error_not_its_cancellation() -> None:
    sf = flight()
    started = asyncio.Event()

    async def slow() -> int:
        started.set()
        await asyncio.sleep(WAIT * 10)
        return 0

    leader = asyncio.create_task(sf.run("k", slow))
    await started.wait()
    waiter = asyncio.create_task(sf.run("k", slow))
    await asyncio.sleep(0)
    leader.cancel()
    async with asyncio.timeout(WAIT):
        with pytest.raises(asyncio.CancelledError):
            await leader
        with pytest.raises(Gone, match="k was cancelled"):
            await waiter
    assert "k" not in sf


async def test_a_cancelled_waiter_does_not_stop_the_shared_call() -> None:
    sf = flight()
    go = asyncio.Event()

    async def make() -> int:
        await go.wait()
        return 1

    leader = asyncio.create_task(sf.run("k", make))
    await asyncio.sleep(0)
    waiter = asyncio.create_task(sf.run("k", make))
    await asyncio.sleep(0)
    waiter.cancel()
    go.set()
    async with asyncio.timeout(WAIT):
        assert await leader == 1
        with pytest.raises(asyncio.CancelledError):
            await waiter
