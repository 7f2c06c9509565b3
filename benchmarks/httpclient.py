"""The aiohttp client for blob throughput and concurrent fetches (herd, memory).

Built to cost as little CPU as a Python client can: no decompression, a 4 MiB read
buffer so flow control does not pause every 128 KiB, and bodies drained with
``readany`` into nothing. Verification is opt-in: a ``Check`` compares every byte
against the blob as stored upstream (memcmp speed, far cheaper than hashing), so a
client that verifies still measures the server rather than itself.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass

import aiohttp
from yarl import URL

READ_BUFSIZE = 4 * 1024 * 1024
TIMEOUT = aiohttp.ClientTimeout(total=None, sock_connect=10, sock_read=120)


class Check:
    """Verify a body chunk by chunk against the expected bytes."""

    def __init__(self, expected: bytes) -> None:
        self.expected = expected

    def matches(self, pos: int, chunk: bytes) -> bool:
        """Whether ``chunk`` equals the expected bytes at ``pos``."""
        return self.expected[pos : pos + len(chunk)] == chunk


@dataclass(frozen=True, slots=True)
class Fetch:
    """One GET: status, bytes received, whether they matched, and its timing."""

    status: int
    size: int
    ok: bool  # 200, complete, and (when checked) every byte matched
    started: float  # perf_counter at request start
    first_byte: float  # seconds from start to response headers
    elapsed: float  # seconds from start to the last byte

    @property
    def rate(self) -> float:
        """Bytes per second over the whole request."""
        return self.size / self.elapsed if self.elapsed > 0 else 0.0


def new_session(connections: int = 100) -> aiohttp.ClientSession:
    """A session that leaves blob bytes alone and reads in big chunks."""
    return aiohttp.ClientSession(
        auto_decompress=False,
        read_bufsize=READ_BUFSIZE,
        timeout=TIMEOUT,
        connector=aiohttp.TCPConnector(limit=connections, force_close=False),
    )


async def fetch(
    session: aiohttp.ClientSession,
    url: str,
    *,
    expect_size: int | None = None,
    check: Check | None = None,
    headers: dict[str, str] | None = None,
) -> Fetch:
    """GET ``url`` and drain the body; never raises for HTTP or transport errors."""
    started = time.perf_counter()
    first_byte = 0.0
    size, status, ok = 0, 0, True
    try:
        async with session.get(url, headers=headers) as resp:
            status = resp.status
            first_byte = time.perf_counter() - started
            read = resp.content.readany
            while True:
                chunk = await read()
                if not chunk:
                    break
                if check is not None and ok and not check.matches(size, chunk):
                    ok = False
                size += len(chunk)
    except (aiohttp.ClientError, TimeoutError):
        ok = False
    elapsed = time.perf_counter() - started
    ok = ok and status == 200 and (expect_size is None or size == expect_size)
    return Fetch(status, size, ok, started, first_byte, elapsed)


async def first_status(url: str) -> int:
    """The status of a GET of ``url`` without following a redirect (body unread)."""
    async with new_session(1) as session, session.get(url, allow_redirects=False) as resp:
        return resp.status


async def fetch_once(url: str, *, expect_size: int | None = None) -> Fetch:
    """One GET on a fresh session (connection set-up included in the time)."""
    async with new_session(1) as session:
        return await fetch(session, url, expect_size=expect_size)


async def fetch_concurrently(
    url: str | Sequence[str],
    clients: int,
    *,
    expect_size: int | None = None,
    check: Check | None = None,
) -> tuple[float, list[Fetch]]:
    """``clients`` simultaneous GETs of ``url``, one connection each.

    Several URLs (the same blob on several servers) are given to the clients in
    turn: client ``i`` asks ``url[i % len(url)]``. Every connection is opened before
    the first request goes out, so all requests arrive together (a herd), not spread
    over connection set-up.

    Returns:
        Wall seconds from the first request to the last byte of the last one,
        and each client's result.
    """
    urls = [url] if isinstance(url, str) else list(url)
    mine = [urls[i % len(urls)] for i in range(clients)]
    async with new_session(clients) as session:
        # Open the connections first (concurrent GET /v2/ leaves them pooled).
        roots = [str(URL(u).with_path("/v2/").with_query(None)) for u in mine]
        await asyncio.gather(*(fetch(session, root) for root in roots))
        gate = asyncio.Event()

        async def one(target: str) -> Fetch:
            await gate.wait()
            return await fetch(session, target, expect_size=expect_size, check=check)

        tasks = [asyncio.create_task(one(target)) for target in mine]
        await asyncio.sleep(0)
        t0 = time.perf_counter()
        gate.set()
        results = await asyncio.gather(*tasks)
        return time.perf_counter() - t0, list(results)


async def fetch_all(
    urls: Sequence[str], *, concurrency: int = 32, headers: dict[str, str] | None = None
) -> list[Fetch]:
    """GET every URL, ``concurrency`` at a time (to warm a cache)."""
    sem = asyncio.Semaphore(concurrency)
    async with new_session(concurrency) as session:

        async def one(url: str) -> Fetch:
            async with sem:
                return await fetch(session, url, headers=headers)

        return list(await asyncio.gather(*(one(u) for u in urls)))
