"""What real clients send, and what they must get back: several Accept lines, no
``ns=`` (routing by path), signed schema1 manifests, upstream 4xx answers,
references that cannot exist, and HEAD requests that fail."""

from __future__ import annotations

import base64
import json

import pytest
from multidict import CIMultiDict

from mirrorproxy.core.oci import DOCKER_V1_SIGNED, manifest_digest
from tests.fakes.registry import DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, manifest_path

# containers/image (podman, skopeo, CRI-O) sends these as six separate lines.
CONTAINERS_IMAGE_ACCEPT = (
    OCI_MANIFEST,
    "application/vnd.docker.distribution.manifest.v2+json",
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    "application/vnd.docker.distribution.manifest.v1+json",
    DOCKER_LIST,
    OCI_INDEX,
)
# Docker Engine sends six lines too, in random order, often application/json first.
DOCKER_ACCEPT = (
    "application/json",
    DOCKER_LIST,
    "application/vnd.docker.distribution.manifest.v1+prettyjws",
    DOCKER_MANIFEST,
    OCI_INDEX,
    OCI_MANIFEST,
)


def lines(types: tuple[str, ...]) -> CIMultiDict[str]:
    """One header line per media type, as containers/image and Docker send them."""
    headers: CIMultiDict[str] = CIMultiDict()
    for t in types:
        headers.add("Accept", t)
    return headers


async def test_every_accept_line_is_forwarded_and_keys_the_tag(
    fake: RunningFake, mirror: Mirror
) -> None:
    amd64 = fake.registry.add_image(REPO, "amd64-only", seed="a")
    arm64 = fake.registry.add_image(REPO, "arm64-only", seed="b")
    index_digest, index_body = fake.registry.add_index(REPO, "multi", [amd64, arm64])

    resp = await mirror.client.get(
        manifest_path(REPO, "multi"), headers=lines(CONTAINERS_IMAGE_ACCEPT)
    )
    assert resp.status == 200
    assert await resp.read() == index_body
    assert resp.headers["Docker-Content-Digest"] == index_digest
    (sent,) = fake.registry.calls("GET", "manifests")
    forwarded = {t.strip() for t in ",".join(sent.headers.getall("Accept")).split(",")}
    assert forwarded == set(CONTAINERS_IMAGE_ACCEPT)

    # Docker's six lines in another order are the same set: a hit, nothing upstream.
    fake.registry.clear_log()
    again = await mirror.client.get(
        manifest_path(REPO, "multi"), headers=lines(tuple(sorted(CONTAINERS_IMAGE_ACCEPT)))
    )
    assert await again.read() == index_body
    assert fake.registry.calls() == []


async def test_docker_accept_order_gets_the_index_every_time(
    fake: RunningFake, mirror: Mirror
) -> None:
    amd64 = fake.registry.add_image(REPO, "a", seed="a")
    arm64 = fake.registry.add_image(REPO, "b", seed="b")
    _, index_body = fake.registry.add_index(REPO, "multi", [amd64, arm64])
    for order in (DOCKER_ACCEPT, DOCKER_ACCEPT[::-1], DOCKER_ACCEPT[2:] + DOCKER_ACCEPT[:2]):
        resp = await mirror.client.get(manifest_path(REPO, "multi"), headers=lines(order))
        assert resp.status == 200
        assert await resp.read() == index_body


def signed_schema1(name: str, tag: str) -> tuple[bytes, str]:
    """A schema1 manifest with a JWS signature block, and its registry digest (the
    hash of the payload without the signatures)."""
    payload = json.dumps(
        {"schemaVersion": 1, "name": name, "tag": tag, "architecture": "amd64", "fsLayers": []},
        indent=3,
    ).encode()
    tail = b"\n}"
    assert payload.endswith(tail)
    length = len(payload) - len(tail)

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).decode().rstrip("=")

    protected = b64(json.dumps({"formatLength": length, "formatTail": b64(tail)}).encode())
    signature = {"header": {"alg": "ES256"}, "signature": "c2ln", "protected": protected}
    signed = (
        payload[:length]
        + b',\n   "signatures": '
        + json.dumps([signature], indent=3).encode()
        + tail
    )
    return signed, "sha256:" + manifest_digest(payload, "x").hex


async def test_signed_schema1_is_served_under_its_payload_digest(
    start_fake: FakeFactory, start_mirror: MirrorFactory, closed_port_url: str
) -> None:
    fake = await start_fake()
    body, digest = signed_schema1(REPO, "old")
    assert manifest_digest(body, DOCKER_V1_SIGNED) != manifest_digest(body, OCI_MANIFEST)
    fake.registry.add_manifest(REPO, "old", DOCKER_V1_SIGNED, body, digest=digest)
    mirror = await start_mirror([fake.url])

    resp = await mirror.client.get(
        manifest_path(REPO, "old"), headers={"Accept": DOCKER_V1_SIGNED}
    )
    assert resp.status == 200
    assert await resp.read() == body
    assert resp.headers["Docker-Content-Digest"] == digest
    assert await mirror.metric("mirrorproxy_upstream_up", endpoint=fake.url) == 1

    fake.registry.faults.status = 503  # by digest: from the cache, verified on read
    by_digest = await mirror.client.get(manifest_path(REPO, digest))
    assert by_digest.status == 200
    assert await by_digest.read() == body


