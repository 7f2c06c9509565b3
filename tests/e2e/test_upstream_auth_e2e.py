"""containerd pulls through the mirror from upstreams that need TLS, credentials, a proxy.

Upstreams are Debian's docker-registry on loopback: with ``auth: htpasswd`` behind TLS
(a CA the test makes with openssl; the mirror trusts it with ``ca``, or not at all
with ``skip_verify``), and with ``auth: token`` against the small token server of
``tests.support.tokenserver``. containerd always talks plain HTTP to the mirror; only
the mirror talks TLS and auth upstream. A CONNECT proxy written here with asyncio
shows that HTTPS_PROXY from the environment, and a per-upstream ``proxy =``, carry
the mirror's upstream traffic. Every test checks the pulled digest and that no
secret reaches the mirror's (debug-level) log.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import itertools
import os
import threading
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pytest

from tests.support import images, tls
from tests.support.procs import (
    Containerd,
    MirrorFactory,
    MirrorProcess,
    Registry,
    ctr_images,
    ctr_pull,
    free_port,
    mirror_config,
    write_hosts_toml,
)
from tests.support.requirements import REQUIRE_E2E_ENV
from tests.support.tokenserver import TokenServer

KiB = 1024
REPO = "library/app"
TAG = "1.0"
USER = "mirror-user"
HTPASSWD_PASSWORD = "htpw-5e7d1c9a-secret"
TOKEN_PASSWORD = "tkpw-a41f08b2-secret"
DEBUG = ("--log-level", "debug")  # the secrecy checks read every line the mirror can print
# Proxy variables the mirror must not inherit from the machine; tests set their own.
CLEAR_PROXY_ENV = {
    name: ""
    for name in (
        "HTTPS_PROXY",
        "https_proxy",
        "HTTP_PROXY",
        "http_proxy",
        "NO_PROXY",
        "no_proxy",
        "ALL_PROXY",
        "all_proxy",
    )
}


# --- fixtures -----------------------------------------------------------------------


@pytest.fixture(scope="module")
def tls_tools() -> None:
    """openssl and htpasswd are needed too: skip, or fail when e2e is required."""
    reasons = tls.missing_tls_tools()
    if not reasons:
        return
    reason = "end-to-end TLS/auth prerequisites missing: " + "; ".join(reasons)
    if os.environ.get(REQUIRE_E2E_ENV) == "1":
        pytest.fail(f"{reason} (MIRRORPROXY_REQUIRE_E2E=1)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True, slots=True)
class Pki:
    ca: tls.CertKey  # the private CA
    server: tls.CertKey  # IP:127.0.0.1, signed by ca; every TLS server here uses it
    signer: tls.CertKey  # self-signed, signs tokens; the registry's rootcertbundle
    htpasswd: Path  # USER with HTPASSWD_PASSWORD, bcrypt


@pytest.fixture(scope="module")
def pki(tls_tools: None, tmp_path_factory: pytest.TempPathFactory) -> Pki:
    """Keys and certificates made once per module (about 0.3 s of openssl)."""
    root = tmp_path_factory.mktemp("pki")
    ca = tls.make_ca(root / "ca")
    htpasswd = root / "htpasswd"
    htpasswd.write_text(tls.htpasswd_line(USER, HTPASSWD_PASSWORD) + "\n")
    return Pki(
        ca=ca,
        server=tls.issue_server_cert(ca, root / "server"),
        signer=tls.make_signing_cert(root / "signer"),
        htpasswd=htpasswd,
    )


class AuthRegistryFactory(Protocol):
    def __call__(self, extra_config: Mapping[str, Any]) -> Registry: ...


@pytest.fixture
def auth_registry(e2e_requirements: None, tmp_path: Path) -> Iterator[AuthRegistryFactory]:
    """Factory for docker-registry with extra config (auth, TLS); stopped at teardown."""
    started: list[Registry] = []
    counter = itertools.count()

    def make(extra_config: Mapping[str, Any]) -> Registry:
        reg = Registry(tmp_path / f"authreg{next(counter)}", extra_config=extra_config)
        started.append(reg)
        return reg

    yield make
    for reg in started:
        reg.stop()


def _tls_config(pki: Pki) -> dict[str, Any]:
    return {"http": {"tls": {"certificate": str(pki.server.cert), "key": str(pki.server.key)}}}


def _htpasswd_config(pki: Pki) -> dict[str, Any]:
    return {"auth": {"htpasswd": {"realm": "basic-realm", "path": str(pki.htpasswd)}}}


def _basic(user: str, password: str) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


@pytest.fixture
def tls_htpasswd_registry(
    pki: Pki, auth_registry: AuthRegistryFactory
) -> tuple[Registry, images.Image]:
    """An HTTPS registry with htpasswd auth holding ``library/app:1.0``."""
    reg = auth_registry(_tls_config(pki) | _htpasswd_config(pki))
    assert reg.url.startswith("https://")
    image = images.build_image([96 * KiB, 256 * KiB], seed=11)
    images.push(
        reg.url,
        REPO,
        TAG,
        image,
        headers={"Authorization": _basic(USER, HTPASSWD_PASSWORD)},
        ssl_context=pki.ca.ssl_context(),
    )
    # The registry really does refuse anonymous reads, so a pull below proves auth.
    with pytest.raises(images.RegistryHTTPError) as refused:
        images.request(
            "GET", f"{reg.url}/v2/{REPO}/manifests/{TAG}", ssl_context=pki.ca.ssl_context()
        )
    assert refused.value.status == 401
    return reg, image


def _pull_ok(ctd: Containerd, ref: str, hosts: Path) -> None:
    proc = ctr_pull(ctd, ref, hosts)
    assert proc.returncode == 0, f"ctr pull {ref} failed:\n{proc.stderr[-3000:]}"


def _assert_no_secrets(mirror: MirrorProcess, *secrets: str, clean: bool = True) -> None:
    """No password, Basic value or token in anything the mirror printed.

    ``clean`` also requires no traceback (a successful pull logs none).
    """
    log = mirror.log_text()
    assert log, "the mirror printed nothing: the secrecy check would be vacuous"
    for secret in secrets:
        assert secret not in log, "a secret appears in the mirror's log"
    if clean:
        assert "Traceback" not in log, log[-3000:]


# --- (a) htpasswd behind TLS ----------------------------------------------------------


@pytest.mark.parametrize("trust", ["ca", "skip_verify"])
def test_containerd_pulls_through_mirror_from_tls_htpasswd_upstream(
    trust: str,
    pki: Pki,
    tls_htpasswd_registry: tuple[Registry, images.Image],
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    """`ca` (password_file) and `skip_verify` (password_env) each reach the registry."""
    reg, image = tls_htpasswd_registry
    upstream: dict[str, str | bool] = {"url": reg.url, "username": USER}
    env = dict(CLEAR_PROXY_ENV)
    if trust == "ca":
        pw_file = tmp_path / "upstream-password"
        pw_file.write_text(HTPASSWD_PASSWORD + "\n")
        upstream |= {"ca": str(pki.ca.cert), "password_file": str(pw_file)}
    else:
        upstream |= {"skip_verify": True, "password_env": "MIRROR_TEST_UPSTREAM_PW"}
        env["MIRROR_TEST_UPSTREAM_PW"] = HTPASSWD_PASSWORD
    port = free_port()
    config = mirror_config(port, tmp_path / "cache", {"docker.io": [upstream]})
    assert HTPASSWD_PASSWORD not in config
    mirror = mirror_process(config, port, env=env, args=DEBUG)
    write_hosts_toml(hosts_dir, "docker.io", "https://registry-1.docker.io", mirror.url)

    _pull_ok(containerd, f"docker.io/{REPO}:{TAG}", hosts_dir)

    assert ctr_images(containerd)[f"docker.io/{REPO}:{TAG}"].digest == image.digest
    served = {path.split("?", 1)[0] for method, path in reg.requests() if method == "GET"}
    assert {f"/v2/{REPO}/blobs/{d}" for d in image.blob_digests()} <= served
    _assert_no_secrets(mirror, HTPASSWD_PASSWORD, _basic(USER, HTPASSWD_PASSWORD).split()[1])


# --- (b) token auth -------------------------------------------------------------------


@pytest.mark.parametrize("scheme", ["http", "https"])
def test_containerd_pulls_through_mirror_from_token_auth_upstream(
    scheme: str,
    pki: Pki,
    auth_registry: AuthRegistryFactory,
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    """The mirror gets a Bearer token with its credentials, pulls, and keeps it secret.

    ``https``: registry and token realm both serve TLS from the test CA, which the
    upstream's ``ca`` must cover for the token request too.
    """
    with TokenServer(
        pki.signer,
        users={USER: TOKEN_PASSWORD},
        tls=pki.server if scheme == "https" else None,
    ) as tokens:
        extra: dict[str, Any] = {
            "auth": {
                "token": {
                    "realm": tokens.realm,
                    "service": tokens.service,
                    "issuer": tokens.issuer,
                    "rootcertbundle": str(pki.signer.cert),
                }
            }
        }
        if scheme == "https":
            extra |= _tls_config(pki)
        reg = auth_registry(extra)
        assert reg.url.startswith(f"{scheme}://")
        ctx = pki.ca.ssl_context() if scheme == "https" else None
        image = images.build_index([64 * KiB, 128 * KiB], seed=12)
        images.push(
            reg.url,
            REPO,
            TAG,
            image,
            headers={"Authorization": "Bearer " + tokens.push_token(REPO)},
            ssl_context=ctx,
        )
        with pytest.raises(images.RegistryHTTPError) as refused:
            images.request("GET", f"{reg.url}/v2/{REPO}/manifests/{TAG}", ssl_context=ctx)
        assert refused.value.status == 401
        assert tokens.requests() == []  # the push used a minted token

        upstream: dict[str, str | bool] = {
            "url": reg.url,
            "username": USER,
            "password_env": "MIRROR_TEST_TOKEN_PW",
        }
        if scheme == "https":
            upstream["ca"] = str(pki.ca.cert)
        port = free_port()
        config = mirror_config(port, tmp_path / "cache", {"docker.io": [upstream]})
        env = CLEAR_PROXY_ENV | {"MIRROR_TEST_TOKEN_PW": TOKEN_PASSWORD}
        mirror = mirror_process(config, port, env=env, args=DEBUG)
        write_hosts_toml(hosts_dir, "docker.io", "https://registry-1.docker.io", mirror.url)

        _pull_ok(containerd, f"docker.io/{REPO}:{TAG}", hosts_dir)

        assert ctr_images(containerd)[f"docker.io/{REPO}:{TAG}"].digest == image.digest
        seen = tokens.requests()
        assert seen, "the mirror never asked the token server"
        for req in seen:
            assert req.status == 200, req
            assert req.user == USER
            assert req.authorized
            assert req.raw_authorization == _basic(USER, TOKEN_PASSWORD)
            assert req.service == tokens.service
            assert req.scopes == (f"repository:{REPO}:pull",)
        # One token serves every request of the pull (cached per upstream and scope).
        assert len(seen) == 1, seen
        issued = [req.token for req in seen if req.token]
        _assert_no_secrets(
            mirror, TOKEN_PASSWORD, _basic(USER, TOKEN_PASSWORD).split()[1], *issued
        )


# --- failures stay failures, and stay quiet -------------------------------------------


def test_untrusted_certificate_and_wrong_credentials_fail_without_leaking(
    pki: Pki,
    tls_htpasswd_registry: tuple[Registry, images.Image],
    auth_registry: AuthRegistryFactory,
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    """No `ca`: TLS fails. Wrong Basic password: 401. Wrong token password: refused."""
    reg, _ = tls_htpasswd_registry
    wrong = "wrong-pw-0c4e2f77"
    with TokenServer(pki.signer, users={USER: TOKEN_PASSWORD}) as tokens:
        token_reg = auth_registry(
            {
                "auth": {
                    "token": {
                        "realm": tokens.realm,
                        "service": tokens.service,
                        "issuer": tokens.issuer,
                        "rootcertbundle": str(pki.signer.cert),
                    }
                }
            }
        )
        images.push(
            token_reg.url,
            REPO,
            TAG,
            images.build_image([32 * KiB], seed=13),
            headers={"Authorization": "Bearer " + tokens.push_token(REPO)},
        )
        namespaces: dict[str, list[dict[str, str | bool]]] = {
            # Right password, but the system CAs do not know the test CA.
            "docker.io": [{"url": reg.url, "username": USER, "password_env": "MIRROR_TEST_PW_OK"}],
            "quay.io": [
                {
                    "url": reg.url,
                    "ca": str(pki.ca.cert),
                    "username": USER,
                    "password_env": "MIRROR_TEST_PW_WRONG",
                }
            ],
            "ghcr.io": [
                {"url": token_reg.url, "username": USER, "password_env": "MIRROR_TEST_PW_WRONG"}
            ],
        }
        port = free_port()
        config = mirror_config(port, tmp_path / "cache", namespaces)
        env = CLEAR_PROXY_ENV | {
            "MIRROR_TEST_PW_OK": HTPASSWD_PASSWORD,
            "MIRROR_TEST_PW_WRONG": wrong,
        }
        mirror = mirror_process(config, port, env=env, args=DEBUG)
        for ns in namespaces:
            write_hosts_toml(hosts_dir, ns, f"https://{ns}", mirror.url)
            proc = ctr_pull(containerd, f"{ns}/{REPO}:{TAG}", hosts_dir)
            assert proc.returncode != 0, f"{ns}: pull should have failed"
        assert ctr_images(containerd) == {}

        # The mirror's error answer names what went wrong upstream, and nothing secret.
        expected = {
            "docker.io": (503, "CERTIFICATE_VERIFY_FAILED"),
            "quay.io": (502, "rejected the configured credentials"),
            "ghcr.io": (502, "answered 401"),
        }
        for ns, (status, detail) in expected.items():
            with pytest.raises(images.RegistryHTTPError) as failed:
                images.request("GET", f"{mirror.url}/v2/{REPO}/manifests/{TAG}?ns={ns}")
            body = str(failed.value)
            assert failed.value.status == status, body
            assert detail in body
            assert wrong not in body
            assert HTPASSWD_PASSWORD not in body
        seen = tokens.requests()
        assert seen, "the token server never saw the wrong credentials"
        assert all(r.status == 401 for r in seen), seen
        assert not any(r.authorized for r in seen), seen
        _assert_no_secrets(
            mirror,
            HTPASSWD_PASSWORD,
            wrong,
            _basic(USER, HTPASSWD_PASSWORD).split()[1],
            _basic(USER, wrong).split()[1],
            # Error answers to containerd's HEADs currently log a traceback (known bug,
            # tests/integration/test_found_bugs.py); secrecy is what this test checks.
            clean=False,
        )


# --- proxies --------------------------------------------------------------------------


class ConnectProxy:
    """An HTTP CONNECT proxy on 127.0.0.1 (asyncio in a thread) that logs each request."""

    def __init__(self) -> None:
        self.request_lines: list[str] = []
        self.port = 0
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=asyncio.run, args=(self._main(),), daemon=True)
        self._thread.start()
        if not self._ready.wait(10):
            raise RuntimeError("proxy did not start")

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        self._ready.set()
        async with server:
            await self._stop.wait()
        # asyncio.run cancels the tunnels still open when this returns.

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        upstream: asyncio.StreamWriter | None = None
        try:
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            line = head.split(b"\r\n", 1)[0].decode("latin-1")
            self.request_lines.append(line)
            method, target, _ = line.split(" ", 2)
            host, _, port = target.rpartition(":")
            if method != "CONNECT" or host != "127.0.0.1":  # loopback tunnels only
                writer.write(b"HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\n\r\n")
                return
            up_reader, upstream = await asyncio.open_connection(host, int(port))
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await asyncio.gather(_pipe(reader, upstream), _pipe(up_reader, writer))
        except (OSError, ValueError, asyncio.IncompleteReadError, TimeoutError):
            pass
        finally:
            for w in (upstream, writer):
                if w is not None:
                    w.close()

    def connects(self) -> list[str]:
        """Targets of the CONNECT requests seen, e.g. ``127.0.0.1:5001``."""
        return [ln.split(" ")[1] for ln in list(self.request_lines) if ln.startswith("CONNECT ")]

    def close(self) -> None:
        if self._loop is not None and self._stop is not None:
            with contextlib.suppress(RuntimeError):  # loop already closed
                self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(timeout=10)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(64 * KiB):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()


@pytest.fixture
def proxies() -> Iterator[tuple[ConnectProxy, ConnectProxy]]:
    env_proxy, own_proxy = ConnectProxy(), ConnectProxy()
    yield env_proxy, own_proxy
    env_proxy.close()
    own_proxy.close()


def test_upstream_traffic_goes_through_https_proxy_and_per_upstream_proxy(
    pki: Pki,
    auth_registry: AuthRegistryFactory,
    proxies: tuple[ConnectProxy, ConnectProxy],
    containerd: Containerd,
    mirror_process: MirrorFactory,
    hosts_dir: Path,
    tmp_path: Path,
) -> None:
    """HTTPS_PROXY carries docker.io's upstream; quay.io's `proxy =` overrides it."""
    env_proxy, own_proxy = proxies
    hub = auth_registry(_tls_config(pki) | _htpasswd_config(pki))
    quay = auth_registry(_tls_config(pki) | _htpasswd_config(pki))
    pushed = {}
    for reg, ns, seed in ((hub, "docker.io", 21), (quay, "quay.io", 22)):
        image = images.build_image([64 * KiB, 160 * KiB], seed=seed)
        images.push(
            reg.url,
            REPO,
            TAG,
            image,
            headers={"Authorization": _basic(USER, HTPASSWD_PASSWORD)},
            ssl_context=pki.ca.ssl_context(),
        )
        pushed[f"{ns}/{REPO}:{TAG}"] = image.digest
    common = {"ca": str(pki.ca.cert), "username": USER, "password_env": "MIRROR_TEST_PW"}
    port = free_port()
    config = mirror_config(
        port,
        tmp_path / "cache",
        {
            "docker.io": [{"url": hub.url, **common}],
            "quay.io": [{"url": quay.url, "proxy": own_proxy.url, **common}],
        },
    )
    env = CLEAR_PROXY_ENV | {
        "HTTPS_PROXY": env_proxy.url,
        "https_proxy": env_proxy.url,
        "MIRROR_TEST_PW": HTPASSWD_PASSWORD,
    }
    mirror = mirror_process(config, port, env=env, args=DEBUG)
    for ns in ("docker.io", "quay.io"):
        write_hosts_toml(hosts_dir, ns, f"https://{ns}", mirror.url)

    for ref in pushed:
        _pull_ok(containerd, ref, hosts_dir)

    listed = ctr_images(containerd)
    assert {ref: listed[ref].digest for ref in pushed} == pushed
    # Every upstream connection went through the proxy meant for it, and only there.
    assert set(env_proxy.connects()) == {hub.host}, env_proxy.request_lines
    assert set(own_proxy.connects()) == {quay.host}, own_proxy.request_lines
    # Nothing but CONNECTs: no plain request was proxied, and none went elsewhere.
    assert len(env_proxy.connects()) == len(env_proxy.request_lines)
    assert len(own_proxy.connects()) == len(own_proxy.request_lines)
    _assert_no_secrets(mirror, HTPASSWD_PASSWORD, _basic(USER, HTPASSWD_PASSWORD).split()[1])
