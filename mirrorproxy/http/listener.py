"""The client-facing listener: TLS, the connection cap, HTTP parser limits and timeouts.

Owns how the app meets the network: which aiohttp knobs enforce ``[server]``'s
limits, the TLS context, a cap on concurrent connections, and OCI error bodies for
requests too malformed to reach the app. It does not decide what a request may do
(``guard``) nor how to answer it (``handlers``).

The limits and where they are enforced:

- ``max_url_length`` and ``max_header_size`` are aiohttp's ``max_line_size`` (the
  request target) and ``max_field_size`` (one header, name and value), checked by
  the HTTP parser while it reads; a longer line is a 400 before any handler runs.
- ``client_timeout`` is aiohttp's ``keepalive_timeout``. aiohttp arms that timer
  when a connection opens and after each response and, unlike an idle timer, does
  not re-arm it when bytes arrive: a client has ``client_timeout`` to deliver a
  whole request head, however slowly it trickles (slowloris). A TLS handshake gets
  the same time.
- ``max_connections`` is counted where aiohttp registers a connection
  (``Server.connection_made``, after the TLS handshake); one over the cap is
  closed at once, before a byte of it is parsed.
"""

from __future__ import annotations

import asyncio
import logging
import math
import resource
import signal
import ssl
import time
from typing import Any

from aiohttp import web
from aiohttp.web_log import AccessLogger

from mirrorproxy.config import ServerConfig
from mirrorproxy.core.errors import CLIENT_CLOSED, BadRequest, RegistryError
from mirrorproxy.http.errors import client_gone, error_response

logger = logging.getLogger(__name__)

LINGER = 5.0  # seconds spent draining a request body nobody reads (push attempts)
REFUSAL_LOG_INTERVAL = 10.0  # at most one "connection refused" warning per interval
FD_HEADROOM = 1024  # descriptors beyond client connections: upstreams, cache files
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


def handler_options(server: ServerConfig) -> dict[str, Any]:
    """aiohttp request-handler options that enforce ``[server]``'s limits."""
    return {
        "keepalive_timeout": server.client_timeout,
        "max_line_size": server.max_url_length,
        "max_field_size": server.max_header_size,
        "lingering_time": min(LINGER, server.client_timeout),
    }


def tls_context(server: ServerConfig) -> ssl.SSLContext | None:
    """The listener's TLS context, or None to serve plain HTTP.

    Raises:
        OSError: the certificate or key cannot be read (``ssl.SSLError`` included).
    """
    if server.tls_cert is None or server.tls_key is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.load_cert_chain(server.tls_cert, server.tls_key)
    return ctx


class _Handler(web.RequestHandler):
    """aiohttp's per-connection protocol, under the cap; parser errors get an OCI body."""

    __slots__ = ("_guard",)

    def __init__(self, guard: GuardedServer, **kwargs: Any) -> None:
        super().__init__(guard, **kwargs)
        self._guard = guard

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        if self not in self._guard.live:
            # Over the cap. Closed only now that aiohttp has set the connection up:
            # its handler task then finds it closing, where a transport closed any
            # earlier would already be torn down under it.
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """Answer a request aiohttp could not parse (400) or hand to the app (500).

        aiohttp's own version logs every malformed request at error level with a
        traceback, which lets anyone flood the log; a bad request is the client's
        problem and is logged at debug, by exception type only (its text quotes the
        offending line, which may hold a credential). A client that went away is
        no error at all: its request is access-logged with status 499.
        """
        if exc is not None and client_gone(request, exc):
            logger.debug("client %s went away: %r", request.remote, exc)
            gone = web.Response(status=CLIENT_CLOSED)
            gone.force_close()
            return gone
        if status >= 500:
            logger.error("internal error handling a request from %s", request.remote, exc_info=exc)
            err: RegistryError = RegistryError("internal error")
        else:
            logger.debug("malformed request from %s: %s", request.remote, type(exc).__name__)
            err = BadRequest("malformed HTTP request")
        if request.writer.output_size > 0:
            raise ConnectionError("a response was started; cannot send an error after it")
        resp = error_response(err)
        resp.force_close()
        return resp


class GuardedServer(web.Server):
    """aiohttp's low-level server with a cap on concurrent client connections."""

    def __init__(
        self,
        handler: Any,
        *,
        max_connections: int,
        request_factory: Any,
        handler_cancellation: bool,
        **kwargs: Any,
    ) -> None:
        super().__init__(
            handler,
            request_factory=request_factory,
            handler_cancellation=handler_cancellation,
            **kwargs,
        )
        self._handler_kwargs = kwargs
        self.max_connections = max_connections
        self.live: set[web.RequestHandler] = set()
        self.refused = 0  # connections closed at the cap, since start
        self._refused_unlogged = 0
        self._last_warning = -math.inf

    def __call__(self) -> web.RequestHandler:
        return _Handler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        """Count a new connection, or leave it out of ``live`` for its handler to close."""
        if len(self.live) < self.max_connections:
            self.live.add(handler)
        else:
            self._note_refusal(transport)
        super().connection_made(handler, transport)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        self.live.discard(handler)
        super().connection_lost(handler, exc)

    def _note_refusal(self, transport: asyncio.Transport) -> None:
        self.refused += 1
        self._refused_unlogged += 1
        now = time.monotonic()
        if now - self._last_warning >= REFUSAL_LOG_INTERVAL:
            peer = transport.get_extra_info("peername")
            logger.warning(
                "max_connections (%d) reached: closed %d new connection(s), latest from %s",
                self.max_connections,
                self._refused_unlogged,
                peer[0] if isinstance(peer, tuple) else peer,
            )
            self._last_warning = now
            self._refused_unlogged = 0


