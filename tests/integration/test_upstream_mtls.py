"""An upstream that demands a client certificate (mutual TLS).

The mirror's `ca`, `client_cert` and `client_key` for one upstream must reach the TLS
handshake: with them the pull works, without the client certificate the upstream
refuses the handshake and the client gets a clean 502/503 naming the upstream.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient, AiohttpServer

from mirrorproxy.config import parse_config
from mirrorproxy.http.app import create_app
from tests.fakes.registry import FakeRegistry
from tests.support.paths import REPO, blob_path, manifest_path
from tests.support.tls import CertKey, issue_server_cert, make_ca

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")


def _client_cert(ca: CertKey, directory: Path) -> CertKey:
    """A client certificate (extendedKeyUsage=clientAuth) signed by ``ca``."""
    out = CertKey(directory / "client.pem", directory / "client.key")
    ext = directory / "client.ext"
    ext.write_text("extendedKeyUsage=clientAuth\nbasicConstraints=critical,CA:FALSE\n")
    csr = directory / "client.csr"
    for argv in (
        ["openssl", "req", "-new", "-nodes", "-newkey", "ec", "-pkeyopt",
         "ec_paramgen_curve:prime256v1", "-keyout", str(out.key), "-out", str(csr),
         "-subj", "/CN=mirrorproxy"],
        ["openssl", "x509", "-req", "-in", str(csr), "-CA", str(ca.cert), "-CAkey",
         str(ca.key), "-CAcreateserial", "-out", str(out.cert), "-days", "1",
         "-extfile", str(ext)],
    ):  # fmt: skip
        subprocess.run(argv, check=True, capture_output=True, timeout=30)
    return out


@pytest.mark.parametrize("with_client_cert", [True, False], ids=["client-cert", "none"])
async def test_mutual_tls_upstream(
    with_client_cert: bool,
    aiohttp_server: AiohttpServer,
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
) -> None:
    ca = make_ca(tmp_path / "ca")
    server_cert = issue_server_cert(ca, tmp_path / "server")
    client = _client_cert(ca, tmp_path)
    tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    tls.load_cert_chain(server_cert.cert, server_cert.key)
    tls.load_verify_locations(cafile=str(ca.cert))
    tls.verify_mode = ssl.CERT_REQUIRED  # no client certificate, no handshake
    registry = FakeRegistry()
    img = registry.add_image(REPO, "3")
    upstream = await aiohttp_server(registry.app, ssl=tls)

    spec: dict[str, Any] = {"url": f"https://127.0.0.1:{upstream.port}", "ca": str(ca.cert)}
    if with_client_cert:
        spec |= {"client_cert": str(client.cert), "client_key": str(client.key)}
    config = parse_config(
        {
            "cache": {"dir": str(tmp_path / "cache")},
            "defaults": {"connect_timeout": "2s", "read_timeout": "2s"},
            "namespaces": {"docker.io": {"upstreams": [spec]}},
        },
        source="test",
        base_dir=tmp_path,
    )
    mirror = await aiohttp_client(create_app(config))
    resp = await mirror.get(manifest_path(REPO, "3"))
    if with_client_cert:
        assert resp.status == 200
        assert await resp.read() == img.manifest
        # A blob big enough for the mirror to read its body off the TLS connection
        # into its own buffers (BodyReader), cached and served whole.
        data = bytes(range(256)) * (12 * 1024 + 7)
        digest = registry.add_blob(data)
        blob = await mirror.get(blob_path(REPO, digest))
        assert blob.status == 200
        assert await blob.read() == data
    else:
        assert resp.status in (502, 503)
        detail = (await resp.json())["errors"][0]["detail"]["upstreams"][0]
        assert f"127.0.0.1:{upstream.port}" in detail
