"""Test data in the upstream registry: big random blobs, many small ones, an image.

Big blobs are never held in memory: random bytes are generated chunk by chunk,
hashed as they go and streamed into one PATCH of a Registry V2 upload session, and
the upload is closed with ``PUT ?digest=``. Small blobs are pushed concurrently.
Images come from the e2e image builder (``tests/support/images.py``).
"""

from __future__ import annotations

import asyncio
import hashlib
import os
import urllib.parse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import aiohttp

from tests.support import images
from tests.support.images import request

MiB = 1024 * 1024
GEN_CHUNK = 8 * MiB


@dataclass(frozen=True, slots=True)
class Blob:
    """A blob in the upstream: where it is, and which file holds it there."""

    repo: str
    digest: str
    size: int
    path: Path  # the upstream registry's data file (nginx serves it)

    def v2_path(self) -> str:
        """``/v2/<repo>/blobs/<digest>``."""
        return f"/v2/{self.repo}/blobs/{self.digest}"


def storage_path(storage: Path, digest: str) -> Path:
    """Where docker-registry's filesystem driver keeps a blob's bytes."""
    hexpart = digest.split(":", 1)[1]
    return storage / "docker/registry/v2/blobs/sha256" / hexpart[:2] / hexpart / "data"


def _upload_url(base: str, repo: str) -> str:
    resp = request("POST", f"{base}/v2/{repo}/blobs/uploads/")
    location = resp.headers.get("location")
    if not location:
        raise RuntimeError(f"registry gave no upload Location for {repo}")
    return urllib.parse.urljoin(base + "/", location)


def _with_digest(url: str, digest: str) -> str:
    sep = "&" if "?" in url else "?"
    return f"{url}{sep}digest={urllib.parse.quote(digest, safe=':')}"


def push_random_blob(base: str, storage: Path, repo: str, size: int) -> Blob:
    """Stream ``size`` fresh random bytes into the registry as one blob.

    Args:
        base: the registry's base URL.
        storage: its storage root, to locate the stored file.
        repo: repository to push into.
        size: bytes.

    Returns:
        The blob, once the registry has committed it.
    """
    hasher = hashlib.sha256()

    def chunks() -> Iterator[bytes]:
        left = size
        while left:
            data = os.urandom(min(GEN_CHUNK, left))
            hasher.update(data)
            left -= len(data)
            yield data

    url = _upload_url(base, repo)
    resp = request(
        "PATCH",
        url,
        data=chunks(),  # type: ignore[arg-type]  # urllib streams an iterable body
        headers={"Content-Type": "application/octet-stream", "Content-Length": str(size)},
        timeout=300,
    )
    location = resp.headers.get("location") or url
    digest = "sha256:" + hasher.hexdigest()
    request("PUT", _with_digest(urllib.parse.urljoin(base + "/", location), digest))
    return Blob(repo, digest, size, storage_path(storage, digest))


async def _push_small(
    session: aiohttp.ClientSession, base: str, repo: str, data: bytes, sem: asyncio.Semaphore
) -> str:
    digest = "sha256:" + hashlib.sha256(data).hexdigest()
    async with sem:
        async with session.post(f"{base}/v2/{repo}/blobs/uploads/") as resp:
            resp.raise_for_status()
            location = urllib.parse.urljoin(base + "/", resp.headers["Location"])
        async with session.put(
            _with_digest(location, digest),
            data=data,
            headers={"Content-Type": "application/octet-stream"},
        ) as resp:
            resp.raise_for_status()
    return digest


async def _push_many(base: str, repo: str, payloads: Sequence[bytes]) -> list[str]:
    sem = asyncio.Semaphore(16)
    async with aiohttp.ClientSession() as session:
        return await asyncio.gather(*(_push_small(session, base, repo, p, sem) for p in payloads))


def push_small_blobs(base: str, storage: Path, repo: str, count: int, size: int) -> list[Blob]:
    """Push ``count`` distinct random blobs of ``size`` bytes, 16 uploads at a time."""
    payloads = [os.urandom(size) for _ in range(count)]
    digests = asyncio.run(_push_many(base, repo, payloads))
    return [Blob(repo, d, size, storage_path(storage, d)) for d in digests]


@dataclass(frozen=True, slots=True)
class PushedImage:
    """An image in the upstream under ``repo:tag``."""

    repo: str
    tag: str
    image: images.Image

    @property
    def manifest_path(self) -> str:
        """``/v2/<repo>/manifests/<tag>``."""
        return f"/v2/{self.repo}/manifests/{self.tag}"


def push_image(
    base: str, repo: str, tag: str, layer_sizes: Sequence[int], seed: int
) -> PushedImage:
    """Build a single-platform image with random gzip layers and push it."""
    image = images.build_image(layer_sizes, seed=seed)
    images.push(base, repo, tag, image, timeout=120)
    return PushedImage(repo, tag, image)