async def test_a_path_prefix_selects_the_namespace_without_ns(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    docker, quay = await start_fake(), await start_fake()
    tool = quay.registry.add_image("org/tool", "1")
    mirror = await start_mirror([], namespaces={NS: [docker.url], "quay.io": [quay.url]})

    resp = await mirror.client.get("/v2/quay.io/org/tool/manifests/1")
    assert resp.status == 200
    assert await resp.read() == tool.manifest
    assert [r.path for r in quay.registry.calls()] == ["/v2/org/tool/manifests/1"]
    assert docker.registry.calls() == []

    blob = await mirror.client.get(f"/v2/quay.io/org/tool/blobs/{tool.layer_digests[0]}")
    assert await blob.read() == tool.layers[0]

    # ns= keeps precedence: the prefix is then part of the repository name.
    quay.registry.clear_log()
    resp = await mirror.client.get(f"/v2/quay.io/org/tool/manifests/1?ns={NS}")
    assert resp.status == 404
    assert [r.path for r in docker.registry.calls()] == ["/v2/quay.io/org/tool/manifests/1"]
    assert quay.registry.calls() == []


async def test_an_unconfigured_prefix_stays_part_of_the_name(
    fake: RunningFake, mirror: Mirror
) -> None:
    img = fake.registry.add_image("ghcr.io/org/x", "1")
    resp = await mirror.client.get("/v2/ghcr.io/org/x/manifests/1")
    assert resp.status == 200  # default namespace, repository "ghcr.io/org/x"
    assert await resp.read() == img.manifest


async def test_an_upstream_4xx_is_relayed_not_bridged_with_stale(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="0s")
    img = fake.registry.add_image(REPO, "3")
    assert (await mirror.client.get(manifest_path(REPO, "3"))).status == 200

    fake.registry.faults.status = 400
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 400
    assert "Warning" not in resp.headers
    body = await resp.json()
    assert body["errors"][0]["code"] == "UNAVAILABLE"  # the upstream's own code

    fake.registry.faults.status = 503  # an outage: now the last answer stands in
    stale = await mirror.client.get(manifest_path(REPO, "3"))
    assert stale.status == 200
    assert stale.headers["Warning"].startswith("110 ")
    assert await stale.read() == img.manifest

    fake.registry.faults.status = 429  # slowing down is an outage too
    throttled = await mirror.client.get(manifest_path(REPO, "3"))
    assert throttled.status == 200
    assert throttled.headers["Warning"].startswith("110 ")


async def test_a_stale_answer_never_crosses_accept_variants(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="0s")
    amd64 = fake.registry.add_image(REPO, "a", seed="a")
    arm64 = fake.registry.add_image(REPO, "b", seed="b")
    fake.registry.add_index(REPO, "multi", [amd64, arm64])
    single = fake.registry.add_image(REPO, "multi", seed="single")  # same tag, v2 manifest

    index_client = lines(CONTAINERS_IMAGE_ACCEPT)
    assert (await mirror.client.get(manifest_path(REPO, "multi"), headers=index_client)).ok
    only_manifest = {"Accept": OCI_MANIFEST}
    got = await mirror.client.get(manifest_path(REPO, "multi"), headers=only_manifest)
    assert await got.read() == single.manifest

    fake.registry.faults.status = 503
    for accept in ("*/*", None):
        headers = {"Accept": accept} if accept else {}
        resp = await mirror.client.get(manifest_path(REPO, "multi"), headers=headers)
        assert resp.status == 502, accept  # no record of its own: no guess between the two
    # A client naming both index types gets the index that an index-taking client got.
    docker = await mirror.client.get(manifest_path(REPO, "multi"), headers=lines(DOCKER_ACCEPT))
    assert docker.status == 200
    assert docker.headers["Content-Type"] == OCI_INDEX


async def test_one_dead_upstream_and_one_404_is_a_404(
    fake: RunningFake, start_mirror: MirrorFactory, closed_port_url: str
) -> None:
    mirror = await start_mirror([closed_port_url, fake.url])
    resp = await mirror.client.get(manifest_path(REPO, "nope"))
    assert resp.status == 404
    body = await resp.json()
    assert body["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert closed_port_url in json.dumps(body["errors"][0]["detail"])

    blob = await mirror.client.get(f"/v2/{REPO}/blobs/sha256:{'0' * 64}?ns={NS}")
    assert blob.status == 404
    assert (await blob.json())["errors"][0]["code"] == "BLOB_UNKNOWN"


async def test_a_reference_that_cannot_exist_is_manifest_unknown(
    fake: RunningFake, mirror: Mirror
) -> None:
    for method in ("GET", "HEAD"):
        resp = await mirror.client.request(method, f"/v2/{REPO}/manifests/.INVALID_MANIFEST_NAME")
        assert resp.status == 404
    assert fake.registry.calls() == []


@pytest.mark.parametrize(
    ("path", "status"),
    [
        (f"/v2/{REPO}/manifests/missing?ns={NS}", 404),  # containerd's tag resolve
        (f"/v2/{REPO}/blobs/sha256:{'0' * 64}?ns={NS}", 404),
        (f"/v2/Bad/Name/manifests/3?ns={NS}", 400),
        (f"/v2/{REPO}/manifests/3?ns=quay.io", 404),
    ],
)
async def test_head_errors_keep_their_status(
    fake: RunningFake, mirror: Mirror, path: str, status: int
) -> None:
    """A HEAD that fails keeps its error's status (containerd resolves tags with HEAD) and
    announces the JSON error's length, with no body."""
    resp = await mirror.client.head(path)
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert int(resp.headers["Content-Length"]) > 0
    assert await resp.read() == b""
