"""The client-facing listener: TLS, the connection cap, HTTP parser limits and timeouts.

Owns how the app meets the network: which aiohttp knobs enforce ``[server]``'s
limits, the TLS context, a cap on concurrent connections, and OCI error bodies for
requests too malformed to reach the app. It does not decide what a request may do
(``guard``) nor how to answer it (``handlers``), and it reaches aiohttp's server
internals only through ``aiohttp_compat``.

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
import socket
import ssl
import time
from collections.abc import Hashable, Sequence
from typing import Any

from aiohttp import web

from mirrorproxy.config import ServerConfig
from mirrorproxy.core.errors import CLIENT_CLOSED, BadRequest, RegistryError
from mirrorproxy.http.aiohttp_compat import GatedRunner, TcpSite, response_started
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


class GuardedConnections:
    """The listener's ``ConnectionPolicy``: the connection cap and malformed-request answers.

    It owns the set of live client connections, the count of those refused at the
    cap (with a rate-limited warning), and the OCI error body for a request aiohttp
    could not parse. It must not touch aiohttp's internals (``aiohttp_compat`` calls
    it) nor judge requests that reached the app (``guard``, ``handlers``).
    """

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.live: set[Hashable] = set()
        self.refused = 0  # connections closed at the cap, since start
        self._refused_unlogged = 0
        self._last_warning = -math.inf

    def admit(self, conn: Hashable, transport: asyncio.Transport) -> bool:
        """Count a new connection; False (over the cap) has it closed at once."""
        if len(self.live) < self.max_connections:
            self.live.add(conn)
            return True
        self._note_refusal(transport)
        return False

    def release(self, conn: Hashable) -> None:
        self.live.discard(conn)

    def error_response(
        self, request: web.BaseRequest, status: int, exc: BaseException | None
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
        if response_started(request):
            raise ConnectionError("a response was started; cannot send an error after it")
        resp = error_response(err)
        resp.force_close()
        return resp

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


async def start(
    app: web.Application,
    server: ServerConfig,
    *,
    sock: socket.socket | None = None,
    internal: Sequence[socket.socket] = (),
    **kwargs: Any,
) -> tuple[GatedRunner, TcpSite]:
    """Set up ``app`` and listen on ``server.host:port`` with every limit in force.

    Args:
        sock: the listening socket, bound already (a worker's); else one is bound.
        internal: more sockets (plain HTTP, a worker's private loopback ones) for
            the same app under the same limits.
        kwargs: more aiohttp runner options (``access_log_class``, ``access_log_format``).

    Returns:
        The runner (``await runner.cleanup()`` stops everything) and the site.

    Raises:
        OSError: the address cannot be bound, or the TLS files cannot be loaded.
    """
    runner = GatedRunner(
        app,
        GuardedConnections(server.max_connections),
        **{**handler_options(server), **kwargs},
    )
    try:
        await runner.setup()  # the app's startup: a failure here still cleans up
        site = TcpSite(
            runner,
            server.host,
            server.port,
            ssl_context=tls_context(server),
            handshake_timeout=server.client_timeout,
            sock=sock,
        )
        await site.start()
        for extra in internal:
            await TcpSite(runner, server.host, 0, sock=extra).start()
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


def shared_port_socket(host: str, port: int) -> socket.socket:
    """A socket bound to ``host:port`` with SO_REUSEPORT, not listening yet.

    Each of a server's workers listens on one of these: the kernel spreads new
    connections over them. The server holds one that never listens, to keep the
    port (and learn it, for port 0) while workers come and go.

    Raises:
        OSError: the address cannot be bound (taken by a process without SO_REUSEPORT,
            or by another user).
    """
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


def loopback_socket(port: int = 0) -> socket.socket:
    """A socket bound to ``127.0.0.1:port`` (0: any free port), not listening yet."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(("127.0.0.1", port))
    except BaseException:
        sock.close()
        raise
    return sock
