"""Bundles past any single-file limit: export pages the tags, import takes every one.

Cache A is filled by preload from a FakeRegistry (a single-platform image and a
two-platform index of which amd64 is fetched), then given tens of thousands of tag
records in bulk, as a real site accumulates them. Its export must keep every index
document under the limit import enforces, stay a valid OCI layout (the pages are
nested OCI indexes), and import into an empty cache B with every tag recorded.
"""

from __future__ import annotations

import asyncio
import io
import json
import tarfile
import time
from pathlib import Path

import pytest

from mirrorproxy.bundle import CONTAINERD_KEY, MAX_INDEX_SIZE, PAGE, PAGE_ENTRIES
from mirrorproxy.bundle.export import export_bundle
from mirrorproxy.bundle.importer import import_bundle
from mirrorproxy.cache import TagEntry
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.cli import main
from mirrorproxy.commands.prefetch import ImageState, Options, preload
from mirrorproxy.commands.progress import LineReporter
from mirrorproxy.config import Config
from mirrorproxy.core.oci import OCI_INDEX, OCI_MANIFEST, parse_digest
from mirrorproxy.core.reference import parse_image_reference
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.engine import Engine
from tests.fakes.registry import Image
from tests.support.mirror import FakeFactory, mirror_config

TAGS = 60_000  # ~21 MB as one index.json: past the 16 MiB import reads of one file
REPO = "library/app"
K8S = "registry.k8s.io"


class SiteA:
    def __init__(self, config: Config, app: Image, index_digest: str) -> None:
        self.config, self.app, self.index_digest = config, app, index_digest


@pytest.fixture
async def site_a(start_fake: FakeFactory, tmp_path: Path) -> SiteA:
    fake = await start_fake()
    app = fake.registry.add_image(REPO, "1", layer_sizes=(20_000, 3000))
    amd = fake.registry.add_image("pause", "amd", seed="amd", layer_sizes=(3000,))
    arm = fake.registry.add_image("pause", "arm", seed="arm", layer_sizes=(4000,))
    index_digest, _ = fake.registry.add_index("pause", "3.9", [amd, arm])
    config = mirror_config(
        tmp_path / "a", [], namespaces={"docker.io": [fake.url], K8S: [fake.url]}
    )
    refs = ("app:1", f"{K8S}/pause:3.9")
    images = [ImageState(parse_image_reference(r)) for r in refs]
    async with Engine(config, Metrics()) as engine:
        await preload(engine, images, Options(("linux/amd64",)), LineReporter(io.StringIO()))
    assert [i.state for i in images] == ["done", "done"]
    return SiteA(config, app, index_digest)


def _add_tags(config: Config, n: int, app: Image) -> None:
    """``n`` more tags of the app, written straight into the cache's tag records."""
    now = time.time()
    entry = TagEntry(parse_digest(app.digest), OCI_MANIFEST, len(app.manifest), now)
    store = FileManifestStore(config.cache.dir)
    tags = [
        (("docker.io", REPO, f"release-{i:06d}-linux"), CONTAINERD_KEY, entry) for i in range(n)
    ]
    assert store.put_tags(tags) == n


def _index_docs(bundle: Path) -> tuple[dict[str, object], dict[str, bytes]]:
    """index.json and every member that is an OCI index (pages and image indexes)."""
    with tarfile.open(bundle) as tar:
        index = json.loads(tar.extractfile("index.json").read())  # type: ignore[union-attr]
        docs = {}
        for m in tar.getmembers():
            if m.isreg() and m.name.startswith("blobs/") and m.size < MAX_INDEX_SIZE:
                data = tar.extractfile(m).read()  # type: ignore[union-attr]
                if data.startswith(b"{") and OCI_INDEX.encode() in data[:100]:
                    docs[m.name] = data
    return index, docs


