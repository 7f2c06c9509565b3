"""``[server.auth]``: who may pull through which namespace, as clients see it.

A mirror with a private namespace (``access = "authenticated"``), a team namespace
(a user list with a group) and an open one, each with its own fake upstream. Basic
credentials come from a bcrypt htpasswd file, Bearer tokens are signed in-process
(``tests.support.jwtkeys``). Every refusal is checked for its status, OCI error
code and ``WWW-Authenticate`` challenges, and for never reaching the upstream.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
from collections.abc import Mapping
from pathlib import Path

import pytest
from aiohttp import ClientResponse, web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient

from mirrorproxy.http.app import create_app
from tests.support import jwtkeys
from tests.support.authmirror import (
    OPEN,
    PRIVATE,
    REALM,
    TEAM,
    USERS,
    AuthFiles,
    auth_config,
    basic,
    bearer,
    make_auth_files,
)
from tests.support.mirror import FakeFactory, RunningFake

REPO = "team/app"
MirrorClient = TestClient[web.Request, web.Application]


@pytest.fixture(scope="module")
def signer() -> jwtkeys.Signer:
    return jwtkeys.rsa_signer()


@pytest.fixture
def files(tmp_path: Path, signer: jwtkeys.Signer) -> AuthFiles:
    return make_auth_files(tmp_path / "auth", signer)


@pytest.fixture
async def fakes(start_fake: FakeFactory) -> dict[str, RunningFake]:
    out = {name: await start_fake() for name in (PRIVATE, TEAM, OPEN)}
    for fake in out.values():
        fake.registry.add_image(REPO, "1")
    return out


async def _mirror(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    files: AuthFiles,
    fakes: Mapping[str, RunningFake],
    *,
    basic_auth: bool = True,
    token_auth: bool = True,
) -> MirrorClient:
    upstreams = {name: fake.url for name, fake in fakes.items()}
    config = auth_config(
        tmp_path / "cache", files, upstreams, basic_auth=basic_auth, token_auth=token_auth
    )
    return await aiohttp_client(create_app(config))


@pytest.fixture
async def mirror(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    files: AuthFiles,
    fakes: dict[str, RunningFake],
) -> MirrorClient:
    return await _mirror(aiohttp_client, tmp_path, files, fakes)


def _manifest(ns: str, ref: str = "1", repo: str = REPO) -> str:
    return f"/v2/{repo}/manifests/{ref}?ns={ns}"


def _scope(ns: str, repo: str = REPO) -> str:
    return f"repository:{ns}/{repo}:pull"


async def _code(resp: ClientResponse) -> str:
    body = await resp.json()
    code: str = body["errors"][0]["code"]
    return code


# -- anonymous clients ---------------------------------------------------------------


async def test_open_namespace_needs_no_credentials(
    mirror: MirrorClient, fakes: dict[str, RunningFake]
) -> None:
    resp = await mirror.get(_manifest(OPEN))
    assert resp.status == 200
    assert "WWW-Authenticate" not in resp.headers
    # Wrong or empty credentials do not matter where nobody needs any.
    resp = await mirror.get(_manifest(OPEN), headers=basic("alice", "wrong"))
    assert resp.status == 200
    resp = await mirror.get(_manifest(OPEN), headers={"Authorization": "Basic Og=="})
    assert resp.status == 200


@pytest.mark.parametrize("method", ["GET", "HEAD"])
@pytest.mark.parametrize("ns", [PRIVATE, TEAM])
async def test_private_namespace_challenges_anonymous_clients(
    mirror: MirrorClient, fakes: dict[str, RunningFake], method: str, ns: str
) -> None:
    for path in (_manifest(ns), f"/v2/{REPO}/blobs/sha256:{'a' * 64}?ns={ns}"):
        resp = await mirror.request(method, path)
        assert resp.status == 401
        assert resp.headers.getall("WWW-Authenticate") == [
            f'Bearer realm="{REALM}",service="mirrorproxy",scope="{_scope(ns)}"',
            'Basic realm="mirrorproxy",charset="UTF-8"',
        ]
        if method == "GET":
            assert await _code(resp) == "UNAUTHORIZED"
    assert fakes[ns].registry.requests == []


async def test_tags_and_referrers_are_covered_too(
    mirror: MirrorClient, fakes: dict[str, RunningFake]
) -> None:
    for path in (f"/v2/{REPO}/tags/list", f"/v2/{REPO}/referrers/sha256:{'b' * 64}"):
        resp = await mirror.get(f"{path}?ns={PRIVATE}")
        assert resp.status == 401
    assert fakes[PRIVATE].registry.requests == []


@pytest.mark.parametrize(("basic_auth", "token_auth"), [(True, False), (False, True)])
async def test_one_scheme_one_challenge(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    files: AuthFiles,
    fakes: dict[str, RunningFake],
    basic_auth: bool,
    token_auth: bool,
) -> None:
    client = await _mirror(
        aiohttp_client, tmp_path, files, fakes, basic_auth=basic_auth, token_auth=token_auth
    )
    resp = await client.get(_manifest(PRIVATE))
    assert resp.status == 401
    challenges = resp.headers.getall("WWW-Authenticate")
    assert len(challenges) == 1
    assert challenges[0].startswith("Basic " if basic_auth else "Bearer ")


# -- Basic ---------------------------------------------------------------------------


async def test_basic_credentials_open_the_private_namespace(
    mirror: MirrorClient, fakes: dict[str, RunningFake]
) -> None:
    resp = await mirror.get(_manifest(PRIVATE), headers=basic("bob", USERS["bob"]))
    assert resp.status == 200
    assert [r.path for r in fakes[PRIVATE].registry.requests] == [f"/v2/{REPO}/manifests/1"]


@pytest.mark.parametrize(
    ("user", "password"), [("bob", "wrong"), ("mallory", "anything"), ("bob", "")]
)
async def test_wrong_basic_credentials_are_challenged(
    mirror: MirrorClient, fakes: dict[str, RunningFake], user: str, password: str
) -> None:
    resp = await mirror.get(_manifest(PRIVATE), headers=basic(user, password))
    assert resp.status == 401
    assert await _code(resp) == "UNAUTHORIZED"
    assert len(resp.headers.getall("WWW-Authenticate")) == 2
    assert fakes[PRIVATE].registry.requests == []


async def test_malformed_authorization_is_challenged(mirror: MirrorClient) -> None:
    for value in ("Basic !!!not-base64", "Basic bm9jb2xvbg==", "Digest x", "Bearer"):
        resp = await mirror.get(_manifest(PRIVATE), headers={"Authorization": value})
        assert resp.status == 401, value


async def test_user_list_and_groups(mirror: MirrorClient, fakes: dict[str, RunningFake]) -> None:
    """TEAM allows alice and the ops group (carol); bob is known but not listed: 403."""
    for user in ("alice", "carol"):
        resp = await mirror.get(_manifest(TEAM), headers=basic(user, USERS[user]))
        assert resp.status == 200, user
    resp = await mirror.get(_manifest(TEAM), headers=basic("bob", USERS["bob"]))
    assert resp.status == 403
    assert await _code(resp) == "DENIED"
    assert "WWW-Authenticate" not in resp.headers
    # bob may still use the namespaces open to any authenticated user.
    resp = await mirror.get(_manifest(PRIVATE), headers=basic("bob", USERS["bob"]))
    assert resp.status == 200


async def test_v2_root_is_the_login_check(mirror: MirrorClient) -> None:
    """What `docker login` and `podman login` probe: 401 without, 200 with credentials."""
    resp = await mirror.get("/v2/")
    assert resp.status == 401
    assert resp.headers.getall("WWW-Authenticate") == [
        f'Bearer realm="{REALM}",service="mirrorproxy"',
        'Basic realm="mirrorproxy",charset="UTF-8"',
    ]
    assert (await mirror.get("/v2/", headers=basic("bob", "nope"))).status == 401
    resp = await mirror.get("/v2/", headers=basic("bob", USERS["bob"]))
    assert resp.status == 200
    assert resp.headers["Docker-Distribution-Api-Version"] == "registry/2.0"


@pytest.mark.parametrize("path", ["/healthz", "/readyz", "/metrics"])
async def test_probes_and_metrics_ask_for_no_credentials(mirror: MirrorClient, path: str) -> None:
    resp = await mirror.get(path)
    assert resp.status == 200
    resp = await mirror.get(path, headers=basic("bob", "wrong"))
    assert resp.status == 200


# -- Bearer --------------------------------------------------------------------------


async def test_token_with_the_scope_pulls(
    mirror: MirrorClient, fakes: dict[str, RunningFake], signer: jwtkeys.Signer
) -> None:
    token = jwtkeys.mint(signer, jwtkeys.pull(f"{PRIVATE}/{REPO}"), subject="svc-ci")
    resp = await mirror.get(_manifest(PRIVATE), headers=bearer(token))
    assert resp.status == 200
    # The same token again: served from the verified-token cache, same answer.
    resp = await mirror.get(_manifest(PRIVATE), headers=bearer(token))
    assert resp.status == 200


async def test_token_without_the_scope_is_sent_for_one(
    mirror: MirrorClient, fakes: dict[str, RunningFake], signer: jwtkeys.Signer
) -> None:
    """A token for another repository, or for the bare name without the registry."""
    for granted in (f"{PRIVATE}/other/app", REPO, f"{OPEN}/{REPO}"):
        token = jwtkeys.mint(signer, jwtkeys.pull(granted))
        resp = await mirror.get(_manifest(PRIVATE), headers=bearer(token))
        assert resp.status == 401, granted
        assert resp.headers.getall("WWW-Authenticate")[0] == (
            f'Bearer realm="{REALM}",service="mirrorproxy",scope="{_scope(PRIVATE)}",'
            'error="insufficient_scope"'
        )
    push_only = [{"type": "repository", "name": f"{PRIVATE}/{REPO}", "actions": ["push"]}]
    resp = await mirror.get(_manifest(PRIVATE), headers=bearer(jwtkeys.mint(signer, push_only)))
    assert resp.status == 401
    assert fakes[PRIVATE].registry.requests == []


async def test_token_subject_must_be_listed(mirror: MirrorClient, signer: jwtkeys.Signer) -> None:
    grant = jwtkeys.pull(f"{TEAM}/{REPO}")
    resp = await mirror.get(
        _manifest(TEAM), headers=bearer(jwtkeys.mint(signer, grant, subject="carol"))
    )
    assert resp.status == 200
    resp = await mirror.get(
        _manifest(TEAM), headers=bearer(jwtkeys.mint(signer, grant, subject="bob"))
    )
    assert resp.status == 403


def _bad_tokens(signer: jwtkeys.Signer) -> dict[str, str]:
    grant = jwtkeys.pull(f"{PRIVATE}/{REPO}")
    stranger = jwtkeys.rsa_signer("someone else")
    return {
        "expired": jwtkeys.mint(signer, grant, expires_in=-300),
        "wrong issuer": jwtkeys.mint(signer, grant, issuer="other-auth"),
        "wrong service": jwtkeys.mint(signer, grant, audience="other-registry"),
        "untrusted key": jwtkeys.mint(stranger, grant),
        "untrusted x5c": jwtkeys.mint(stranger, grant, x5c=[stranger]),
        "garbage": "not.a.token",
    }


async def test_invalid_tokens_are_refused(
    mirror: MirrorClient, fakes: dict[str, RunningFake], signer: jwtkeys.Signer
) -> None:
    for why, token in _bad_tokens(signer).items():
        resp = await mirror.get(_manifest(PRIVATE), headers=bearer(token))
        assert resp.status == 401, why
        assert resp.headers.getall("WWW-Authenticate")[0].endswith('error="invalid_token"'), why
    assert fakes[PRIVATE].registry.requests == []


async def test_hmac_token_made_with_the_public_key_is_refused(
    mirror: MirrorClient, files: AuthFiles
) -> None:
    """The classic algorithm confusion: HS256 keyed with the trusted public PEM."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    now = int(time.time())
    claims = {
        "iss": jwtkeys.ISSUER,
        "aud": jwtkeys.SERVICE,
        "sub": "mallory",
        "exp": now + 300,
        "access": jwtkeys.pull(f"{PRIVATE}/{REPO}"),
    }
    signing_input = (
        b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        + "."
        + b64(json.dumps(claims).encode())
    )
    mac = hmac.new(files.keys.read_bytes(), signing_input.encode(), hashlib.sha256).digest()
    resp = await mirror.get(_manifest(PRIVATE), headers=bearer(f"{signing_input}.{b64(mac)}"))
    assert resp.status == 401