class GuardedRunner(web.AppRunner):
    """An AppRunner whose server is a GuardedServer with ``[server]``'s limits."""

    __slots__ = ("_guard_kwargs", "_max_connections")

    def __init__(
        self,
        app: web.Application,
        server: ServerConfig,
        *,
        handle_signals: bool = False,
        shutdown_timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        kwargs = {**handler_options(server), **kwargs}
        super().__init__(
            app, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout, **kwargs
        )
        self._guard_kwargs = {"access_log_class": AccessLogger, **kwargs}
        self._max_connections = server.max_connections

    async def _make_server(self) -> web.Server:
        # AppRunner's own step runs the app's startup and freezes it; its server
        # (which never gets a connection) supplies the app's request handler.
        plain = await super()._make_server()
        kwargs = dict(self._guard_kwargs)
        kwargs.pop("handler_cancellation", None)
        return GuardedServer(
            plain.request_handler,
            max_connections=self._max_connections,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            **kwargs,
        )


class GuardedSite(web.BaseSite):
    """A TCP site whose TLS handshakes are bounded like request heads."""

    __slots__ = ("_handshake_timeout", "_host", "_listening", "_port")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 60.0,
        backlog: int = 128,
    ) -> None:
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._handshake_timeout = handshake_timeout
        self._listening: asyncio.Server | None = None

    @property
    def port(self) -> int:
        """The bound port (the real one once started with port 0)."""
        if self._listening is not None and self._listening.sockets:
            port: int = self._listening.sockets[0].getsockname()[1]
            return port
        return self._port

    @property
    def name(self) -> str:
        scheme = "https" if self._ssl_context else "http"
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"{scheme}://{host}:{self.port}"

    async def start(self) -> None:
        await super().start()
        server = self._runner.server
        if server is None:  # pragma: no cover - BaseSite refuses an unset runner
            raise RuntimeError("runner is not set up")
        tls: dict[str, Any] = {}
        if self._ssl_context is not None:
            tls = {"ssl": self._ssl_context, "ssl_handshake_timeout": self._handshake_timeout}
        self._listening = await asyncio.get_running_loop().create_server(
            server, self._host, self._port, backlog=self._backlog, **tls
        )
        self._server = self._listening  # BaseSite.stop() closes it


async def start(
    app: web.Application, server: ServerConfig, **kwargs: Any
) -> tuple[GuardedRunner, GuardedSite]:
    """Set up ``app`` and listen on ``server.host:port`` with every limit in force.

    Args:
        kwargs: more aiohttp runner options (``access_log_class``, ``access_log_format``).

    Returns:
        The runner (``await runner.cleanup()`` stops everything) and the site.

    Raises:
        OSError: the address cannot be bound, or the TLS files cannot be loaded.
    """
    runner = GuardedRunner(app, server, **kwargs)
    try:
        await runner.setup()  # the app's startup: a failure here still cleans up
        site = GuardedSite(
            runner,
            server.host,
            server.port,
            ssl_context=tls_context(server),
            handshake_timeout=server.client_timeout,
        )
        await site.start()
    except BaseException:
        await runner.cleanup()
        raise
    return runner, site


def run(app: web.Application, server: ServerConfig, **kwargs: Any) -> None:
    """Serve ``app`` until SIGINT or SIGTERM, like ``web.run_app`` with our limits.

    Raises:
        OSError: the address cannot be bound, or the TLS files cannot be loaded.
    """
    raise_fd_limit(server.max_connections + FD_HEADROOM)

    async def serve() -> None:
        # A signal only sets an event: the graceful shutdown (in-flight responses
        # get the runner's shutdown_timeout) runs before asyncio.run cancels the
        # remaining tasks, in web.run_app's order.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in STOP_SIGNALS:
            loop.add_signal_handler(sig, stop.set)
        try:
            runner, _ = await start(app, server, **kwargs)
            try:
                await stop.wait()
            finally:
                await runner.cleanup()
        finally:
            for sig in STOP_SIGNALS:
                loop.remove_signal_handler(sig)

    asyncio.run(serve())


def raise_fd_limit(wanted: int) -> None:
    """Lift the soft open-files limit toward ``wanted`` (never above the hard limit).

    Every client connection is a descriptor; at the limit ``accept()`` fails and
    asyncio stops accepting for a while, which would lock out normal clients too.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    target = wanted if hard == resource.RLIM_INFINITY else min(wanted, hard)
    if soft != resource.RLIM_INFINITY and soft < target:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
        except (ValueError, OSError) as err:  # pragma: no cover - platform specific
            logger.warning("cannot raise the open files limit to %d: %s", target, err)
            return
        soft = target
    if soft != resource.RLIM_INFINITY and soft < wanted:
        logger.warning(
            "open files limit %d is below max_connections plus %d; raise it (ulimit -n)",
            soft,
            FD_HEADROOM,
        )
