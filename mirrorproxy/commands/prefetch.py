"""The work of ``mirrorproxy preload``: fill the cache with images before they are needed.

Each image is resolved through the configured namespaces exactly as a containerd
pull through the mirror would be (same Accept header, so the tag records answer
containerd later), then the chosen platforms' manifests, configs and layers are
fetched into the cache. Images run in parallel; what is cached is skipped. The
verb itself (flags, display, report, exit code) is ``commands.preload``.

Over 300 lines: the walk of one image (index, platforms, blobs, referrers) and the
once-only counting of what a run fetched read best together.
"""

from __future__ import annotations

import asyncio
import json
import platform as host
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import aiohttp

from mirrorproxy.core.errors import (
    BadGateway,
    GatewayTimeout,
    ManifestUnknown,
    NotFound,
    RegistryError,
    Unavailable,
)
from mirrorproxy.core.namespaces import resolve
from mirrorproxy.core.oci import CONTAINERD_ACCEPT, Digest, parse_digest
from mirrorproxy.core.reference import ImageRef
from mirrorproxy.pullthrough.answers import HIT, MISS, ManifestAnswer, Target
from mirrorproxy.pullthrough.engine import Engine
from mirrorproxy.pullthrough.source import BlobFailed, NotCacheable

ATTEMPTS = 3
TRANSIENT = (
    Unavailable,
    BadGateway,
    GatewayTimeout,
    BlobFailed,
    aiohttp.ClientError,
    TimeoutError,
)
# Build attestations sit in an index as platform "unknown/unknown" children.
REFERENCE_TYPE = "vnd.docker.reference.type"
ATTESTATION = "attestation-manifest"
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
    """One image of a run and how far it got, for the display and the report.

    It owns the image's state and byte counts; ``preload`` updates it, the reporters
    only read it and must not change it.
    """

    ref: ImageRef
    state: str = "queued"  # queued, resolving, fetching, done, failed
    total: int = 0  # bytes the image needs
    cached: int = 0  # bytes that were already in the cache
    fetched: int = 0  # bytes this image brought from upstream
    shared: int = 0  # bytes another image of this run was fetching at the same time
    error: str = ""
    started: float = field(default_factory=time.monotonic)


@dataclass
class Totals:
    """The run's own numbers: every blob and manifest counted once, whoever needed it.

    Only ``preload`` writes it (the underscored sets are its bookkeeping); reporters
    and the report read the public counts.
    """

    blobs_fetched: int = 0  # from upstream
    bytes_fetched: int = 0
    blobs_cached: int = 0  # already in the cache before this run needed them
    bytes_cached: int = 0
    manifests_fetched: int = 0  # from upstream
    referrers: int = 0  # manifests found referring to the images (signatures, SBOMs)
    # (os/arch, why) -> platform manifests of indexes that were not fetched
    left_out: Counter[tuple[str, str]] = field(default_factory=Counter)
    _blobs: dict[Digest, str] = field(default_factory=dict)  # counted as: fetching/fetched/cached
    _manifests: set[Digest] = field(default_factory=set)
    _indexes: set[Digest] = field(default_factory=set)


class Reporter(Protocol):
    """Shows a run's progress; it must not change the states it is shown."""

    def update(self, image: ImageState) -> None: ...

    def tick(self, images: Sequence[ImageState], totals: Totals) -> None: ...


@dataclass(frozen=True, slots=True)
class Options:
    """How a run fetches (platforms, parallel images, referrers); set once by the verb."""

    platforms: tuple[str, ...] = ()  # empty: the host's platform
    all_platforms: bool = False
    jobs: int = 4
    tick: float = 0.5  # seconds between progress updates
    referrers: bool = True  # also fetch what refers to each manifest (signatures, SBOMs)


async def preload(
    engine: Engine,
    images: Sequence[ImageState],
    options: Options,
    reporter: Reporter,
    totals: Totals | None = None,
) -> Totals:
    """Fetch every image into the cache; each ImageState ends done or failed.

    Returns:
        What the run fetched, found cached and left out, each item counted once.
    """
    totals = totals if totals is not None else Totals()
    gate = asyncio.Semaphore(max(1, options.jobs))

    async def one(image: ImageState) -> None:
        async with gate:
            for attempt in range(1, ATTEMPTS + 1):
                try:
                    await _load(engine, image, options, reporter, totals)
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
            reporter.tick(images, totals)
            await asyncio.sleep(options.tick)

    ticking = asyncio.create_task(ticker())
    try:
        await asyncio.gather(*(one(image) for image in images))
    finally:
        ticking.cancel()
        reporter.tick(images, totals)
    return totals


