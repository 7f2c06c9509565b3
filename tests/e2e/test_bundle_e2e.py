"""An air-gapped site: export mirror A's cache, import it into B, pull offline through B.

Mirror A (the real CLI) fills its cache from docker-registry upstreams as containerd
pulls an image and a multi-arch index through it; ``mirrorproxy export`` runs beside
it. With every upstream stopped, ``mirrorproxy import`` fills B's empty cache while
B already serves it with ``offline = true``, and containerd pulls the same digests
through B. ``skopeo`` (Debian package ``skopeo``) must read the bundle as an
``oci-archive``, and ``ctr images import`` must load it under the full references.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support import images
from tests.support.procs import (
    Containerd,
    MirrorFactory,
    RegistryFactory,
    ctr,
    ctr_images,
    ctr_pull,
    ctr_rm,
    free_port,
    mirror_config,
    write_hosts_toml,
)
from tests.support.requirements import REQUIRE_E2E_ENV

KiB = 1024
CLI_TIMEOUT = 120.0
APP = "docker.io/library/app:1.0"
PAUSE = "registry.k8s.io/pause:3.9"
# The real registries hosts.toml names; ctr's fallback to them fails (proxy env).
SERVERS = {
    "docker.io": "https://registry-1.docker.io",
    "registry.k8s.io": "https://registry.k8s.io",
}


@pytest.fixture
def skopeo() -> str:
    """The skopeo binary; skip (or fail, when e2e is required) without it."""
    path = shutil.which("skopeo")
    if path is None:
        reason = "`skopeo` not found on PATH (apt-get install skopeo)"
        if os.environ.get(REQUIRE_E2E_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
        pytest.skip(reason)
    return path


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """Run the real ``python -m mirrorproxy`` CLI."""
    return subprocess.run(
        [sys.executable, "-m", "mirrorproxy", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def _skopeo(skopeo: str, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [skopeo, "--insecure-policy", *args],
        capture_output=True,
        text=True,
        timeout=CLI_TIMEOUT,
        check=False,
    )


def _pull_ok(ctd: Containerd, ref: str, hosts: Path) -> None:
    proc = ctr_pull(ctd, ref, hosts)
    assert proc.returncode == 0, f"ctr pull {ref} failed:\n{proc.stderr[-3000:]}"


def test_export_import_then_containerd_pulls_offline_and_skopeo_reads_the_bundle(
    upstream_registry: RegistryFactory,
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
    skopeo: str,
) -> None:
    hub = upstream_registry()
    k8s = upstream_registry()
    app = images.build_image([64 * KiB, 1024 * KiB, 200 * KiB], seed=11)
    pause = images.build_index([96 * KiB, 32 * KiB], seed=12)
    images.push(hub.url, "library/app", "1.0", app)
    images.push(k8s.url, "pause", "3.9", pause)
    refs = {APP: app.digest, PAUSE: pause.digest}

    port_a = free_port()
    upstreams = {"docker.io": [hub.url], "registry.k8s.io": [k8s.url]}
    a = mirror_process(mirror_config(port_a, tmp_path / "cache-a", upstreams), port_a)
    for registry, server in SERVERS.items():
        write_hosts_toml(hosts_dir, registry, server, a.url)
    for ref in refs:
        _pull_ok(containerd, ref, hosts_dir)

    # Export while A still serves; the upstreams are not needed any more.
    bundle = tmp_path / "site.tar"
    proc = _cli("export", "--config", str(a.config_path), "--out", str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert "exported 2 tags (2 images)" in proc.stdout
    assert "platform manifests of multi-platform images (linux/arm64 x1)" in proc.stdout
    assert proc.stderr == ""  # containerd pulled amd64 only: said once, not as a warning
    hub.stop()
    k8s.stop()
    a.stop()

    # Other tools read the bundle: skopeo resolves and copies by full reference.
    proc = _skopeo(skopeo, "inspect", f"oci-archive:{bundle}:{APP}")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["Digest"] == app.digest
    proc = _skopeo(skopeo, "inspect", "--raw", f"oci-archive:{bundle}:{PAUSE}")
    assert proc.returncode == 0, proc.stderr
    assert images.sha256_digest(proc.stdout.encode()) == pause.digest
    proc = _skopeo(skopeo, "copy", f"oci-archive:{bundle}:{APP}", f"dir:{tmp_path / 'copy'}")
    assert proc.returncode == 0, proc.stderr
    # So does containerd's own importer, naming images from the annotations.
    with Containerd() as other:
        proc = ctr(other, "images", "import", str(bundle))
        assert proc.returncode == 0, proc.stderr
        listed = ctr_images(other)
        assert {ref: listed[ref].digest for ref in refs} == refs

    # Site B: offline from the start, its cache filled by the import while it runs.
    port_b = free_port()
    dead = f"http://127.0.0.1:{free_port()}"
    config_b = mirror_config(
        port_b,
        tmp_path / "cache-b",
        {"docker.io": [dead], "registry.k8s.io": [dead]},
        cache={"offline": True},
    )
    b = mirror_process(config_b, port_b)
    proc = _cli("import", "--config", str(b.config_path), str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("added ")
    assert ", 3 manifests, 2 tags; 0 already present" in proc.stdout
    proc = _cli("import", "--config", str(b.config_path), str(bundle))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("added 0 blobs (0B), 0 manifests, 0 tags;")

    for ref in refs:
        assert ctr_rm(containerd, ref).returncode == 0
    for registry, server in SERVERS.items():
        write_hosts_toml(hosts_dir, registry, server, b.url)
    for ref in refs:
        _pull_ok(containerd, ref, hosts_dir)
    listed = ctr_images(containerd)
    assert {ref: listed[ref].digest for ref in refs} == refs
    assert "Traceback" not in b.log_text()
