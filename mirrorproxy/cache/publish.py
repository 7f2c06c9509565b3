"""Atomic publication of files: the one way a durable file appears at its final path.

A file is written under a temp name, its data made durable (fsync, or one syncfs
for a batch), renamed over its final path, and the directory fsynced so the rename
itself survives a crash. A reader therefore sees either the old file or the whole
new one, never part of it. The cache's stores, bundle import and the generated
client files (hosts.toml and friends) all go through here.

Temp files in a cache's ``tmp/`` carry the writing process's id in their name, so a
sweep at start removes what a dead process left and spares a live one's.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import uuid
from collections.abc import Sequence
from pathlib import Path


def temp_name(prefix: str) -> str:
    """A temp file name that records its owner, so a sweep spares live processes' files."""
    return f"{prefix[:16]}-{os.getpid()}-{uuid.uuid4().hex}.partial"


def owner_alive(name: str) -> bool:
    """Whether the process that made temp file ``name`` still runs (not us: we just began)."""
    parts = name.split("-")
    if len(parts) != 3 or not parts[1].isdigit():
        return False
    pid = int(parts[1])
    if pid == os.getpid():
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's live process
    return True


def sweep_temp(tmp_dir: Path) -> int:
    """Remove the temp files in ``tmp_dir`` whose writers are gone; return how many.

    Files of another live process (a server, preload or import on the same cache
    dir) are left alone.
    """
    swept = 0
    for entry in tmp_dir.iterdir():
        if owner_alive(entry.name):
            continue
        with contextlib.suppress(OSError):
            entry.unlink()
            swept += 1
    return swept


def sync_directory(path: Path) -> None:
    """fsync a directory, making the renames and creations in it durable."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def publish(tmp: Path, final: Path, *, fd: int | None = None) -> None:
    """Move a fully written temp file to ``final``, durably.

    Args:
        fd: an open descriptor of ``tmp`` whose data is fsynced first; without
            one, the caller has already made the data durable.
    """
    if fd is not None:
        os.fsync(fd)
    final.parent.mkdir(parents=True, exist_ok=True)
    os.replace(tmp, final)
    sync_directory(final.parent)


def write_atomic(
    final: Path, data: bytes, *, tmp_dir: Path | None = None, mode: int | None = None
) -> None:
    """Replace ``final`` with ``data``: written and synced under a temp name, then published.

    Args:
        tmp_dir: where the temp file goes (a cache's ``tmp/``); by default a hidden
            name next to ``final`` (the same filesystem, as the rename needs).
        mode: permissions of the new file; by default what the umask gives.
    """
    if tmp_dir is None:
        tmp = final.parent / ("." + temp_name(final.name))
    else:
        tmp = tmp_dir / temp_name(final.name)
    try:
        with open(tmp, "xb") as f:
            f.write(data)
            f.flush()
            if mode is not None:
                os.fchmod(f.fileno(), mode)
            os.fsync(f.fileno())
        publish(tmp, final)
    except BaseException:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise


def write_atomic_many(tmp_dir: Path, files: Sequence[tuple[Path, bytes]]) -> None:
    """Write many files as ``write_atomic`` does, with one flush of the filesystem.

    Every temp file is written first, then the filesystem is flushed once (syncfs),
    then all are renamed and each directory touched is fsynced: after a crash each
    final path holds either its old or its whole new content.
    """
    if not files:
        return
    temps: list[tuple[Path, Path]] = []
    try:
        for final, data in files:
            tmp = tmp_dir / temp_name(final.name)
            temps.append((tmp, final))
            with open(tmp, "xb") as f:
                f.write(data)
        sync_filesystem(tmp_dir)
        parents = set()
        for tmp, final in temps:
            if final.parent not in parents:
                final.parent.mkdir(parents=True, exist_ok=True)
                parents.add(final.parent)
            os.replace(tmp, final)
        for parent in parents:
            sync_directory(parent)
    except BaseException:
        for tmp, _ in temps:
            with contextlib.suppress(OSError):
                tmp.unlink()
        raise


def sync_filesystem(path: Path) -> None:
    """Flush the filesystem holding ``path`` (Linux syncfs; a global sync elsewhere)."""
    libc = ctypes.CDLL(None, use_errno=True)
    syncfs = getattr(libc, "syncfs", None)
    if syncfs is None:
        os.sync()
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        if syncfs(fd) != 0:
            err = ctypes.get_errno()
            raise OSError(err, os.strerror(err), str(path))
    finally:
        os.close(fd)
