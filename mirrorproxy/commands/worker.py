"""One of ``serve --workers N``'s serving processes (``python -m mirrorproxy.commands.worker``).

The server starts it with a ``WorkerSpec`` on standard input and keeps that pipe
open: its end (the server died, even by ``kill -9``) stops the worker, and so does
SIGTERM (the server's graceful stop; Linux's parent-death signal as well). The
worker listens on the server's address with SO_REUSEPORT (the kernel spreads the
connections) and on its own private loopback socket, bound by the server, where
the other workers reach it: together they are a cluster whose members are those
private URLs, so each blob and tag has one owning worker that fetches it from
upstream and commits it; the others follow its answer without committing it.
It prints ``ready`` on standard output once it listens.
"""

from __future__ import annotations

import asyncio
import ctypes
import logging
import os
import pickle
import signal
import socket
import struct
import sys
from dataclasses import dataclass, replace

from mirrorproxy.config import ClusterConfig, Config
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.rendezvous import blob_key, owner
from mirrorproxy.http import keys, listener
from mirrorproxy.http.accesslog import AccessLogger
from mirrorproxy.http.app import create_app
from mirrorproxy.http.observability import MetricsListenError
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.engine import Sharing

logger = logging.getLogger(__name__)

READY = b"ready\n"
PEER_TIMEOUT = 1.0  # connect timeout to another worker: loopback answers at once or never
PR_SET_PDEATHSIG = 1


@dataclass(frozen=True, slots=True)
class WorkerSpec:
    """What the server tells a worker: its place, the config, where to listen."""

    index: int
    config: Config  # the server's (with its command-line overrides)
    members: tuple[str, ...]  # every worker's private URL, by index
    private_fd: int  # this worker's private socket, bound, inherited
    port: int  # the listening port (resolved when the config says 0)
    metrics_dir: str  # PROMETHEUS_MULTIPROC_DIR, set in this process's environment
    parent: int  # the server's pid
    log_level: str
    log_format: str
    reconcile: bool  # make the index agree with the files (the first worker, once)

    @property
    def name(self) -> str:
        return f"w{self.index}"


def send_spec(spec: WorkerSpec) -> bytes:
    """The bytes that hand ``spec`` over on the worker's standard input."""
    data = pickle.dumps(spec)
    return struct.pack("!Q", len(data)) + data


def _read_spec(fd: int) -> WorkerSpec:
    header = _read_exactly(fd, 8)
    spec = pickle.loads(_read_exactly(fd, struct.unpack("!Q", header)[0]))  # noqa: S301 - from our parent
    if not isinstance(spec, WorkerSpec):
        raise SystemExit("mirrorproxy worker: not started by mirrorproxy serve")
    return spec


def _read_exactly(fd: int, n: int) -> bytes:
    out = bytearray()
    while len(out) < n:
        chunk = os.read(fd, n - len(out))
        if not chunk:
            raise SystemExit("mirrorproxy worker: the server went away before starting it")
        out += chunk
    return bytes(out)


def _die_with_parent(parent: int) -> None:
    """Have Linux send SIGTERM when the server dies (besides the pipe's end)."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(PR_SET_PDEATHSIG, signal.SIGTERM, 0, 0, 0)
    except (OSError, AttributeError):  # pragma: no cover - not Linux: the pipe does it
        pass
    if os.getppid() != parent:
        raise SystemExit("mirrorproxy worker: the server is gone")


def worker_config(spec: WorkerSpec) -> Config:
    """The server's config as this worker serves it: a member of the workers' cluster."""
    cluster = ClusterConfig(
        self_url=spec.members[spec.index], members=spec.members, peer_timeout=PEER_TIMEOUT
    )
    return replace(spec.config, cluster=cluster)


def owns(members: tuple[str, ...], me: str) -> Sharing:
    """This worker's part of the cache budget: the digests it owns, 1/N of max_size."""

    def mine(digest: Digest) -> bool:
        return owner(blob_key(str(digest)), members) == me

    return Sharing(owns=mine, share=1 / len(members))


async def serve(spec: WorkerSpec) -> None:
    """Listen on the shared address and the private socket until told to stop."""
    config = worker_config(spec)
    private = socket.socket(fileno=spec.private_fd)
    shared = listener.shared_port_socket(config.server.host, spec.port)
    sharing = replace(owns(spec.members, spec.members[spec.index]), reconcile=spec.reconcile)
    app = create_app(
        config,
        metrics=Metrics(multiprocess_dir=spec.metrics_dir),
        sharing=sharing,
        metrics_listener=spec.index == 0,
    )
    app[keys.INTERNAL_PORTS] = frozenset({private.getsockname()[1]})
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in listener.STOP_SIGNALS:
        loop.add_signal_handler(sig, stop.set)

    def parent_pipe() -> None:
        if not os.read(0, 4096):  # the server is gone: stop as on SIGTERM
            logger.warning("the server went away; stopping")
            loop.remove_reader(0)
            stop.set()

    loop.add_reader(0, parent_pipe)
    runner, _ = await listener.start(
        app,
        config.server,
        sock=shared,
        internal=[private],
        access_log_class=AccessLogger,
        handler_cancellation=False,
    )
    try:
        logger.info("worker %s (pid %d) serving", spec.name, os.getpid())
        os.write(1, READY)
        await stop.wait()
    finally:
        await runner.cleanup()


def main() -> int:
    """Read the spec, then serve; exit 0 after a graceful stop, 1 when serving failed."""
    from mirrorproxy.observability.log import configure_logging

    spec = _read_spec(0)
    _die_with_parent(spec.parent)
    configure_logging(spec.log_level, spec.log_format, worker=spec.name)
    listener.raise_fd_limit(spec.config.server.max_connections + listener.FD_HEADROOM)
    try:
        asyncio.run(serve(spec))
    except (OSError, MetricsListenError) as err:
        logger.error(
            "worker %s cannot serve: %s", spec.name, getattr(err, "strerror", None) or err
        )
        return 1
    except Exception:
        logger.exception("worker %s failed", spec.name)
        return 1
    finally:
        logging.shutdown()
    return 0


if __name__ == "__main__":
    # Run from the module's own name, so the spec unpickles as its WorkerSpec.
    from mirrorproxy.commands.worker import main as worker_main

    sys.exit(worker_main())
