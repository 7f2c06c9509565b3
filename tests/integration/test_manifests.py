"""Manifests through the mirror: tag freshness, revalidation, stale-if-error, Accept.

Upstreams are asked for uncompressed bodies (a compressing proxy must not put gzip
in the cache) and with a GET when they refuse HEAD; a body cut mid-way falls back to
the stale copy; Accept variants of one tag fetched at once are all recorded.
"""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.core.oci import accept_types
from tests.fakes.registry import OCI_INDEX, OCI_MANIFEST
from tests.fakes.variants import CuttingRegistry, GzipRegistry, PagingRegistry
from tests.support.logs import errors_logged
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, manifest_path

INDEX_ACCEPT = f"{OCI_INDEX}, {OCI_MANIFEST}"
STALE_WARNING = '110 - "Response is Stale"'


async def test_tag_miss_then_hit(fake: RunningFake, mirror: Mirror) -> None:
    img = fake.registry.add_image(REPO, "3")

    first = await mirror.client.get(manifest_path(REPO, "3"), headers={"Accept": OCI_MANIFEST})
    assert first.status == 200
    assert await first.read() == img.manifest
    assert first.headers["Content-Type"] == OCI_MANIFEST
    assert first.headers["Docker-Content-Digest"] == img.digest
    assert first.headers["ETag"] == f'"{img.digest}"'
    upstream_gets = fake.registry.calls("GET", "manifests")
    assert [r.path for r in upstream_gets] == [f"/v2/{REPO}/manifests/3"]
    assert upstream_gets[0].headers["Accept"] == OCI_MANIFEST

    second = await mirror.client.get(manifest_path(REPO, "3"), headers={"Accept": OCI_MANIFEST})
    assert second.status == 200
    assert await second.read() == img.manifest
    assert second.headers["Docker-Content-Digest"] == img.digest
    assert len(fake.registry.requests) == 1  # fresh: answered from the cache


async def test_head_by_tag_has_digest_length_type_and_no_body(
    fake: RunningFake, mirror: Mirror
) -> None:
    img = fake.registry.add_image(REPO, "3")
    for _ in range(2):  # a miss, then a hit
        resp = await mirror.client.head(manifest_path(REPO, "3"), headers={"Accept": OCI_MANIFEST})
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == img.digest
        assert resp.headers["Content-Length"] == str(len(img.manifest))
        assert resp.headers["Content-Type"] == OCI_MANIFEST
        assert resp.headers["ETag"] == f'"{img.digest}"'
        assert await resp.read() == b""
    assert len(fake.registry.calls(kind="manifests")) == 1


async def test_by_digest_is_cached_forever(fake: RunningFake, start_mirror: MirrorFactory) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="0s")
    img = fake.registry.add_image(REPO, "3")
    resp = await mirror.client.get(manifest_path(REPO, img.digest))
    assert resp.status == 200
    assert await resp.read() == img.manifest
    assert resp.headers["ETag"] == f'"{img.digest}"'
    assert [r.path for r in fake.registry.requests] == [f"/v2/{REPO}/manifests/{img.digest}"]

    fake.registry.faults.status = 500  # the upstream breaks: digests do not care
    for method in ("GET", "HEAD", "GET"):
        resp = await mirror.client.request(method, manifest_path(REPO, img.digest))
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == img.digest
        assert resp.headers["Content-Length"] == str(len(img.manifest))
        assert await resp.read() == (img.manifest if method == "GET" else b"")
    assert len(fake.registry.requests) == 1


