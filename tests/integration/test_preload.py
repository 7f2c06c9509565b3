"""`mirrorproxy preload` against in-process fake upstreams.

The CLI runs its own event loop, so tests call it in a worker thread while the
fake registries keep serving on the test's loop.

Checks what lands in the cache (chosen platforms only, or all), that cached bytes
are skipped on a second run, that failures are named with exit 1, that transient
upstream errors are retried, and that a preloaded cache answers an offline mirror.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from mirrorproxy.cli import main
from mirrorproxy.commands.prefetch import ImageState, Options, preload
from mirrorproxy.commands.progress import LineReporter
from mirrorproxy.config import Config
from mirrorproxy.core.oci import OCI_INDEX, OCI_MANIFEST
from mirrorproxy.core.reference import parse_image_reference
from mirrorproxy.core.units import format_size
from mirrorproxy.http.errors import Handler
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.engine import Engine
from tests.fakes.registry import FakeRegistry, payload, sha256
from tests.support.mirror import FakeFactory, mirror_config


@pytest.fixture(autouse=True)
def _root_logging_restored() -> Iterator[None]:
    """preload configures logging onto this test's captured stderr: undo that after."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)


def _write_config(cfg_dir: Path, url: str, *, offline: bool = False) -> Path:
    path = cfg_dir / "mirror.toml"
    path.write_text(
        f'[cache]\ndir = "{cfg_dir / "cache"}"\noffline = {str(offline).lower()}\n'
        f'[defaults]\ncooldown = "0.05s"\nmax_cooldown = "0.1s"\n'
        f'[namespaces."docker.io"]\nupstreams = ["{url}"]\n'
        f'[namespaces."registry.k8s.io"]\nupstreams = ["{url}"]\n'
    )
    return path


def _blob_gets(reg: FakeRegistry) -> list[str]:
    return [r.path.rsplit("/", 1)[1] for r in reg.calls("GET", "blobs")]


