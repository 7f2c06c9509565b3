"""Real clients against a mirror with ``[server.auth]``: skopeo, podman, ctr, CRI.

Two mirrors share one set-up per module: one with Basic auth (an htpasswd file made
by ``htpasswd -B``), one with Bearer tokens from the token server of
``tests.support.tokenserver``. Each serves ``private.corp`` (only alice may pull),
and ``docker.io`` (open), from two docker-registry upstreams. Each test says what
the client sent and what it got, from the mirror's access log.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from tests.support import images, tls
from tests.support.containers import ContainersTools
from tests.support.cri import AuthConfig, CriContainerd, CriImageClient, rpc_error_text
from tests.support.procs import (
    CTR_ENV_OVERRIDES,
    Containerd,
    MirrorProcess,
    Registry,
    ctr,
    free_port,
    write_hosts_toml,
)
from tests.support.requirements import REQUIRE_E2E_ENV
from tests.support.tokenserver import TokenServer

KiB = 1024
PRIVATE = "private.corp"
OPEN = "docker.io"
PRIVATE_REPO = "team/app"
OPEN_REPO = "library/app"
TAG = "1"
USERS = {"alice": "alice-e2e-pw-7Hq2", "bob": "bob-e2e-pw-3Kd9"}
TIMEOUT = 120


@dataclass(frozen=True, slots=True)
class Site:
    basic: MirrorProcess  # Basic auth against the htpasswd file
    bearer: MirrorProcess  # Bearer tokens from the token server
    tokens: TokenServer
    private_image: images.Image
    open_image: images.Image
    root: Path


def _mirror(
    root: Path, name: str, auth: str, private: Registry, public: Registry
) -> MirrorProcess:
    port = free_port()
    config = f"""
[server]
listen = "127.0.0.1:{port}"
default_namespace = "docker.io"

[server.auth]
{auth}

[cache]
dir = "{root / name / "cache"}"

[namespaces."{PRIVATE}"]
upstreams = ["{private.url}"]
access = ["alice"]

