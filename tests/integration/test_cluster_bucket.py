"""Members of a [cluster] over one bucket: one budget for the bucket as a whole.

In-process members over a real SeaweedFS bucket and one fake upstream. Each blob's
owner accounts for it and alone evicts it; the members report to it what they serve
and read from the bucket, so the owner neither evicts a blob a member is streaming
nor forgets that it is hot elsewhere. With ``members_dns`` (a resolver the test
controls) the split follows the list: ``max_size`` holds for the bucket while
members come and go.

The owner alone downloads and commits: a member asked for a blob it does not own
relays the owner's answer, verified on the way, and writes nothing to the bucket;
when the owner dies in the middle of that answer, the relay resumes from the next
member in rendezvous order and its client sees one whole body.
"""

from __future__ import annotations

import asyncio
import hashlib
import re
import uuid
from typing import Any

import pytest

from mirrorproxy.core.rendezvous import FORWARDED_HEADER, blob_key, owner
from mirrorproxy.core.touches import MAX_BODY, TOUCHES_PATH, encode_report
from mirrorproxy.core.tuning import Tuning
from mirrorproxy.http import keys
from tests.fakes.registry import payload
from tests.integration.test_cluster import by_rank, get_blob, herd, slow
from tests.support.cluster import ClusterFactory
from tests.support.mirror import FakeFactory, Mirror
from tests.support.paths import NS, REPO
from tests.support.seaweed import SeaweedFS
from tests.support.waiting import WAIT, wait_for, wait_until

KIB = 1024
MIB = 1024 * KIB
UPLOADS = "mirrorproxy_store_request_seconds_count"
# Reports are sent every 0.2 s here, best effort: on a loaded machine a few may be
# lost to the 2 s timeout before one gets through.
REPORTED = 30.0
FAST = Tuning(touch_report=0.2, remote_pin=3.0, relist_after=0.3, index_flush=0.5)


def url_of(m: Mirror) -> str:
    assert m.config.cluster is not None
    return m.config.cluster.self_url


def bucket(seaweedfs: SeaweedFS) -> dict[str, Any]:
    """A ``[storage]`` table: a prefix of the session's bucket, fresh for this test."""
    return seaweedfs.storage(prefix=f"cluster-{uuid.uuid4().hex}/")


def owned_payloads(
    count: int, size: int, tag: str, members: list[str], by: str | None
) -> list[bytes]:
    """``count`` blobs of ``size`` bytes whose owner among ``members`` is ``by`` (any: None)."""
    found: list[bytes] = []
    for i in range(1000):
        data = payload(size, f"{tag} {i}")
        digest = "sha256:" + hashlib.sha256(data).hexdigest()
        if by is None or owner(blob_key(digest), members) == by:
            found.append(data)
            if len(found) == count:
                return found
    raise AssertionError("no such blobs")


async def get(m: Mirror, digest: str) -> bytes:
    resp = await m.client.get(f"/v2/{REPO}/blobs/{digest}?ns={NS}")
    assert resp.status == 200, await resp.text()
    return await resp.read()


async def bucket_bytes(m: Mirror) -> int:
    """What the bucket holds under the members' prefix, listed from the bucket itself."""
    blobs = m.client.app[keys.ENGINE].blobs
    return await asyncio.to_thread(lambda: sum(c.size for c in blobs.contents()))


async def reported(m: Mirror) -> bool:
    """Whether ``m`` took a report of a blob's use, as served or as being read."""
    return await received(m, "served") or await received(m, "reading")


async def received(m: Mirror, use: str) -> bool:
    """Whether ``m`` took a report of a blob ``use`` ("served", "reading") already."""
    return await m.metric("mirrorproxy_cluster_touches_received_total", use=use) >= 1


async def in_bucket(m: Mirror, digest: str) -> bool:
    return await m.stored(digest)


