"""The OCI 1.1 referrers API through the mirror: passed through, cached like a tag,
filtered by ``artifactType`` locally, stale on outages, 404 without upstream support."""

from __future__ import annotations

from urllib.parse import quote

from tests.fakes.registry import OCI_INDEX, OCI_MANIFEST
from tests.support.mirror import MirrorFactory, RunningFake
from tests.support.paths import NS, REPO

SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
SBOM = "application/spdx+json"


def referrers_path(subject: str, query: str = "") -> str:
    return f"/v2/{REPO}/referrers/{subject}?ns={NS}{query}"


def descriptor(n: int, artifact_type: str) -> dict[str, object]:
    return {
        "mediaType": OCI_MANIFEST,
        "digest": f"sha256:{n:064x}",
        "size": 100 + n,
        "artifactType": artifact_type,
    }


async def test_referrers_are_cached_and_filtered_locally(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="5m")
    img = fake.registry.add_image(REPO, "1")
    fake.registry.referrers[(REPO, img.digest)] = [descriptor(1, SIG), descriptor(2, SBOM)]

    resp = await mirror.client.get(referrers_path(img.digest))
    assert resp.status == 200
    assert resp.headers["Content-Type"] == OCI_INDEX
    doc = await resp.json(content_type=None)
    assert [m["artifactType"] for m in doc["manifests"]] == [SIG, SBOM]
    assert "OCI-Filters-Applied" not in resp.headers

    filtered = await mirror.client.get(
        referrers_path(img.digest, f"&artifactType={quote(SIG, safe='')}")
    )
    assert filtered.headers["OCI-Filters-Applied"] == "artifactType"
    doc = await filtered.json(content_type=None)
    assert [m["artifactType"] for m in doc["manifests"]] == [SIG]
    assert len(fake.registry.calls("GET")) == 1  # one upstream answer serves every filter


async def test_stale_referrers_on_outage_and_offline(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="0s")
    img = fake.registry.add_image(REPO, "1")
    fake.registry.referrers[(REPO, img.digest)] = [descriptor(1, SIG)]
    assert (await mirror.client.get(referrers_path(img.digest))).status == 200

    fake.registry.faults.status = 503
    stale = await mirror.client.get(referrers_path(img.digest))
    assert stale.status == 200
    assert stale.headers["Warning"].startswith("110 ")
    assert len((await stale.json(content_type=None))["manifests"]) == 1

    offline = await start_mirror([fake.url], cache={"offline": True})
    cached = await offline.client.get(referrers_path(img.digest))
    assert cached.status == 200
    missing = await offline.client.get(referrers_path(f"sha256:{'1' * 64}"))
    assert missing.status == 404


async def test_no_referrers_api_upstream_is_a_404(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    fake.registry.referrers_api = False
    mirror = await start_mirror([fake.url])
    img = fake.registry.add_image(REPO, "1")
    resp = await mirror.client.get(referrers_path(img.digest))
    assert resp.status == 404  # clients fall back to the sha256-<hex> tag scheme
    body = await resp.json()
    assert "referrers API" in body["errors"][0]["message"]


async def test_an_empty_list_is_an_answer(fake: RunningFake, start_mirror: MirrorFactory) -> None:
    mirror = await start_mirror([fake.url])
    resp = await mirror.client.get(referrers_path(f"sha256:{'2' * 64}"))
    assert resp.status == 200
    assert (await resp.json(content_type=None))["manifests"] == []


async def test_a_dead_upstream_beside_one_without_the_api_is_still_a_404(
    fake: RunningFake, start_mirror: MirrorFactory, closed_port_url: str
) -> None:
    fake.registry.referrers_api = False
    mirror = await start_mirror([closed_port_url, fake.url])
    img = fake.registry.add_image(REPO, "1")
    resp = await mirror.client.get(referrers_path(img.digest))
    assert resp.status == 404  # the reachable registry answered: fall back to tags
    assert "referrers API" in (await resp.json())["errors"][0]["message"]
