"""The container image, built by ``docker/build.sh --local-base`` and run for real.

The image is built once for the module, on a Debian base made by mmdebstrap from this
machine's apt sources (cached by build.sh, so a second run only rebuilds the mirror's
own layers). podman runs it on the host network with a config and a cache volume;
containerd pulls through it with the hosts.toml the image's own ``mirrorproxy hosts``
wrote; the container is stopped and started, and the second pull is all cache hits.
The ``--save`` archive loads into both containerd and podman.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.support import images
from tests.support.container import (
    BUILD_SH,
    BuiltImage,
    CommandError,
    Container,
    build_image,
    missing_image_requirements,
    podman,
    process_uids,
    remove_image,
    run,
)
from tests.support.procs import (
    Containerd,
    RegistryFactory,
    ctr,
    ctr_images,
    ctr_pull,
    ctr_rm,
    free_port,
    mirror_config,
    wait_for_v2,
)
from tests.support.requirements import REQUIRE_E2E_ENV

KiB = 1024
TAG = "localhost/mirrorproxy:e2e-test"
UID = 10001
CONFIG_DIR = "/etc/mirrorproxy"  # where the image looks for config.toml
CACHE_DIR = Path("/var/lib/mirrorproxy")  # the image's cache volume
DEAD = "http://127.0.0.1:9"  # an upstream that is never asked


@pytest.fixture(scope="module")
def image(
    e2e_requirements: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[BuiltImage]:
    """Build the image once for every test here; skip (or fail) without the tools."""
    missing = missing_image_requirements()
    if missing:
        reason = "image build prerequisites missing: " + "; ".join(missing)
        if os.environ.get(REQUIRE_E2E_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
        pytest.skip(reason)
    archive = tmp_path_factory.mktemp("image") / "mirrorproxy.tar"
    built = build_image(TAG, archive)
    # The size is part of the report (shown with -s or on failure).
    print(built.output.strip().splitlines()[-2])
    yield built
    remove_image(TAG)  # the base stays, cached for the next run


@pytest.fixture
def volume() -> Iterator[str]:
    name = podman("volume", "create").strip()
    yield name
    run(["podman", "volume", "rm", "--force", name])


def _cache_results(port: int) -> dict[str, float]:
    """Sum mirrorproxy_cache_requests_total by result, from the mirror's /metrics."""
    text = images.request("GET", f"http://127.0.0.1:{port}/metrics").body.decode()
    totals: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "mirrorproxy_cache_requests_total":
                result = sample.labels["result"]
                totals[result] = totals.get(result, 0.0) + sample.value
    return {k: v for k, v in totals.items() if v}


def _wait_serving(container: Container, port: int) -> None:
    try:
        wait_for_v2(port, timeout=30)
    except RuntimeError as err:
        raise AssertionError(f"{err}\n--- podman logs ---\n{container.logs()}") from None