async def test_export_pages_tags_past_the_file_limit_and_import_takes_them_all(
    site_a: SiteA, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await asyncio.to_thread(_add_tags, site_a.config, TAGS, site_a.app)
    bundle = tmp_path / "site.tar"
    config_a = tmp_path / "a.toml"
    config_a.write_text(
        f'[cache]\ndir = "{site_a.config.cache.dir}"\n'
        '[namespaces."docker.io"]\nupstreams = ["http://127.0.0.1:9"]\n'
    )
    args = ["export", "--config", str(config_a), "--out", str(bundle)]
    assert await asyncio.to_thread(main, args) == 0
    out = capsys.readouterr().out
    pages = -(-(TAGS + 2) // PAGE_ENTRIES)
    assert out.startswith(f"exported {TAGS + 2} tags (2 images) to {bundle}: ")
    assert f"tags in {pages} nested indexes" in out

    index, docs = _index_docs(bundle)
    entries = index["manifests"]
    assert isinstance(entries, list)
    assert len(entries) == pages
    assert all(e["annotations"] == {PAGE: "tags"} for e in entries)
    names = []
    flat = 0  # what index.json would weigh with every tag in it
    for e in entries:
        page = json.loads(docs[f"blobs/{e['digest'].replace(':', '/')}"])
        assert len(page["manifests"]) <= PAGE_ENTRIES
        names += [m["annotations"]["org.opencontainers.image.ref.name"] for m in page["manifests"]]
        flat += sum(len(json.dumps(m)) + 2 for m in page["manifests"])
    assert flat > MAX_INDEX_SIZE  # the old single index.json could not have been imported
    assert names == sorted(names)
    assert len(set(names)) == TAGS + 2
    assert f"docker.io/{REPO}:release-059999-linux" in names
    assert max(len(d) for d in docs.values()) < MAX_INDEX_SIZE

    cache_b = tmp_path / "b"
    config_b = tmp_path / "b.toml"
    config_b.write_text(
        f'[cache]\ndir = "{cache_b}"\n[namespaces."docker.io"]\nupstreams = ["http://127.0.0.1:9"]\n'
        '[namespaces."registry.k8s.io"]\nupstreams = ["http://127.0.0.1:9"]\n'
    )
    assert await asyncio.to_thread(main, ["import", "--config", str(config_b), str(bundle)]) == 0
    out = capsys.readouterr().out
    assert f", {TAGS + 2} tags; 0 already present" in out
    store = FileManifestStore(cache_b)
    for tag in ("1", "release-000000-linux", "release-031337-linux", "release-059999-linux"):
        got = await store.get_tag("docker.io", REPO, tag)
        assert str(got[CONTAINERD_KEY].digest) == site_a.app.digest
    pause = await store.get_tag("registry.k8s.io", "pause", "3.9")
    assert str(pause[CONTAINERD_KEY].digest) == site_a.index_digest

    assert await asyncio.to_thread(main, ["import", "--config", str(config_b), str(bundle)]) == 0
    assert "added 0 blobs (0B), 0 manifests, 0 tags;" in capsys.readouterr().out


@pytest.mark.parametrize(("tags", "page_entries", "pages"), [(3, 5, 0), (7, 3, 3), (20, 2, 20)])
async def test_pages_of_pages_round_trip(
    site_a: SiteA, tmp_path: Path, tags: int, page_entries: int, pages: int
) -> None:
    """Small pages force one level (7 tags in 3 pages) or four (20 tags: 10 + 5 + 3 + 2)."""
    _add_tags(site_a.config, tags - 2, site_a.app)
    bundle = tmp_path / "site.tar"
    result = await asyncio.to_thread(
        export_bundle, site_a.config.cache.dir, bundle, None, page_entries=page_entries
    )
    assert (result.tags, result.pages) == (tags, pages)
    index, _ = _index_docs(bundle)
    assert len(index["manifests"]) <= page_entries  # type: ignore[arg-type]

    dead = ["http://127.0.0.1:9"]
    config_b = mirror_config(tmp_path / "b", [], namespaces={"docker.io": dead, K8S: dead})
    got = await asyncio.to_thread(import_bundle, config_b, bundle, warn=print, batch=4)
    assert (got.tags, got.manifests, got.not_in_bundle) == (tags, 3, 1)
    store = FileManifestStore(config_b.cache.dir)
    last = f"release-{tags - 3:06d}-linux"
    assert str((await store.get_tag("docker.io", REPO, last))[CONTAINERD_KEY].digest) == (
        site_a.app.digest
    )
