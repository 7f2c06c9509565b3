"""``serve`` with ``[server] workers`` > 1: start the serving processes, watch, stop them.

The server process serves nothing itself. It keeps the listening port (a socket
bound with SO_REUSEPORT that never listens: each worker listens on its own, and
the kernel spreads connections over them), binds one private loopback socket per
worker before any starts (their URLs are the members of the workers' cluster, see
``worker``), and makes a private directory for prometheus-client's multiprocess
files, so that ``/metrics`` of any worker sums all of them.

- **Start**: every worker must say it listens within ``START_TIMEOUT``; if one
  fails, all are stopped and ``serve`` exits 1 (its error is in the log).
- **A worker that dies** is logged and started again on the same private address,
  at most ``MAX_RESTARTS`` times per ``RESTART_WINDOW``; beyond that the server
  stops the others and exits 1, so a supervisor (systemd, Kubernetes) sees it.
- **Stop**: SIGTERM or SIGINT to the server sends SIGTERM to every worker; each
  stops as a single server does (answers in flight, downloads given their grace),
  and one still running after ``STOP_TIMEOUT`` is killed. Workers run in their own
  process group (a terminal's Ctrl-C reaches only the server) and stop by
  themselves when the server dies (its pipe closes; Linux's parent-death signal).
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import deque
from dataclasses import dataclass, field
from types import FrameType

from mirrorproxy.commands.worker import READY, WorkerSpec, send_spec
from mirrorproxy.config import Config
from mirrorproxy.http import listener

logger = logging.getLogger(__name__)

START_TIMEOUT = 60.0  # seconds a worker may take to listen
STOP_TIMEOUT = 90.0  # seconds workers get to stop gracefully (answers, then downloads)
MAX_RESTARTS = 5  # worker restarts tolerated per window...
RESTART_WINDOW = 60.0  # ...of this many seconds
POLL = 0.2  # seconds between looks at the workers


class WorkersError(Exception):
    """The workers could not be started or kept running; the message is for the operator."""


@dataclass
class _Worker:
    index: int
    port: int  # of its private socket
    proc: subprocess.Popen[bytes] | None = None
    restarts: deque[float] = field(default_factory=deque)


class Workers:
    """The server's side of ``serve --workers``: it owns the worker processes, the
    listening port, the private sockets and the metrics directory; it must not serve."""

    def __init__(self, config: Config, *, log_level: str, log_format: str) -> None:
        self._config = config
        self._log_level, self._log_format = log_level, log_format
        self._stopping = False
        self._anchor: socket.socket | None = None
        self._metrics_dir = ""
        self._workers: list[_Worker] = []
        self._members: tuple[str, ...] = ()

    def run(self) -> None:
        """Serve with the workers until SIGTERM or SIGINT.

        Raises:
            WorkersError: a worker could not start, or kept dying.
            OSError: the address cannot be bound.
        """
        server = self._config.server
        self._anchor = listener.shared_port_socket(server.host, server.port)
        previous = {sig: signal.signal(sig, self._stop) for sig in listener.STOP_SIGNALS}
        self._metrics_dir = tempfile.mkdtemp(prefix="mirrorproxy-metrics-")
        try:
            privates = [listener.loopback_socket() for _ in range(server.workers)]
            ports = [s.getsockname()[1] for s in privates]
            self._members = tuple(f"http://127.0.0.1:{p}" for p in ports)
            self._workers = [_Worker(i, p) for i, p in enumerate(ports)]
            for worker, sock in zip(self._workers, privates, strict=True):
                self._spawn(worker, sock, reconcile=worker.index == 0)
            self._await_ready(self._workers)
            logger.info(
                "mirrorproxy serving on %s:%d with %d workers (pids %s)",
                server.host,
                self._anchor.getsockname()[1],
                len(self._workers),
                ", ".join(str(w.proc.pid) for w in self._workers if w.proc),
            )
            while not self._stopping:
                time.sleep(POLL)
                for worker in self._workers:
                    if not self._stopping:
                        self._check(worker)
        finally:
            self._stop_all()
            for sig, handler in previous.items():
                signal.signal(sig, handler)
            shutil.rmtree(self._metrics_dir, ignore_errors=True)
            self._anchor.close()

    def _stop(self, signum: int, frame: FrameType | None) -> None:
        self._stopping = True

    def _spawn(self, worker: _Worker, sock: socket.socket, *, reconcile: bool) -> None:
        """Start ``worker`` on ``sock`` (closed here: the worker holds it from now on)."""
        assert self._anchor is not None  # noqa: S101 - run() binds it first
        spec = WorkerSpec(
            index=worker.index,
            config=self._config,
            members=self._members,
            private_fd=sock.fileno(),
            port=self._anchor.getsockname()[1],
            metrics_dir=self._metrics_dir,
            parent=os.getpid(),
            log_level=self._log_level,
            log_format=self._log_format,
            reconcile=reconcile,
        )
        env = dict(os.environ, PROMETHEUS_MULTIPROC_DIR=self._metrics_dir)
        try:
            worker.proc = subprocess.Popen(
                [sys.executable, "-m", "mirrorproxy.commands.worker"],
                stdin=subprocess.PIPE,
                stdout=subprocess.PIPE,
                pass_fds=(sock.fileno(),),
                env=env,
                process_group=0,
            )
        finally:
            sock.close()
        assert worker.proc.stdin is not None  # noqa: S101 - PIPE
        worker.proc.stdin.write(send_spec(spec))
        worker.proc.stdin.flush()  # and kept open: its end tells the worker we are gone

    def _await_ready(self, workers: list[_Worker]) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        waiting = {w.proc.stdout.fileno(): w for w in workers if w.proc and w.proc.stdout}
        while waiting:
            left = deadline - time.monotonic()
            if self._stopping:
                return
            if left <= 0:
                raise WorkersError(f"workers {_names(waiting.values())} did not start in time")
            readable, _, _ = select.select(list(waiting), [], [], min(left, POLL))
            for fd in readable:
                if os.read(fd, len(READY)) != READY:
                    worker = waiting[fd]
                    code = worker.proc.wait() if worker.proc else None
                    raise WorkersError(
                        f"worker w{worker.index} could not start (exit status {code});"
                        " its error is logged above"
                    )
                del waiting[fd]

    def _check(self, worker: _Worker) -> None:
        """Start ``worker`` again if it died, within the restart budget."""
        proc = worker.proc
        if proc is None or proc.poll() is None:
            return
        self._forget(proc)
        logger.error(
            "worker w%d (pid %d) exited with status %s", worker.index, proc.pid, proc.returncode
        )
        now = time.monotonic()
        while worker.restarts and now - worker.restarts[0] > RESTART_WINDOW:
            worker.restarts.popleft()
        if len(worker.restarts) >= MAX_RESTARTS:
            raise WorkersError(
                f"worker w{worker.index} died {MAX_RESTARTS + 1} times within"
                f" {RESTART_WINDOW:.0f}s; stopping"
            )
        worker.restarts.append(now)
        try:
            sock = listener.loopback_socket(worker.port)
        except OSError as err:
            raise WorkersError(
                f"cannot restart worker w{worker.index}: its address 127.0.0.1:{worker.port}"
                f" is taken ({err.strerror or err})"
            ) from None
        self._spawn(worker, sock, reconcile=False)
        self._await_ready([worker])
        logger.warning(
            "worker w%d restarted (pid %d)", worker.index, worker.proc.pid if worker.proc else 0
        )

    def _forget(self, proc: subprocess.Popen[bytes]) -> None:
        """A worker is gone: close its pipes and drop its live gauges."""
        from prometheus_client.multiprocess import mark_process_dead

        for pipe in (proc.stdin, proc.stdout):
            if pipe is not None:
                with contextlib.suppress(OSError):
                    pipe.close()
        mark_process_dead(proc.pid, self._metrics_dir)  # type: ignore[no-untyped-call]

    def _stop_all(self) -> None:
        """SIGTERM to every worker, then wait (killing those past ``STOP_TIMEOUT``)."""
        procs = [w.proc for w in self._workers if w.proc is not None and w.proc.poll() is None]
        for proc in procs:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + STOP_TIMEOUT
        for proc in procs:
            try:
                proc.wait(timeout=max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                logger.error(
                    "worker (pid %d) did not stop in %.0fs; killing it", proc.pid, STOP_TIMEOUT
                )
                proc.kill()
                proc.wait()
        for worker in self._workers:
            if worker.proc is not None:
                self._forget(worker.proc)


def _names(workers: object) -> str:
    return ", ".join(f"w{w.index}" for w in workers)  # type: ignore[attr-defined]
