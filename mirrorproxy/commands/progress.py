"""Progress display for preload: a live summary on a terminal, plain lines elsewhere.

On a terminal (``rich``): one summary line with a bar (images done, bytes from
upstream, rate, ETA), then one row per image in flight, never more rows than the
terminal has; each finished image is printed once above that area and scrolls away
with the terminal's own history. The screen is redrawn once per tick (finished
images included), so the output grows with the run's length and the terminal's
height, not with the number of images times the ticks. Elsewhere (logs, CI,
pipes): one line per change.
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Sequence
from types import TracebackType
from typing import TextIO

from rich.console import Console, Group, RenderableType
from rich.live import Live
from rich.progress_bar import ProgressBar
from rich.table import Table
from rich.text import Text

from mirrorproxy.commands.prefetch import ImageState, Totals
from mirrorproxy.core.units import format_size

RATE_WINDOW = 5.0  # seconds of history behind the shown rate
IN_FLIGHT = ("resolving", "fetching")


def finished_line(image: ImageState) -> str:
    """The one line a finished (or failed) image gets."""
    if image.state == "failed":
        return f"FAILED   {image.ref}: {image.error}"
    parts = [f"{format_size(image.fetched)} fetched", f"{format_size(image.cached)} cached"]
    if image.shared:
        parts.append(f"{format_size(image.shared)} fetched for another image")
    return f"done     {image.ref} ({', '.join(parts)})"


class LineReporter:
    """One line per state change: for logs, CI and pipes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def update(self, image: ImageState) -> None:
        if image.state == "fetching":
            self.out.write(f"fetching {image.ref} ({format_size(image.total)})\n")
        elif image.state in ("done", "failed"):
            self.out.write(finished_line(image) + "\n")
        else:
            return
        self.out.flush()

    def tick(self, images: Sequence[ImageState], totals: Totals) -> None:
        pass


class TerminalReporter:
    """The live area: a summary line with a bar and the images in flight (a context manager)."""

    def __init__(self, console: Console) -> None:
        self.console = console
        self._live = Live(
            console=console,
            auto_refresh=False,  # redrawn on each tick, not by a thread of its own
            transient=True,  # the final report replaces it
            redirect_stdout=False,
            redirect_stderr=False,
        )
        self._started = time.monotonic()
        self._active: dict[int, ImageState] = {}  # in the order they started
        self._samples: deque[tuple[float, int]] = deque()
        self._finished: list[Text] = []  # printed above the live area on the next tick

    def __enter__(self) -> TerminalReporter:
        self._live.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self._live.stop()

    def update(self, image: ImageState) -> None:
        if image.state in IN_FLIGHT:
            self._active.setdefault(id(image), image)
        elif image.state in ("done", "failed"):
            self._active.pop(id(image), None)
            style = "red" if image.state == "failed" else ""
            self._finished.append(Text(finished_line(image), style=style))

    def tick(self, images: Sequence[ImageState], totals: Totals) -> None:
        """Print what finished since the last tick above the live area, then redraw it once."""
        self._live.update(self.render(images), refresh=not self._finished)
        if self._finished:
            self._live.console.print(*self._finished, sep="\n", soft_wrap=True)
            self._finished.clear()

    def render(self, images: Sequence[ImageState]) -> RenderableType:
        """The summary line, then as many in-flight rows as the terminal has room for."""
        now = time.monotonic()
        fetched = sum(i.fetched for i in images)
        self._samples.append((now, fetched))
        while len(self._samples) > 2 and now - self._samples[0][0] > RATE_WINDOW:
            self._samples.popleft()
        t0, b0 = self._samples[0]
        rate = (fetched - b0) / (now - t0) if now > t0 else 0.0
        done = sum(1 for i in images if i.state in ("done", "failed"))
        failed = sum(1 for i in images if i.state == "failed")
        elapsed = now - self._started
        eta = _clock(elapsed / done * (len(images) - done)) if done else "-:--:--"
        summary = Table.grid(padding=(0, 1))
        summary.add_row(
            f"{done}/{len(images)} images",
            ProgressBar(total=max(len(images), 1), completed=done, width=20),
            Text(
                f"{format_size(fetched)} at {format_size(rate)}/s, ETA {eta}"
                + (f", {failed} failed" if failed else ""),
                no_wrap=True,
                overflow="ellipsis",
            ),
        )
        rows = Table.grid(padding=(0, 1), expand=True)
        rows.add_column(ratio=1, no_wrap=True, overflow="ellipsis")
        rows.add_column(no_wrap=True)
        rows.add_column(no_wrap=True, justify="right")
        room = max(self.console.height - 2, 1)
        active = list(self._active.values())
        shown = active if len(active) <= room else active[: room - 1]
        for image in shown:
            have = image.fetched + image.cached + image.shared
            bar = ProgressBar(total=image.total or None, completed=have, width=12)
            sizes = f"{format_size(have)}/{format_size(image.total)}" if image.total else "..."
            rows.add_row(Text(f"  {image.ref}"), bar, Text(sizes))
        if len(shown) < len(active):
            rows.add_row(Text(f"  ... and {len(active) - len(shown)} more in flight"), "", "")
        return Group(summary, rows)


def _clock(seconds: float) -> str:
    s = int(seconds)
    return f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"
