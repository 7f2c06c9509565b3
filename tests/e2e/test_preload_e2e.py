"""Air-gapped fill: preload from real registries, cut them off, serve offline.

`mirrorproxy preload` fills the cache from docker-registry upstreams; the upstreams
stop; a mirror with `offline = true` serves containerd from the cache alone.
"""

from __future__ import annotations

import json
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.support import images
from tests.support.procs import (
    Containerd,
    MirrorFactory,
    RegistryFactory,
    ctr_images,
    ctr_pull,
    free_port,
    mirror_config,
    write_hosts_toml,
)

KiB = 1024


def test_preload_then_containerd_pulls_from_an_offline_mirror(
    upstream_registry: RegistryFactory,
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    hub, k8s = upstream_registry(), upstream_registry()
    app = images.build_image([200 * KiB, 64 * KiB, 128 * KiB], seed=21)
    pause = images.build_index([48 * KiB], seed=22)
    images.push(hub.url, "library/app", "2.0", app)
    images.push(k8s.url, "pause", "3.9", pause)

    port = free_port()
    online = mirror_config(
        port, tmp_path / "cache", {"docker.io": [hub.url], "registry.k8s.io": [k8s.url]}
    )
    config = tmp_path / "preload.toml"
    config.write_text(online)
    listing = tmp_path / "images.txt"
    listing.write_text("# what the nodes need\napp:2.0\nregistry.k8s.io/pause:3.9\n")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirrorproxy",
            "preload",
            "--config",
            str(config),
            str(listing),
            "--platform",
            "linux/amd64",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert out.returncode == 0, out.stdout + out.stderr
    assert "preloaded 2 of 2 images" in out.stdout

    hub.stop()
    k8s.stop()
    offline = online.replace("[cache]\n", "[cache]\noffline = true\n", 1)
    mirror = mirror_process(offline, port)
    for registry, server in (
        ("docker.io", "https://registry-1.docker.io"),
        ("registry.k8s.io", "https://registry.k8s.io"),
    ):
        write_hosts_toml(hosts_dir, registry, server, mirror.url)
    refs = {"docker.io/library/app:2.0": app.digest, "registry.k8s.io/pause:3.9": pause.digest}
    for ref in refs:
        proc = ctr_pull(containerd, ref, hosts_dir, platform="linux/amd64")
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r: ctr_images(containerd)[r].digest for r in refs} == refs
    # Offline: what was not preloaded is refused with an OCI error naming the reason.
    miss = ctr_pull(containerd, "docker.io/library/other:1", hosts_dir)
    assert miss.returncode != 0
    url = f"{mirror.url}/v2/library/other/manifests/1?ns=docker.io"
    with pytest.raises(urllib.error.HTTPError) as info:
        urllib.request.urlopen(url, timeout=10)  # noqa: S310 - a loopback http URL
    assert info.value.code == 404
    assert "offline" in json.loads(info.value.read())["errors"][0]["message"]
