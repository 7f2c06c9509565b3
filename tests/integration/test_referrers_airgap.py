"""Referrers travel with their images: preload fetches them (through the referrers
API, else the ``sha256-<hex>`` tag scheme), export carries them, import records them,
and an offline mirror then answers the referrers API and the signatures themselves."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from mirrorproxy.cli import main
from tests.fakes.registry import OCI_INDEX, OCI_MANIFEST, FakeRegistry, Image, sha256
from tests.support.mirror import FakeFactory, MirrorFactory
from tests.support.paths import NS, REPO, manifest_path

SIG_TYPE = "application/vnd.dev.cosign.artifact.sig.v1+json"


def _config(path: Path, cache_dir: Path, url: str) -> Path:
    path.write_text(f'[cache]\ndir = "{cache_dir}"\n[namespaces."{NS}"]\nupstreams = ["{url}"]\n')
    return path


def _sign(registry: FakeRegistry, img: Image) -> tuple[dict[str, object], bytes]:
    """Push a signature manifest whose subject is ``img``; return its descriptor and layer."""
    payload = json.dumps({"critical": {"image": {"docker-manifest-digest": img.digest}}})
    layer = payload.encode()
    config = b"{}"
    registry.add_blob(layer)
    registry.add_blob(config)
    manifest = json.dumps(
        {
            "schemaVersion": 2,
            "mediaType": OCI_MANIFEST,
            "artifactType": SIG_TYPE,
            "config": {"mediaType": SIG_TYPE, "digest": sha256(config), "size": len(config)},
            "layers": [
                {"mediaType": "application/json", "digest": sha256(layer), "size": len(layer)}
            ],
            "subject": {
                "mediaType": OCI_MANIFEST,
                "digest": img.digest,
                "size": len(img.manifest),
            },
        }
    ).encode()
    digest = registry.add_manifest(REPO, sha256(manifest), OCI_MANIFEST, manifest)
    descriptor = {
        "mediaType": OCI_MANIFEST,
        "digest": digest,
        "size": len(manifest),
        "artifactType": SIG_TYPE,
    }
    return descriptor, layer


@pytest.mark.parametrize("api", [True, False], ids=["referrers-api", "tag-scheme"])
async def test_signatures_travel_into_an_offline_site(
    start_fake: FakeFactory, start_mirror: MirrorFactory, tmp_path: Path, api: bool
) -> None:
    fake = await start_fake()
    img = fake.registry.add_image(REPO, "1")
    descriptor, layer = _sign(fake.registry, img)
    sig = str(descriptor["digest"])
    if api:
        fake.registry.referrers[(REPO, img.digest)] = [descriptor]
    else:
        fake.registry.referrers_api = False
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": [descriptor]})
        fake.registry.add_manifest(REPO, img.digest.replace(":", "-"), OCI_INDEX, index.encode())

    a = _config(tmp_path / "a.toml", tmp_path / "a", fake.url)
    images = tmp_path / "images.txt"
    images.write_text(f"{NS}/{REPO}:1\n")
    preload = ["preload", "--config", str(a), str(images), "--platform", "linux/amd64"]
    assert await asyncio.to_thread(main, preload) == 0
    bundle = tmp_path / "site.tar"
    assert await asyncio.to_thread(main, ["export", "--config", str(a), "--out", str(bundle)]) == 0

    # start_mirror(name="b") serves tmp_path/b/cache: import into that.
    b = _config(tmp_path / "b.toml", tmp_path / "b" / "cache", "http://127.0.0.1:9")
    assert await asyncio.to_thread(main, ["import", "--config", str(b), str(bundle)]) == 0
    offline = await start_mirror(["http://127.0.0.1:9"], name="b", cache={"offline": True})

    if api:
        resp = await offline.client.get(f"/v2/{REPO}/referrers/{img.digest}?ns={NS}")
        assert resp.status == 200
        listed = [m["digest"] for m in (await resp.json(content_type=None))["manifests"]]
        assert listed == [sig]
    else:
        tag = img.digest.replace(":", "-")
        resp = await offline.client.get(manifest_path(REPO, tag), headers={"Accept": OCI_INDEX})
        assert resp.status == 200
    got = await offline.client.get(manifest_path(REPO, sig))
    assert got.status == 200
    blob = await offline.client.get(f"/v2/{REPO}/blobs/{sha256(layer)}?ns={NS}")
    assert await blob.read() == layer
