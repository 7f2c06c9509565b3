"""What a run does (sizes, counts, durations) and what scenarios share (the Context).

``Plan.default()`` follows the issue's scenarios; ``Plan.quick()`` keeps every
scenario but shrinks sizes and durations for a smoke run (CI, under a minute).
"""

from __future__ import annotations

import contextlib
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field, replace
from pathlib import Path

from benchmarks import profiling
from benchmarks.stack import Stack

MIRROR_AGENT = "mirrorproxy/"  # User-Agent prefixes in the upstream's access log
BASELINE_AGENT = "Go-http-client/"

KiB = 1024
MiB = 1024 * KiB
GiB = 1024 * MiB


@dataclass(frozen=True, slots=True)
class Plan:
    """Sizes, counts and durations of one run."""

    repeat: int = 3
    big_blob: int = 256 * MiB  # scenarios 1 and 2
    warm_samples: int = 5  # fetches per server per repetition in scenario 1
    cold_samples: int = 3  # cold fetches per server per repetition in scenario 2
    herd_blob: int = 64 * MiB
    herd_clients: int = 50
    manifest_clients: int = 64
    manifest_seconds: float = 10.0
    memory_blob: int = 1 * GiB
    memory_clients: int = 10
    memory_limit_mib: float = 150.0
    image_layers: int = 20
    layer_size: int = 4 * MiB
    small_count: int = 2000
    small_size: int = 4 * KiB
    small_clients: int = 32
    small_seconds: float = 10.0
    wrk_threads: int = 1
    quick: bool = False

    @classmethod
    def default(cls) -> Plan:
        """The issue's sizes."""
        return cls()

    @classmethod
    def quick_run(cls) -> Plan:
        """Small sizes and short durations: every scenario, in well under a minute."""
        return cls(
            repeat=1,
            big_blob=32 * MiB,
            warm_samples=3,
            cold_samples=1,
            herd_blob=8 * MiB,
            manifest_seconds=2.0,
            memory_blob=64 * MiB,
            layer_size=64 * KiB,
            small_count=200,
            small_seconds=2.0,
            quick=True,
        )

    def with_repeat(self, repeat: int | None) -> Plan:
        """This plan with another repeat count (None keeps it)."""
        return self if repeat is None else replace(self, repeat=max(1, repeat))


@dataclass
class Context:
    """What every scenario gets: the running servers, the plan, and reporting hooks."""

    stack: Stack
    plan: Plan
    profile_dir: Path | None = None
    started: float = field(default_factory=time.monotonic)

    def log(self, message: str) -> None:
        """A progress line on stderr, with seconds since the run started."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {message}", file=sys.stderr, flush=True)

    @contextlib.contextmanager
    def profiled(self, name: str) -> Iterator[None]:
        """Sample the mirror with py-spy during the block (``--profile``, named blocks)."""
        pid = self.stack.mirror.pid
        if self.profile_dir is None or pid is None or not name:
            yield
            return
        with profiling.record(pid, self.profile_dir / f"{name}.raw"):
            yield

    def upstream_count(self, agent: str, needle: str = "", method: str = "") -> int:
        """Requests the upstream has logged from clients whose User-Agent starts with
        ``agent``, with ``needle`` in the path (and ``method``, when given).

        Counting by agent, not by log position, stays right when a request's line is
        written after the next measurement started (lines appear on completion).
        """
        count = 0
        for line in self.stack.upstream.log_text().splitlines():
            _, quote, rest = line.partition('] "')
            parts = rest.split(" ", 2)
            if not quote or len(parts) < 2 or needle not in parts[1]:
                continue
            if method and parts[0] != method:
                continue
            fields = line.rstrip().rsplit('"', 2)
            if len(fields) == 3 and fields[1].startswith(agent):
                count += 1
        return count

    def settled_upstream_count(self, agent: str, needle: str = "", method: str = "") -> int:
        """``upstream_count`` once it stops changing (polled for up to 3 s)."""
        last = self.upstream_count(agent, needle, method)
        for _ in range(15):
            time.sleep(0.2)
            now = self.upstream_count(agent, needle, method)
            if now == last:
                break
            last = now
        return last
