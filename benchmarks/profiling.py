"""Optional py-spy sampling of the mirror while a scenario measures it (``--profile``).

``py-spy record --format raw`` writes collapsed stacks (``frame;frame;... count``);
``summarize`` turns them into the few lines a reader needs: where the samples
ended (self time) and which of our functions they passed through (inclusive).
Profiling slows the mirror down, so a profiled run's figures are not results.
"""

from __future__ import annotations

import contextlib
import shutil
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path


def _pyspy() -> str | None:
    """py-spy on PATH, else next to this interpreter (an unactivated virtualenv)."""
    found = shutil.which("py-spy")
    if found is not None:
        return found
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else None


def available() -> bool:
    """Whether py-spy can be found (``pip install py-spy``)."""
    return _pyspy() is not None


@contextlib.contextmanager
def record(pid: int, out: Path, *, rate: int = 250) -> Iterator[None]:
    """Sample ``pid`` (and its worker processes) into ``out`` while the block runs."""
    pyspy = _pyspy()
    if pyspy is None:
        raise RuntimeError("py-spy not found (pip install py-spy)")
    out.parent.mkdir(parents=True, exist_ok=True)
    log = out.with_suffix(".log").open("wb")
    proc = subprocess.Popen(
        [
            pyspy,
            "record",
            "--pid",
            str(pid),
            "--subprocesses",
            "--gil",  # only the thread holding the GIL: Python-level work, not waits
            "--format",
            "raw",
            "--rate",
            str(rate),
            "--output",
            str(out),
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    try:
        yield
    finally:
        proc.send_signal(signal.SIGINT)  # py-spy writes its output on SIGINT
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    if out.exists():
        out.with_suffix(".summary.txt").write_text(summarize(out))


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:12)`` -> ``func (file.py)``: group by function."""
    name, _, where = frame.partition(" (")
    file = where.rsplit("/", 1)[-1].split(":", 1)[0]
    return f"{name} ({file})" if file else name


def summarize(raw: Path, top: int = 25) -> str:
    """Self and inclusive sample shares of the top functions in a raw py-spy file."""
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        frames = [_frame_name(f) for f in stack.split(";") if f]
        if not frames:
            continue
        total += count
        self_time[frames[-1]] += count
        for name in set(frames):
            inclusive[name] += count
    if not total:
        return "no samples\n"
    lines = [f"{total} samples", "", "self time:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in self_time.most_common(top)]
    lines += ["", "inclusive:"]
    lines += [f"  {100 * n / total:5.1f}%  {name}" for name, n in inclusive.most_common(top)]
    return "\n".join(lines) + "\n"
