"""Prove the e2e infrastructure itself against real docker-registry and containerd.

If these fail, mirror e2e failures mean nothing: the image builder, the pusher, the
process helpers and the hosts.toml writer are checked here with no mirror involved.
"""

from __future__ import annotations

import gzip
import hashlib
import io
import json
import tarfile
import time
import tomllib
from pathlib import Path

import pytest

from tests.support import images
from tests.support.procs import (
    Containerd,
    MirrorProcess,
    RegistryFactory,
    ctr_images,
    ctr_pull,
    ctr_rm,
    free_port,
    mirror_config,
    write_hosts_toml,
)

KiB = 1024
LAYERS = (64 * KiB, 256 * KiB, 1024 * KiB)
DOCKER_HUB = "https://registry-1.docker.io"


def _blob_gets(reg_requests: list[tuple[str, str]]) -> set[str]:
    """Digests the registry served blob GETs for."""
    return {
        path.split("/blobs/", 1)[1].split("?", 1)[0]
        for method, path in reg_requests
        if method == "GET" and "/blobs/" in path
    }


def test_layers_are_real_reproducible_gzip_tars() -> None:
    """Digests name the gzip, diff_ids the tar, and a seed always gives the same bytes."""
    a = images.build_image([1000, 1], seed=7)
    b = images.build_image([1000, 1], seed=7)
    assert a == b
    assert images.build_image([1000, 1], seed=8).digest != a.digest
    config = json.loads(a.blobs[json.loads(a.body)["config"]["digest"]])
    for layer_desc, diff_id in zip(
        json.loads(a.body)["layers"], config["rootfs"]["diff_ids"], strict=True
    ):
        blob = a.blobs[layer_desc["digest"]]
        assert images.sha256_digest(blob) == layer_desc["digest"]
        assert layer_desc["size"] == len(blob)
        tar_bytes = gzip.decompress(blob)
        assert "sha256:" + hashlib.sha256(tar_bytes).hexdigest() == diff_id
        with tarfile.open(fileobj=io.BytesIO(tar_bytes)) as tar:
            assert sum(m.size for m in tar.getmembers()) in (1000, 1)


def test_push_image_and_get_manifest_back(upstream_registry: RegistryFactory) -> None:
    """A 3-layer OCI image pushes and reads back byte for byte."""
    reg = upstream_registry()
    image = images.build_image(LAYERS, seed=1)
    assert len(image.blobs) == 4

    images.push(reg.url, "library/alpine", "3", image)

    resp = images.get_manifest(reg.url, "library/alpine", "3")
    assert resp.headers["docker-content-digest"] == image.digest
    assert resp.headers["content-type"] == images.OCI_MANIFEST
    assert resp.body == image.body
    for digest, data in image.blobs.items():
        blob = images.request("GET", f"{reg.url}/v2/library/alpine/blobs/{digest}")
        assert blob.body == data


def test_push_index_and_get_children(upstream_registry: RegistryFactory) -> None:
    """A multi-arch index pushes with its children, each retrievable by digest."""
    reg = upstream_registry()
    index = images.build_index([64 * KiB], seed=2)
    assert set(index.platforms) == {"linux/amd64", "linux/arm64"}
    assert index.blob_digests("linux/amd64").isdisjoint(index.blob_digests("linux/arm64"))

    images.push(reg.url, "pause", "3.9", index)

    top = images.get_manifest(reg.url, "pause", "3.9")
    assert top.headers["docker-content-digest"] == index.digest
    assert top.headers["content-type"] == images.OCI_INDEX
    for digest in index.platforms.values():
        child = images.get_manifest(reg.url, "pause", digest)
        assert child.body == index.manifests[digest][1]


@pytest.mark.parametrize("docker", [False, True], ids=["oci", "docker-schema2"])
def test_ctr_pulls_image_through_hosts_toml(
    upstream_registry: RegistryFactory,
    containerd: Containerd,
    hosts_dir: Path,
    docker: bool,
) -> None:
    """ctr resolves docker.io through a hand-written hosts.toml to the registry."""
    reg = upstream_registry()
    image = images.build_image(LAYERS, seed=3, docker=docker)
    images.push(reg.url, "library/alpine", "3", image)
    write_hosts_toml(hosts_dir, "docker.io", DOCKER_HUB, reg.url)
    ref = "docker.io/library/alpine:3"

    pulled = ctr_pull(containerd, ref, hosts_dir)

    assert pulled.returncode == 0, pulled.stderr
    listed = ctr_images(containerd)
    assert listed[ref].digest == image.digest
    assert listed[ref].media_type == image.media_type
    reqs = reg.requests()
    assert ("HEAD", "/v2/library/alpine/manifests/3?ns=docker.io") in reqs
    assert _blob_gets(reqs) == image.blob_digests()

    removed = ctr_rm(containerd, ref)
    assert removed.returncode == 0, removed.stderr
    assert ref not in ctr_images(containerd)


