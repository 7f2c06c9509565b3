"""containerd pulls through the real `mirrorproxy serve` whose cache is an S3 bucket.

SeaweedFS (one per session) holds the cache; Debian's docker-registry is the
upstream. The second pull of an image is served from the bucket: the upstream's
access log shows no more blob GETs. With ``redirect = true`` containerd follows the
mirror's 307s to presigned URLs of the bucket.
"""

from __future__ import annotations

import re
import uuid
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
from tests.support.seaweed import SeaweedFS, storage_toml

KiB = 1024
REF = "docker.io/library/app:1.0"


def _blob_gets(requests: list[tuple[str, str]]) -> list[str]:
    return [
        path.split("/blobs/", 1)[1].split("?", 1)[0]
        for method, path in requests
        if method == "GET" and "/blobs/" in path
    ]


def _pull_ok(ctd: Containerd, hosts: Path) -> None:
    proc = ctr_pull(ctd, REF, hosts)
    assert proc.returncode == 0, f"ctr pull {REF} failed:\n{proc.stderr[-3000:]}"


@pytest.mark.parametrize("redirect", [False, True], ids=["streamed", "redirected"])
def test_containerd_pulls_twice_through_a_mirror_on_s3_the_second_time_from_the_bucket(
    redirect: bool,
    seaweedfs: SeaweedFS,
    upstream_registry: RegistryFactory,
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    hub = upstream_registry()
    app = images.build_image([64 * KiB, 300 * KiB, 1024 * KiB], seed=31 + redirect)
    images.push(hub.url, "library/app", "1.0", app)
    port = free_port()
    storage = storage_toml(seaweedfs, f"e2e-{uuid.uuid4().hex}/", redirect=redirect)
    config = mirror_config(port, tmp_path / "cache", {"docker.io": [hub.url]}, extra=storage)
    mirror = mirror_process(config, port)
    write_hosts_toml(hosts_dir, "docker.io", "https://registry-1.docker.io", mirror.url)

    _pull_ok(containerd, hosts_dir)
    first = _blob_gets(hub.requests())
    assert set(first) == app.blob_digests()

    assert ctr_rm(containerd, REF).returncode == 0
    _pull_ok(containerd, hosts_dir)
    assert ctr_images(containerd)[REF].digest == app.digest
    assert _blob_gets(hub.requests()) == first  # no upstream blob GET the second time
    blobs_dir = tmp_path / "cache" / "blobs"
    assert not blobs_dir.exists() or not any(p.is_file() for p in blobs_dir.rglob("*"))
    log = mirror.log_text()
    assert "Traceback" not in log
    redirects = re.findall(r"\"GET /v2/library/app/blobs/\S+\" 307 ", log)
    if redirect:
        assert redirects, log[-3000:]
    else:
        assert not redirects
