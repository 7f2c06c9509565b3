"""Progress display for preload: a live table on a terminal, plain lines elsewhere."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import TextIO

from mirrorproxy.preload import ImageState
from mirrorproxy.units import format_size


class LineReporter:
    """One line per state change: for logs, CI and pipes."""

    def __init__(self, out: TextIO) -> None:
        self.out = out

    def update(self, image: ImageState) -> None:
        if image.state in ("fetching", "resolving"):
            if image.state == "fetching":
                self.out.write(f"fetching {image.ref} ({format_size(image.total)})\n")
        elif image.state == "done":
            self.out.write(
                f"done     {image.ref}: {format_size(image.fetched)} fetched, "
                f"{format_size(image.cached)} already cached\n"
            )
        elif image.state == "failed":
            self.out.write(f"FAILED   {image.ref}: {image.error}\n")
        self.out.flush()

    def tick(self, images: Sequence[ImageState]) -> None:
        pass


class TerminalReporter:
    """Redraws a table of every image (state, bytes, rate) in place."""

    def __init__(self, out: TextIO) -> None:
        self.out = out
        self._lines = 0
        self._started = time.monotonic()

    def update(self, image: ImageState) -> None:
        pass  # the next tick redraws

    def tick(self, images: Sequence[ImageState]) -> None:
        if self._lines:
            self.out.write(f"\x1b[{self._lines}A")  # back to the top of the table
        elapsed = max(time.monotonic() - self._started, 0.001)
        fetched = sum(i.fetched for i in images)
        rows = []
        for i in images:
            share = f"{100 * (i.fetched + i.cached) / i.total:5.1f}%" if i.total else "     "
            detail = (
                i.error
                if i.state == "failed"
                else (f"{format_size(i.fetched + i.cached)} / {format_size(i.total)}")
            )
            rows.append(f"{i.state:<9} {share} {str(i.ref)[:60]:<60} {detail}")
        rows.append(f"{format_size(fetched)} fetched at {format_size(fetched / elapsed)}/s")
        for row in rows:
            self.out.write(f"\x1b[2K{row}\n")
        self._lines = len(rows)
        self.out.flush()
