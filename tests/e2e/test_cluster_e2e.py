"""Three `mirrorproxy serve` processes in one [cluster] in front of Debian's docker-registry.

Each test runs twice: the members with their own filesystem caches (peer-to-peer
node mirrors), and the members sharing one S3 bucket (a site mirror on SeaweedFS).
The upstream's access log counts what crossed from upstream: a blob once for the
whole cluster, whichever members the clients use; an image one member filled is
pulled by containerd through another without a blob from upstream; a member killed
in the middle of a download leaves the others serving. On S3, the store stopped and
started again: the members say so and recover without a restart.
"""

from __future__ import annotations

import hashlib
import http.client
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pytest

from mirrorproxy.core.rendezvous import blob_key, rank
from tests.support import images
from tests.support.cluster import member_ports
from tests.support.faultproxy import FaultProxy
from tests.support.procs import (
    Containerd,
    MirrorFactory,
    MirrorProcess,
    RegistryFactory,
    ctr_images,
    ctr_pull,
    ctr_rm,
    mirror_config,
    write_hosts_toml,
)
from tests.support.seaweed import SeaweedFS, running_seaweedfs, storage_toml

KiB = 1024
MiB = 1024 * KiB
NS = "docker.io"
CLIENTS = 30
DEADLINE = 120.0  # seconds: the bound on any wait in these tests
OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


@dataclass
class Cluster:
    members: list[MirrorProcess]

    @property
    def urls(self) -> list[str]:
        return [m.url for m in self.members]

    def by_rank(self, key: str) -> list[MirrorProcess]:
        """The members in rendezvous order for ``key``: the owner first."""
        order = rank(key, self.urls)
        return sorted(self.members, key=lambda m: order.index(m.url))


@pytest.fixture(params=["filesystem", "s3"])
def storage(request: pytest.FixtureRequest) -> str:
    """The members' ``[storage]`` TOML: none (each its own disk) or one shared bucket."""
    if request.param == "filesystem":
        return ""
    seaweedfs: SeaweedFS = request.getfixturevalue("seaweedfs")
    return storage_toml(seaweedfs, f"cluster-{uuid.uuid4().hex}/")


def start_cluster(
    mirror_process: MirrorFactory, tmp_path: Path, upstreams: Sequence[str], storage: str = ""
) -> Cluster:
    ports = member_ports(3)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    members = []
    for i, port in enumerate(ports):
        cluster = (
            "\n[cluster]\n"
            f'self = "{urls[i]}"\n'
            "members = [" + ", ".join(f'"{u}"' for u in urls) + "]\n"
            'peer_timeout = "1s"\n'
        ) + (f"\n{storage}" if storage else "")
        config = mirror_config(
            port, tmp_path / f"member{i}" / "cache", {NS: upstreams}, extra=cluster
        )
        members.append(mirror_process(config, port))
    return Cluster(members)


def blob_gets(requests: list[tuple[str, str]], digest: str | None = None) -> list[str]:
    gets = [
        path.split("/blobs/", 1)[1].split("?", 1)[0]
        for method, path in requests
        if method == "GET" and "/blobs/" in path
    ]
    return [d for d in gets if digest is None or d == digest]


def fetch(member: MirrorProcess, repo: str, digest: str) -> str:
    """GET a blob through ``member``; the sha256 digest of what came back."""
    url = f"{member.url}/v2/{repo}/blobs/{digest}?ns={NS}"
    hasher = hashlib.sha256()
    with OPENER.open(url, timeout=DEADLINE) as resp:
        while chunk := resp.read(1024 * KiB):
            hasher.update(chunk)
    return "sha256:" + hasher.hexdigest()


def no_tracebacks(members: Sequence[MirrorProcess]) -> None:
    for m in members:
        assert "Traceback" not in m.log_text(), m.log_text()[-3000:]


def test_thirty_clients_over_three_members_make_one_upstream_blob_get(
    upstream_registry: RegistryFactory, mirror_process: MirrorFactory, tmp_path: Path, storage: str
) -> None:
    registry = upstream_registry()
    image = images.build_image([24 * MiB], seed=81)
    images.push(registry.url, "library/big", "1", image, timeout=DEADLINE)
    layer = max(image.blobs, key=lambda d: len(image.blobs[d]))
    cluster = start_cluster(mirror_process, tmp_path, [registry.url], storage)

    with ThreadPoolExecutor(CLIENTS) as pool:
        futures = [
            pool.submit(fetch, cluster.members[i % 3], "library/big", layer)
            for i in range(CLIENTS)
        ]
        got = [f.result(timeout=DEADLINE) for f in futures]
    assert got == [layer] * CLIENTS
    assert blob_gets(registry.requests(), layer) == [layer]
    no_tracebacks(cluster.members)


def test_containerd_pulls_through_one_member_what_another_filled(
    upstream_registry: RegistryFactory,
    mirror_process: MirrorFactory,
    containerd: Containerd,
    tmp_path: Path,
    storage: str,
) -> None:
    registry = upstream_registry()
    image = images.build_image([512 * KiB, 300 * KiB, 64 * KiB], seed=82)
    images.push(registry.url, "library/app", "1.0", image)
    cluster = start_cluster(mirror_process, tmp_path, [registry.url], storage)
    ref = "docker.io/library/app:1.0"
    for i in (0, 1):
        write_hosts_toml(
            tmp_path / f"hosts{i}", NS, "https://registry-1.docker.io", cluster.urls[i]
        )

    first = ctr_pull(containerd, ref, tmp_path / "hosts0")
    assert first.returncode == 0, first.stderr[-3000:]
    filled = blob_gets(registry.requests())
    assert sorted(filled) == sorted(image.blob_digests())  # each blob once
    assert ctr_rm(containerd, ref).returncode == 0

    second = ctr_pull(containerd, ref, tmp_path / "hosts1")
    assert second.returncode == 0, second.stderr[-3000:]
    assert ctr_images(containerd)[ref].digest == image.digest
    assert blob_gets(registry.requests()) == filled  # no blob from upstream again
    no_tracebacks(cluster.members)


