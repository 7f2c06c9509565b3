"""A cluster of in-process mirrors on fixed loopback ports, as the cluster tests drive it.

Each member's config names every member's URL, so the ports are chosen before any
member starts (``member_ports``). The fixture that starts them lives in
``tests/integration/conftest.py``.
"""

from __future__ import annotations

import socket
from collections.abc import Awaitable, Mapping, Sequence
from typing import Any, Protocol

from mirrorproxy.core.tuning import DEFAULT_TUNING, Tuning
from mirrorproxy.upstream.members import Resolver
from tests.support.mirror import Mirror

MAX_PORT = 55535  # the machine's other work uses the ports above


def member_ports(n: int) -> list[int]:
    """``n`` distinct loopback ports that were free a moment ago, below ``MAX_PORT``."""
    ports: list[int] = []
    for _ in range(100 * n):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
            sock.bind(("127.0.0.1", 0))
            port: int = sock.getsockname()[1]
        if port < MAX_PORT and port not in ports:
            ports.append(port)
            if len(ports) == n:
                return ports
    raise RuntimeError(f"no {n} free ports below {MAX_PORT}")


class ClusterFactory(Protocol):
    """Start ``n`` members in front of ``upstreams``.

    ``members`` gives member ``i`` its own member list (indexes into the cluster's
    URLs, or URLs where ``{0}``, ``{1}``... stand for the members' ports); by default
    every member lists all of them. ``cluster`` adds
    ``[cluster]`` keys; ``server`` adds ``[server]`` keys; ``storage`` is a
    ``[storage]`` table (one bucket for all), ``cache`` adds ``[cache]`` keys.
    ``dns``: the members find each other with ``members_dns``, looked up with this
    resolver; member i then listens on 127.0.0.<i+1>, all on the same port.
    """

    def __call__(
        self,
        upstreams: Sequence[str],
        n: int = 3,
        *,
        members: Mapping[int, Sequence[str | int]] | None = None,
        cluster: Mapping[str, Any] | None = None,
        server: Mapping[str, Any] | None = None,
        storage: Mapping[str, Any] | None = None,
        cache: Mapping[str, Any] | None = None,
        tuning: Tuning = DEFAULT_TUNING,
        dns: Resolver | None = None,
    ) -> Awaitable[list[Mirror]]: ...
