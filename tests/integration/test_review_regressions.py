"""Regressions for manifest and tag-list bugs found in review (all fixed).

Each test pins one answer the mirror once got wrong:

- an upstream that cuts a manifest body mid-way is a failed upstream like any other:
  the next endpoint is asked, or the stale copy is served, and a cut tag list is a
  502/503/504 in OCI JSON (it used to be a 500 "internal error" with a traceback);
- upstream requests say ``Accept-Encoding: identity``: a registry behind a
  compressing proxy otherwise sends gzip, and the mirror stored gzip bytes;
- a tag record another process rewrites (``mirrorproxy import`` next to a running
  offline server) is re-read, not remembered forever;
- a ``tags/list`` ``Link`` header is passed on, pointing at this mirror;
- an upstream that refuses HEAD (405) gets a GET, so a moved tag is noticed;
- two Accept variants of a new tag fetched at once are both recorded (no lost update).
"""

from __future__ import annotations

import asyncio
import gzip
import json
import logging
import time

import pytest
from aiohttp import ClientResponse, web
from yarl import URL

from mirrorproxy.bundle import CONTAINERD_KEY
from mirrorproxy.cache import StoredManifest, TagEntry
from mirrorproxy.cache.manifests import TAG_RECHECK, FileManifestStore
from mirrorproxy.core.oci import CONTAINERD_ACCEPT, accept_types, parse_digest
from tests.fakes.registry import OCI_INDEX, OCI_MANIFEST, FakeRegistry, Handler
from tests.support.mirror import FakeFactory, MirrorFactory
from tests.support.paths import NS, REPO, manifest_path
from tests.support.waiting import WAIT

STALE_WARNING = '110 - "Response is Stale"'
TAGS_PATH = f"/v2/{REPO}/tags/list"


class CuttingRegistry(FakeRegistry):
    """A FakeRegistry that sends half of a GET body, then drops the connection.

    ``cut`` names the kinds of request cut (``manifests``, ``tags``); the headers
    still announce the full length, as when a connection dies mid-transfer.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cut: set[str] = set()
        self.app.middlewares.append(self._cut_body)

    @web.middleware
    async def _cut_body(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        full = await handler(request)
        if request.method != "GET" or not any(f"/{k}/" in request.path for k in self.cut):
            return full
        body = full.body if isinstance(full, web.Response) else None
        if full.status != 200 or not isinstance(body, bytes):
            return full
        resp = web.StreamResponse(
            headers={k: v for k, v in full.headers.items() if k.lower() != "content-length"}
        )
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)  # let the client read the half before the close
        if request.transport is not None:
            request.transport.close()
        return resp


class GzipRegistry(FakeRegistry):
    """A registry behind a proxy with ``gzip on`` for JSON: compresses when asked to.

    Like some such proxies, it drops ``Docker-Content-Digest`` from compressed answers.
    """

    async def _manifest(self, request: web.Request) -> web.Response:
        resp = await super()._manifest(request)
        body = resp.body
        if (
            request.method != "GET"
            or resp.status != 200
            or "gzip" not in request.headers.get("Accept-Encoding", "")
            or not isinstance(body, bytes)
        ):
            return resp
        headers = {
            k: v
            for k, v in resp.headers.items()
            if k.lower() not in ("content-length", "docker-content-digest")
        }
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=gzip.compress(body), headers=headers)


class PagingRegistry(FakeRegistry):
    """Paginates ``tags/list`` like distribution: a ``Link`` while more tags follow."""

    refuse_head: bool = False  # answer manifest HEADs with 405, as some registries do

    async def _tags_list(self, request: web.Request) -> web.Response:
        resp = await super()._tags_list(request)
        if resp.status != 200 or "n" not in request.query or resp.text is None:
            return resp
        repo, page = request.match_info["name"], json.loads(resp.text)["tags"]
        if page and page[-1] < max(t for (r, t) in self._tags if r == repo):
            n = request.query["n"]
            resp.headers["Link"] = f'</v2/{repo}/tags/list?last={page[-1]}&n={n}>; rel="next"'
        return resp

    async def _manifest(self, request: web.Request) -> web.Response:
        if self.refuse_head and request.method == "HEAD":
            return web.Response(status=405)
        return await super()._manifest(request)


def errors_logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    """Records at ERROR or above, or carrying a traceback (an unexpected failure)."""
    return [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR or r.exc_info]


async def oci_error_code(resp: ClientResponse) -> str:
    """The code of an OCI error body (``{"errors": [{"code": ...}]}``)."""
    assert resp.content_type == "application/json"
    errors = (await resp.json())["errors"]
    assert isinstance(errors, list)
    assert errors
    return str(errors[0]["code"])


# -- a manifest or tag-list body cut mid-way ---------------------------------------------


async def test_cut_manifest_body_fails_over_to_the_next_upstream(
    start_fake: FakeFactory, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut manifest body moves on to the healthy second upstream, logging no error."""
    cutting = CuttingRegistry()
    cutting.cut = {"manifests"}
    one, two = await start_fake(cutting), await start_fake()
    img = one.registry.add_image(REPO, "3")
    assert two.registry.add_image(REPO, "3") == img
    mirror = await start_mirror([one.url, two.url])
    caplog.set_level(logging.WARNING)

    resp = await mirror.client.get(manifest_path(REPO, "3"))
    assert resp.status == 200, await resp.text()
    assert await resp.read() == img.manifest
    assert resp.headers["Docker-Content-Digest"] == img.digest
    assert len(one.registry.calls("GET", "manifests")) == 1  # tried, and cut
    assert len(two.registry.calls("GET", "manifests")) == 1
    assert errors_logged(caplog) == []

    # The whole manifest was stored under its digest: served without asking upstream.
    one.registry.clear_log()
    two.registry.clear_log()
    resp = await mirror.client.get(manifest_path(REPO, img.digest))
    assert resp.status == 200
    assert await resp.read() == img.manifest
    assert one.registry.requests == two.registry.requests == []


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