@pytest.fixture
def slow_upstream(upstream_registry: RegistryFactory) -> Iterator[tuple[FaultProxy, str]]:
    """A docker-registry holding a 32 MiB layer, behind a proxy sending 8 MiB/s."""
    registry = upstream_registry()
    image = images.build_image([32 * MiB], seed=83)
    images.push(registry.url, "library/big", "1", image, timeout=DEADLINE)
    proxy = FaultProxy(registry.url)
    proxy.start()
    proxy.faults.rate = 8 * MiB
    try:
        yield proxy, max(image.blobs, key=lambda d: len(image.blobs[d]))
    finally:
        proxy.stop()


def wait_for_download(member: MirrorProcess, cache_dir: Path, size: int) -> None:
    """Until ``member``'s temp file of a download holds ``size`` bytes."""
    deadline = time.monotonic() + DEADLINE
    while time.monotonic() < deadline:
        tmp = cache_dir / "tmp"
        if tmp.is_dir() and any(p.stat().st_size >= size for p in tmp.iterdir() if p.is_file()):
            return
        assert member.running, member.log_text()[-3000:]
        time.sleep(0.02)
    raise AssertionError(f"no download reached {size} bytes")


def test_a_member_killed_mid_download_leaves_the_others_serving(
    slow_upstream: tuple[FaultProxy, str],
    mirror_process: MirrorFactory,
    tmp_path: Path,
    storage: str,
) -> None:
    proxy, layer = slow_upstream
    cluster = start_cluster(mirror_process, tmp_path, [proxy.url], storage)
    owner, second, third = cluster.by_rank(blob_key(layer))
    owner_cache = tmp_path / f"member{cluster.members.index(owner)}" / "cache"

    with ThreadPoolExecutor(2) as pool:
        direct = pool.submit(fetch, owner, "library/big", layer)
        forwarded = pool.submit(fetch, second, "library/big", layer)
        wait_for_download(owner, owner_cache, 8 * MiB)
        owner.kill()  # SIGKILL, in the middle of the owner's download
        try:
            cut: str | None = direct.result(timeout=DEADLINE)
        except (OSError, http.client.HTTPException):
            cut = None
        assert cut != layer  # the owner's own client is cut short
        # The member that was being served by the owner resumes from the next one.
        assert forwarded.result(timeout=DEADLINE) == layer
    # A retry through the third member succeeds.
    assert fetch(third, "library/big", layer) == layer
    no_tracebacks([second, third])


def status_of(url: str, accept: str = "*/*") -> int:
    """The HTTP status of a GET (the body read and dropped)."""
    request = urllib.request.Request(url, headers={"Accept": accept})  # noqa: S310 - loopback
    try:
        with OPENER.open(request, timeout=DEADLINE) as resp:
            resp.read()
            return int(resp.status)
    except urllib.error.HTTPError as err:
        err.read()
        return err.code


def until(what: str, check: Callable[[], bool], bound: float = DEADLINE) -> None:
    deadline = time.monotonic() + bound
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not within {bound:.0f}s")
        time.sleep(0.25)


def test_members_on_s3_ride_out_the_store_stopping_and_coming_back(
    upstream_registry: RegistryFactory, mirror_process: MirrorFactory, tmp_path: Path
) -> None:
    registry = upstream_registry()
    image = images.build_image([256 * KiB, 64 * KiB], seed=84)
    images.push(registry.url, "library/app", "1.0", image)
    with running_seaweedfs(tmp_path / "seaweedfs") as store:
        cluster = start_cluster(
            mirror_process, tmp_path, [registry.url], storage_toml(store, "outage/")
        )
        first = cluster.members[0]
        manifest = f"/v2/library/app/manifests/1.0?ns={NS}"
        assert status_of(first.url + manifest, image.media_type) == 200
        blobs = [f"/v2/library/app/blobs/{d}?ns={NS}" for d in image.blob_digests()]
        for i, path in enumerate(blobs):  # cached, through different members
            assert status_of(cluster.members[i % 3].url + path) == 200

        def committed() -> bool:  # a client has the last byte before the upload completes
            logs = "".join(m.log_text() for m in cluster.members)
            return all(f"cached blob {d} " in logs for d in image.blob_digests())

        until("every blob committed to the bucket", committed)

        store.stop()
        for m in cluster.members:
            assert status_of(m.url + "/readyz") == 503
            assert status_of(m.url + blobs[0]) == 503  # a clear error, not a hang
        # Manifests in memory still serve.
        assert status_of(first.url + manifest, image.media_type) == 200

        store.start()
        for m in cluster.members:  # no restart: each member finds the store again
            ready = m.url + "/readyz"

            def answers(ready: str = ready) -> bool:
                return status_of(ready) == 200

            until(f"{ready} answering 200", answers)
            for path in blobs:
                assert status_of(m.url + path) == 200
        assert len(blob_gets(registry.requests())) == len(blobs)  # nothing fetched twice
        no_tracebacks(cluster.members)
