"""``mirrorproxy preload``: fill the cache with a list of images before they are needed.

Each image is resolved through the configured namespaces exactly as a containerd
pull through the mirror would be (same Accept header, so the tag records answer
containerd later), then the chosen platforms' manifests, configs and layers are
fetched into the cache. Images run in parallel; what is cached is skipped.
"""

from __future__ import annotations

import asyncio
import json
import platform as host
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from mirrorproxy.blobfill import FillFailed
from mirrorproxy.engine import Engine
from mirrorproxy.errors import BadGateway, GatewayTimeout, RegistryError, Unavailable
from mirrorproxy.namespaces import resolve
from mirrorproxy.oci import CONTAINERD_ACCEPT, Digest, parse_digest
from mirrorproxy.pullthrough import Target
from mirrorproxy.reference import ImageRef

ATTEMPTS = 3
TRANSIENT = (
    Unavailable,
    BadGateway,
    GatewayTimeout,
    FillFailed,
    aiohttp.ClientError,
    TimeoutError,
)
_ARCH = {
    "x86_64": "amd64",
    "aarch64": "arm64",
    "armv7l": "arm",
    "ppc64le": "ppc64le",
    "s390x": "s390x",
}


def host_platform() -> str:
    machine = host.machine().lower()
    return f"linux/{_ARCH.get(machine, machine)}"


class PreloadError(Exception):
    """An image could not be preloaded; the message names why."""


@dataclass
class ImageState:
    ref: ImageRef
    state: str = "queued"  # queued, resolving, fetching, done, failed
    total: int = 0  # bytes the image needs
    cached: int = 0  # bytes that were already in the cache
    fetched: int = 0  # bytes fetched by this run
    error: str = ""
    started: float = field(default_factory=time.monotonic)


class Reporter(Protocol):
    def update(self, image: ImageState) -> None: ...

    def tick(self, images: Sequence[ImageState]) -> None: ...


@dataclass(frozen=True, slots=True)
class Options:
    platforms: tuple[str, ...] = ()  # empty: the host's platform
    all_platforms: bool = False
    jobs: int = 4


async def preload(
    engine: Engine, images: Sequence[ImageState], options: Options, reporter: Reporter
) -> None:
    """Fetch every image into the cache; each ImageState ends done or failed."""
    gate = asyncio.Semaphore(max(1, options.jobs))

    async def one(image: ImageState) -> None:
        async with gate:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await _load(engine, image, options, reporter)
                    image.state = "done"
                    break
                except TRANSIENT as err:
                    image.error = _describe(err)
                    if attempt == ATTEMPTS:
                        image.state = "failed"
                    else:
                        await asyncio.sleep(0.5 * 2**attempt)
                except (PreloadError, RegistryError, ValueError) as err:
                    image.error = _describe(err)
                    image.state = "failed"
                    break
            reporter.update(image)

    async def ticker() -> None:
        while True:
            reporter.tick(images)
            await asyncio.sleep(0.5)

    ticking = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(one(image) for image in images))
    finally:
        ticking.cancel()
        reporter.tick(images)


async def _load(engine: Engine, image: ImageState, options: Options, reporter: Reporter) -> None:
    pt = engine.pullthrough
    ref = image.ref
    image.state, image.total, image.cached, image.fetched = "resolving", 0, 0, 0
    reporter.update(image)
    ns, ns_name = resolve(engine.config, ref.registry)
    target = Target(ns=ns, ns_name=ns_name, repo=ref.repository)
    top = (await pt.manifest(target, ref.reference, CONTAINERD_ACCEPT)).manifest
    if ref.digest is not None and top.digest != ref.digest:
        raise PreloadError(f"resolved to {top.digest}, not the pinned {ref.digest}")
    doc = _json(top.body)
    manifests = [doc]
    if isinstance(doc.get("manifests"), list):
        children = _choose(doc["manifests"], options)
        if not children:
            raise PreloadError(f"no manifest for {', '.join(_wanted(options))} in its index")
        manifests = []
        for child in children:
            answer = await pt.manifest(
                target, parse_digest(str(child["digest"])), CONTAINERD_ACCEPT
            )
            manifests.append(_json(answer.manifest.body))
    blobs: dict[Digest, int] = {}
    for m in manifests:
        for desc in [m.get("config"), *(m.get("layers") or [])]:
            if isinstance(desc, dict) and "digest" in desc:
                blobs[parse_digest(str(desc["digest"]))] = int(desc.get("size") or 0)
    image.total = sum(blobs.values())
    image.state = "fetching"
    reporter.update(image)
    for digest, size in blobs.items():
        await _fetch_blob(engine, target, digest, size, image)


async def _fetch_blob(
    engine: Engine, target: Target, digest: Digest, size: int, image: ImageState
) -> None:
    answer = await engine.pullthrough.blob(target, digest)
    if answer.info is not None:
        image.cached += size
        return
    fill = answer.fill
    if fill is None:  # pragma: no cover - BlobAnswer holds one of the two
        raise PreloadError(f"blob {digest}: nothing to fetch")
    if not fill.caching:
        resp = fill.claim_direct()
        if resp is not None:
            resp.release()
        raise PreloadError(f"blob {digest} cannot be cached (max_size too small, or disk full)")
    before = image.fetched
    while not fill.task.done():
        image.fetched = before + fill.written
        await asyncio.wait({fill.task}, timeout=0.25)
    if fill.result is None:
        raise FillFailed(f"blob {digest}: {fill.error or 'download failed'}")
    image.fetched = before + fill.result.size


def _choose(children: list[Any], options: Options) -> list[dict[str, Any]]:
    """The index entries for the wanted platforms (all of them with --all-platforms)."""
    wanted = _wanted(options)
    out = []
    for child in children:
        if not isinstance(child, dict) or "digest" not in child:
            continue
        p = child.get("platform") or {}
        name = f"{p.get('os', '')}/{p.get('architecture', '')}"
        full = f"{name}/{p['variant']}" if p.get("variant") else name
        if options.all_platforms or name in wanted or full in wanted:
            out.append(child)
    return out


def _wanted(options: Options) -> tuple[str, ...]:
    return options.platforms or (host_platform(),)


def _json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except ValueError:
        raise PreloadError("manifest is not JSON") from None
    if not isinstance(doc, dict):
        raise PreloadError("manifest is not a JSON object")
    return doc


def _describe(err: BaseException) -> str:
    if isinstance(err, RegistryError):
        return err.message
    return str(err) or type(err).__name__
