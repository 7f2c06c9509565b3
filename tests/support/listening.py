"""The mirror on a real socket in the test's event loop, with every listener limit on.

``aiohttp_client`` runs an app behind aiohttp's plain test server, which knows
nothing of ``[server]``'s connection cap, parser limits, timeouts or TLS. Tests of
those start the app with ``mirrorproxy.http.listener.start`` instead, the same code the
CLI runs, on ``127.0.0.1`` and a free port.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, replace
from typing import Any

from mirrorproxy.config import Config
from mirrorproxy.http import keys
from mirrorproxy.http.aiohttp_compat import GatedRunner, TcpSite
from mirrorproxy.http.app import create_app
from mirrorproxy.http.listener import GuardedConnections, start


@dataclass
class Listening:
    """A running mirror: its config, runner and site."""

    config: Config
    runner: GatedRunner
    site: TcpSite

    @property
    def host(self) -> str:
        return self.config.server.host

    @property
    def port(self) -> int:
        return self.site.port

    @property
    def url(self) -> str:
        scheme = "https" if self.config.server.tls_cert else "http"
        return f"{scheme}://{self.host}:{self.port}"

    @property
    def server(self) -> GuardedConnections:
        """The listener's connections: those live, and the count refused at the cap."""
        policy = self.runner.policy
        assert isinstance(policy, GuardedConnections)
        return policy

    def tune(self, **changes: Any) -> None:
        """Change ``Tuning`` values for downloads started after this call."""
        pt = self.runner.app[keys.PULLTHROUGH]
        pt.tuning = replace(pt.tuning, **changes)


def with_server(config: Config, **changes: Any) -> Config:
    """``config`` with ``[server]`` fields replaced (and a free port on 127.0.0.1)."""
    changes = {"host": "127.0.0.1", "port": 0, **changes}
    return replace(config, server=replace(config.server, **changes))


@asynccontextmanager
async def listening(config: Config, **runner_options: Any) -> AsyncIterator[Listening]:
    """Serve ``create_app(config)`` on ``config.server`` until the block ends.

    ``runner_options`` go to aiohttp's runner as the CLI passes them
    (``access_log_class``, ``access_log_format``).
    """
    runner, site = await start(create_app(config), config.server, **runner_options)
    try:
        yield Listening(config, runner, site)
    finally:
        await runner.cleanup()