async def test_preload_fetches_host_platform_then_skips_what_is_cached(
    start_fake: FakeFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = await start_fake()
    app = fake.registry.add_image("library/app", "1", layer_sizes=(50_000, 7_000))
    amd = fake.registry.add_image("pause", "amd", seed="amd", layer_sizes=(3000,))
    arm = fake.registry.add_image("pause", "arm", seed="arm", layer_sizes=(4000,))
    fake.registry.add_index("pause", "3.9", [amd, arm])
    images = tmp_path / "images.txt"
    images.write_text("# node images\napp:1\n\nregistry.k8s.io/pause:3.9  # the index\n")
    config = _write_config(tmp_path, fake.url)

    args = ["preload", "--config", str(config), str(images), "--platform", "linux/amd64"]
    assert await asyncio.to_thread(main, args) == 0
    out = capsys.readouterr().out
    assert "preloaded 2 of 2 images" in out
    got = set(_blob_gets(fake.registry))
    want = {app.config_digest, *app.layer_digests, amd.config_digest, *amd.layer_digests}
    assert got == want  # arm64 left alone

    fake.registry.clear_log()
    assert await asyncio.to_thread(main, args) == 0
    assert _blob_gets(fake.registry) == []  # everything was cached
    out = capsys.readouterr().out
    assert "from upstream: 0 blobs (0B), 0 manifests" in out
    assert "already cached: 5 blobs" in out


async def test_all_platforms_and_named_failures(
    start_fake: FakeFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = await start_fake()
    amd = fake.registry.add_image("pause", "amd", seed="amd")
    arm = fake.registry.add_image("pause", "arm", seed="arm")
    fake.registry.add_index("pause", "3.9", [amd, arm])
    images = tmp_path / "images.txt"
    images.write_text("registry.k8s.io/pause:3.9\nmissing:1\nquay.io/not/configured:1\n")
    config = _write_config(tmp_path, fake.url)
    assert (
        await asyncio.to_thread(
            main, ["preload", "-c", str(config), str(images), "--all-platforms"]
        )
        == 1
    )
    captured = capsys.readouterr()
    assert "preloaded 1 of 3 images" in captured.out
    assert "failed: docker.io/library/missing:1: manifest library/missing:1 not found" in (
        captured.err
    )
    assert "failed: quay.io/not/configured:1: registry 'quay.io' is not configured" in (
        captured.err
    )
    assert set(_blob_gets(fake.registry)) == {
        amd.config_digest,
        *amd.layer_digests,
        arm.config_digest,
        *arm.layer_digests,
    }


async def test_every_bad_line_is_reported_and_keep_going_fetches_the_good_ones(
    start_fake: FakeFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    fake = await start_fake()
    app = fake.registry.add_image("library/app", "1", layer_sizes=(3000,))
    images = tmp_path / "images.txt"
    images.write_text("app:1\nNot A Reference!\n# fine\nbad::tag\n\nalso bad@sha256:12\n")
    config = _write_config(tmp_path, fake.url)
    args = ["preload", "-c", str(config), str(images)]

    assert await asyncio.to_thread(main, args) == 2
    err = capsys.readouterr().err.splitlines()
    assert [line.split(": ", 2)[1] for line in err[:3]] == [
        f"{images}:2",
        f"{images}:4",
        f"{images}:6",
    ]
    assert err[3] == (
        "mirrorproxy: 3 bad lines, nothing done "
        "(fix them, or --keep-going to go on with the good ones)"
    )
    assert len(err) == 4
    assert fake.registry.calls() == []  # nothing fetched

    assert await asyncio.to_thread(main, [*args, "--keep-going"]) == 1
    out, err2 = capsys.readouterr()
    assert err2.count("\n") == 3  # the same three lines, nothing else
    assert "preloaded 1 of 1 images" in out
    assert set(_blob_gets(fake.registry)) == {app.config_digest, *app.layer_digests}


async def test_transient_errors_are_retried(start_fake: FakeFactory, tmp_path: Path) -> None:
    fake = await start_fake()
    img = fake.registry.add_image("library/app", "1")
    fake.registry.faults.status = 503  # every request fails at first
    config: Config = mirror_config(tmp_path / "cache", [fake.url], cooldown="0.05s")
    state = ImageState(parse_image_reference("app:1"))

    async def heal() -> None:
        fake.registry.faults.clear()

    async with Engine(config, Metrics()) as engine:
        loop = asyncio.get_running_loop()
        loop.call_later(0.3, lambda: loop.create_task(heal()))
        async with asyncio.timeout(20):
            await preload(engine, [state], Options(), LineReporter(io.StringIO()))
    assert state.state == "done", state.error
    assert state.fetched == len(img.config) + sum(len(x) for x in img.layers)


@pytest.mark.parametrize("jobs", [1, 3])
async def test_jobs_bounds_how_many_images_load_at_once(
    jobs: int, start_fake: FakeFactory, tmp_path: Path
) -> None:
    """--jobs N: never more than N images in flight upstream (and N really run at once)."""
    registry = FakeRegistry()
    in_flight, peak = 0, 0

    @web.middleware
    async def count(request: web.Request, handler: Handler) -> web.StreamResponse:
        nonlocal in_flight, peak
        in_flight += 1
        peak = max(peak, in_flight)
        try:
            await asyncio.sleep(0.05)  # long enough for parallel images to overlap
            return await handler(request)
        finally:
            in_flight -= 1

    registry.app.middlewares.append(count)
    fake = await start_fake(registry)
    for i in range(4):
        fake.registry.add_image(f"library/app{i}", "1", seed=f"app{i}", layer_sizes=(1000,))
    images = tmp_path / "images.txt"
    images.write_text("".join(f"app{i}:1\n" for i in range(4)))
    config = _write_config(tmp_path, fake.url)
    args = ["preload", "-c", str(config), str(images), "--jobs", str(jobs)]
    assert await asyncio.to_thread(main, args) == 0
    assert peak == jobs


def _manifest(reg: FakeRegistry, repo: str, tag: str, blobs: list[bytes]) -> tuple[str, bytes]:
    """Push an OCI image whose first blob is its config and the rest its layers."""
    for blob in blobs:
        reg.add_blob(blob)

    def desc(media_type: str, data: bytes) -> dict[str, object]:
        return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}

    body = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "config": desc("application/vnd.oci.image.config.v1+json", blobs[0]),
            "layers": [desc("application/vnd.oci.image.layer.v1.tar", b) for b in blobs[1:]],
        }
    ).encode()
    return reg.add_manifest(repo, tag, OCI_MANIFEST, body), body


