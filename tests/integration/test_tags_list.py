"""``tags/list`` through the mirror, which passes it on from the upstream.

The paging parameters are checked first and passed on normalised; the upstream's
pagination ``Link`` is rewritten to point at this mirror; a tag list the upstream
cuts mid-way is a gateway error in OCI JSON.
"""

from __future__ import annotations

import logging

import pytest
from aiohttp import ClientResponse
from yarl import URL

from tests.fakes.variants import CuttingRegistry, PagingRegistry
from tests.support.logs import errors_logged
from tests.support.mirror import FakeFactory, Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO

TAGS_PATH = f"/v2/{REPO}/tags/list"


async def oci_error_code(resp: ClientResponse) -> str:
    """The code of an OCI error body (``{"errors": [{"code": ...}]}``)."""
    assert resp.content_type == "application/json"
    errors = (await resp.json())["errors"]
    assert isinstance(errors, list)
    assert errors
    return str(errors[0]["code"])


async def test_tags_list_is_passed_through(fake: RunningFake, mirror: Mirror) -> None:
    """A tag list comes from the upstream as it is, asked without ``ns=``."""
    for tag in ("3", "3.19", "latest"):
        fake.registry.add_image(REPO, tag)
    resp = await mirror.client.get(f"/v2/{REPO}/tags/list?ns={NS}&n=2")
    assert resp.status == 200
    assert await resp.json() == {"name": REPO, "tags": ["3", "3.19"]}
    (req,) = fake.registry.calls("GET", "tags")
    assert req.path == f"/v2/{REPO}/tags/list"
    assert req.query.get("n") == "2"
    assert "ns" not in req.query


@pytest.mark.parametrize(
    ("query", "code"),
    [
        ("n=-1", "PAGINATION_NUMBER_INVALID"),
        ("n=abc", "PAGINATION_NUMBER_INVALID"),
        ("n=1000001", "PAGINATION_NUMBER_INVALID"),
        ("n=%EF%BC%92", "PAGINATION_NUMBER_INVALID"),  # a full-width digit
        ("last=..", "NAME_INVALID"),
        ("last=a%2Fb", "NAME_INVALID"),
    ],
)
async def test_tags_list_paging_is_checked_before_going_upstream(
    fake: RunningFake, mirror: Mirror, query: str, code: str
) -> None:
    """A bad ``n`` or ``last`` is a 400 with the OCI code, and the upstream is not asked."""
    resp = await mirror.client.get(f"/v2/{REPO}/tags/list?ns={NS}&{query}")
    assert resp.status == 400
    assert (await resp.json())["errors"][0]["code"] == code
    assert fake.registry.calls("GET", "tags") == []


async def test_tags_list_paging_is_passed_on(fake: RunningFake, mirror: Mirror) -> None:
    """``n`` (normalised) and ``last`` reach the upstream; other query keys do not."""
    for tag in ("3", "3.19", "latest"):
        fake.registry.add_image(REPO, tag)
    resp = await mirror.client.get(f"/v2/{REPO}/tags/list?ns={NS}&n=007&last=3&x=y")
    assert resp.status == 200
    (req,) = fake.registry.calls("GET", "tags")
    assert dict(req.query) == {"n": "7", "last": "3"}


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
