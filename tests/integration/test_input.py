"""Bad input is refused with OCI error JSON, before anything is asked upstream."""

from __future__ import annotations

import pytest
from aiohttp import ClientResponse

from tests.support.mirror import Mirror, RunningFake
from tests.support.paths import NS, REPO

HEX = "0123456789abcdef" * 4


async def _error_code(resp: ClientResponse) -> str:
    assert resp.content_type == "application/json"
    body = await resp.json()
    code: str = body["errors"][0]["code"]
    assert body["errors"][0]["message"]
    return code


@pytest.mark.parametrize(
    "name", ["Library/alpine", "library/-alpine", "library//alpine", "library/alp%20ine"]
)
async def test_invalid_name(fake: RunningFake, mirror: Mirror, name: str) -> None:
    resp = await mirror.client.get(f"/v2/{name}/manifests/3?ns={NS}")
    assert resp.status == 400
    assert await _error_code(resp) == "NAME_INVALID"
    assert fake.registry.requests == []


async def test_invalid_tag(fake: RunningFake, mirror: Mirror) -> None:
    """A reference that cannot exist names no manifest: 404, as the OCI spec's
    conformance suite wants (NAME_INVALID is for repository names)."""
    for method in ("GET", "HEAD"):
        resp = await mirror.client.request(method, f"/v2/{REPO}/manifests/.hidden?ns={NS}")
        assert resp.status == 404
        if method == "GET":
            assert await _error_code(resp) == "MANIFEST_UNKNOWN"
    assert fake.registry.requests == []


@pytest.mark.parametrize(
    "digest",
    [
        "sha256:xyz",
        "sha256:" + HEX[:-1],  # one hex digit short
        "sha256:" + HEX.upper(),
        "sha256:" + HEX + "00",
        "sha256:",
    ],
)
@pytest.mark.parametrize("kind", ["blobs", "manifests"])
async def test_invalid_digest(fake: RunningFake, mirror: Mirror, kind: str, digest: str) -> None:
    resp = await mirror.client.get(f"/v2/{REPO}/{kind}/{digest}?ns={NS}")
    assert resp.status == 400
    assert await _error_code(resp) == "DIGEST_INVALID"
    assert fake.registry.requests == []


async def test_blob_reference_must_be_a_digest(fake: RunningFake, mirror: Mirror) -> None:
    resp = await mirror.client.get(f"/v2/{REPO}/blobs/latest?ns={NS}")
    assert resp.status == 400
    assert await _error_code(resp) == "DIGEST_INVALID"
    assert fake.registry.requests == []


@pytest.mark.parametrize("kind", ["blobs", "manifests"])
async def test_sha1_digest_is_refused(fake: RunningFake, mirror: Mirror, kind: str) -> None:
    resp = await mirror.client.get(f"/v2/{REPO}/{kind}/sha1:{HEX[:40]}?ns={NS}")
    assert 400 <= resp.status < 500
    assert await _error_code(resp) in ("DIGEST_INVALID", "UNSUPPORTED")
    assert fake.registry.requests == []


@pytest.mark.parametrize("ns", ["quay.io", "registry.k8s.io", "evil.example:8080"])
async def test_unconfigured_namespace(fake: RunningFake, mirror: Mirror, ns: str) -> None:
    resp = await mirror.client.get(f"/v2/{REPO}/manifests/3?ns={ns}")
    assert resp.status == 404
    assert await _error_code(resp) == "NAME_UNKNOWN"
    resp = await mirror.client.get(f"/v2/{REPO}/blobs/sha256:{HEX}?ns={ns}")
    assert resp.status == 404
    assert await _error_code(resp) == "NAME_UNKNOWN"
    assert fake.registry.requests == []


async def test_invalid_namespace(fake: RunningFake, mirror: Mirror) -> None:
    resp = await mirror.client.get(f"/v2/{REPO}/manifests/3?ns=not%20a%20host")
    assert resp.status == 400
    assert await _error_code(resp) == "NAME_INVALID"
    assert fake.registry.requests == []


@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("PUT", f"/v2/{REPO}/manifests/3"),
        ("DELETE", f"/v2/{REPO}/manifests/sha256:{HEX}"),
        ("DELETE", f"/v2/{REPO}/blobs/sha256:{HEX}"),
        ("POST", f"/v2/{REPO}/blobs/uploads"),
        ("PATCH", f"/v2/{REPO}/manifests/3"),
    ],
)
async def test_write_methods_are_unsupported(
    fake: RunningFake, mirror: Mirror, method: str, path: str
) -> None:
    resp = await mirror.client.request(method, f"{path}?ns={NS}", data=b"{}")
    assert resp.status == 405
    assert await _error_code(resp) == "UNSUPPORTED"
    assert "GET" in resp.headers["Allow"]
    assert fake.registry.requests == []


async def test_push_start_is_405_unsupported(fake: RunningFake, mirror: Mirror) -> None:
    """Starting a push (POST .../blobs/uploads/) is 405 UNSUPPORTED: a mirror is read-only."""
    resp = await mirror.client.post(f"/v2/{REPO}/blobs/uploads/?ns={NS}")
    assert resp.status == 405
    assert (await resp.json())["errors"][0]["code"] == "UNSUPPORTED"


@pytest.mark.parametrize("path", ["/nope", "/v1/_ping", f"/v2/{REPO}/referrers"])
async def test_unknown_path_is_404_json(fake: RunningFake, mirror: Mirror, path: str) -> None:
    resp = await mirror.client.get(path)
    assert resp.status == 404
    assert await _error_code(resp)
    assert fake.registry.requests == []


async def test_api_root(mirror: Mirror) -> None:
    resp = await mirror.client.get("/v2/")
    assert resp.status == 200
    assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"
    assert await resp.json() == {}
