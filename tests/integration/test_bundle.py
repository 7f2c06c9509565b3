"""`mirrorproxy export` and `mirrorproxy import` between caches filled by in-process mirrors.

Cache A is filled by pulling through a mirror from a FakeRegistry (an image, and an
index of which only amd64 is pulled); its export must be a valid OCI image layout.
The import goes into an empty cache B while an offline mirror serves B, which must
then answer containerd's requests; a second import changes nothing, and damaged
bundles are refused with one line and leave B exactly as it was. The CLI runs its
own event loop, so it is called in a worker thread.
"""

from __future__ import annotations

import asyncio
import hashlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from mirrorproxy.cache.index import CacheIndex
from mirrorproxy.cli import main
from mirrorproxy.core.oci import CONTAINERD_ACCEPT
from tests.fakes.registry import Image
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.paths import blob_path, manifest_path
from tests.support.waiting import wait_for

K8S = "registry.k8s.io"
APP_REF = "docker.io/library/app:1"
PAUSE_REF = "registry.k8s.io/pause:3.9"
ACCEPT = {"Accept": CONTAINERD_ACCEPT}


def _config(path: Path, cache_dir: Path, url: str, *, offline: bool = False) -> Path:
    path.write_text(
        f'[cache]\ndir = "{cache_dir}"\noffline = {str(offline).lower()}\n'
        f'[namespaces."docker.io"]\nupstreams = ["{url}"]\n'
        f'[namespaces."{K8S}"]\nupstreams = ["{url}"]\n'
    )
    return path


async def _pull(mirror: Mirror, repo: str, tag: str, ns: str) -> str:
    """Pull like containerd: the tag, the first platform of an index, then its blobs."""
    resp = await mirror.client.get(manifest_path(repo, tag, ns), headers=ACCEPT)
    assert resp.status == 200, await resp.text()
    top = resp.headers["Docker-Content-Digest"]
    doc = json.loads(await resp.read())
    if "manifests" in doc:
        child = doc["manifests"][0]["digest"]
        resp = await mirror.client.get(manifest_path(repo, child, ns), headers=ACCEPT)
        assert resp.status == 200
        doc = json.loads(await resp.read())
    digests = [doc["config"]["digest"], *(layer["digest"] for layer in doc["layers"])]
    for digest in digests:
        resp = await mirror.client.get(blob_path(repo, digest, ns))
        assert resp.status == 200
        await resp.read()
    await wait_for(lambda: all(mirror.blob_path(d).is_file() for d in digests))
    return top


class Site:
    """Cache A, filled through a mirror, plus the images and index digest it holds."""

    def __init__(self, fake: RunningFake, mirror: Mirror, app: Image, amd: Image, arm: Image):
        self.fake, self.mirror, self.app, self.amd, self.arm = fake, mirror, app, amd, arm
        self.index_digest = ""
        self.config = Path()


@pytest.fixture
async def site(start_fake: FakeFactory, start_mirror: MirrorFactory, tmp_path: Path) -> Site:
    fake = await start_fake()
    app = fake.registry.add_image("library/app", "1", layer_sizes=(1_500_000, 5000))
    amd = fake.registry.add_image("pause", "amd", seed="amd", layer_sizes=(3000,))
    arm = fake.registry.add_image("pause", "arm", seed="arm", layer_sizes=(4000,))
    fake.registry.add_index("pause", "3.9", [amd, arm])
    mirror = await start_mirror([], namespaces={"docker.io": [fake.url], K8S: [fake.url]})
    s = Site(fake, mirror, app, amd, arm)
    assert await _pull(mirror, "library/app", "1", "docker.io") == app.digest
    s.index_digest = await _pull(mirror, "pause", "3.9", K8S)
    s.config = _config(tmp_path / "a.toml", mirror.cache_dir, fake.url)
    return s


async def _cli(*args: str) -> int:
    return await asyncio.to_thread(main, list(args))