async def test_reported_numbers_equal_what_the_upstream_served(
    start_fake: FakeFactory, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Shared base layers fetched while several images wait on them count once."""
    reg = FakeRegistry()
    reg.faults.chunk_size, reg.faults.chunk_delay = 8192, 0.005  # images overlap in flight
    fake = await start_fake(reg)
    bases = [payload(60_000, f"base{i}") for i in range(3)]
    refs = []
    for i in range(12):
        own = [payload(300 + i, f"config{i}"), bases[i % 3], payload(9_000 + i, f"own{i}")]
        _manifest(reg, f"library/app{i}", "1", own)
        refs.append(f"app{i}:1")
    for i in range(2):  # indexes: amd64 (wanted), arm64 and an attestation (left out)
        children = []
        for arch in ("amd64", "arm64", "unknown"):
            blobs = [payload(200, f"ic{i}{arch}"), bases[0], payload(5_000, f"il{i}{arch}")]
            digest, body = _manifest(reg, "library/multi", f"{i}-{arch}", blobs)
            entry: dict[str, Any] = {"mediaType": OCI_MANIFEST, "digest": digest}
            entry["size"] = len(body)
            entry["platform"] = {"os": "unknown" if arch == "unknown" else "linux"}
            entry["platform"]["architecture"] = arch
            if arch == "unknown":
                entry["annotations"] = {"vnd.docker.reference.type": "attestation-manifest"}
            children.append(entry)
        index = {"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": children}
        reg.add_manifest("library/multi", f"v{i}", OCI_INDEX, json.dumps(index).encode())
        refs.append(f"multi:v{i}")
    images = tmp_path / "images.txt"
    images.write_text("\n".join(refs) + "\n")
    config = _write_config(tmp_path, fake.url)
    args = ["preload", "-c", str(config), str(images), "--platform", "linux/amd64"]

    assert await asyncio.to_thread(main, [*args, "--jobs", "8"]) == 0
    out = capsys.readouterr().out
    gets = _blob_gets(reg)
    assert len(gets) == len(set(gets)) == 3 + 12 * 2 + 2 * 2  # every blob once
    manifest_gets = len(reg.calls("GET", "manifests"))
    assert manifest_gets == 12 + 2 * 2
    assert (
        f"from upstream: {len(gets)} blobs ({format_size(reg.blob_bytes_sent)}), "
        f"{manifest_gets} manifests\n"
    ) in out
    assert "already cached: 0 blobs (0B)\n" in out
    assert "preloaded 14 of 14 images\n" in out
    assert (
        "left out 2 platform manifests (linux/arm64 x2): not among the platforms asked for "
        "(linux/amd64); --all-platforms fetches every one\n"
    ) in out
    assert "left out 2 platform manifests (unknown/unknown x2): attestation manifests" in out
    assert "fetched for another image" in out  # the shared bases, seen from the waiters

    sent = reg.blob_bytes_sent
    reg.clear_log()
    assert await asyncio.to_thread(main, args) == 0
    out = capsys.readouterr().out
    assert _blob_gets(reg) == []
    assert "from upstream: 0 blobs (0B), 0 manifests\n" in out
    assert f"already cached: {len(gets)} blobs ({format_size(sent)})\n" in out
