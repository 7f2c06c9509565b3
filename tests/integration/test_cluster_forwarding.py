"""What else a member asks the key's owner first: blob HEADs and referrers.

A HEAD for a blob this member lacks is answered by the owner, which may hold it
(each member of a filesystem cluster keeps what it serves); referrers are cached
like a tag, so the owner's fetch serves every member. Tag lists are live data,
never cached: forwarding them would only add a hop, so they are not.
"""

from __future__ import annotations

from mirrorproxy.core.rendezvous import blob_key, referrers_key
from tests.fakes.registry import payload
from tests.integration.test_cluster import REPO, by_rank, get_blob
from tests.support.cluster import ClusterFactory
from tests.support.mirror import FakeFactory
from tests.support.paths import NS

SIG = "application/vnd.dev.cosign.artifact.sig.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"


async def test_a_blob_head_is_answered_by_the_owner_that_holds_it(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    blob = payload(300 * 1024, "head-forwarded")
    digest = fake.registry.add_blob(blob)
    mirrors = await start_cluster([fake.url])
    owner, second, third = by_rank(blob_key(digest), mirrors)
    assert await get_blob(owner, digest) == (200, blob)
    await owner.settled()

    for m in (second, third):
        resp = await m.client.head(f"/v2/{REPO}/blobs/{digest}?ns={NS}")
        assert resp.status == 200
        assert resp.content_length == len(blob)
    assert fake.registry.calls("HEAD") == []  # the owner had it
    assert await second.metric("mirrorproxy_cluster_forwarded_total", kind="blob", result="ok")


async def test_a_blob_head_the_owner_lacks_is_a_404_relayed(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    mirrors = await start_cluster([fake.url])
    missing = "sha256:" + "0" * 64
    _, second, _ = by_rank(blob_key(missing), mirrors)
    resp = await second.client.head(f"/v2/{REPO}/blobs/{missing}?ns={NS}")
    assert resp.status == 404
    assert len(fake.registry.calls("HEAD")) == 1  # asked by the owner, not again


async def test_referrers_through_every_member_are_one_upstream_fetch(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    img = fake.registry.add_image(REPO, "1")
    sig = {"mediaType": OCI_MANIFEST, "digest": "sha256:" + "1" * 64, "size": 9}
    fake.registry.referrers[(REPO, img.digest)] = [{**sig, "artifactType": SIG}]
    mirrors = await start_cluster([fake.url])
    ordered = by_rank(referrers_key(NS, REPO, img.digest), mirrors)
    for m in ordered[::-1]:  # the owner last
        resp = await m.client.get(f"/v2/{REPO}/referrers/{img.digest}?ns={NS}")
        assert resp.status == 200
        doc = await resp.json(content_type=None)
        assert [d["artifactType"] for d in doc["manifests"]] == [SIG]
    referrers = [r for r in fake.registry.calls("GET") if "/referrers/" in r.path]
    assert len(referrers) == 1