async def _load(
    engine: Engine, image: ImageState, options: Options, reporter: Reporter, totals: Totals
) -> None:
    pt = engine.pullthrough
    ref = image.ref
    image.state, image.total, image.cached, image.fetched, image.shared = "resolving", 0, 0, 0, 0
    reporter.update(image)
    ns, ns_name = resolve(engine.config, ref.registry)
    target = Target(ns=ns, ns_name=ns_name, repo=ref.repository)
    answer = await pt.manifest(target, ref.reference, CONTAINERD_ACCEPT)
    _count_manifest(totals, answer)
    top = answer.manifest
    if ref.digest is not None and top.digest != ref.digest:
        raise PreloadError(f"resolved to {top.digest}, not the pinned {ref.digest}")
    doc = _json(top.body)
    manifests = [doc]
    chosen: list[Digest] = []  # the platform manifests fetched from an index
    if isinstance(doc.get("manifests"), list):
        children, left_out = _choose(doc["manifests"], options)
        if top.digest not in totals._indexes:
            totals._indexes.add(top.digest)
            totals.left_out.update(left_out)
        if not children:
            raise PreloadError(f"no manifest for {', '.join(_wanted(options))} in its index")
        manifests = []
        for child in children:
            chosen.append(parse_digest(str(child["digest"])))
            answer = await pt.manifest(target, chosen[-1], CONTAINERD_ACCEPT)
            _count_manifest(totals, answer)
            manifests.append(_json(answer.manifest.body))
    blobs = _blobs_of(manifests)
    image.total = sum(blobs.values())
    image.state = "fetching"
    reporter.update(image)
    for digest, size in blobs.items():
        await _fetch_blob(engine, target, digest, size, image, totals)
    if options.referrers:
        for subject in [top.digest, *chosen]:
            await _load_referrers(engine, target, subject, image, totals)


def _blobs_of(manifests: list[dict[str, Any]]) -> dict[Digest, int]:
    """The config and layers of image manifests, with their sizes."""
    blobs: dict[Digest, int] = {}
    for m in manifests:
        for desc in [m.get("config"), *(m.get("layers") or [])]:
            if isinstance(desc, dict) and "digest" in desc:
                blobs[parse_digest(str(desc["digest"]))] = int(desc.get("size") or 0)
    return blobs


async def _load_referrers(
    engine: Engine, target: Target, subject: Digest, image: ImageState, totals: Totals
) -> None:
    """Fetch what refers to ``subject`` (signatures, SBOMs), so it travels with the
    image: through the referrers API, else the ``<alg>-<hex>`` fallback tag."""
    pt = engine.pullthrough
    try:
        listing = await pt.referrers(target, subject)
    except NotFound:  # no upstream offers the API: the tag scheme of distribution-spec 1.1
        try:
            listing = await pt.manifest(
                target, f"{subject.algorithm}-{subject.hex}", CONTAINERD_ACCEPT
            )
        except ManifestUnknown:
            return
        _count_manifest(totals, listing)
    descriptors = _json(listing.manifest.body).get("manifests")
    for desc in descriptors if isinstance(descriptors, list) else []:
        if not isinstance(desc, dict) or "digest" not in desc:
            continue
        answer = await pt.manifest(target, parse_digest(str(desc["digest"])), CONTAINERD_ACCEPT)
        _count_manifest(totals, answer)
        totals.referrers += 1
        for digest, size in _blobs_of([_json(answer.manifest.body)]).items():
            await _fetch_blob(engine, target, digest, size, image, totals)


def _count_manifest(totals: Totals, answer: ManifestAnswer) -> None:
    digest = answer.manifest.digest
    if answer.result == MISS and digest not in totals._manifests:
        totals._manifests.add(digest)
        totals.manifests_fetched += 1


async def _fetch_blob(
    engine: Engine, target: Target, digest: Digest, size: int, image: ImageState, totals: Totals
) -> None:
    """Fetch one blob, counting it once in ``totals`` (shared fills are not counted twice)."""
    source = await engine.pullthrough.blob(target, digest)
    seen = totals._blobs.get(digest)
    if source.result == HIT:
        if seen is None:
            totals._blobs[digest] = "cached"
            totals.blobs_cached += 1
            totals.bytes_cached += await source.cached(lambda _: None)
        if seen in (None, "cached"):
            image.cached += size
        else:
            image.shared += size  # fetched by another image of this run
        return
    mine = seen is None  # the first image to need it counts it; the others share it
    if mine:
        totals._blobs[digest] = "fetching"
    before = image.fetched if mine else image.shared
    try:
        fetched = await source.cached(lambda n: _progress(image, mine, before + n))
    except NotCacheable:
        if mine:
            del totals._blobs[digest]
        raise PreloadError(
            f"blob {digest} cannot be cached (max_size too small, or disk full)"
        ) from None
    except BaseException:
        if mine:
            del totals._blobs[digest]
        _progress(image, mine, before)
        raise
    _progress(image, mine, before + fetched)
    if mine:
        totals._blobs[digest] = "fetched"
        totals.blobs_fetched += 1
        totals.bytes_fetched += fetched


def _progress(image: ImageState, mine: bool, value: int) -> None:
    if mine:
        image.fetched = value
    else:
        image.shared = value


def _choose(
    children: list[Any], options: Options
) -> tuple[list[dict[str, Any]], Counter[tuple[str, str]]]:
    """The index entries for the wanted platforms, and (platform, why) of the others."""
    wanted = _wanted(options)
    out = []
    left_out: Counter[tuple[str, str]] = Counter()
    for child in children:
        if not isinstance(child, dict) or "digest" not in child:
            continue
        p = child.get("platform") or {}
        name = f"{p.get('os', '')}/{p.get('architecture', '')}"
        full = f"{name}/{p['variant']}" if p.get("variant") else name
        if options.all_platforms or name in wanted or full in wanted:
            out.append(child)
        elif (child.get("annotations") or {}).get(REFERENCE_TYPE) == ATTESTATION:
            left_out[(full, "attestation manifests, not images")] += 1
        else:
            why = f"not among the platforms asked for ({', '.join(wanted)})"
            left_out[(full, f"{why}; --all-platforms fetches every one")] += 1
    return out, left_out


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
