"""`mirrorproxy preload` on a terminal: a pseudo-terminal of 24 rows and 80 columns.

The CLI runs as a subprocess whose stdout is the pty; the FakeRegistry it fetches
from serves slow bodies on the test's loop, so the live display redraws many times
while more images are in flight than the screen has rows. Everything the terminal
received is then checked: each finished image printed exactly once, and no redraw
ever moves the cursor up further than the screen is tall (beyond that, cursor
movement cannot work and old rows would pile up in the scrollback).
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorproxy.cli import main
from tests.support.mirror import FakeFactory


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """preload configures logging onto this test's captured stderr: undo that after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


ROWS, COLS = 24, 80
IMAGES = 60
JOBS = 30  # more in flight than the screen has rows
UP = re.compile(rb"(?:\x1b\[1A\x1b\[2K)+")  # rich erasing its live area, row by row


def _run_on_pty(argv: list[str]) -> tuple[int, bytes]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", ROWS, COLS, 0, 0))
    env = {k: v for k, v in os.environ.items() if k not in ("COLUMNS", "LINES")}
    env |= {"TERM": "xterm-256color", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.Popen(argv, stdin=slave, stdout=slave, stderr=slave, env=env)
    os.close(slave)
    out = bytearray()
    try:
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its end
                break
            if not chunk:
                break
            out += chunk
    finally:
        os.close(master)
        code = proc.wait(timeout=60)
    return code, bytes(out)


async def test_progress_stays_within_a_24_row_terminal(
    start_fake: FakeFactory, tmp_path: Path
) -> None:
    fake = await start_fake()
    fake.registry.faults.chunk_size, fake.registry.faults.chunk_delay = 4096, 0.05
    for i in range(IMAGES):
        fake.registry.add_image(f"library/app{i}", "1", seed=f"app{i}", layer_sizes=(80_000,))
    images = tmp_path / "images.txt"
    images.write_text("".join(f"app{i}:1\n" for i in range(IMAGES)))
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
        f'[namespaces."docker.io"]\nupstreams = ["{fake.url}"]\n'
    )
    argv = [sys.executable, "-m", "mirrorproxy", "preload", "-c", str(config), str(images)]
    code, out = await asyncio.to_thread(_run_on_pty, [*argv, "--jobs", str(JOBS)])
    text = out.decode(errors="replace")
    assert code == 0, text[-2000:]

    for i in range(IMAGES):  # finished images scroll above, once each
        assert text.count(f"done     docker.io/library/app{i}:1 (") == 1, i
    redraws = [m.group(0).count(b"\x1b[1A") for m in UP.finditer(out)]
    assert len(redraws) >= 3  # it did redraw while images were in flight
    assert max(redraws) < ROWS
    assert "more in flight" in text  # 30 in flight do not fit: the rest are counted
    assert f"/{IMAGES} images" in text
    assert "preloaded 60 of 60 images" in text
    # Bounded: the finished lines, the report, and at most a screenful per redraw.
    assert len(out) < IMAGES * 200 + (len(redraws) + 1) * ROWS * (COLS + 40)


def test_plain_lines_without_a_terminal(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Not a terminal (a pipe, a log): no escape sequences at all."""
    images = tmp_path / "images.txt"
    images.write_text("Not Valid\n")
    config = tmp_path / "mirror.toml"
    config.write_text(
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
        '[namespaces."docker.io"]\nupstreams = ["http://127.0.0.1:9"]\n'
    )
    assert main(["preload", "-c", str(config), str(images)]) == 2
    out, err = capsys.readouterr()
    assert "\x1b" not in out + err
