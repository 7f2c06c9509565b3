"""`mirrorproxy hosts` output drives a real containerd through the mirror.

Three registries (docker.io, registry.k8s.io with a multi-arch index, quay.io) are
stood in for by docker-registry on loopback; the hosts.toml files come from the CLI,
not from the test. After the upstreams stop, the pulls repeat from the mirror's cache.
"""

from __future__ import annotations

import subprocess
import sys
import tomllib
from pathlib import Path

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
)

KiB = 1024


def test_generated_hosts_toml_pulls_three_registries_then_from_cache(
    upstream_registry: RegistryFactory,
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    hub, k8s, quay = upstream_registry(), upstream_registry(), upstream_registry()
    app = images.build_image([128 * KiB, 64 * KiB, 256 * KiB], seed=11)
    pause = images.build_index([64 * KiB], seed=12)
    tool = images.build_image([96 * KiB, 32 * KiB], seed=13, docker=True)
    images.push(hub.url, "library/app", "1.2", app)
    images.push(k8s.url, "pause", "3.9", pause)
    images.push(quay.url, "acme/tool", "v5", tool)

    port = free_port()
    config = mirror_config(
        port,
        tmp_path / "cache",
        {"docker.io": [hub.url], "registry.k8s.io": [k8s.url], "quay.io": [quay.url]},
    )
    mirror = mirror_process(config, port)
    unrelated = hosts_dir / "example.org" / "hosts.toml"
    unrelated.parent.mkdir()
    unrelated.write_text('server = "https://example.org"\n')

    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "mirrorproxy",
            "hosts",
            "--config",
            str(mirror.config_path),
            "--out",
            str(hosts_dir),
        ],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert out.returncode == 0, out.stderr
    for ns in ("docker.io", "registry.k8s.io", "quay.io"):
        parsed = tomllib.loads((hosts_dir / ns / "hosts.toml").read_text())
        assert parsed["host"][mirror.url]["capabilities"] == ["pull", "resolve"]
    assert unrelated.read_text() == 'server = "https://example.org"\n'  # left alone

    refs = {
        "docker.io/library/app:1.2": app.digest,
        "registry.k8s.io/pause:3.9": pause.digest,
        "quay.io/acme/tool:v5": tool.digest,
    }
    for ref in refs:
        proc = ctr_pull(containerd, ref, hosts_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r: ctr_images(containerd)[r].digest for r in refs} == refs

    for reg in (hub, k8s, quay):
        reg.stop()
    for ref in refs:
        assert ctr_rm(containerd, ref).returncode == 0
    for ref in refs:
        proc = ctr_pull(containerd, ref, hosts_dir)
        assert proc.returncode == 0, proc.stderr[-3000:]
    assert {r: ctr_images(containerd)[r].digest for r in refs} == refs
