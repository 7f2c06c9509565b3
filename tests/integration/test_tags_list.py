"""``tags/list`` through the mirror: always asked of the upstream, never cached.

The paging parameters are checked first and passed on normalised; the upstream's
pagination ``Link`` is rewritten to point at this mirror; a tag list the upstream
cuts mid-way is a gateway error in OCI JSON.
"""

from __future__ import annotations

import pytest

from tests.support.mirror import Mirror, RunningFake
from tests.support.paths import NS, REPO


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
