"""The machine and software a run measured, for the report header.

Reads /proc, asks each tool for its version and git for the commit (read-only);
anything that cannot be found is reported as such, never fatal.
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

from tests.support.seaweed import weed_binary

REPO = Path(__file__).resolve().parent.parent


def _run(argv: Sequence[str]) -> str:
    try:
        proc = subprocess.run(
            list(argv), capture_output=True, text=True, timeout=10, check=False, cwd=REPO
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    out = (proc.stdout or proc.stderr).strip().splitlines()
    return out[0].strip() if out else "?"


def _cpu() -> tuple[str, bool]:
    model, sha_ni = "?", False
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and model == "?":
                model = line.split(":", 1)[1].strip()
            if line.startswith("flags") and " sha_ni" in line:
                sha_ni = True
    except OSError:
        pass
    return model, sha_ni


def _mem_gib() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                return f"{int(line.split()[1]) / 1024 / 1024:.1f} GiB"
    except OSError:
        pass
    return "?"


def _pkg(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "not installed"


def _os_release() -> str:
    try:
        for line in Path("/etc/os-release").read_text().splitlines():
            if line.startswith("PRETTY_NAME="):
                return line.split("=", 1)[1].strip('"')
    except OSError:
        pass
    return "?"


def describe() -> list[str]:
    """Markdown lines naming the machine, the software and the commit measured."""
    model, sha_ni = _cpu()
    commit = _run(["git", "rev-parse", "--short", "HEAD"])
    dirty = _run(["git", "status", "--porcelain", "--untracked-files=no"])
    commit += " + uncommitted changes" if dirty not in ("", "?") else ""
    now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    return [
        f"- when: {now}; mirrorproxy {_pkg('mirrorproxy')} at {commit}",
        f"- machine: {os.cpu_count()} cores (`nproc`), {model}, sha_ni "
        f"{'yes' if sha_ni else 'no'}; {_mem_gib()} RAM; kernel {platform.release()}; "
        f"{_os_release()}",
        f"- Python {platform.python_version()}, aiohttp {_pkg('aiohttp')}, "
        f"uvloop {_pkg('uvloop')}",
        f"- {_run(['docker-registry', '--version'])}; {_run(['nginx', '-v'])}; "
        f"{_run(['wrk', '-v'])}; {_run(['containerd', '--version'])}; {_weed()}",
    ]


def _weed() -> str:
    """SeaweedFS's version (scenarios 8-10), or that it is missing."""
    binary = weed_binary()
    return f"SeaweedFS {_run([binary, 'version'])}" if binary else "SeaweedFS not installed"


def preamble(
    options: Sequence[str], log_level: str, scenarios: Sequence[int], source: Path | None
) -> list[str]:
    """How the mirror was run, and what the columns mean."""
    extra = ", ".join(f"`{o}`" for o in options) or "none"
    src = f" from `{source}`" if source is not None else ""
    return [
        f"Mirror: `mirrorproxy serve`{src}, log level {log_level}, extra options {extra}. "
        f"Scenarios run: {', '.join(map(str, scenarios))}.",
        "Figures are medians over repetitions (min-max in the detail table). "
        "GB/s = 10^9 bytes/s. All servers on 127.0.0.1 of this machine, clients included. "
        "*background*: cores busy outside this run's processes during the scenario "
        "(other jobs, kernel threads); well above 0.1 means a noisy measurement.",
    ]


def page_cache_probe(directory: Path, size: int = 256 * 1024 * 1024) -> str:
    """Write ``size`` bytes to a new file twice, deleting it in between; report both rates.

    On a VM whose memory the host backs lazily (and takes back when idle), the first
    write into fresh page cache can be ten times slower than the second, which reuses
    the pages the first one freed. Cold blob fills write into fresh page cache.
    """
    block = os.urandom(1024 * 1024)
    rates = []
    for _ in range(2):
        path = directory / "page-cache-probe.tmp"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        started = time.perf_counter()
        try:
            for offset in range(0, size, len(block)):
                os.pwrite(fd, block, offset)
        finally:
            os.close(fd)
        rates.append(size / (time.perf_counter() - started) / (1024 * 1024))
        path.unlink()
    return (
        f"- page-cache writes (buffered, {size >> 20} MiB into a new file): "
        f"{rates[0]:,.0f} MiB/s into fresh memory, then {rates[1]:,.0f} MiB/s reusing it"
    )