[namespaces."{OPEN}"]
upstreams = ["{public.url}"]
"""
    return MirrorProcess(root / name, config, port, args=("--log-level", "debug"))


@pytest.fixture(scope="module")
def site(e2e_requirements: None, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Site]:
    missing = tls.missing_tls_tools()
    if missing:
        if os.environ.get(REQUIRE_E2E_ENV) == "1":
            pytest.fail("; ".join(missing), pytrace=False)
        pytest.skip("; ".join(missing))
    root = tmp_path_factory.mktemp("clientauth")
    htpasswd = root / "htpasswd"
    htpasswd.write_text("".join(tls.htpasswd_line(u, p) + "\n" for u, p in USERS.items()))
    signer = tls.make_signing_cert(root / "signer")
    private, public = Registry(root / "private"), Registry(root / "public")
    tokens = TokenServer(signer, service="mirrorproxy", issuer="corp-auth", users=USERS)
    mirrors: list[MirrorProcess] = []
    try:
        private_image = images.build_image([96 * KiB, 200 * KiB], seed=21)
        open_image = images.build_image([64 * KiB], seed=22)
        images.push(private.url, PRIVATE_REPO, TAG, private_image)
        images.push(public.url, OPEN_REPO, TAG, open_image)
        basic = _mirror(root, "basic", f'htpasswd = "{htpasswd}"', private, public)
        mirrors.append(basic)
        bearer_auth = (
            f'token_realm = "{tokens.realm}"\ntoken_service = "mirrorproxy"\n'
            f'token_issuer = "corp-auth"\ntoken_public_keys = "{signer.cert}"'
        )
        bearer = _mirror(root, "bearer", bearer_auth, private, public)
        mirrors.append(bearer)
        yield Site(basic, bearer, tokens, private_image, open_image, root)
    finally:
        for m in mirrors:
            m.stop()
        tokens.close()
        private.stop()
        public.stop()


def _require(binary: str) -> None:
    """Skip without ``binary`` (Debian package of the same name), or fail when required."""
    if shutil.which(binary) is not None:
        return
    reason = f"`{binary}` not found on PATH (apt-get install {binary})"
    if os.environ.get(REQUIRE_E2E_ENV) == "1":
        pytest.fail(f"{reason} (MIRRORPROXY_REQUIRE_E2E=1)", pytrace=False)
    pytest.skip(reason)


def _config_digest(image: images.Image) -> str:
    digest: str = json.loads(image.body)["config"]["digest"]
    return digest


def _last_layer(image: images.Image) -> str:
    digest: str = json.loads(image.body)["layers"][-1]["digest"]
    return digest


def _host(mirror: MirrorProcess) -> str:
    return f"127.0.0.1:{mirror.port}"


def _access(mirror: MirrorProcess, since: int, *, last: str) -> list[str]:
    """`METHOD path status` of each access-log line after the first ``since`` lines,
    waiting (bounded) for a line containing ``last``: lines are written in batches."""
    deadline = time.monotonic() + 5.0
    while True:
        out = []
        for line in mirror.log_text().splitlines()[since:]:
            if "mirrorproxy.access" not in line or line.count('"') < 2:
                continue
            request, rest = line.split('"')[1], line.split('"')[2]
            method, path = [*request.split(), "", ""][:2]
            out.append(f"{method} {path} {rest.split()[0]}")
        if any(last in entry for entry in out) or time.monotonic() > deadline:
            return out
        time.sleep(0.05)


def _mark(mirror: MirrorProcess) -> int:
    return len(mirror.log_text().splitlines())


def _no_secrets(site: Site, mirror: MirrorProcess) -> None:
    """Neither a password nor an issued token in anything the mirror printed."""
    log = mirror.log_text()
    for password in USERS.values():
        assert password not in log
    for issued in site.tokens.requests():
        if issued.token:
            assert issued.token not in log
    assert "Traceback" not in log, log[-3000:]


def _run(
    argv: Sequence[str], *, env: Mapping[str, str] | None = None, stdin: str | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        input=stdin,
        timeout=TIMEOUT,
        env=dict(os.environ) | CTR_ENV_OVERRIDES | dict(env or {}),
        check=False,
    )


# -- skopeo ---------------------------------------------------------------------------


def _skopeo_inspect(
    site: Site, mirror: MirrorProcess, ref: str, *creds: str
) -> subprocess.CompletedProcess[str]:
    auth_file = site.root / "skopeo-auth.json"  # never the machine's own logins
    argv = ["skopeo", "inspect", "--raw", "--tls-verify=false", "--authfile", str(auth_file)]
    if creds:
        argv += ["--creds", creds[0]]
    return _run([*argv, f"docker://{_host(mirror)}/{ref}"])


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_skopeo_with_and_without_creds(site: Site, scheme: str) -> None:
    _require("skopeo")
    mirror = site.basic if scheme == "basic" else site.bearer
    private_ref = f"{PRIVATE}/{PRIVATE_REPO}:{TAG}"
    mark = _mark(mirror)
    anonymous = _skopeo_inspect(site, mirror, private_ref)
    assert anonymous.returncode != 0
    assert (
        "unauthorized" in anonymous.stderr.lower()
        or "authentication required" in anonymous.stderr.lower()
    ), anonymous.stderr
    wrong = _skopeo_inspect(site, mirror, private_ref, "alice:wrong-password")
    assert wrong.returncode != 0
    denied = _skopeo_inspect(site, mirror, private_ref, f"bob:{USERS['bob']}")
    assert denied.returncode != 0
    assert "denied" in denied.stderr.lower(), denied.stderr
    ok = _skopeo_inspect(site, mirror, private_ref, f"alice:{USERS['alice']}")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.encode() == site.private_image.body
    open_ok = _skopeo_inspect(site, mirror, f"{OPEN}/{OPEN_REPO}:{TAG}")
    assert open_ok.returncode == 0, open_ok.stderr
    seen = _access(mirror, mark, last=f"/v2/{OPEN}/{OPEN_REPO}/manifests/{TAG} 200")
    print(f"skopeo/{scheme} -> mirror:", *seen, sep="\n  ")
    assert f"GET /v2/{PRIVATE}/{PRIVATE_REPO}/manifests/{TAG} 403" in seen
    assert f"GET /v2/{PRIVATE}/{PRIVATE_REPO}/manifests/{TAG} 200" in seen
    if scheme == "bearer":
        scopes = {s for r in site.tokens.requests() for s in r.scopes}
        print("token server asked for:", sorted(scopes))
        assert f"repository:{PRIVATE}/{PRIVATE_REPO}:pull" in scopes
    _no_secrets(site, mirror)


# -- podman ----------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_podman_login_then_pull(
    site: Site, scheme: str, tmp_path_factory: pytest.TempPathFactory
) -> None:
    _require("podman")
    mirror = site.basic if scheme == "basic" else site.bearer
    workdir = tmp_path_factory.mktemp("podauth")  # short: podman wants runroot <= 50 chars
    registries = workdir / "registries.conf"
    registries.write_text("unqualified-search-registries = []\n")
    tools = ContainersTools(workdir, registries)
    auth_file = workdir / "auth.json"
    auth_file.write_text('{"auths": {}}\n')  # podman's own, never the machine's logins
    auth = ("--authfile", str(auth_file), "--tls-verify=false")
    login = ("login", *auth, "-u", "alice", "--password-stdin", _host(mirror))
    ref = f"{_host(mirror)}/{PRIVATE}/{PRIVATE_REPO}:{TAG}"
    mark = _mark(mirror)
    before = tools.podman("pull", *auth, ref)
    assert before.returncode != 0
    # Basic: "authentication required"; Bearer: an anonymous token without the scope.
    assert "authentication required" in before.stderr or "unauthorized" in before.stderr

    bad = tools.podman(*login, stdin="not-her-password\n")
    assert bad.returncode != 0  # the login check on /v2/ refuses it
    assert "invalid username/password" in bad.stderr, bad.stderr
    good = tools.podman(*login, stdin=USERS["alice"] + "\n")
    assert good.returncode == 0, good.stderr
    pulled = tools.podman("pull", *auth, ref)
    assert pulled.returncode == 0, pulled.stderr
    seen = _access(mirror, mark, last=f"/blobs/{_config_digest(site.private_image)} 200")
    print(f"podman/{scheme} -> mirror:", *seen, sep="\n  ")
    assert (
        f"GET /v2/{PRIVATE}/{PRIVATE_REPO}/blobs/{_config_digest(site.private_image)} 200" in seen
    )
    _no_secrets(site, mirror)


# -- ctr --------------------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_ctr_user(site: Site, scheme: str, containerd: Containerd, hosts_dir: Path) -> None:
    """A node's way: hosts.toml sends private.corp to the mirror, ctr adds ``ns=``."""
    mirror = site.basic if scheme == "basic" else site.bearer
    write_hosts_toml(hosts_dir, PRIVATE, f"https://{PRIVATE}", mirror.url)
    ref = f"{PRIVATE}/{PRIVATE_REPO}:{TAG}"
    mark = _mark(mirror)
    pull = ["images", "pull", "--hosts-dir", str(hosts_dir)]
    anonymous = ctr(containerd, *pull, ref)
    assert anonymous.returncode != 0
    denied = ctr(containerd, *pull, "--user", f"bob:{USERS['bob']}", ref)
    assert denied.returncode != 0
    ok = ctr(containerd, *pull, "--user", f"alice:{USERS['alice']}", ref)
    assert ok.returncode == 0, ok.stderr
    seen = _access(mirror, mark, last=f"/blobs/{_last_layer(site.private_image)}")
    print(f"ctr/{scheme} -> mirror:", *seen, sep="\n  ")
    manifest = f"/v2/{PRIVATE_REPO}/manifests/{TAG}?ns={PRIVATE}"
    assert f"HEAD {manifest} 401" in seen
    assert f"HEAD {manifest} 403" in seen
    assert f"HEAD {manifest} 200" in seen
    _no_secrets(site, mirror)


