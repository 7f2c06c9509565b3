"""Raw-socket HTTP/1.1 for tests that must send what no HTTP client library would.

Owns writing arbitrary bytes to a server (malformed request lines, NUL bytes, huge
or trickled headers), reading back whatever answer comes (or noticing that the
connection was closed instead) and a minimal parse of that answer. Every read is
bounded by a timeout. It knows nothing about the mirror.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

READ_TIMEOUT = 5.0


@dataclass(frozen=True, slots=True)
class RawResponse:
    """One HTTP response as bytes on the wire, minimally parsed."""

    status: int
    headers: dict[str, str]  # lower-cased names; the last value wins
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)

    @property
    def is_oci_error(self) -> bool:
        """Whether this is ``application/json`` with a non-empty ``errors`` list."""
        if not self.headers.get("content-type", "").startswith("application/json"):
            return False
        try:
            doc = self.json()
        except ValueError:
            return False
        errors = doc.get("errors") if isinstance(doc, dict) else None
        if not isinstance(errors, list) or not errors:
            return False
        return all(isinstance(e, dict) and e.get("code") and e.get("message") for e in errors)


def parse_response(data: bytes, *, head: bool = False) -> RawResponse | None:
    """Parse the first final response in ``data``; None if there is no complete head.

    Interim answers (``100 Continue``) are skipped.
    """
    head_end = data.find(b"\r\n\r\n")
    if head_end < 0:
        return None
    lines = data[:head_end].decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[1].isdigit():
        return None
    if 100 <= int(parts[1]) < 200:
        return parse_response(data[head_end + 4 :], head=head)
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    body = data[head_end + 4 :]
    if not head and "content-length" in headers:
        body = body[: int(headers["content-length"])]
    return RawResponse(int(parts[1]), headers, b"" if head else body)


async def send_raw(
    host: str,
    port: int,
    data: bytes,
    *,
    within: float = READ_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
    head: bool = False,
) -> RawResponse | None:
    """Send ``data`` on a new connection and read one response (None: closed without one).

    The request should carry ``Connection: close`` or be malformed, so the server
    ends the connection after answering; otherwise the read stops at
    Content-Length.
    """
    reader, writer = await asyncio.open_connection(host, port, ssl=ssl_context)
    try:
        writer.write(data)
        await writer.drain()
        buf = b""
        async with asyncio.timeout(within):
            while True:
                chunk = await reader.read(65536)
                if not chunk:
                    break
                buf += chunk
                resp = parse_response(buf, head=head)
                if resp is not None and _complete(buf, resp, head=head):
                    return resp
        return parse_response(buf, head=head)
    except (ConnectionError, ssl.SSLError):
        return None
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError, ssl.SSLError):
            await writer.wait_closed()


def _complete(buf: bytes, resp: RawResponse, *, head: bool) -> bool:
    if head:
        return True
    length = resp.headers.get("content-length")
    if length is None:
        return False  # read until the server closes
    return len(resp.body) >= int(length)


async def closed_within(reader: asyncio.StreamReader, seconds: float) -> bool:
    """Whether the server closes the connection (EOF or reset) within ``seconds``.

    Bytes that arrive first (an error answer) are read and ignored.
    """
    try:
        async with asyncio.timeout(seconds):
            while await reader.read(65536):
                pass
    except TimeoutError:
        return False
    except ConnectionError:
        return True
    return True


def request(
    method: str = "GET",
    target: str = "/v2/",
    *,
    headers: dict[str, str] | None = None,
    close: bool = True,
) -> bytes:
    """A well-formed HTTP/1.1 request head (no body)."""
    lines = [f"{method} {target} HTTP/1.1", "Host: mirror"]
    lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
    if close:
        lines.append("Connection: close")
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


class SlowReader:
    """A GET whose answer is read only when the test says so: a client that falls
    behind. Its receive buffer is small, so the server soon has to wait for it."""

    def __init__(self, sock: socket.socket, body_start: bytes) -> None:
        self._sock = sock
        self._body = bytearray(body_start)

    @property
    def received(self) -> bytes:
        """The body bytes read so far."""
        return bytes(self._body)

    async def body(self, size: int) -> bytes:
        """Read on until ``size`` body bytes arrived (bounded); raise if cut short."""
        loop = asyncio.get_running_loop()
        async with asyncio.timeout(READ_TIMEOUT):
            while len(self._body) < size:
                chunk = await loop.sock_recv(self._sock, 1024 * 1024)
                if not chunk:
                    raise ConnectionError("connection closed early")
                self._body += chunk
        return bytes(self._body)


@contextlib.asynccontextmanager
async def slow_get(port: int, path: str, *, rcvbuf: int = 32 * 1024) -> AsyncIterator[SlowReader]:
    """Send ``GET path`` to 127.0.0.1:``port`` and read only the status line and headers
    (a 200 is expected); the body waits for ``SlowReader.body``."""
    loop = asyncio.get_running_loop()
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
    sock.setblocking(False)
    try:
        async with asyncio.timeout(READ_TIMEOUT):
            await loop.sock_connect(sock, ("127.0.0.1", port))
            await loop.sock_sendall(sock, f"GET {path} HTTP/1.1\r\nHost: m\r\n\r\n".encode())
            head = await loop.sock_recv(sock, 4096)
        if not head.startswith(b"HTTP/1.1 200"):
            raise AssertionError(f"expected a 200, got {head[:80]!r}")
        yield SlowReader(sock, head.partition(b"\r\n\r\n")[2])
    finally:
        sock.close()
