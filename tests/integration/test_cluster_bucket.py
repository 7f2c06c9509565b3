"""Members over one bucket: the owner downloads and commits, the others relay.

Three in-process members share one prefix of a real SeaweedFS bucket in front of
one in-process fake upstream. A member asked for a blob it does not own relays the
owner's answer, verified on the way, and writes nothing to the bucket; when the
owner dies in the middle of that answer, the relay resumes from the next member in
rendezvous order and its client sees one whole body.
"""

from __future__ import annotations

import asyncio
import re
import uuid

import pytest

from mirrorproxy.core.rendezvous import blob_key
from tests.fakes.registry import payload
from tests.integration.test_cluster import by_rank, get_blob, herd, slow
from tests.support.cluster import ClusterFactory
from tests.support.mirror import FakeFactory, Mirror
from tests.support.paths import NS
from tests.support.seaweed import SeaweedFS
from tests.support.waiting import WAIT

MiB = 1024 * 1024
REPO = "library/app"
UPLOADS = "mirrorproxy_store_request_seconds_count"


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
    blob = payload(3 * MiB, "bucket herd")
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
        assert await m.metric("mirrorproxy_cluster_forwarded_total", kind="blob", result="ok")


@pytest.mark.parametrize("resumed_by", ["next member", "own upstream"])
async def test_the_owner_dying_mid_relay_resumes_from_the_next_member(
    seaweedfs: SeaweedFS, start_fake: FakeFactory, start_cluster: ClusterFactory, resumed_by: str
) -> None:
    fake = await start_fake()
    blob = payload(4 * MiB, f"owner dies {resumed_by}")
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
        body = bytearray(await resp.content.readexactly(MiB))
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
        assert int(resumed_at[1]) >= MiB
    assert await client.metric_sum("mirrorproxy_cluster_peer_failures_total") >= 1
    assert await writes(client) == 0  # the relaying member wrote nothing
    # Nothing partial under the final key: what any member finds there is the blob.
    for m in (second, third):
        await m.settled()
        status, got = await get_blob(m, digest)
        assert (status, got) == (200, blob)
