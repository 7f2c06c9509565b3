"""Real mounts for tests that run as root: a tiny tmpfs, a read-only view of a directory.

Owns making them and undoing them (innermost first), always bounded in time; it
decides nothing about skipping (the fixtures do).
"""

from __future__ import annotations

import subprocess
from pathlib import Path

TIMEOUT = 10.0


class Mounts:
    """Mounts made for one test, undone (innermost first) at teardown."""

    def __init__(self) -> None:
        self.made: list[Path] = []

    def tmpfs(self, path: Path, size: str) -> None:
        path.mkdir(parents=True, exist_ok=True)
        mount("-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(path))
        self.made.append(path)

    def read_only(self, path: Path) -> None:
        """Lay a read-only view of ``path`` over itself: new opens get EROFS.

        (``mount -o remount,ro`` of the filesystem itself is refused with EBUSY while
        the mirror runs: its SQLite index holds files open for writing.)
        """
        mount("--bind", "-o", "ro", str(path), str(path))
        self.made.append(path)

    def undo(self, path: Path) -> None:
        self.made.remove(path)
        umount(path)

    def undo_all(self) -> None:
        while self.made:
            umount(self.made.pop())


def mount(*args: str) -> None:
    proc = subprocess.run(
        ["mount", *args], capture_output=True, text=True, timeout=TIMEOUT, check=False
    )
    assert proc.returncode == 0, proc.stderr


def umount(path: Path) -> None:
    for argv in (["umount", str(path)], ["umount", "-l", str(path)]):
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=TIMEOUT, check=False)
        if proc.returncode == 0:
            return
