"""A cluster of three mirrors fetches each blob and tag from upstream once.

Three in-process mirrors on loopback ports, each with its own cache, in front of
one in-process fake upstream that counts what it is asked. A member asks a key's
owner (rendezvous hashing) before its upstreams; the owner serves it itself.
"""

from __future__ import annotations

import asyncio
import hashlib

import pytest
from aiohttp import ClientPayloadError

from mirrorproxy.core.rendezvous import FORWARDED_HEADER, blob_key, rank, tag_key
from tests.fakes.registry import FakeRegistry, payload, sha256
from tests.support.cluster import ClusterFactory
from tests.support.mirror import FakeFactory, Mirror
from tests.support.paths import NS
from tests.support.waiting import WAIT

MiB = 1024 * 1024
REPO = "library/app"


def url_of(m: Mirror) -> str:
    assert m.config.cluster is not None
    return m.config.cluster.self_url


def by_rank(key: str, mirrors: list[Mirror]) -> list[Mirror]:
    """The members in rendezvous order for ``key``: the owner first."""
    order = rank(key, [url_of(m) for m in mirrors])
    return sorted(mirrors, key=lambda m: order.index(url_of(m)))


def slow(registry: FakeRegistry) -> None:
    """Blob bodies take a moment, so that concurrent clients overlap."""
    registry.faults.chunk_size = 64 * 1024
    registry.faults.chunk_delay = 0.01


async def get_blob(m: Mirror, digest: str, **headers: str) -> tuple[int, bytes]:
    resp = await m.client.get(f"/v2/{REPO}/blobs/{digest}?ns={NS}", headers=headers)
    return resp.status, await resp.read()


async def herd(mirrors: list[Mirror], digest: str, clients: int = 30) -> None:
    """``clients`` concurrent GETs of ``digest`` spread over ``mirrors``: all whole."""
    async with asyncio.timeout(WAIT):
        got = await asyncio.gather(
            *(get_blob(mirrors[i % len(mirrors)], digest) for i in range(clients))
        )
    assert [status for status, _ in got] == [200] * clients
    assert all(hashlib.sha256(body).hexdigest() == digest.split(":")[1] for _, body in got)


