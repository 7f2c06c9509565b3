"""Regressions for server bugs the integration suite found (all fixed).

HEAD errors kept their status, push endpoints answer 405, and an in-flight download
for one namespace does not hand its failure to another namespace.
"""

from __future__ import annotations

import asyncio

import pytest

from tests.fakes.registry import payload
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO


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
    resp = await mirror.client.head(path)
    assert resp.status == status
    assert resp.content_type == "application/json"
    assert int(resp.headers["Content-Length"]) > 0
    assert await resp.read() == b""


async def test_push_start_is_405_unsupported(fake: RunningFake, mirror: Mirror) -> None:
    resp = await mirror.client.post(f"/v2/{REPO}/blobs/uploads/?ns={NS}")
    assert resp.status == 405
    assert (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"


async def test_in_flight_fill_is_not_shared_across_namespaces(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    has_not, has = await start_fake(), await start_fake()
    data = payload(100_000, "cross-namespace")
    digest = has.registry.add_blob(data)
    has_not.registry.faults.delay = 0.3  # its 404 comes late: the fills overlap
    mirror = await start_mirror([], namespaces={"a.io": [has_not.url], "b.io": [has.url]})
    async with asyncio.timeout(5):
        first = asyncio.create_task(mirror.client.get(f"/v2/{REPO}/blobs/{digest}?ns=a.io"))
        await asyncio.sleep(0.1)
        resp = await mirror.client.get(f"/v2/{REPO}/blobs/{digest}?ns=b.io")
        assert (await first).status == 404
    assert resp.status == 200
    assert await resp.read() == data
