"""What ``mirrorproxy.http.aiohttp_compat`` relies on in aiohttp's private API, checked.

Each check names the aiohttp piece it needs, first by signature (does it still exist,
with those parameters?) and then by behaviour on a real socket (is it still called
when, and does it still do what, the adapter assumes?). A failure here after an
aiohttp upgrade means the adapter must change before the listener can be trusted:
connection caps, bounded TLS handshakes and OCI error bodies for malformed requests
all go through it.
"""

from __future__ import annotations

import asyncio
import inspect
from collections.abc import AsyncIterator, Hashable
from contextlib import asynccontextmanager
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from aiohttp.http_writer import StreamWriter

from mirrorproxy.http.aiohttp_compat import GatedRunner, GatedServer, TcpSite, response_started
from tests.support.rawhttp import closed_within, request, send_raw

BROKEN = f"aiohttp {aiohttp.__version__} changed what mirrorproxy/http/aiohttp_compat.py uses"


def _params(func: object) -> list[str]:
    assert callable(func), f"{BROKEN}: {func!r} is not callable"
    return list(inspect.signature(func).parameters)


def test_app_runner_make_server_is_an_overridable_coroutine() -> None:
    make = getattr(web.AppRunner, "_make_server", None)
    assert make is not None, f"{BROKEN}: web.AppRunner._make_server is gone"
    assert inspect.iscoroutinefunction(make), f"{BROKEN}: AppRunner._make_server not async"
    assert _params(make) == ["self"], f"{BROKEN}: AppRunner._make_server takes arguments"


def test_server_hooks_and_attributes() -> None:
    init = _params(web.Server.__init__)
    for name in ("handler", "request_factory", "handler_cancellation", "kwargs"):
        assert name in init, f"{BROKEN}: web.Server() has no {name!r} parameter"
    assert _params(web.Server.__call__) == ["self"], f"{BROKEN}: web.Server.__call__"
    assert _params(web.Server.connection_made) == ["self", "handler", "transport"], (
        f"{BROKEN}: web.Server.connection_made(handler, transport)"
    )
    assert _params(web.Server.connection_lost) == ["self", "handler", "exc"], (
        f"{BROKEN}: web.Server.connection_lost(handler, exc)"
    )


def test_request_handler_hooks() -> None:
    init = inspect.signature(web.RequestHandler.__init__).parameters
    assert list(init)[:2] == ["self", "manager"], f"{BROKEN}: RequestHandler(manager, ...)"
    assert init["loop"].kind is inspect.Parameter.KEYWORD_ONLY, f"{BROKEN}: RequestHandler loop"
    for option in ("keepalive_timeout", "max_line_size", "max_field_size", "lingering_time"):
        assert option in init, f"{BROKEN}: RequestHandler has no {option!r} option"
    assert _params(web.RequestHandler.connection_made) == ["self", "transport"], (
        f"{BROKEN}: RequestHandler.connection_made(transport)"
    )
    assert _params(web.RequestHandler.force_close) == ["self"], f"{BROKEN}: force_close()"
    assert _params(web.RequestHandler.handle_error) == [
        "self",
        "request",
        "status",
        "exc",
        "message",
    ], f"{BROKEN}: RequestHandler.handle_error(request, status, exc, message)"


def test_base_site_private_attributes() -> None:
    slots = set(web.BaseSite.__slots__)
    for name in ("_runner", "_ssl_context", "_backlog", "_server"):
        assert name in slots, f"{BROKEN}: web.BaseSite has no {name}"
    assert "_server" in inspect.getsource(web.BaseSite.stop), (
        f"{BROKEN}: BaseSite.stop() no longer closes self._server"
    )


def test_stream_writer_counts_output() -> None:
    assert "output_size" in inspect.getsource(StreamWriter), (
        f"{BROKEN}: StreamWriter.output_size (whether a response started)"
    )


class Recorder:
    """A ConnectionPolicy that admits ``room`` connections and records every call."""

    def __init__(self, room: int = 100) -> None:
        self.room = room
        self.admitted: list[Hashable] = []
        self.released: list[Hashable] = []
        self.errors: list[tuple[int, type[BaseException] | None]] = []

    def admit(self, conn: Hashable, transport: asyncio.Transport) -> bool:
        assert transport.get_extra_info("peername") is not None
        self.admitted.append(conn)
        return len(self.admitted) <= self.room

    def release(self, conn: Hashable) -> None:
        self.released.append(conn)

    def error_response(
        self, request: web.BaseRequest, status: int, exc: BaseException | None
    ) -> web.StreamResponse:
        self.errors.append((status, type(exc) if exc is not None else None))
        resp = web.Response(status=status, text="from the policy")
        resp.force_close()
        return resp