def test_image_serves_containerd_across_a_restart(
    image: BuiltImage,
    upstream_registry: RegistryFactory,
    containerd: Containerd,
    volume: str,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    registry = upstream_registry()
    app = images.build_image([192 * KiB, 64 * KiB], seed=17)
    images.push(registry.url, "library/app", "1.2", app)
    pushed = len(registry.requests())
    ref = "docker.io/library/app:1.2"

    # A config of our own, listening where the image's default command does not: the
    # HEALTHCHECK has to find this address by itself.
    port = free_port()
    etc = tmp_path / "etc"
    etc.mkdir()
    config = mirror_config(port, CACHE_DIR, {"docker.io": [registry.url]}, tag_ttl="1h")
    (etc / "config.toml").write_text(config)
    mounts = [f"{etc}:{CONFIG_DIR}:ro", f"{volume}:{CACHE_DIR}"]

    # hosts.toml from the image itself, written as its non-root user.
    os.chown(hosts_dir, UID, UID)
    wrote = podman(
        "run", "--rm", "--network", "host", "--ulimit", "nofile=20000:20000",
        "--ulimit", "nproc=4096:4096", "-v", mounts[0], "-v", f"{hosts_dir}:/out",
        TAG, "hosts", "--config", f"{CONFIG_DIR}/config.toml", "--out", "/out",
    )  # fmt: skip
    assert "wrote /out/docker.io/hosts.toml" in wrote
    hosts_toml = (hosts_dir / "docker.io" / "hosts.toml").read_text()
    assert f'[host."http://127.0.0.1:{port}"]' in hosts_toml

    container = Container(
        TAG, mounts=mounts, command=["serve", "--config", f"{CONFIG_DIR}/config.toml"]
    )
    try:
        container.run()
        _wait_serving(container, port)

        pulled = ctr_pull(containerd, ref, hosts_dir)
        assert pulled.returncode == 0, pulled.stderr + container.logs()
        assert ctr_images(containerd)[ref].digest == app.digest
        fetched = [p for m, p in registry.requests()[pushed:] if m == "GET" and "/blobs/" in p]
        assert len(fetched) == len(app.blobs)  # each blob fetched once, through the mirror

        health = container.healthcheck()
        assert health.returncode == 0, health.stdout + health.stderr
        assert container.health_status() == "healthy"

        pids = container.host_pids()
        assert pids
        for pid in pids:
            assert 0 not in process_uids(pid), f"pid {pid} runs as root"

        # SIGTERM reaches the server as PID 1 and it exits cleanly, not by SIGKILL.
        assert container.stop() == 0
        container.start()
        _wait_serving(container, port)

        assert ctr_rm(containerd, ref).returncode == 0
        before = len(registry.requests())
        again = ctr_pull(containerd, ref, hosts_dir)
        assert again.returncode == 0, again.stderr + container.logs()
        assert registry.requests()[before:] == []  # nothing went upstream
        # Counters restart with the server: they count only the second pull.
        results = _cache_results(port)
        assert set(results) == {"hit"}, results
        assert results["hit"] >= len(app.blobs) + 1  # every blob and the manifest
        assert container.healthcheck().returncode == 0
    finally:
        container.remove()


def test_image_contents(image: BuiltImage) -> None:
    [info] = json.loads(podman("image", "inspect", TAG))
    config = info["Config"]
    assert config["User"] == f"{UID}:{UID}"
    assert config["Entrypoint"] == ["mirrorproxy"]
    assert str(CACHE_DIR) in config["Volumes"]
    # Kept only in the docker image format: build.sh asks for it.
    assert info["Healthcheck"]["Test"] == ["CMD", "mirrorproxy", "healthcheck"]

    probe = (
        "import json, os, shutil, importlib.util as u;"
        "print(json.dumps({"
        "'tools': [t for t in ('pip', 'pip3', 'gcc', 'cc', 'make', 'apt-get') if shutil.which(t)],"
        "'pip': u.find_spec('pip') is not None, 'ensurepip': u.find_spec('ensurepip') is not None,"
        "'wheels': os.path.exists('/usr/share/python-wheels'),"
        "'sources': os.listdir('/etc/apt/sources.list.d')"
        " + (['sources.list'] if os.path.exists('/etc/apt/sources.list') else []),"
        "'uid': os.getuid()}))"
    )
    out = podman(
        "run", "--rm", "--network", "none", "--ulimit", "nofile=20000:20000",
        "--ulimit", "nproc=4096:4096", "--entrypoint", "python3", TAG, "-c", probe,
    )  # fmt: skip
    facts = json.loads(out)
    assert facts == {
        "tools": [],
        "pip": False,
        "ensurepip": False,
        "wheels": False,
        "sources": [],  # the build machine's apt sources were stripped
        "uid": UID,
    }
    version = podman(
        "run", "--rm", "--network", "none", "--ulimit", "nofile=20000:20000",
        "--ulimit", "nproc=4096:4096", TAG, "--version",
    )  # fmt: skip
    assert version.startswith("mirrorproxy ")


def test_saved_archive_loads_into_containerd_and_podman(
    image: BuiltImage, containerd: Containerd, tmp_path: Path
) -> None:
    imported = ctr(containerd, "images", "import", str(image.archive), timeout=300)
    assert imported.returncode == 0, imported.stderr
    assert TAG in ctr_images(containerd)

    # The README's next step on a node: fill its cache from a bundle with this image.
    cache = tmp_path / "cache"
    cache.mkdir()
    (tmp_path / "mp.toml").write_text(mirror_config(free_port(), cache, {"docker.io": [DEAD]}))
    exported = run(
        [sys.executable, "-m", "mirrorproxy", "export", "--config", str(tmp_path / "mp.toml"),
         "--out", str(tmp_path / "site.tar")],
    )  # fmt: skip
    assert exported.startswith("exported 0 tags")
    os.chown(cache, UID, UID)
    filled = ctr(
        containerd, "run", "--rm",
        "--mount", f"type=bind,src={cache},dst={CACHE_DIR},options=rbind:rw",
        "--mount", f"type=bind,src={tmp_path / 'site.tar'},dst=/site.tar,options=rbind:ro",
        TAG, "mirrorproxy-import",
        "mirrorproxy", "import", "--config", f"{CONFIG_DIR}/config.toml", "/site.tar",
        timeout=120,
    )  # fmt: skip
    assert filled.returncode == 0, filled.stdout + filled.stderr
    assert "added 0 blobs" in filled.stdout
    assert (cache / "index.db").stat().st_uid == UID  # written by the image's user

    # A separate podman store stands in for an air-gapped node (podman wants a short
    # runroot path).
    tmp = Path(tempfile.mkdtemp(prefix="podman-", dir="/tmp"))
    store = [
        "--root", str(tmp / "root"), "--runroot", str(tmp / "run"), "--storage-driver", "vfs",
    ]  # fmt: skip
    try:
        loaded = run(["podman", *store, "load", "--input", str(image.archive)], timeout=300)
        assert TAG in loaded
        [info] = json.loads(run(["podman", *store, "image", "inspect", TAG]))
        assert info["Healthcheck"]["Test"] == ["CMD", "mirrorproxy", "healthcheck"]
        assert info["Config"]["User"] == f"{UID}:{UID}"
    finally:
        run(["podman", *store, "system", "reset", "--force"], timeout=300)
        shutil.rmtree(tmp, ignore_errors=True)


def test_build_sh_usage() -> None:
    with pytest.raises(CommandError, match="unknown option --bogus") as info:
        run([str(BUILD_SH), "--bogus"])
    assert "docker/build.sh [--local-base] [--save FILE] [TAG]" in str(info.value)