async def test_thirty_clients_over_three_members_make_one_upstream_get(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    blob = payload(2 * MiB, "cluster-cold")
    digest = fake.registry.add_blob(blob)
    slow(fake.registry)
    mirrors = await start_cluster([fake.url])

    await herd(mirrors, digest)
    assert len(fake.registry.calls("GET", "blobs")) == 1

    owner, *others = by_rank(blob_key(digest), mirrors)
    assert await owner.metric("mirrorproxy_cluster_owned_fills_total", kind="blob") == 1
    assert await owner.metric_sum("mirrorproxy_cluster_forwarded_total") == 0
    for m in others:
        assert await m.metric("mirrorproxy_cluster_forwarded_total", kind="blob", result="ok") == 1
        assert await m.metric("mirrorproxy_cluster_members") == 3
    for m in mirrors:  # each member keeps its copy (filesystem stores are not shared)
        await m.settled()
        assert m.blob_path(digest).read_bytes() == blob


async def test_a_tag_through_all_three_members_is_one_upstream_manifest_get(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    image = fake.registry.add_image(REPO, "1.0")
    mirrors = await start_cluster([fake.url])
    accept = "application/vnd.oci.image.manifest.v1+json"
    for m in by_rank(tag_key(NS, REPO, "1.0"), mirrors)[::-1]:  # the owner last
        resp = await m.client.get(f"/v2/{REPO}/manifests/1.0?ns={NS}", headers={"Accept": accept})
        assert resp.status == 200
        assert await resp.read() == image.manifest
        assert resp.headers["Docker-Content-Digest"] == image.digest
    assert len(fake.registry.calls(kind="manifests")) == 1
    # Every member keeps the manifest: by digest it is a hit everywhere.
    for m in mirrors:
        resp = await m.client.get(f"/v2/{REPO}/manifests/{image.digest}?ns={NS}")
        assert resp.status == 200
    assert len(fake.registry.calls(kind="manifests")) == 1


async def test_when_the_owner_is_down_the_next_member_takes_over(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    blobs = [payload(256 * 1024, f"owner-down-{i}") for i in range(20)]
    digests = [fake.registry.add_blob(b) for b in blobs]
    mirrors = await start_cluster([fake.url], cluster={"peer_timeout": "1s"})
    owner, second, third = by_rank(blob_key(digests[0]), mirrors)
    await owner.client.close()  # its port now refuses connections

    assert await get_blob(third, digests[0]) == (200, blobs[0])
    # The third asked the owner (refused), then the second, which fetched it.
    assert len(fake.registry.calls("GET", "blobs")) == 1
    assert await third.metric("mirrorproxy_cluster_forwarded_total", result="error") == 1
    assert await third.metric("mirrorproxy_cluster_forwarded_total", result="ok") == 1
    assert await second.metric("mirrorproxy_cluster_owned_fills_total", kind="blob") == 1
    failures = await third.metric_sum("mirrorproxy_cluster_peer_failures_total")
    assert failures == 1
    # The dead owner cools down: more of its blobs cost no more failed connections.
    owned = [d for d in digests[1:] if by_rank(blob_key(d), mirrors)[0] is owner]
    assert owned
    for d in owned[:3]:
        status, body = await get_blob(third, d)
        assert status == 200
        assert sha256(body) == d
    assert await third.metric_sum("mirrorproxy_cluster_peer_failures_total") == failures
    assert (await third.client.get("/readyz")).status == 200  # a dead member is no concern


async def test_the_owners_404_is_relayed_not_failed_over(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    mirrors = await start_cluster([fake.url])
    missing = sha256(b"nobody has this")
    others = by_rank(blob_key(missing), mirrors)[1:]
    resp = await others[-1].client.get(f"/v2/{REPO}/blobs/{missing}?ns={NS}")
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "BLOB_UNKNOWN"
    # Only the owner asked upstream; the member it was relayed by did not ask again.
    assert len(fake.registry.calls("GET", "blobs")) == 1
    result = "not_found"
    assert await others[-1].metric("mirrorproxy_cluster_forwarded_total", result=result) == 1


async def test_a_forwarded_request_is_served_where_it_lands(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    blob = payload(128 * 1024, "forwarded-once")
    digest = fake.registry.add_blob(blob)
    mirrors = await start_cluster([fake.url])
    not_owner = by_rank(blob_key(digest), mirrors)[-1]
    status, body = await get_blob(not_owner, digest, **{FORWARDED_HEADER: "http://elsewhere:1"})
    assert (status, body) == (200, blob)
    assert await not_owner.metric_sum("mirrorproxy_cluster_forwarded_total") == 0
    assert await not_owner.metric("mirrorproxy_cluster_owned_fills_total", kind="blob") == 1


def _disagreeing_blob(a: Mirror, b: Mirror, alias: str) -> bytes:
    """A blob that ``a`` thinks ``b`` owns, while ``b`` (which knows ``a`` as ``alias``)
    thinks ``a`` owns it."""
    for i in range(1000):
        blob = payload(1 * MiB, f"disagree-{i}")
        key = blob_key(sha256(blob))
        if (
            rank(key, (url_of(a), url_of(b)))[0] == url_of(b)
            and rank(key, (alias, url_of(b)))[0] == alias
        ):
            return blob
    raise AssertionError("no such blob among 1000")


async def test_members_that_disagree_on_the_owner_never_forward_twice(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    # Member 1 knows member 0 by another name (localhost): their rankings disagree.
    a, b = await start_cluster([fake.url], n=2, members={1: ["http://localhost:{0}", 1]})
    blob = _disagreeing_blob(a, b, url_of(a).replace("127.0.0.1", "localhost"))
    digest = fake.registry.add_blob(blob)

    async with asyncio.timeout(WAIT):
        assert await get_blob(a, digest) == (200, blob)
    # a forwarded it to b, which served it itself although it thinks a owns it.
    assert len(fake.registry.calls("GET", "blobs")) == 1
    assert await a.metric("mirrorproxy_cluster_forwarded_total", result="ok") == 1
    assert await b.metric_sum("mirrorproxy_cluster_forwarded_total") == 0
    assert await b.metric("mirrorproxy_cluster_owned_fills_total", kind="blob") == 1


async def test_members_that_disagree_on_the_owner_do_not_wait_on_each_other(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    slow(fake.registry)
    a, b = await start_cluster([fake.url], n=2, members={1: ["http://localhost:{0}", 1]})
    blob = _disagreeing_blob(a, b, url_of(a).replace("127.0.0.1", "localhost"))
    digest = fake.registry.add_blob(blob)

    # Both start at once: each forwards to the other, which is forwarding too. One
    # answers 508 (a loop), its sender fetches upstream itself: nobody waits forever.
    async with asyncio.timeout(WAIT):
        got = await asyncio.gather(get_blob(a, digest), get_blob(b, digest))
    assert list(got) == [(200, blob), (200, blob)]
    assert 1 <= len(fake.registry.calls("GET", "blobs")) <= 2


def owned_by(member: str, members: list[str], seed: str, size: int = 256 * 1024) -> bytes:
    """A blob whose owner among ``members`` is ``member``."""
    for i in range(1000):
        blob = payload(size, f"{seed}-{i}")
        if rank(blob_key(sha256(blob)), members)[0] == member:
            return blob
    raise AssertionError("no such blob among 1000")


async def test_what_a_member_is_sent_and_its_bytes_verified(
    start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    """A fake registry stands in for the owner: it records what it is sent."""
    upstream, owner = await start_fake(), await start_fake()
    (m,) = await start_cluster([upstream.url], n=1, members={0: [0, owner.url]})
    blob = owned_by(owner.url, [url_of(m), owner.url], "fake-owner")
    digest = upstream.registry.add_blob(blob)
    owner.registry.add_blob(blob)

    assert await get_blob(m, digest, Authorization="Basic dXNlcjpwdw==") == (200, blob)
    (sent,) = owner.registry.calls("GET", "blobs")
    assert sent.path == f"/v2/{REPO}/blobs/{digest}"
    assert sent.query["ns"] == NS
    assert sent.headers[FORWARDED_HEADER] == url_of(m)
    assert sent.headers["Authorization"] == "Basic dXNlcjpwdw=="  # the owner checks it
    assert upstream.registry.calls() == []

    # Bytes from a member are verified like an upstream's: wrong ones are never
    # served whole, the member cools down, and the next try goes upstream.
    other = owned_by(owner.url, [url_of(m), owner.url], "fake-owner-corrupt")
    other_digest = upstream.registry.add_blob(other)
    owner.registry.add_blob(other)
    owner.registry.faults.wrong_bytes = True
    resp = await m.client.get(f"/v2/{REPO}/blobs/{other_digest}?ns={NS}")
    with pytest.raises(ClientPayloadError):  # cut one byte short of the whole
        await resp.read()
    assert await m.metric("mirrorproxy_cluster_peer_failures_total", reason="corrupt") == 1
    assert await get_blob(m, other_digest) == (200, other)
    assert len(upstream.registry.calls("GET", "blobs")) == 1