@asynccontextmanager
async def serving(policy: Recorder) -> AsyncIterator[tuple[GatedRunner, TcpSite, list[bool]]]:
    """An app behind GatedRunner and TcpSite on 127.0.0.1; the list gets response_started
    before and after a response is written."""
    started: list[bool] = []

    async def hello(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse()
        resp.content_length = 5
        started.append(response_started(request))
        await resp.prepare(request)
        await resp.write(b"hello")
        started.append(response_started(request))
        return resp

    async def boom(request: web.Request) -> web.StreamResponse:
        raise RuntimeError("handler failed")

    startups: list[str] = []

    async def on_startup(app: web.Application) -> None:
        startups.append("started")

    app = web.Application()
    app.router.add_get("/", hello)
    app.router.add_get("/boom", boom)
    app.on_startup.append(on_startup)
    runner = GatedRunner(app, policy, keepalive_timeout=5.0, max_line_size=100)
    await runner.setup()
    try:
        assert startups == ["started"], f"{BROKEN}: _make_server no longer runs the startup"
        assert isinstance(runner.server, GatedServer), (
            f"{BROKEN}: AppRunner.setup() no longer takes its server from _make_server"
        )
        site = TcpSite(runner, "127.0.0.1", 0)
        await site.start()
        yield runner, site, started
    finally:
        await runner.cleanup()


async def test_connections_reach_the_policy_and_requests_the_app() -> None:
    policy = Recorder()
    async with serving(policy) as (_, site, started):
        answer = await send_raw("127.0.0.1", site.port, request("GET", "/"))
        assert answer is not None, f"{BROKEN}: GatedServer is not the protocol factory"
        assert answer.status == 200
        assert answer.body == b"hello"
        assert started == [False, True], f"{BROKEN}: StreamWriter.output_size"
        assert len(policy.admitted) == 1, f"{BROKEN}: Server.connection_made is not called"
        for _ in range(100):  # connection_lost runs once the loop sees the close
            if policy.released:
                break
            await asyncio.sleep(0.01)
        assert policy.released == policy.admitted, f"{BROKEN}: Server.connection_lost"


async def test_a_refused_connection_is_closed_before_any_answer() -> None:
    policy = Recorder(room=0)
    async with serving(policy) as (_, site, _started):
        reader, writer = await asyncio.open_connection("127.0.0.1", site.port)
        try:
            writer.write(request("GET", "/"))
            assert await closed_within(reader, 5.0), f"{BROKEN}: force_close after connect"
        finally:
            writer.close()
        assert len(policy.admitted) == 1


@pytest.mark.parametrize(
    ("raw", "status"),
    [
        (b"GET /" + b"x" * 200 + b" HTTP/1.1\r\nHost: a\r\n\r\n", 400),  # over max_line_size
        (b"NOT HTTP AT ALL\r\n\r\n", 400),
        (request("GET", "/boom"), 500),
    ],
)
async def test_errors_are_answered_by_the_policy(raw: bytes, status: int) -> None:
    policy = Recorder()
    async with serving(policy) as (_, site, _started):
        answer = await send_raw("127.0.0.1", site.port, raw)
    assert answer is not None, f"{BROKEN}: no answer to a request handle_error covers"
    assert (answer.status, answer.body) == (status, b"from the policy"), (
        f"{BROKEN}: RequestHandler.handle_error is not how aiohttp answers a {status}"
    )
    assert [s for s, _ in policy.errors] == [status]


async def test_cleanup_closes_the_listening_socket() -> None:
    policy = Recorder()
    async with serving(policy) as (runner, site, _started):
        port = site.port
        assert site.name == f"http://127.0.0.1:{port}"
    assert runner.server is None
    with pytest.raises(ConnectionRefusedError):  # BaseSite.stop() closed TcpSite._server
        await asyncio.open_connection("127.0.0.1", port)


PRIVATE = ("_make_server", "web.Server", "RequestHandler", "BaseSite", "output_size")


def test_only_the_adapter_reaches_aiohttp_server_internals() -> None:
    package = Path(__file__).resolve().parents[2] / "mirrorproxy"
    adapter = package / "http" / "aiohttp_compat.py"
    found = [
        f"{path.relative_to(package)}: {word}"
        for path in sorted(package.rglob("*.py"))
        if path != adapter
        for word in PRIVATE
        if word in path.read_text()
    ]
    assert found == [], "aiohttp server internals outside http/aiohttp_compat.py"