# -- containerd's CRI plugin (what the kubelet drives) ---------------------------------


def _cri_pull(
    ctd: CriContainerd, ref: str, auth: AuthConfig | None
) -> tuple[str | None, str | None]:
    with CriImageClient(ctd.address) as client:
        try:
            return client.pull(ref, auth), None
        except grpc.RpcError as err:
            return None, rpc_error_text(err)


@pytest.mark.parametrize("scheme", ["basic", "bearer"])
def test_cri_pull_image_with_pull_secret_credentials(
    site: Site, scheme: str, hosts_dir: Path
) -> None:
    """PullImage's AuthConfig, as the kubelet fills it from an imagePullSecret."""
    mirror = site.basic if scheme == "basic" else site.bearer
    write_hosts_toml(hosts_dir, PRIVATE, f"https://{PRIVATE}", mirror.url)
    ref = f"{PRIVATE}/{PRIVATE_REPO}:{TAG}"
    alice = {"username": "alice", "password": USERS["alice"]}
    cases = {
        "no auth": None,
        "user+password": AuthConfig(**alice),
        "server_address=registry": AuthConfig(**alice, server_address=PRIVATE),
        "server_address=mirror": AuthConfig(**alice, server_address=f"http://{_host(mirror)}"),
    }
    results = {}
    for name, auth in cases.items():
        with CriContainerd(hosts_dir) as ctd:  # a fresh content store per case
            mark = _mark(mirror)
            image_id, error = _cri_pull(ctd, ref, auth)
            # Wait for the line that decided it: lines are written in batches.
            decided = f"manifests/{TAG}?ns={PRIVATE} {200 if image_id else 401}"
            seen = _access(mirror, mark, last=decided)
            results[name] = (image_id, error, seen)
            print(f"CRI/{scheme} {name}: id={image_id} error={error}", *seen, sep="\n  ")
    manifest = f"HEAD /v2/{PRIVATE_REPO}/manifests/{TAG}?ns={PRIVATE}"
    image = _config_digest(site.private_image)
    # Without credentials: challenged, no fallback that works (the registry is fake).
    assert results["no auth"][0] is None
    assert f"{manifest} 401" in results["no auth"][2]
    # What the kubelet sends from an imagePullSecret (it leaves server_address empty):
    # containerd answers the mirror's challenge with it.
    assert results["user+password"][0] == image
    assert f"{manifest} 200" in results["user+password"][2]
    # A server_address naming another host keeps the credentials from the mirror ...
    assert results["server_address=registry"][0] is None
    # (only the tag's resolve decides: the previous case's blob lines may still be
    # arriving, as access lines are written in batches)
    assert f"{manifest} 200" not in results["server_address=registry"][2]
    # ... and one naming the mirror's own host sends them.
    assert results["server_address=mirror"][0] == image
    _no_secrets(site, mirror)


def test_cri_registry_configs_auth_for_the_mirror_host(site: Site, hosts_dir: Path) -> None:
    """What k3s writes from registries.yaml ``configs.<mirror>.auth``: no request auth."""
    mirror = site.basic
    write_hosts_toml(hosts_dir, PRIVATE, f"https://{PRIVATE}", mirror.url)
    configs = {_host(mirror): {"username": "alice", "password": USERS["alice"]}}
    with CriContainerd(hosts_dir, registry_auth=configs) as ctd:
        mark = _mark(mirror)
        image_id, error = _cri_pull(ctd, f"{PRIVATE}/{PRIVATE_REPO}:{TAG}", None)
        seen = _access(mirror, mark, last=f"/blobs/{_last_layer(site.private_image)}")
        print("CRI configs.auth:", image_id, error, *seen, sep="\n  ")
    assert image_id == _config_digest(site.private_image), error
