"""FaultProxy: an in-process HTTP proxy in front of a real registry that breaks blobs.

Owns relaying Registry V2 requests to one upstream (Debian's docker-registry) and,
on request, damaging what it relays: flipping one byte in the middle of chosen blobs
(as a bad disk or middlebox does), and slowing blob bodies to a set rate (so a test
can act while a download runs). It records every request with its ``Range`` header
and the body bytes it relayed. It runs its own event loop in a thread, because the
end-to-end tests drive real clients with blocking subprocess calls. It knows nothing
about the mirror.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass, field

import aiohttp
from aiohttp import web

CHUNK = 256 * 1024
HOP_HEADERS = ("Content-Length", "Content-Range", "Content-Type", "Docker-Content-Digest", "ETag")
START_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Relayed:
    """One request the proxy relayed: what was asked, answered, and sent."""

    method: str
    path: str
    range: str
    status: int
    sent: int  # body bytes relayed to the client


@dataclass
class Faults:
    """Knobs a test sets between (or during) pulls; plain attributes, read per request."""

    flip: set[str] = field(default_factory=set)  # blob digests relayed with a byte flipped
    rate: float | None = None  # blob body bytes per second, None: as fast as it comes


class FaultProxy:
    """Relays to ``upstream`` (``http://127.0.0.1:PORT``); ``url`` is where it listens."""

    def __init__(self, upstream: str) -> None:
        self.upstream = upstream.rstrip("/")
        self.faults = Faults()
        self.log: list[Relayed] = []
        self._lock = threading.Lock()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None
        self._session: aiohttp.ClientSession | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._start(), self._loop).result(START_TIMEOUT)

    def stop(self) -> None:
        if self._thread.is_alive():
            asyncio.run_coroutine_threadsafe(self._stop(), self._loop).result(START_TIMEOUT)
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(START_TIMEOUT)
        if not self._thread.is_alive():
            self._loop.close()

    def relayed(self, digest: str) -> list[Relayed]:
        """Every GET of blob ``digest`` relayed so far."""
        with self._lock:
            return [r for r in self.log if r.method == "GET" and r.path.endswith(digest)]

    async def _start(self) -> None:
        self._session = aiohttp.ClientSession(
            auto_decompress=False, timeout=aiohttp.ClientTimeout(total=None, sock_read=60)
        )
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._relay)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        server = site._server
        assert isinstance(server, asyncio.Server)
        self.port = server.sockets[0].getsockname()[1]

    async def _stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _relay(self, request: web.Request) -> web.StreamResponse:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k in ("Accept", "Range")}
        for value in request.headers.getall("Accept", [])[1:]:
            headers["Accept"] += f", {value}"
        url = self.upstream + request.path_qs
        async with self._session.request(request.method, url, headers=headers) as up:
            resp = web.StreamResponse(status=up.status)
            for name in HOP_HEADERS:
                if name in up.headers:
                    resp.headers[name] = up.headers[name]
            digest = request.path.rsplit("/", 1)[-1]
            blob = "/blobs/" in request.path and request.method == "GET"
            flip = blob and digest in self.faults.flip
            offset = _first_byte(up.headers.get("Content-Range"))
            size = _total(up.headers.get("Content-Range")) or up.content_length
            await resp.prepare(request)
            sent = 0
            began = time.monotonic()
            if request.method != "HEAD":
                async for chunk in up.content.iter_chunked(CHUNK):
                    if flip and size:
                        chunk = _flip(chunk, offset + sent, size // 2)
                    await resp.write(chunk)
                    sent += len(chunk)
                    rate = self.faults.rate
                    if blob and rate:
                        ahead = sent / rate - (time.monotonic() - began)
                        if ahead > 0:
                            await asyncio.sleep(ahead)
            await resp.write_eof()
        with self._lock:
            self.log.append(
                Relayed(request.method, request.path, headers.get("Range", ""), up.status, sent)
            )
        return resp


def _flip(chunk: bytes, at: int, target: int) -> bytes:
    """``chunk`` (which starts at blob offset ``at``) with the byte at ``target`` flipped."""
    if not at <= target < at + len(chunk):
        return chunk
    i = target - at
    return chunk[:i] + bytes([chunk[i] ^ 0xFF]) + chunk[i + 1 :]


def _first_byte(content_range: str | None) -> int:
    if not content_range:
        return 0
    first = content_range.removeprefix("bytes ").split("-", 1)[0]
    return int(first) if first.isdigit() else 0


def _total(content_range: str | None) -> int | None:
    total = (content_range or "").rpartition("/")[2]
    return int(total) if total.isdigit() else None