async def test_cut_tags_list_is_an_oci_gateway_error(
    start_fake: FakeFactory, start_mirror: MirrorFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """A cut tag list answers 502/503/504 with an OCI JSON error, not a 500 traceback."""
    cutting = CuttingRegistry()
    cutting.cut = {"tags"}
    one = await start_fake(cutting)
    one.registry.add_image(REPO, "3")
    mirror = await start_mirror([one.url])
    caplog.set_level(logging.WARNING)

    resp = await mirror.client.get(f"{TAGS_PATH}?ns={NS}")
    assert resp.status in (502, 503, 504), await resp.text()
    assert await oci_error_code(resp) == "UNAVAILABLE"
    assert len(one.registry.calls("GET", "tags")) == 1
    assert errors_logged(caplog) == []


# -- what upstream requests ask for --------------------------------------------------------


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


async def test_tags_list_link_points_at_this_mirror(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """The upstream's pagination ``Link`` is forwarded as a path on this mirror, with ns=."""
    one = await start_fake(PagingRegistry())
    one.registry.add_image(REPO, "a")
    one.registry.add_image(REPO, "b")
    mirror = await start_mirror([one.url])

    resp = await mirror.client.get(f"{TAGS_PATH}?ns={NS}&n=1")
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["tags"] == ["a"]
    link = resp.headers["Link"]
    assert link.endswith('>; rel="next"')
    assert link.startswith("<")
    target = URL(link[1 : link.index(">")])
    assert not target.is_absolute()
    assert target.path == TAGS_PATH
    assert dict(target.query) == {"n": "1", "last": "a", "ns": NS}

    # Following it gives the next (last) page, which has no Link.
    resp = await mirror.client.get(str(target))
    assert resp.status == 200, await resp.text()
    assert (await resp.json())["tags"] == ["b"]
    assert "Link" not in resp.headers
    assert dict(one.registry.calls("GET", "tags")[-1].query) == {"last": "a", "n": "1"}


# -- tag records ---------------------------------------------------------------------------


async def test_offline_server_rereads_a_tag_another_process_moved(
    start_fake: FakeFactory, start_mirror: MirrorFactory
) -> None:
    """A running offline server serves the tag ``import`` rewrote, after TAG_RECHECK."""
    fake = await start_fake()
    v1 = fake.registry.add_image(REPO, "3")
    accept = {"Accept": CONTAINERD_ACCEPT}
    online = await start_mirror([fake.url], name="shared")
    assert (await online.client.get(manifest_path(REPO, "3"), headers=accept)).status == 200

    offline = await start_mirror([fake.url], name="shared", cache={"offline": True})
    resp = await offline.client.get(manifest_path(REPO, "3"), headers=accept)
    assert resp.status == 200
    assert resp.headers["Docker-Content-Digest"] == v1.digest  # now remembered in memory

    # What `mirrorproxy import` does from another process: store v2, move the tag.
    v2 = fake.registry.add_image(REPO, "3", seed="v2")
    other = FileManifestStore(offline.cache_dir)
    d2 = parse_digest(v2.digest)
    await other.put(StoredManifest(d2, OCI_MANIFEST, v2.manifest))
    entry = TagEntry(d2, OCI_MANIFEST, len(v2.manifest), time.time())
    await other.put_tag(NS, REPO, "3", CONTAINERD_KEY, entry)
    fake.registry.clear_log()

    async with asyncio.timeout(TAG_RECHECK + WAIT):
        while True:
            resp = await offline.client.get(manifest_path(REPO, "3"), headers=accept)
            assert resp.status == 200
            body = await resp.read()
            if resp.headers["Docker-Content-Digest"] == v2.digest:
                break
            assert body == v1.manifest  # until the recheck: the remembered record
            await asyncio.sleep(0.05)
    assert body == v2.manifest
    assert fake.registry.requests == []  # offline: the cache alone answered


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
