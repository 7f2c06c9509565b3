"""``[server] tls_cert``/``tls_key``: the mirror serves HTTPS, and hosts.toml trusts its CA.

Certificates come from ``tests.support.tls`` (openssl, made per test).
"""

from __future__ import annotations

import asyncio
import shutil
import tomllib
from pathlib import Path

import aiohttp
import pytest

from mirrorproxy.cli import EXIT_USAGE, main
from tests.support.listening import listening, with_server
from tests.support.mirror import RunningFake, mirror_config
from tests.support.paths import NS, REPO
from tests.support.rawhttp import closed_within, request, send_raw
from tests.support.tls import CertKey, issue_server_cert, make_ca

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


@pytest.fixture
def pki(tmp_path: Path) -> tuple[CertKey, CertKey]:
    """A CA and a server certificate for 127.0.0.1 signed by it."""
    ca = make_ca(tmp_path / "pki")
    return ca, issue_server_cert(ca, tmp_path / "pki")


async def test_mirror_serves_https(
    fake: RunningFake, tmp_path: Path, pki: tuple[CertKey, CertKey]
) -> None:
    ca, cert = pki
    image = fake.registry.add_image(REPO, "3")
    config = with_server(
        mirror_config(tmp_path / "cache", [fake.url]),
        tls_cert=cert.cert,
        tls_key=cert.key,
        client_timeout=0.5,
    )
    async with listening(config) as m, aiohttp.ClientSession() as session:
        assert m.url.startswith("https://")
        url = f"{m.url}/v2/{REPO}/manifests/3?ns={NS}"
        async with session.get(url, ssl=ca.ssl_context()) as resp:
            assert resp.status == 200
            assert await resp.read() == image.manifest

        # Plain HTTP to the TLS port gets no HTTP answer.
        assert await send_raw(m.host, m.port, request("GET", "/v2/")) is None

        # A client that connects and never starts the handshake is dropped, like a
        # slow request head.
        reader, writer = await asyncio.open_connection(m.host, m.port)
        assert await closed_within(reader, 0.5 + 1.0)
        writer.close()


def _tls_config_file(tmp_path: Path, cert: CertKey) -> Path:
    path = tmp_path / "mirror.toml"
    path.write_text(
        "[server]\n"
        'listen = "127.0.0.1:5443"\n'
        f'tls_cert = "{cert.cert}"\n'
        f'tls_key = "{cert.key}"\n'
        "[cache]\n"
        f'dir = "{tmp_path / "cache"}"\n'
        '[namespaces."docker.io"]\n'
        'upstreams = ["https://registry-1.docker.io"]\n'
    )
    return path


def test_hosts_writes_the_ca_for_an_https_mirror(
    tmp_path: Path, pki: tuple[CertKey, CertKey], capsys: pytest.CaptureFixture[str]
) -> None:
    ca, cert = pki
    config = _tls_config_file(tmp_path, cert)
    assert main(["hosts", "-c", str(config), "--dry-run", "--ca", str(ca.cert)]) == 0
    text = capsys.readouterr().out.split("\n", 1)[1]
    host = tomllib.loads(text)["host"]
    assert host == {
        "https://127.0.0.1:5443": {"capabilities": ["pull", "resolve"], "ca": str(ca.cert)}
    }


def test_hosts_refuses_a_ca_for_a_plain_http_mirror(
    tmp_path: Path, pki: tuple[CertKey, CertKey], capsys: pytest.CaptureFixture[str]
) -> None:
    ca, cert = pki
    config = _tls_config_file(tmp_path, cert)
    argv = ["hosts", "-c", str(config), "--dry-run", "--ca", str(ca.cert)]
    assert main([*argv, "--mirror-url", "http://10.0.0.1:5000"]) == EXIT_USAGE
    assert "--ca" in capsys.readouterr().err