def _members(tar_path: Path) -> dict[str, bytes]:
    with tarfile.open(tar_path) as tar:
        return {
            m.name: tar.extractfile(m).read()  # type: ignore[union-attr]
            for m in tar.getmembers()
            if m.isreg()
        }


def _snapshot(cache: Path) -> dict[str, int]:
    """Every content and tag file with its mtime: what "nothing changed" compares."""
    return {
        str(p.relative_to(cache)): p.stat().st_mtime_ns
        for sub in ("blobs", "manifests", "tags", "tmp")
        for p in (cache / sub).rglob("*")
        if p.is_file()
    }


async def test_export_writes_an_oci_layout_with_full_references(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "site.tar"
    assert await _cli("export", "--config", str(site.config), "--out", str(out)) == 0
    stdout, stderr = capsys.readouterr()
    assert stdout.startswith(f"exported 2 tags (2 images) to {out}: 5 blobs")
    # The arm64 child was never pulled: said once, with its platform and why.
    assert "left out 1 platform manifests of multi-platform images (linux/arm64 x1): not in" in (
        stdout
    )
    assert stderr == ""
    assert _files(tmp_path, "*.partial") == []

    with tarfile.open(out) as tar:
        names = tar.getnames()
    blobs = [n for n in names if n.startswith("blobs/sha256/")]
    assert names == ["oci-layout", "blobs", "blobs/sha256", *sorted(blobs), "index.json"]
    members = _members(out)
    assert json.loads(members["oci-layout"]) == {"imageLayoutVersion": "1.0.0"}
    for name in blobs:
        assert hashlib.sha256(members[name]).hexdigest() == name.rsplit("/", 1)[1]
    index = json.loads(members["index.json"])
    by_ref = {m["annotations"]["org.opencontainers.image.ref.name"]: m for m in index["manifests"]}
    assert set(by_ref) == {APP_REF, PAUSE_REF}
    for ref, digest in ((APP_REF, site.app.digest), (PAUSE_REF, site.index_digest)):
        desc = by_ref[ref]
        assert desc["digest"] == digest
        assert desc["annotations"]["io.containerd.image.name"] == ref
        assert desc["size"] == len(members[f"blobs/{digest.replace(':', '/')}"])
    assert by_ref[APP_REF]["mediaType"] == "application/vnd.oci.image.manifest.v1+json"
    assert by_ref[PAUSE_REF]["mediaType"] == "application/vnd.oci.image.index.v1+json"
    want = {site.app.digest, site.index_digest, site.amd.digest}
    want |= {site.app.config_digest, *site.app.layer_digests}
    want |= {site.amd.config_digest, *site.amd.layer_digests}
    assert {"sha256:" + n.rsplit("/", 1)[1] for n in blobs} == want
    assert members[f"blobs/{site.app.layer_digests[0].replace(':', '/')}"] == site.app.layers[0]

    again = tmp_path / "again.tar"
    assert await _cli("export", "--config", str(site.config), "--out", str(again)) == 0
    assert again.read_bytes() == out.read_bytes()  # reproducible, byte for byte


async def test_export_of_a_list_is_exact_and_a_missing_reference_writes_nothing(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    images = tmp_path / "images.txt"
    out = tmp_path / "app.tar"
    images.write_text("# only the app\napp:1\n")
    args = ["export", "--config", str(site.config), "--out", str(out), "--images", str(images)]
    assert await _cli(*args) == 0
    capsys.readouterr()
    index = json.loads(_members(out)["index.json"])
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == [APP_REF]

    pinned = f"docker.io/library/app@{site.app.digest}"
    images.write_text(f"{pinned}\nnothere:2\n{K8S}/pause:3.9\n")
    out.unlink()
    assert await _cli(*args) == 1
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    assert stderr == (
        "mirrorproxy: export: not completely in the cache: "
        "docker.io/library/nothere:2: the tag is not in the cache\n"
    )
    assert _files(tmp_path, "*.tar") == _files(tmp_path, ".*.partial") == []


async def test_export_takes_the_images_of_kubernetes_manifests(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--images`` may name Kubernetes YAML, as for preload: its images are exported."""
    manifests = tmp_path / "deploy.yaml"
    manifests.write_text(
        "apiVersion: apps/v1\nkind: Deployment\nmetadata: {name: app}\nspec:\n"
        "  template:\n    spec:\n      containers:\n      - {name: app, image: app:1}\n"
    )
    out = tmp_path / "app.tar"
    args = ["export", "--config", str(site.config), "--out", str(out), "--images", str(manifests)]
    assert await _cli(*args) == 0
    capsys.readouterr()
    index = json.loads(_members(out)["index.json"])
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == [APP_REF]


@pytest.fixture
async def bundle(site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> Path:
    out = tmp_path / "site.tar"
    assert await _cli("export", "--config", str(site.config), "--out", str(out)) == 0
    capsys.readouterr()
    return out


async def test_import_into_an_empty_cache_serves_offline_and_is_idempotent(
    site: Site,
    bundle: Path,
    start_mirror: MirrorFactory,
    closed_port_url: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # Mirror B already serves (offline) the empty cache the import goes into.
    b = await start_mirror(
        [],
        name="b",
        namespaces={"docker.io": [closed_port_url], K8S: [closed_port_url]},
        cache={"offline": True},
    )
    config = _config(tmp_path / "b.toml", b.cache_dir, closed_port_url, offline=True)
    assert await _cli("import", "--config", str(config), str(bundle)) == 0
    stdout, stderr = capsys.readouterr()
    assert stderr == ""
    blobs = (site.app.config, *site.app.layers, site.amd.config, *site.amd.layers)
    size = sum(len(x) for x in blobs)
    assert stdout.startswith(f"added 5 blobs ({size / 1024 / 1024:.1f}MiB), 3 manifests, 2 tags;")
    assert "0 already present (1 platform manifests were not in the bundle)" in stdout
    assert b.tmp_files() == []

    assert await _pull(b, "library/app", "1", "docker.io") == site.app.digest
    assert await _pull(b, "pause", "3.9", K8S) == site.index_digest
    resp = await b.client.get(blob_path("library/app", site.app.layer_digests[0]))
    assert await resp.read() == site.app.layers[0]
    index = CacheIndex(b.cache_dir / "index.db")
    try:
        kinds = {(e.kind, e.namespace) for e in index.entries()}
    finally:
        index.close()
    assert kinds == {(k, ns) for k in ("blob", "manifest") for ns in ("docker.io", K8S)}

    before = _snapshot(b.cache_dir)
    assert await _cli("import", "--config", str(config), str(bundle)) == 0
    stdout, _ = capsys.readouterr()
    assert stdout.startswith("added 0 blobs (0B), 0 manifests, 0 tags; 10 already present")
    assert _snapshot(b.cache_dir) == before


def _rewrite(src: Path, dst: Path, *, drop: str) -> None:
    """Copy a tar without one member."""
    with tarfile.open(src) as tin, tarfile.open(dst, "w") as tout:
        for m in tin.getmembers():
            if m.name != drop:
                tout.addfile(m, tin.extractfile(m) if m.isreg() else None)


def _files(directory: Path, pattern: str) -> list[Path]:
    return sorted(directory.glob(pattern))


def _damage(bundle: Path, how: str, name: str) -> tuple[Path, str]:
    """Damage the bundle (or a copy) at member ``name``; return it and the expected problem."""
    with tarfile.open(bundle) as tar:
        info = tar.getmember(name)
    if how == "flip":
        with open(bundle, "r+b") as f:
            f.seek(info.offset_data + info.size // 2)
            byte = f.read(1)[0]
            f.seek(-1, io.SEEK_CUR)
            f.write(bytes([byte ^ 0x01]))
        return bundle, f"{name}: content does not match its digest"
    if how == "truncate":
        with open(bundle, "r+b") as f:
            f.truncate(info.offset_data + info.size // 2)
        return bundle, "damaged or truncated tar"
    if how == "missing":
        damaged = bundle.with_name("damaged.tar")
        _rewrite(bundle, damaged, drop=name)
        return damaged, f"{name}: missing from the bundle (referenced by manifest blobs/"
    bundle.write_bytes(b"this is not a tar file" * 100)
    return bundle, "not a tar archive"


@pytest.mark.parametrize("damage", ["flip", "truncate", "missing", "not-a-tar"])
async def test_a_damaged_bundle_is_refused_and_nothing_is_added(
    damage: str,
    site: Site,
    bundle: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # The blob last in the tar: every other blob has been staged when it fails.
    blobs = {site.app.config_digest, *site.app.layer_digests}
    blobs |= {site.amd.config_digest, *site.amd.layer_digests}
    names = [f"blobs/{d.replace(':', '/')}" for d in blobs]
    with tarfile.open(bundle) as tar:
        last = max(names, key=lambda n: tar.getmember(n).offset_data)
    bundle, problem = _damage(bundle, damage, last)
    cache = tmp_path / "b" / "cache"
    config = _config(tmp_path / "b.toml", cache, "http://127.0.0.1:9", offline=True)

    assert await _cli("import", "--config", str(config), str(bundle)) == 1
    stdout, stderr = capsys.readouterr()
    assert stdout == ""
    assert stderr.count("\n") == 1
    assert stderr.startswith("mirrorproxy: import: ")
    assert problem in stderr
    assert stderr.endswith("; nothing was imported\n")
    assert _snapshot(cache) == {}  # no blob, manifest, tag or temp file
    assert not (cache / "index.db").exists()


async def test_export_leaves_out_or_refuses_what_the_cache_lacks_or_has_corrupt(
    site: Site, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "site.tar"
    layer = site.mirror.blob_path(site.app.layer_digests[1])
    _move(layer, tmp_path / "evicted")  # as the cache budget would
    assert await _cli("export", "--config", str(site.config), "--out", str(out)) == 0
    stdout, stderr = capsys.readouterr()
    assert "exported 1 tags (1 images)" in stdout
    assert "left out 1 references not completely in the cache" in stdout
    evicted = site.app.layer_digests[1]
    assert stderr == f"mirrorproxy: warning: {APP_REF}: blob {evicted} is not cached, left out\n"
    index = json.loads(_members(out)["index.json"])
    assert [m["annotations"]["io.containerd.image.name"] for m in index["manifests"]] == [
        PAUSE_REF
    ]

    images = tmp_path / "images.txt"
    images.write_text("app:1\n")
    args = ["export", "--config", str(site.config), "--out", str(out), "--images", str(images)]
    assert await _cli(*args) == 1
    assert capsys.readouterr().err == (
        f"mirrorproxy: export: not completely in the cache: {APP_REF}: "
        f"blob {evicted} is not cached\n"
    )

    # Bit rot in a cached blob: the export hashes on the way and refuses to ship it.
    _move(tmp_path / "evicted", layer)
    _flip_byte(layer)
    out.unlink()
    assert await _cli(*args) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"mirrorproxy: export: cache file {layer}: content does not match")
    assert err.count("\n") == 1
    assert _files(tmp_path, "*.tar") == _files(tmp_path, ".*.partial") == []


def _move(src: Path, dst: Path) -> None:
    src.rename(dst)


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0x01
    path.write_bytes(bytes(data))


async def test_import_warns_about_a_registry_no_namespace_serves(
    bundle: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = tmp_path / "hub-only.toml"
    config.write_text(
        f'[cache]\ndir = "{tmp_path / "c"}"\n'
        '[namespaces."docker.io"]\nupstreams = ["http://127.0.0.1:9"]\n'
    )
    assert await _cli("import", "--config", str(config), str(bundle)) == 0
    stdout, stderr = capsys.readouterr()
    assert stderr == (
        f"mirrorproxy: warning: {PAUSE_REF}: no namespace in {config} serves {K8S}\n"
    )
    assert ", 2 tags;" in stdout  # imported all the same: the config may be fixed later
