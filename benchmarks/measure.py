"""What a run costs: CPU of the client and of a server's process tree, and peak RSS.

Reads ``/proc`` and ``getrusage`` only (Linux); nothing here starts servers or sends
requests. CPU is reported in cores (CPU seconds / wall seconds), so 1.0 means one
core fully busy: a client near 1.0 may be what limits a result.
"""

from __future__ import annotations

import os
import resource
import subprocess
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Self

_TICK = os.sysconf("SC_CLK_TCK")
_PAGE = os.sysconf("SC_PAGE_SIZE")


def _stat_fields(pid: int) -> list[str] | None:
    """Fields of ``/proc/PID/stat`` after the command name, or None if it is gone."""
    try:
        raw = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return raw.rpartition(")")[2].split()


def tree_pids(root: int) -> list[int]:
    """``root`` and all its living descendants (worker processes included)."""
    children: dict[int, list[int]] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        fields = _stat_fields(int(entry.name))
        if fields is not None:
            children.setdefault(int(fields[1]), []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


def tree_cpu_seconds(root: int) -> float:
    """User + system CPU seconds used so far by ``root`` and its living descendants."""
    total = 0
    for pid in tree_pids(root):
        fields = _stat_fields(pid)
        if fields is not None:
            total += int(fields[11]) + int(fields[12])  # utime, stime
    return total / _TICK


def tree_rss_bytes(root: int) -> int:
    """Resident set size of ``root`` and its living descendants, summed."""
    total = 0
    for pid in tree_pids(root):
        try:
            resident = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
        except (OSError, IndexError, ValueError):
            continue
        total += resident * _PAGE
    return total


def peak_rss_bytes(pid: int) -> int:
    """The kernel's high-water mark of one process's RSS (``VmHWM``)."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 0


class RssSampler:
    """Sample the RSS of a process tree in a thread; ``peak`` is the largest sum seen.

    Sampling misses spikes shorter than the interval, so callers also read the
    kernel's ``VmHWM`` of the main process and report the larger figure.
    """

    def __init__(self, root: int, interval: float = 0.01) -> None:
        self.root = root
        self.interval = interval
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="rss-sampler", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, tree_rss_bytes(self.root))
            self._stop.wait(self.interval)

    def __enter__(self) -> Self:
        self._thread.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, tree_rss_bytes(self.root), peak_rss_bytes(self.root))


@dataclass(frozen=True, slots=True)
class Usage:
    """Wall time and CPU seconds of one measured stretch."""

    wall: float
    cpu: float

    @property
    def cores(self) -> float:
        """Average cores busy (CPU seconds per wall second)."""
        return self.cpu / self.wall if self.wall > 0 else 0.0


def _self_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def trees_cpu_seconds(roots: int | Sequence[int]) -> float:
    """``tree_cpu_seconds`` summed over one or several process trees."""
    return sum(tree_cpu_seconds(r) for r in ([roots] if isinstance(roots, int) else roots))


def settled_cpu_seconds(
    root: int | Sequence[int], *, interval: float = 0.1, quiet: float = 0.02, limit: float = 10.0
) -> float:
    """``trees_cpu_seconds(root)`` once the tree(s) have stopped using CPU.

    A cache keeps working after its client has the last byte (the mirror's fsync and
    rename, the baseline proxy's own second download of the blob into its storage):
    that is part of what a cold fill costs. Polled every ``interval`` seconds until
    one interval adds less than ``quiet`` CPU seconds, for at most ``limit`` seconds.
    """
    last = trees_cpu_seconds(root)
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        time.sleep(interval)
        now = trees_cpu_seconds(root)
        if now - last < quiet:
            return now
        last = now
    return last


class Meter:
    """Measure wall time, this process's CPU and a server tree's CPU over a block.

    ``with Meter(server_pid) as m: ...`` then ``m.client`` and ``m.server``. With
    ``settle=True`` the exit also waits for the server to go quiet and records all
    the CPU it used for the block's work, the tail after the response included, in
    ``m.server_total`` (CPU seconds). ``server_pid`` may name several servers (cluster
    members): their trees' CPU is summed.
    """

    def __init__(
        self, server_pid: int | Sequence[int] | None = None, *, settle: bool = False
    ) -> None:
        self.server_pid = server_pid
        self.settle = settle
        self.client = Usage(0.0, 0.0)
        self.server = Usage(0.0, 0.0)
        self.server_total = 0.0
        self._t0 = self._c0 = self._s0 = 0.0

    def __enter__(self) -> Self:
        self._s0 = trees_cpu_seconds(self.server_pid) if self.server_pid else 0.0
        self._c0 = _self_cpu()
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        wall = time.perf_counter() - self._t0
        self.client = Usage(wall, _self_cpu() - self._c0)
        if self.server_pid:
            self.server = Usage(wall, trees_cpu_seconds(self.server_pid) - self._s0)
            self.server_total = self.server.cpu
            if self.settle:
                self.server_total = settled_cpu_seconds(self.server_pid) - self._s0


@dataclass(frozen=True, slots=True)
class Completed:
    """A finished client subprocess (wrk, ctr): output, exit code and its cost."""

    returncode: int
    stdout: str
    stderr: str
    usage: Usage


def run_measured(
    argv: Sequence[str],
    *,
    env: Mapping[str, str] | None = None,
    timeout: float = 300.0,
) -> Completed:
    """Run a client program to completion and measure its wall time and CPU.

    The CPU comes from ``RUSAGE_CHILDREN`` before and after: the suite reaps no other
    child while a client runs (servers are reaped only when they are stopped).

    Raises:
        subprocess.TimeoutExpired: it ran longer than ``timeout`` seconds.
    """
    c0 = _children_cpu()
    t0 = time.perf_counter()
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        env=dict(env) if env is not None else None,
        timeout=timeout,
        check=False,
    )
    wall = time.perf_counter() - t0
    return Completed(proc.returncode, proc.stdout, proc.stderr, Usage(wall, _children_cpu() - c0))


def _busy_seconds() -> float:
    """CPU seconds the whole machine has been busy (all cores, not idle or iowait)."""
    first = Path("/proc/stat").read_text().split("\n", 1)[0].split()
    ticks = [int(x) for x in first[1:9]]  # user nice system idle iowait irq softirq steal
    return (sum(ticks) - ticks[3] - ticks[4]) / _TICK


def _own_seconds() -> float:
    """CPU seconds of this process, its living descendants and its reaped children."""
    return tree_cpu_seconds(os.getpid()) + _children_cpu()


class Background:
    """CPU the machine spent outside this run's processes during a block, in cores.

    That is other jobs on the machine, and kernel threads (softirq work for loopback
    traffic lands there too, so a little is normal). Much more means a noisy run.
    """

    def __init__(self) -> None:
        self.cores = 0.0
        self._t0 = self._busy0 = self._own0 = 0.0

    def __enter__(self) -> Self:
        self._busy0, self._own0 = _busy_seconds(), _own_seconds()
        self._t0 = time.perf_counter()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        wall = time.perf_counter() - self._t0
        other = (_busy_seconds() - self._busy0) - (_own_seconds() - self._own0)
        self.cores = max(0.0, other / wall) if wall > 0 else 0.0
