"""Every use of aiohttp's private or undocumented server API, in one place.

``web.run_app`` offers no connection cap, no bound on TLS handshakes and no hook for
the answer to a request its parser refuses. The listener needs all three, so this
module subclasses aiohttp where nothing public reaches, and nothing else in the
package does. What it relies on (``tests/unit/test_aiohttp_compat.py`` checks each
one, by signature and by behaviour, so an aiohttp upgrade that breaks it fails there
first and by name):

- ``web.AppRunner._make_server()``: builds the runner's ``web.Server`` after the
  app's startup; overridden to build a ``GatedServer`` instead, so the runner's
  graceful shutdown covers the connections that server holds.
- ``web.Server.__call__()`` (the protocol factory), ``connection_made(handler,
  transport)`` and ``connection_lost(handler, exc)`` (called by every
  ``RequestHandler``), and its ``request_handler``, ``request_factory`` and
  ``handler_cancellation`` attributes.
- ``web.RequestHandler(manager, *, loop, **options)``, its ``connection_made``,
  ``force_close()`` and ``handle_error(request, status, exc, message)`` (the answer
  to a request the parser refused, or a handler failure it caught).
- ``web.BaseSite``'s ``_runner``, ``_ssl_context`` and ``_backlog``, and ``_server``
  (what ``BaseSite.stop()`` closes).
- ``BaseRequest.writer.output_size``: whether a response has started.

It decides nothing: the ``ConnectionPolicy`` it is given admits connections and
words error answers.
"""

from __future__ import annotations

import asyncio
import socket
import ssl
from collections.abc import Hashable
from typing import Any, Protocol

from aiohttp import web
from aiohttp.web_log import AccessLogger


class ConnectionPolicy(Protocol):
    """What the listener decides about client connections; the adapter asks it."""

    def admit(self, conn: Hashable, transport: asyncio.Transport) -> bool:
        """A connection is set up (after any TLS handshake); False closes it at once."""
        ...

    def release(self, conn: Hashable) -> None:
        """A connection, admitted or not, is gone."""
        ...

    def error_response(
        self, request: web.BaseRequest, status: int, exc: BaseException | None
    ) -> web.StreamResponse:
        """The answer to a request aiohttp could not parse (400) or hand to the app (500)."""
        ...


def response_started(request: web.BaseRequest) -> bool:
    """Whether bytes of a response to ``request`` were written already."""
    return request.writer.output_size > 0


class _GatedHandler(web.RequestHandler):
    """aiohttp's per-connection protocol, closed at once when the policy refuses it."""

    __slots__ = ("_admitted", "_policy")

    def __init__(self, server: GatedServer, **kwargs: Any) -> None:
        super().__init__(server, **kwargs)
        self._policy = server.policy
        self._admitted = True

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)  # GatedServer.connection_made asks the policy
        if not self._admitted:
            # Closed only now that aiohttp has set the connection up: its handler
            # task then finds it closing, where a transport closed any earlier
            # would already be torn down under it.
            self.force_close()

    def handle_error(
        self,
        request: web.BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        return self._policy.error_response(request, status, exc)


class GatedServer(web.Server):
    """aiohttp's low-level server whose connections a ``ConnectionPolicy`` admits.

    It owns the wiring of aiohttp's connection hooks to the policy; it must not
    decide anything itself (caps, logging and error bodies are the policy's).
    """

    def __init__(
        self,
        handler: Any,
        *,
        policy: ConnectionPolicy,
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
        self.policy = policy

    def __call__(self) -> web.RequestHandler:
        return _GatedHandler(self, loop=asyncio.get_running_loop(), **self._handler_kwargs)

    def connection_made(self, handler: web.RequestHandler, transport: asyncio.Transport) -> None:
        if isinstance(handler, _GatedHandler):
            handler._admitted = self.policy.admit(handler, transport)
        super().connection_made(handler, transport)

    def connection_lost(
        self, handler: web.RequestHandler, exc: BaseException | None = None
    ) -> None:
        self.policy.release(handler)
        super().connection_lost(handler, exc)


class GatedRunner(web.AppRunner):
    """An AppRunner whose server is a ``GatedServer`` under ``policy``.

    It owns the app's life (startup, graceful shutdown, cleanup) as ``AppRunner``
    does; it must not listen itself (``TcpSite`` does).
    """

    __slots__ = ("_gated_kwargs", "policy")

    def __init__(
        self,
        app: web.Application,
        policy: ConnectionPolicy,
        *,
        handle_signals: bool = False,
        shutdown_timeout: float = 60.0,
        **kwargs: Any,
    ) -> None:
        """``kwargs``: request-handler options (``keepalive_timeout``, ``access_log_class``...)."""
        super().__init__(
            app, handle_signals=handle_signals, shutdown_timeout=shutdown_timeout, **kwargs
        )
        self.policy = policy
        self._gated_kwargs = {"access_log_class": AccessLogger, **kwargs}

    async def _make_server(self) -> web.Server:
        # AppRunner's own step runs the app's startup and freezes it; its server
        # (which never gets a connection) supplies the app's request handler.
        plain = await super()._make_server()
        kwargs = dict(self._gated_kwargs)
        kwargs.pop("handler_cancellation", None)
        return GatedServer(
            plain.request_handler,
            policy=self.policy,
            request_factory=plain.request_factory,
            handler_cancellation=plain.handler_cancellation,
            **kwargs,
        )


class TcpSite(web.BaseSite):
    """A TCP site whose TLS handshakes are bounded (``web.TCPSite`` has no bound).

    It owns the listening socket; it must not outlive its runner (``BaseSite.stop``,
    run by the runner's cleanup, closes it).
    """

    __slots__ = ("_handshake_timeout", "_host", "_listening", "_port", "_sock")

    def __init__(
        self,
        runner: web.BaseRunner,
        host: str,
        port: int,
        *,
        ssl_context: ssl.SSLContext | None = None,
        handshake_timeout: float = 60.0,
        backlog: int = 128,
        sock: socket.socket | None = None,
    ) -> None:
        """``sock``: a socket bound already (a worker's), used instead of host and port."""
        super().__init__(runner, ssl_context=ssl_context, backlog=backlog)
        self._host = host
        self._port = port
        self._sock = sock
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
        loop = asyncio.get_running_loop()
        if self._sock is not None:
            self._listening = await loop.create_server(
                server, sock=self._sock, backlog=self._backlog, **tls
            )
        else:
            self._listening = await loop.create_server(
                server, self._host, self._port, backlog=self._backlog, **tls
            )
        self._server = self._listening  # BaseSite.stop() closes it