async def test_manifest_is_fetched_and_stored_uncompressed(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """Upstreams are asked for ``identity``; the real manifest is served and stored."""
    one = await start_fake(GzipRegistry())
    img = one.registry.add_image(REPO, "3")
    mirror = await start_mirror([one.url])

    resp = await mirror.client.get(
        manifest_path(REPO, "3"), headers={"Accept-Encoding": "identity"}
    )
    assert resp.status == 200, await resp.text()
    assert "Content-Encoding" not in resp.headers
    assert await resp.read() == img.manifest
    assert resp.headers["Docker-Content-Digest"] == img.digest
    [get] = one.registry.calls("GET", "manifests")
    assert get.headers.get("Accept-Encoding") == "identity"

    # Stored under its real digest: a pull by digest is a cache hit with the same bytes.
    assert mirror.manifest_file(img.digest).is_file()
    one.registry.clear_log()
    resp = await mirror.client.get(
        manifest_path(REPO, img.digest), headers={"Accept-Encoding": "identity"}
    )
    assert resp.status == 200
    assert await resp.read() == img.manifest
    assert one.registry.requests == []


async def test_concurrent_tag_misses_share_one_upstream_request(
    fake: RunningFake, mirror: Mirror
) -> None:
    img = fake.registry.add_image(REPO, "3")
    fake.registry.faults.delay = 0.1  # keep the first request open while the others arrive
    async with asyncio.timeout(5):
        responses = await asyncio.gather(
            *(mirror.client.get(manifest_path(REPO, "3")) for _ in range(20))
        )
        bodies = [await r.read() for r in responses]
    assert [r.status for r in responses] == [200] * 20
    assert bodies == [img.manifest] * 20
    assert len(fake.registry.requests) == 1


async def test_expired_tag_is_revalidated_with_head(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="150ms")
    img = fake.registry.add_image(REPO, "3")
    path = manifest_path(REPO, "3")
    assert (await mirror.client.get(path)).status == 200
    assert (await mirror.client.get(path)).status == 200
    assert [r.method for r in fake.registry.requests] == ["GET"]

    await asyncio.sleep(0.2)
    resp = await mirror.client.get(path)
    assert resp.status == 200
    assert await resp.read() == img.manifest
    # Unchanged digest: one HEAD, no GET of the body.
    assert [r.method for r in fake.registry.requests] == ["GET", "HEAD"]
    assert fake.registry.requests[1].path == f"/v2/{REPO}/manifests/3"

    # The revalidation made the tag fresh again.
    assert (await mirror.client.get(path)).status == 200
    assert len(fake.registry.requests) == 2


async def test_moved_tag_serves_the_new_digest(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="100ms")
    old = fake.registry.add_image(REPO, "3", seed="old")
    path = manifest_path(REPO, "3")
    assert (await mirror.client.get(path)).headers["Docker-Content-Digest"] == old.digest

    new = fake.registry.add_image(REPO, "3", seed="new")
    assert new.digest != old.digest
    # Still fresh: the old answer.
    assert (await mirror.client.get(path)).headers["Docker-Content-Digest"] == old.digest
    await asyncio.sleep(0.15)
    resp = await mirror.client.get(path)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == new.digest
    assert await resp.read() == new.manifest
    assert [r.method for r in fake.registry.requests] == ["GET", "HEAD", "GET"]
    # The old manifest stays available by digest, from the cache.
    resp = await mirror.client.get(manifest_path(REPO, old.digest))
    assert await resp.read() == old.manifest
    assert len(fake.registry.requests) == 3


async def test_head_refused_with_405_falls_back_to_get(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """An upstream refusing HEAD gets a GET: a moved tag is served, not the old one."""
    paging = PagingRegistry()
    one = await start_fake(paging)
    one.registry.add_image(REPO, "3")
    mirror = await start_mirror([one.url], tag_ttl="0s")  # every pull revalidates
    assert (await mirror.client.get(manifest_path(REPO, "3"))).status == 200

    paging.refuse_head = True
    moved = one.registry.add_image(REPO, "3", seed="moved")
    one.registry.clear_log()
    for _ in range(2):  # and it keeps working: the 405 cooled nothing down
        resp = await mirror.client.get(manifest_path(REPO, "3"))
        assert resp.status == 200, await resp.text()
        assert await resp.read() == moved.manifest
        assert resp.headers["Docker-Content-Digest"] == moved.digest
        assert "Warning" not in resp.headers
    assert [r.method for r in one.registry.calls(kind="manifests")] == ["HEAD", "GET"] * 2


async def test_stale_tag_served_when_every_upstream_is_down(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    img = one.registry.add_image(REPO, "3")
    mirror = await start_mirror([one.url, two.url], tag_ttl="100ms")
    path = manifest_path(REPO, "3")
    assert (await mirror.client.get(path)).status == 200

    one.registry.faults.status = 503
    await two.server.close()
    await asyncio.sleep(0.15)
    for method in ("GET", "HEAD"):
        resp = await mirror.client.request(method, path)
        assert resp.status == 200
        assert resp.headers["Docker-Content-Digest"] == img.digest
        assert resp.headers["Warning"].startswith("110 ")
        assert await resp.read() == (img.manifest if method == "GET" else b"")
    # The stale answer came after asking upstream, not instead of it.
    assert one.registry.calls("HEAD", "manifests")
    stale = await mirror.metric(
        "mirrorproxy_cache_requests_total", namespace=NS, kind="manifest", result="stale"
    )
    assert stale == 2


async def test_cut_manifest_body_serves_the_stale_copy(
    start_fake: FakeFactory, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut body of a moved tag is an upstream failure: the stale copy, with a Warning."""
    cutting = CuttingRegistry()
    one = await start_fake(cutting)
    old = one.registry.add_image(REPO, "3")
    mirror = await start_mirror([one.url], tag_ttl="0s")
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 200
    assert "Warning" not in resp.headers

    one.registry.add_image(REPO, "3", seed="moved")  # the HEAD sees a new digest ...
    cutting.cut = {"manifests"}  # ... and the GET of the new body is cut
    caplog.set_level(logging.WARNING)
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 200, await resp.text()
    assert await resp.read() == old.manifest
    assert resp.headers["Docker-Content-Digest"] == old.digest
    assert resp.headers["Warning"] == STALE_WARNING
    assert len(one.registry.calls("GET", "manifests")) == 2  # the first fetch, the cut one
    assert errors_logged(caplog) == []


async def test_deleted_tag_is_404_even_with_a_stale_copy(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="0s")
    fake.registry.add_image(REPO, "3")
    assert (await mirror.client.get(manifest_path(REPO, "3"))).status == 200
    fake.registry.remove_tag(REPO, "3")
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 404
    body = await resp.json()
    assert body["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert "Warning" not in resp.headers


async def test_failing_upstreams_without_cache_give_502_naming_them(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    one, two = await start_fake(), await start_fake()
    one.registry.faults.status = 500
    two.registry.faults.status = 503
    mirror = await start_mirror([one.url, two.url])
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 502
    assert resp.content_type == "application/json"
    err = (await resp.json())["errors"][0]
    assert err["code"] == "UNAVAILABLE"
    upstreams = err["detail"]["upstreams"]
    assert len(upstreams) == 2
    assert upstreams[0] == f"{one.url}: 500"
    assert upstreams[1] == f"{two.url}: 503"
    assert "Warning" not in resp.headers


async def test_unreachable_upstreams_without_cache_give_503_naming_them(
    start_mirror: MirrorFactory, closed_port_url: str
) -> None:
    mirror = await start_mirror([closed_port_url])
    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 503
    err = (await resp.json())["errors"][0]
    assert err["code"] == "UNAVAILABLE"
    assert err["detail"]["upstreams"][0].startswith(closed_port_url)


@pytest.mark.parametrize("index_first", [True, False])
async def test_accept_dependent_tag(fake: RunningFake, mirror: Mirror, index_first: bool) -> None:
    img = fake.registry.add_image(REPO, "3")
    index_digest, index_body = fake.registry.add_index(REPO, "3", [img])
    path = manifest_path(REPO, "3")

    async def pull(accept: str) -> tuple[str, bytes]:
        resp = await mirror.client.get(path, headers={"Accept": accept})
        assert resp.status == 200
        return resp.headers["Content-Type"], await resp.read()

    index = (OCI_INDEX, index_body)
    platform = (OCI_MANIFEST, img.manifest)
    clients = [(INDEX_ACCEPT, index), (OCI_MANIFEST, platform)]
    if not index_first:
        clients.reverse()
    for accept, expected in clients:
        assert await pull(accept) == expected
    gets = fake.registry.calls("GET", "manifests")
    assert [r.headers["Accept"] for r in gets] == [accept for accept, _ in clients]
    # Both are cached now, each for its own Accept set, and neither answers for the other.
    for accept, expected in clients * 2:
        assert await pull(accept) == expected
    assert len(fake.registry.requests) == 2
    assert json.loads(index_body)["manifests"][0]["digest"] == img.digest
    assert index_digest != img.digest


async def test_index_only_tag_is_404_for_a_platform_only_client(
    fake: RunningFake, mirror: Mirror
) -> None:
    """A tag that only exists as an index is 404 upstream for a platform-only client."""
    img = fake.registry.add_image(REPO, "other")
    fake.registry.add_index(REPO, "3", [img])
    ok = await mirror.client.get(manifest_path(REPO, "3"), headers={"Accept": INDEX_ACCEPT})
    assert ok.status == 200
    resp = await mirror.client.get(manifest_path(REPO, "3"), headers={"Accept": OCI_MANIFEST})
    assert resp.status == 404
    assert (await resp.json())["errors"][0]["code"] == "MANIFEST_UNKNOWN"
    assert fake.registry.calls("GET", "manifests")[-1].headers["Accept"] == OCI_MANIFEST


async def test_stale_index_is_not_served_to_a_platform_only_client(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    mirror = await start_mirror([fake.url], tag_ttl="0s")
    img = fake.registry.add_image(REPO, "3")
    _, index_body = fake.registry.add_index(REPO, "3", [img])
    path = manifest_path(REPO, "3")
    assert await (await mirror.client.get(path, headers={"Accept": INDEX_ACCEPT})).read() == (
        index_body
    )
    fake.registry.faults.status = 503
    stale = await mirror.client.get(path, headers={"Accept": INDEX_ACCEPT})
    assert stale.status == 200
    assert await stale.read() == index_body
    assert stale.headers["Warning"].startswith("110 ")
    resp = await mirror.client.get(path, headers={"Accept": OCI_MANIFEST})
    assert resp.status == 502
    assert (await resp.json())["errors"][0]["code"] == "UNAVAILABLE"


async def test_concurrent_accept_variants_of_a_new_tag_are_both_recorded(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """Two Accept variants of one tag fetched at once both land in its record."""
    fake = await start_fake()
    img = fake.registry.add_image(REPO, "base")
    mirror = await start_mirror([fake.url])
    only_manifest = {"Accept": OCI_MANIFEST}
    with_index = {"Accept": f"{OCI_INDEX}, {OCI_MANIFEST}"}
    only_key, index_key = (
        ",".join(accept_types(h["Accept"])) for h in (only_manifest, with_index)
    )

    for i in range(5):  # each round is a fresh tag: a new record written twice at once
        tag = f"t{i}"
        fake.registry.add_manifest(REPO, tag, OCI_MANIFEST, img.manifest)
        index_digest, _ = fake.registry.add_index(REPO, tag, [img])
        a, b = await asyncio.gather(
            mirror.client.get(manifest_path(REPO, tag), headers=only_manifest),
            mirror.client.get(manifest_path(REPO, tag), headers=with_index),
        )
        assert (a.status, b.status) == (200, 200)
        assert a.headers["Docker-Content-Digest"] == img.digest
        assert b.headers["Docker-Content-Digest"] == index_digest

        # On disk, as a fresh process would read it ...
        entries = await FileManifestStore(mirror.cache_dir).get_tag(NS, REPO, tag)
        digests = {key: str(e.digest) for key, e in entries.items()}
        assert digests == {only_key: img.digest, index_key: index_digest}, f"round {i}"
        # ... and in the running mirror: both variants are now fresh cache hits.
        fake.registry.clear_log()
        for headers, digest in ((only_manifest, img.digest), (with_index, index_digest)):
            resp = await mirror.client.get(manifest_path(REPO, tag), headers=headers)
            assert resp.headers["Docker-Content-Digest"] == digest
        assert fake.registry.requests == []


async def test_manifest_over_the_size_limit_is_refused_and_not_cached(
    fake: RunningFake, start_mirror: MirrorFactory
) -> None:
    """An upstream manifest past [cache] max_manifest_size is a 502, never stored."""
    body = json.dumps({"schemaVersion": 2, "padding": "x" * 5000}).encode()
    fake.registry.add_manifest(REPO, "big", OCI_MANIFEST, body)
    mirror = await start_mirror([fake.url], cache={"max_manifest_size": "4KiB"})
    resp = await mirror.client.get(manifest_path(REPO, "big"))
    assert resp.status == 502
    error = (await resp.json())["errors"][0]
    assert error["code"] == "MANIFEST_INVALID"
    assert "4096-byte limit" in error["message"]
    assert mirror.manifest_files() == []