async def test_x5c_chain_to_a_trusted_certificate(
    mirror: MirrorClient, signer: jwtkeys.Signer
) -> None:
    """A leaf key certified by the trusted certificate signs; the leaf is not in the file."""
    leaf = jwtkeys.issued_signer(signer)
    token = jwtkeys.mint(leaf, jwtkeys.pull(f"{PRIVATE}/{REPO}"), x5c=[leaf])
    resp = await mirror.get(_manifest(PRIVATE), headers=bearer(token))
    assert resp.status == 200
    # Without the chain the leaf key is unknown.
    token = jwtkeys.mint(leaf, jwtkeys.pull(f"{PRIVATE}/{REPO}"))
    assert (await mirror.get(_manifest(PRIVATE), headers=bearer(token))).status == 401


async def test_jwks_file_with_key_ids(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    files: AuthFiles,
    fakes: dict[str, RunningFake],
) -> None:
    first, second = jwtkeys.ec_signer("k1"), jwtkeys.ec_signer("k2")
    jwks = jwtkeys.write_jwks(tmp_path / "jwks.json", first, second)
    client = await _mirror(aiohttp_client, tmp_path, AuthFiles(files.htpasswd, jwks, first), fakes)
    grant = jwtkeys.pull(f"{PRIVATE}/{REPO}")
    for s in (first, second):
        resp = await client.get(_manifest(PRIVATE), headers=bearer(jwtkeys.mint(s, grant)))
        assert resp.status == 200, s.kid
    outsider = jwtkeys.ec_signer("k1")  # claims a trusted kid, signs with another key
    resp = await client.get(_manifest(PRIVATE), headers=bearer(jwtkeys.mint(outsider, grant)))
    assert resp.status == 401