def test_ctr_pulls_host_platform_of_index(
    upstream_registry: RegistryFactory, containerd: Containerd, hosts_dir: Path
) -> None:
    """Without --all-platforms ctr fetches the index and only linux/amd64's blobs."""
    reg = upstream_registry()
    index = images.build_index([64 * KiB, 128 * KiB], seed=4)
    images.push(reg.url, "library/pause", "3.9", index)
    write_hosts_toml(hosts_dir, "docker.io", DOCKER_HUB, reg.url)
    ref = "docker.io/library/pause:3.9"

    pulled = ctr_pull(containerd, ref, hosts_dir)

    assert pulled.returncode == 0, pulled.stderr
    assert ctr_images(containerd)[ref].digest == index.digest
    assert _blob_gets(reg.requests()) == index.blob_digests("linux/amd64")


def test_ctr_pulls_all_platforms_of_index(
    upstream_registry: RegistryFactory, containerd: Containerd, hosts_dir: Path
) -> None:
    """--all-platforms fetches every platform's blobs."""
    reg = upstream_registry()
    index = images.build_index([64 * KiB], seed=5)
    images.push(reg.url, "library/pause", "3.9", index)
    write_hosts_toml(hosts_dir, "docker.io", DOCKER_HUB, reg.url)
    ref = "docker.io/library/pause:3.9"

    pulled = ctr_pull(containerd, ref, hosts_dir, all_platforms=True)

    assert pulled.returncode == 0, pulled.stderr
    assert ctr_images(containerd)[ref].digest == index.digest
    assert _blob_gets(reg.requests()) == index.blob_digests()


def test_ctr_fallback_to_real_server_dies_at_once(
    upstream_registry: RegistryFactory, containerd: Containerd, hosts_dir: Path
) -> None:
    """A tag the mirror lacks falls back to `server`, which the proxy env kills fast."""
    reg = upstream_registry()
    write_hosts_toml(hosts_dir, "docker.io", DOCKER_HUB, reg.url)

    started = time.monotonic()
    pulled = ctr_pull(containerd, "docker.io/library/missing:1", hosts_dir)

    assert pulled.returncode != 0
    assert time.monotonic() - started < 10
    assert "127.0.0.1:9" in pulled.stderr, pulled.stderr


def test_registry_proxy_mode_serves_pulls(
    upstream_registry: RegistryFactory, containerd: Containerd, hosts_dir: Path
) -> None:
    """docker-registry in proxy mode (the baseline) pulls through from an upstream."""
    upstream = upstream_registry()
    baseline = upstream_registry(proxy_remoteurl=upstream.url)
    image = images.build_image([64 * KiB, 64 * KiB], seed=6)
    images.push(upstream.url, "library/busybox", "1", image)
    write_hosts_toml(hosts_dir, "docker.io", DOCKER_HUB, baseline.url)

    pulled = ctr_pull(containerd, "docker.io/library/busybox:1", hosts_dir)

    assert pulled.returncode == 0, pulled.stderr
    assert ctr_images(containerd)["docker.io/library/busybox:1"].digest == image.digest
    assert _blob_gets(upstream.requests()) == image.blob_digests()


def test_mirror_config_renders_the_contract(tmp_path: Path) -> None:
    """The rendered config parses as TOML with upstreams in the given order."""
    text = mirror_config(
        5000,
        tmp_path / "cache",
        {"docker.io": ["http://127.0.0.1:1", "http://127.0.0.1:2"], "registry.k8s.io": []},
    )
    doc = tomllib.loads(text)
    assert doc["server"] == {"listen": "127.0.0.1:5000", "default_namespace": "docker.io"}
    assert doc["cache"] == {"dir": str(tmp_path / "cache"), "tag_ttl": "5m"}
    assert doc["namespaces"]["docker.io"]["upstreams"] == [
        "http://127.0.0.1:1",
        "http://127.0.0.1:2",
    ]


def test_mirror_process_that_exits_fails_fast_with_its_log(tmp_path: Path) -> None:
    """A mirror that cannot start raises with its output instead of hanging."""
    started = time.monotonic()
    with pytest.raises(RuntimeError, match="exited") as excinfo:
        MirrorProcess(tmp_path / "bad", "this is [not toml\n", free_port())
    assert time.monotonic() - started < 10
    assert "mirror.log" in str(excinfo.value)
