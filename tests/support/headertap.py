"""A loopback TCP relay that records each HTTP request head a real client sends.

Real clients differ in what they send (six ``Accept`` lines, one comma-joined line,
random order), and the mirror's access log cannot show it. Tests point a client at
the tap instead of the mirror; the tap forwards every byte both ways and keeps each
request's method, target and header lines exactly as sent. It adds one header,
``X-Request-Id: tap-N``, which the mirror keeps and logs, so a tapped request can be
matched with the mirror's access-log line (status, namespace, cache result).

The tap parses request heads only: requests with a body (never sent by a puller)
and anything that is not HTTP (podman's TLS probe on an insecure mirror) switch
that connection to plain relaying. It runs its own event loop in a thread, so
synchronous tests and subprocess clients can use it.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
import threading
from dataclasses import dataclass

MAX_HEAD = 64 * 1024
READ_SIZE = 64 * 1024
START_TIMEOUT = 10.0
ID_HEADER = "x-request-id"
_REQUEST_LINE = re.compile(rb"[A-Z]{3,10} \S+ HTTP/1\.[01]")


@dataclass(frozen=True, slots=True)
class TappedRequest:
    """One request head as the client sent it."""

    request_id: str  # the X-Request-Id the mirror saw (the tap's unless the client sent one)
    method: str
    target: str  # path and query, as sent
    headers: tuple[tuple[str, str], ...]  # every header line, in order, names as sent

    def values(self, name: str) -> list[str]:
        """Every value of header ``name`` (one entry per line), in order."""
        return [v for k, v in self.headers if k.lower() == name.lower()]

    @property
    def accept_lines(self) -> list[str]:
        """The ``Accept`` header lines, one entry per line as sent."""
        return self.values("accept")

    @property
    def path(self) -> str:
        """The target without its query."""
        return self.target.split("?", 1)[0]


def parse_head(head: bytes) -> tuple[str, str, list[tuple[str, str]]] | None:
    """Split a request head into method, target and header lines; None if not HTTP."""
    lines = head.split(b"\r\n")
    if not _REQUEST_LINE.fullmatch(lines[0]):
        return None
    method, target, _ = lines[0].decode("latin-1").split(" ", 2)
    headers: list[tuple[str, str]] = []
    for raw in lines[1:]:
        name, sep, value = raw.decode("latin-1").partition(":")
        if not sep or not name or name != name.strip():
            return None
        headers.append((name, value.strip()))
    return method, target, headers


class HeaderTap:
    """Relay ``127.0.0.1:<port>`` to ``127.0.0.1:<target_port>``, recording request heads."""

    def __init__(self, target_port: int, *, id_prefix: str = "tap") -> None:
        self.target_port = target_port
        self.port = 0
        self._prefix = id_prefix
        self._ids = itertools.count(1)
        self._records: list[TappedRequest] = []
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stopping: asyncio.Event | None = None
        self._thread: threading.Thread | None = None
        self._ready = threading.Event()
        self._error: BaseException | None = None

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``: what clients are given as the mirror."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:<port>``, as image references use it."""
        return f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Listen on a free loopback port; return once it accepts connections."""
        self._thread = threading.Thread(target=self._run, name="header-tap", daemon=True)
        self._thread.start()
        if not self._ready.wait(START_TIMEOUT) or self._error is not None:
            raise RuntimeError(f"header tap did not start: {self._error!r}")

    def stop(self) -> None:
        """Close the listener and every relayed connection; join the thread."""
        loop, stopping, thread = self._loop, self._stopping, self._thread
        if loop is not None and stopping is not None and thread is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                loop.call_soon_threadsafe(stopping.set)
            thread.join(START_TIMEOUT)
        self._thread = None

    def requests(self, since: int = 0) -> list[TappedRequest]:
        """Recorded requests, oldest first, from position ``since`` (see ``mark``)."""
        with self._lock:
            return self._records[since:]

    def mark(self) -> int:
        """The current position, to ask later for the requests made after it."""
        with self._lock:
            return len(self._records)

    def _run(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as err:  # surfaced to start()
            self._error = err
            self._ready.set()
        finally:
            loop.close()

    async def _serve(self) -> None:
        self._stopping = asyncio.Event()
        conns: set[asyncio.Task[None]] = set()

        async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            task = asyncio.current_task()
            assert task is not None
            conns.add(task)
            try:
                await self._relay(reader, writer)
            finally:
                conns.discard(task)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stopping.wait()
            server.close()
            for task in list(conns):
                task.cancel()
            await asyncio.gather(*conns, return_exceptions=True)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.close()
            return
        try:
            # Either side may reset; the other then ends when its socket closes.
            await asyncio.gather(
                self._client_to_server(reader, up_writer),
                _pump(up_reader, writer),
                return_exceptions=True,
            )
        finally:
            for w in (writer, up_writer):
                w.close()

    async def _client_to_server(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Forward client bytes, rewriting each request head to carry a request id."""
        buf = b""
        while True:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                if len(buf) > MAX_HEAD or (buf and not _could_be_http(buf)):
                    writer.write(buf)
                    await _pump(reader, writer)
                    return
                data = await reader.read(READ_SIZE)
                if not data:
                    writer.write(buf)
                    if writer.can_write_eof():
                        writer.write_eof()
                    return
                buf += data
                continue
            head, buf = buf[:end], buf[end + 4 :]
            parsed = parse_head(head)
            if parsed is None:
                writer.write(head + b"\r\n\r\n" + buf)
                await _pump(reader, writer)
                return
            method, target, headers = parsed
            request_id = next((v for k, v in headers if k.lower() == ID_HEADER), None)
            extra = b""
            if request_id is None:
                request_id = f"{self._prefix}-{next(self._ids):06d}"
                extra = f"\r\nX-Request-Id: {request_id}".encode()
            with self._lock:
                self._records.append(TappedRequest(request_id, method, target, tuple(headers)))
            writer.write(head + extra + b"\r\n\r\n")
            await writer.drain()
            if _has_body(headers):
                writer.write(buf)  # a body: stop parsing this connection
                await _pump(reader, writer)
                return


def _has_body(headers: list[tuple[str, str]]) -> bool:
    """Whether a request head announces a body."""
    for name, value in headers:
        if name.lower() == "transfer-encoding" or (
            name.lower() == "content-length" and value != "0"
        ):
            return True
    return False


def _could_be_http(buf: bytes) -> bool:
    """Whether ``buf`` may still become a request line (a method in capitals first)."""
    word = buf.split(b" ", 1)[0]
    return word.isalpha() and word.isupper() and len(word) <= 10


async def _pump(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copy bytes until EOF, then half-close the other side."""
    while data := await reader.read(READ_SIZE):
        writer.write(data)
        await writer.drain()
    if writer.can_write_eof():
        writer.write_eof()