async def test_a_blob_read_through_another_member_is_touched_and_pinned_by_its_owner(
    seaweedfs: SeaweedFS, start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    a, b = await start_cluster(
        [fake.url], 2, storage=bucket(seaweedfs), cache={"max_size": "56MiB"}, tuning=FAST
    )
    pair = [url_of(a), url_of(b)]
    # A's part is 28 MiB. X is big enough that a client not reading holds B's stream.
    x, v = (fake.registry.add_blob(d) for d in owned_payloads(2, 16 * MIB, "big", pair, pair[0]))
    y, z = (fake.registry.add_blob(d) for d in owned_payloads(2, 4 * MIB, "small", pair, pair[0]))
    (q,) = (fake.registry.add_blob(d) for d in owned_payloads(1, 8 * MIB, "mid", pair, pair[0]))
    for digest in (x, y, z):
        await get(a, digest)
        await a.settled()
    assert a.budget.total == 24 * MIB

    # B serves X from the bucket: A hears of it, so X is now more recent than Y and Z.
    await wait_until(lambda: b.stored(x))  # B finds A's commit in the bucket
    assert hashlib.sha256(await get(b, x)).hexdigest() == x.split(":")[1]
    hit = "mirrorproxy_cache_requests_total"
    assert await b.metric(hit, namespace=NS, kind="blob", result="hit") == 1
    # Told as served, or as being read if a report went out while B was sending it:
    # either way A counts X as used now.
    await wait_until(lambda: reported(a), within=REPORTED)
    sent = "mirrorproxy_cluster_touches_sent_total"
    assert await b.metric(sent, use="served") + await b.metric(sent, use="reading") >= 1
    await get(a, q)  # room for Q: Y, the least recently used, goes, not X
    await a.settled()
    assert await in_bucket(a, x)
    assert not await in_bucket(a, y)
    assert a.budget.total == 28 * MIB

    # A client reads X through B and stops. Room for V would take evicting Z, Q and
    # X: B reports X as being read, so A evicts nothing and streams V through.
    took = "mirrorproxy_cluster_touches_received_total"
    read_before = await a.metric(took, use="reading")
    resp = await b.client.get(f"/v2/{REPO}/blobs/{x}?ns={NS}")
    assert resp.status == 200
    hasher = hashlib.sha256(await resp.content.readexactly(1 * MIB))

    async def read_reported() -> bool:  # a report of this read, not of the one before
        return await a.metric(took, use="reading") > read_before

    await wait_until(read_reported, within=REPORTED)
    remote = a.budget.remote
    assert remote is not None
    assert x in remote.held(a.budget.now())
    assert hashlib.sha256(await get(a, v)).hexdigest() == v.split(":")[1]
    await a.settled()
    assert not await in_bucket(a, v)  # not cached: no room without evicting X
    for digest in (x, z, q):
        assert await in_bucket(a, digest)
    assert await a.metric("mirrorproxy_cache_evictions_total", kind="blob") == 1
    while chunk := await resp.content.read(MIB):  # the rest of X, never cut
        hasher.update(chunk)
    assert hasher.hexdigest() == x.split(":")[1]
    assert await b.metric("mirrorproxy_cluster_touches_sent_total", use="reading") >= 1

    # The pin lapses once B stops reporting the read (a member that died, say).
    await wait_for(lambda: not remote.held(a.budget.now()))


async def test_members_from_dns_hold_max_size_for_the_bucket_as_a_whole(
    seaweedfs: SeaweedFS, start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    answer = ["127.0.0.1", "127.0.0.2", "127.0.0.3"]

    async def dns(host: str, port: int) -> list[str]:
        return list(answer)

    members = await start_cluster(
        [fake.url],
        3,
        storage=bucket(seaweedfs),
        cache={"max_size": "3MiB"},
        tuning=FAST,
        dns=dns,
        cluster={"refresh": "1h"},  # the test refreshes by hand
    )
    urls = [url_of(m) for m in members]
    for m in members:
        assert m.client.app[keys.ENGINE].members is not None
        assert await m.metric("mirrorproxy_cluster_members") == 3
        assert m.budget.limit == 1 * MIB

    blobs = [fake.registry.add_blob(d) for d in owned_payloads(24, 256 * KIB, "dns", urls, None)]
    for i, digest in enumerate(blobs[:16]):  # 4 MiB through all three members
        await get(members[i % 3], digest)
        for m in members:
            await m.settled()
    stored = await bucket_bytes(members[0])
    owned = [sum(owner(blob_key(d), urls) == u for d in blobs[:16]) for u in urls]
    assert stored == sum(min(n, 4) for n in owned) * 256 * KIB  # 1 MiB each at most
    assert stored <= 3 * MIB
    assert sum(m.budget.total for m in members) == stored  # each blob counted once

    # The third member leaves the list: the other two split the bucket and, once the
    # list held still, learn of the blobs it owned (a re-list) and evict down to their
    # new shares, keeping max_size as more comes in.
    answer.remove("127.0.0.3")
    for m in members:
        await m.client.app[keys.ENGINE].members.refresh()  # type: ignore[union-attr]
    two = members[:2]
    assert [m.budget.limit for m in two] == [int(1.5 * MIB)] * 2
    for i, digest in enumerate(blobs[16:]):  # 2 MiB more, through the two
        await get(two[i % 2], digest)
        for m in members:
            await m.settled()

    async def accounted() -> bool:
        return sum(m.budget.total for m in two) == await bucket_bytes(members[0])

    await wait_until(accounted)  # the re-lists ran: the owners count what is there
    stored = await bucket_bytes(members[0])
    assert 2 * MIB < stored <= 3 * MIB
    assert all(m.budget.total <= m.budget.limit for m in two)
    assert members[2].budget.total == 0  # not a member any more: owns nothing
    assert len(fake.registry.calls("GET", "blobs")) == len(blobs)  # once per cluster


async def test_the_report_endpoint_takes_bounded_json_from_members_only(
    seaweedfs: SeaweedFS, start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    # Two other members, never started: one at this test's address, one elsewhere.
    near, far = "http://127.0.0.1:1", "http://127.0.0.9:5000"
    (a,) = await start_cluster(
        [fake.url], 1, members={0: [0, near, far]}, storage=bucket(seaweedfs), tuning=FAST
    )
    (data,) = owned_payloads(1, 64 * KIB, "known", [url_of(a), near, far], url_of(a))
    known = fake.registry.add_blob(data)
    await get(a, known)
    await a.settled()
    unknown = "sha256:" + "ab" * 32
    marker = {FORWARDED_HEADER: near}

    async def post(body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
        resp = await a.client.post(TOUCHES_PATH, data=body, headers=headers)
        return resp.status, await resp.json()

    report = encode_report([unknown], [known])
    # Not a member, this member itself, a member at another address than the sender's.
    for claimed in ({}, {FORWARDED_HEADER: url_of(a)}, {FORWARDED_HEADER: far}):
        status, answer = await post(report, claimed)
        assert (status, answer["errors"][0]["code"]) == (403, "DENIED")
    status, answer = await post(b"{not json", marker)
    assert (status, answer["errors"][0]["code"]) == (400, "UNSUPPORTED")
    status, answer = await post(b'{"served": ["sha256:nope"]}', marker)
    assert status == 400
    assert "served" in answer["errors"][0]["message"]
    status, answer = await post(b" " * (MAX_BODY + 1), marker)
    assert (status, answer["errors"][0]["code"]) == (413, "SIZE_INVALID")
    status, answer = await post(report, marker)
    assert (status, answer) == (200, {"known": 1})
    assert a.budget.index is not None
    assert a.budget.index.get("blob", unknown) is None  # a report never adds an entry
    remote = a.budget.remote
    assert remote is not None
    assert remote.held(a.budget.now()) == {known}
    assert await a.metric("mirrorproxy_cluster_touches_received_total", use="reading") == 1
    assert await a.metric("mirrorproxy_cluster_touches_received_total", use="served") == 0


def kill(m: Mirror) -> None:
    """As if the member's machine died: stop listening, drop every connection."""
    runner = m.client.server.runner
    assert runner is not None
    assert runner.server is not None
    for site in runner.sites:
        server = site._server
        if server is not None:
            server.close()
    for transport in list(runner.server._connections.values()):
        transport.abort()


async def writes(m: Mirror) -> float:
    """Objects this member put into the bucket (single PUTs and multipart uploads)."""
    return await m.metric(UPLOADS, op="put") + await m.metric(UPLOADS, op="create_upload")


async def test_thirty_clients_over_three_members_on_one_bucket_one_get_one_write(
    seaweedfs: SeaweedFS, start_fake: FakeFactory, start_cluster: ClusterFactory
) -> None:
    fake = await start_fake()
    blob = payload(3 * MIB, "bucket herd")
    digest = fake.registry.add_blob(blob)
    slow(fake.registry)
    storage = seaweedfs.storage(prefix=f"t-{uuid.uuid4().hex}/")
    mirrors = await start_cluster([fake.url], storage=storage)

    await herd(mirrors, digest)
    assert len(fake.registry.calls("GET", "blobs")) == 1
    owner, *others = by_rank(blob_key(digest), mirrors)
    await owner.settled()
    assert await writes(owner) == 1
    for m in others:  # they relayed the owner's answer and wrote nothing
        assert await writes(m) == 0
        assert await m.stored(digest)  # yet find it in the bucket now
        # One download from the owner for all ten of its clients, not one each.
        forwarded = "mirrorproxy_cluster_forwarded_total"
        assert await m.metric(forwarded, kind="blob", result="ok") == 1


@pytest.mark.parametrize("resumed_by", ["next member", "own upstream"])
async def test_the_owner_dying_mid_relay_resumes_from_the_next_member(
    seaweedfs: SeaweedFS, start_fake: FakeFactory, start_cluster: ClusterFactory, resumed_by: str
) -> None:
    fake = await start_fake()
    blob = payload(4 * MIB, f"owner dies {resumed_by}")
    digest = fake.registry.add_blob(blob)
    slow(fake.registry)
    storage = seaweedfs.storage(prefix=f"t-{uuid.uuid4().hex}/")
    mirrors = await start_cluster([fake.url], storage=storage)
    owner, second, third = by_rank(blob_key(digest), mirrors)
    # The third asks owner, then second; the second, owner and then its upstream.
    client = third if resumed_by == "next member" else second

    async with asyncio.timeout(WAIT):
        resp = await client.client.get(f"/v2/{REPO}/blobs/{digest}?ns={NS}")
        assert resp.status == 200
        body = bytearray(await resp.content.readexactly(MIB))
        kill(owner)
        body += await resp.read()
    assert bytes(body) == blob
    gets = fake.registry.calls("GET", "blobs")
    assert len(gets) == 2  # the owner's download, and where the rest came from
    if resumed_by == "next member":  # the second owns it now: it downloads and commits it
        assert await second.metric("mirrorproxy_cluster_owned_fills_total", kind="blob") == 1
    else:  # nobody is ahead of the second but the owner: only the rest, uncached
        resumed_at = re.fullmatch(r"bytes=(\d+)-", gets[-1].headers["Range"])
        assert resumed_at is not None
        assert int(resumed_at[1]) >= MIB
    assert await client.metric_sum("mirrorproxy_cluster_peer_failures_total") >= 1
    assert await writes(client) == 0  # the relaying member wrote nothing
    # Nothing partial under the final key: what any member finds there is the blob.
    for m in (second, third):
        await m.settled()
        status, got = await get_blob(m, digest)
        assert (status, got) == (200, blob)
