"""containerd pulls through the real `mirrorproxy serve`, then again with upstreams gone.

Upstreams are Debian's docker-registry on loopback; the first docker.io upstream is a
closed port, so failover is on the path of every pull. hosts.toml is written by
hand here (the generator has its own tests).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.support import images
from tests.support.procs import (
    Containerd,
    MirrorFactory,
    RegistryFactory,
    ctr_images,
    ctr_pull,
    ctr_rm,
    free_port,
    mirror_config,
    write_hosts_toml,
)

KiB = 1024


def _blob_gets(requests: list[tuple[str, str]]) -> list[str]:
    return [
        path.split("/blobs/", 1)[1].split("?", 1)[0]
        for method, path in requests
        if method == "GET" and "/blobs/" in path
    ]


def _pull_ok(ctd: Containerd, ref: str, hosts: Path) -> None:
    proc = ctr_pull(ctd, ref, hosts)
    assert proc.returncode == 0, f"ctr pull {ref} failed:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("tag_ttl", ["5m", "0s"], ids=["fresh-tags", "stale-tags"])
def test_containerd_pulls_image_and_index_then_from_cache_when_upstreams_are_gone(
    tag_ttl: str,
    upstream_registry: RegistryFactory,
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    hub = upstream_registry()
    k8s = upstream_registry()
    app = images.build_image([64 * KiB, 300 * KiB, 1024 * KiB, 200 * KiB], seed=1)
    docker_app = images.build_image([128 * KiB, 64 * KiB], seed=2, docker=True)
    pause = images.build_index([96 * KiB, 32 * KiB], seed=3)
    images.push(hub.url, "library/app", "1.0", app)
    images.push(hub.url, "library/legacy", "2", docker_app)
    images.push(k8s.url, "pause", "3.9", pause)

    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    port = free_port()
    config = mirror_config(
        port,
        tmp_path / "cache",
        {"docker.io": [dead, hub.url], "registry.k8s.io": [k8s.url]},
        tag_ttl=tag_ttl,  # "0s": every resolve after the upstreams stop is a stale serve
    )
    mirror = mirror_process(config, port)
    write_hosts_toml(hosts_dir, "docker.io", "https://registry-1.docker.io", mirror.url)
    write_hosts_toml(hosts_dir, "registry.k8s.io", "https://registry.k8s.io", mirror.url)

    refs = {
        "docker.io/library/app:1.0": app.digest,
        "docker.io/library/legacy:2": docker_app.digest,
        "registry.k8s.io/pause:3.9": pause.digest,
    }
    for ref in refs:
        _pull_ok(containerd, ref, hosts_dir)
    listed = ctr_images(containerd)
    assert {ref: listed[ref].digest for ref in refs} == refs

    # Every blob crossed from upstream once, whatever containerd asked for.
    hub_gets = _blob_gets(hub.requests())
    assert sorted(hub_gets) == sorted(set(hub_gets))
    assert set(hub_gets) == app.blob_digests() | docker_app.blob_digests()
    assert set(_blob_gets(k8s.requests())) == pause.blob_digests("linux/amd64")

    # Upstreams gone, content gone from containerd: the mirror's cache alone serves.
    hub.stop()
    k8s.stop()
    for ref in refs:
        assert ctr_rm(containerd, ref).returncode == 0
    assert not set(refs) & set(ctr_images(containerd))
    for ref in refs:
        _pull_ok(containerd, ref, hosts_dir)
    listed = ctr_images(containerd)
    assert {ref: listed[ref].digest for ref in refs} == refs
    log = mirror.log_text()
    assert "Traceback" not in log
    if tag_ttl == "0s":
        assert log.count("serving stale") >= len(refs)


def test_mirror_restart_serves_from_disk_cache(
    upstream_registry: RegistryFactory,
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    hub = upstream_registry()
    app = images.build_image([256 * KiB, 64 * KiB], seed=4)
    images.push(hub.url, "library/app", "1.0", app)
    port = free_port()
    config = mirror_config(port, tmp_path / "cache", {"docker.io": [hub.url]})
    first = mirror_process(config, port)
    write_hosts_toml(hosts_dir, "docker.io", "https://registry-1.docker.io", first.url)
    _pull_ok(containerd, "docker.io/library/app:1.0", hosts_dir)

    first.stop()
    hub.stop()
    assert ctr_rm(containerd, "docker.io/library/app:1.0").returncode == 0
    second = mirror_process(config, port)
    _pull_ok(containerd, "docker.io/library/app:1.0", hosts_dir)
    assert ctr_images(containerd)["docker.io/library/app:1.0"].digest == app.digest
    assert "Traceback" not in second.log_text()
