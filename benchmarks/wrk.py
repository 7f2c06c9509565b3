"""Request rates with Debian's ``wrk``: a generated Lua script, a JSON summary back.

The script cycles through a list of paths (each wrk thread from its own offset),
sends fixed headers, and prints one machine-readable line in ``done()`` with the
request count, errors and latency percentiles, so nothing parses wrk's text report.
"""

from __future__ import annotations

import json
import shutil
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks.measure import Usage, run_measured

MARK = "WRKJSON "

_SCRIPT = """-- written by benchmarks/wrk.py
local paths = {
%(paths)s
}
wrk.headers = {
%(headers)s
}
local counter = 0
local thread_no = 0

function setup(thread)
  thread:set("offset", thread_no * 7919)
  thread_no = thread_no + 1
end

function init(args)
  counter = offset or 0
end

function request()
  counter = counter + 1
  return wrk.format("GET", paths[(counter %% #paths) + 1])
end

function done(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '%(mark)s{"requests":%%d,"duration_us":%%d,"bytes":%%d,' ..
    '"connect":%%d,"read":%%d,"write":%%d,"status":%%d,"timeout":%%d,' ..
    '"p50_us":%%d,"p90_us":%%d,"p99_us":%%d,"max_us":%%d}\\n',
    summary.requests, summary.duration, summary.bytes,
    e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max))
end
"""


def _lua_string(text: str) -> str:
    return json.dumps(text)  # a JSON string literal is a valid Lua string literal here


def write_script(
    path: Path, paths: Sequence[str], headers: Mapping[str, str] | None = None
) -> Path:
    """Write a wrk script that GETs ``paths`` round-robin with ``headers``."""
    if not paths:
        raise ValueError("wrk needs at least one path")
    path.write_text(
        _SCRIPT
        % {
            "paths": ",\n".join(f"  {_lua_string(p)}" for p in paths),
            "headers": ",\n".join(
                f"  [{_lua_string(k)}] = {_lua_string(v)}" for k, v in (headers or {}).items()
            ),
            "mark": MARK,
        }
    )
    return path


@dataclass(frozen=True, slots=True)
class WrkResult:
    """What one wrk run measured, and what wrk itself cost."""

    requests: int
    seconds: float
    bytes: int
    errors: int  # connect, read, write and timeout errors plus HTTP status >= 400
    p50_ms: float
    p90_ms: float
    p99_ms: float
    max_ms: float
    usage: Usage

    @property
    def rate(self) -> float:
        """Requests per second."""
        return self.requests / self.seconds if self.seconds > 0 else 0.0


def available() -> bool:
    """Whether ``wrk`` is on PATH."""
    return shutil.which("wrk") is not None


def run(
    base_url: str,
    script: Path,
    *,
    connections: int,
    seconds: float,
    threads: int = 1,
) -> WrkResult:
    """Run wrk against ``base_url`` with ``script`` and parse its summary line.

    Raises:
        RuntimeError: wrk failed or printed no summary.
    """
    argv = [
        "wrk",
        f"-t{threads}",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        "--timeout",
        "10s",
        "-s",
        str(script),
        base_url,
    ]
    done = run_measured(argv, timeout=seconds + 60)
    line = next((x for x in done.stdout.splitlines() if x.startswith(MARK)), None)
    if done.returncode != 0 or line is None:
        raise RuntimeError(f"wrk failed ({done.returncode}): {done.stdout}\n{done.stderr}")
    raw = json.loads(line[len(MARK) :])
    errors = sum(raw[k] for k in ("connect", "read", "write", "status", "timeout"))
    return WrkResult(
        requests=raw["requests"],
        seconds=raw["duration_us"] / 1e6,
        bytes=raw["bytes"],
        errors=errors,
        p50_ms=raw["p50_us"] / 1000,
        p90_ms=raw["p90_us"] / 1000,
        p99_ms=raw["p99_us"] / 1000,
        max_ms=raw["max_us"] / 1000,
        usage=done.usage,
    )
