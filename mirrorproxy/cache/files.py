"""What the filesystem stores share: content files of one kind under a cache directory.

A blob or manifest lives at ``<root>/blobs|manifests/<alg>/<xx>/<hex>`` and only
ever gets there through ``publish`` (whole and verified). This module knows that
layout, and lists, checks, removes and quarantines such files; it stages the files
bulk import publishes later. It knows nothing of the index, budgets or HTTP.
"""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

from mirrorproxy.cache import BLOB, Content, DigestMismatch
from mirrorproxy.cache.publish import publish, temp_name
from mirrorproxy.core.oci import Digest

HASH_CHUNK = 4 * 1024 * 1024  # bytes read at a time when re-hashing a file
_HEX = {"sha256": 64, "sha512": 128}
_HEX_RE = re.compile(r"[0-9a-f]+")


def content_path(root: Path, kind: str, digest: str) -> Path:
    """Where a blob or manifest with ``digest`` lives under the cache ``root``."""
    alg, _, hexpart = digest.partition(":")
    sub = "blobs" if kind == BLOB else "manifests"
    return root / sub / alg / hexpart[:2] / hexpart


def contents_of(root: Path, kind: str) -> Iterator[Content]:
    """Every content file of ``kind`` under the cache ``root``.

    Anything else there (temp names, foreign files) is not content and is skipped.
    """
    base = root / ("blobs" if kind == BLOB else "manifests")
    try:
        algs = list(os.scandir(base))
    except FileNotFoundError:
        return
    for alg in algs:
        if alg.name not in _HEX or not alg.is_dir():
            continue
        for shard in os.scandir(alg.path):
            if not shard.is_dir():
                continue
            for f in os.scandir(shard.path):
                if len(f.name) == _HEX[alg.name] and _HEX_RE.fullmatch(f.name) and f.is_file():
                    try:
                        st = f.stat()
                    except FileNotFoundError:
                        continue  # evicted while listed
                    yield Content(kind, Digest(alg.name, f.name), st.st_size, st.st_mtime)


class FileContent:
    """Content files of one kind: their paths, listing, checks, removal, quarantine.

    Owns only files that are already in place; writing them is the stores' part.
    """

    kind = BLOB

    def __init__(self, root: Path) -> None:
        self.root = root
        self.tmp = root / "tmp"

    def path_of(self, digest: Digest) -> Path:
        return content_path(self.root, self.kind, str(digest))

    def contents(self) -> Iterator[Content]:
        return contents_of(self.root, self.kind)

    def size(self, digest: Digest) -> int | None:
        try:
            return self.path_of(digest).stat().st_size
        except OSError:
            return None

    def check(self, digest: Digest) -> bool | None:
        try:
            with open(self.path_of(digest), "rb") as f:
                return self._intact(f, digest)
        except FileNotFoundError:
            return None

    def _intact(self, f: BinaryIO, digest: Digest) -> bool:
        hasher = digest.hasher()
        while chunk := f.read(HASH_CHUNK):
            hasher.update(chunk)
        return hasher.hexdigest() == digest.hex

    def delete(self, digest: Digest) -> bool:
        try:
            self.path_of(digest).unlink()
        except FileNotFoundError:
            return False
        return True

    def quarantine(self, digest: Digest) -> str:
        """Move the file to ``<root>/quarantine/<kind>-<alg>-<hex>`` (if it is there)."""
        target = self.root / "quarantine" / f"{self.kind}-{digest.algorithm}-{digest.hex}"
        target.parent.mkdir(exist_ok=True)
        with contextlib.suppress(FileNotFoundError):
            os.replace(self.path_of(digest), target)
        return str(target)


class StagedFile:
    """A verified, fsynced temp file waiting to be published at its content path."""

    def __init__(self, tmp: Path, final: Path, size: int) -> None:
        self.tmp, self.final, self.size = tmp, final, size

    def publish(self) -> None:
        publish(self.tmp, self.final)

    def discard(self) -> None:
        self.tmp.unlink(missing_ok=True)


def stage_file(tmp_dir: Path, final: Path, digest: Digest, chunks: Iterable[bytes]) -> StagedFile:
    """Write ``chunks`` to a temp file while hashing them; keep it only if it is ``digest``.

    Raises:
        DigestMismatch: the bytes are not ``digest`` (the temp file is removed, as it
            is on any error ``chunks`` raises).
    """
    tmp = tmp_dir / temp_name(digest.hex)
    hasher = digest.hasher()
    size = 0
    try:
        with open(tmp, "xb") as out:
            for chunk in chunks:
                hasher.update(chunk)
                out.write(chunk)
                size += len(chunk)
            if hasher.hexdigest() != digest.hex:
                actual = f"{digest.algorithm}:{hasher.hexdigest()}"
                raise DigestMismatch(f"expected {digest}, got {actual}")
            out.flush()
            os.fsync(out.fileno())
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    return StagedFile(tmp, final, size)
