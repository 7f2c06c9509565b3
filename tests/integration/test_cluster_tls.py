"""Members over https: ``[cluster] ca`` and ``server_name``.

A member reached over https is checked against ``[cluster] ca`` (else the system's
CAs), by ``server_name`` when given: members from DNS are addresses, and one
certificate for the Service's name then serves them all. A fake registry on TLS
stands in for the owner, with a certificate for a name, not for 127.0.0.1.
"""

from __future__ import annotations

import shutil
import ssl
from pathlib import Path

import pytest
from pytest_aiohttp import AiohttpServer

from mirrorproxy.config import ConfigError
from tests.fakes.registry import FakeRegistry
from tests.integration.test_cluster import get_blob, owned_by, url_of
from tests.support.cluster import ClusterFactory
from tests.support.mirror import FakeFactory, RunningFake, mirror_config
from tests.support.tls import CertKey, issue_server_cert, make_ca

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs openssl")

NAME = "mirrorproxy-members.mirrorproxy.svc"


@pytest.fixture
def pki(tmp_path: Path) -> tuple[CertKey, CertKey]:
    ca = make_ca(tmp_path / "pki")
    return ca, issue_server_cert(ca, tmp_path / "pki", dns=NAME)


async def tls_owner(aiohttp_server: AiohttpServer, cert: CertKey) -> RunningFake:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(cert.cert, cert.key)
    registry = FakeRegistry()
    server = await aiohttp_server(registry.app, host="127.0.0.1", ssl=ctx)
    return RunningFake(registry, server)


@pytest.mark.parametrize("named", [True, False], ids=["server_name", "no-server_name"])
async def test_an_https_member_is_checked_against_the_ca_and_server_name(
    named: bool,
    pki: tuple[CertKey, CertKey],
    aiohttp_server: AiohttpServer,
    start_fake: FakeFactory,
    start_cluster: ClusterFactory,
) -> None:
    ca, cert = pki
    upstream, owner = await start_fake(), await tls_owner(aiohttp_server, cert)
    owner_url = f"https://127.0.0.1:{owner.server.port}"
    cluster = {"ca": str(ca.cert), **({"server_name": NAME} if named else {})}
    (m,) = await start_cluster([upstream.url], n=1, members={0: [0, owner_url]}, cluster=cluster)
    blob = owned_by(owner_url, [url_of(m), owner_url], "tls-owner", size=64 * 1024)
    digest = upstream.registry.add_blob(blob)
    owner.registry.add_blob(blob)

    assert await get_blob(m, digest) == (200, blob)
    if named:  # the owner answered over TLS, checked against the name
        assert len(owner.registry.calls("GET", "blobs")) == 1
        assert upstream.registry.calls() == []
    else:  # its certificate is not for 127.0.0.1: never trusted, the upstream answers
        assert owner.registry.calls() == []
        assert len(upstream.registry.calls("GET", "blobs")) == 1
        assert await m.metric("mirrorproxy_cluster_peer_failures_total", reason="unreachable")


def test_tls_keys_need_an_https_member_and_a_pem(tmp_path: Path) -> None:
    bad = tmp_path / "bad.pem"
    bad.write_text("not a certificate\n")
    http = {"self": "http://127.0.0.1:5000", "members": ["http://127.0.0.1:5000"]}
    with pytest.raises(ConfigError, match=r"cluster\.server_name.*https"):
        mirror_config(
            tmp_path / "c", ["http://127.0.0.1:1"], cluster={**http, "server_name": NAME}
        )
    https = {"self": "https://127.0.0.1:5000", "members": ["https://127.0.0.1:5000"]}
    with pytest.raises(ConfigError, match=r"cluster\.ca.*PEM"):
        mirror_config(tmp_path / "c", ["http://127.0.0.1:1"], cluster={**https, "ca": str(bad)})
    with pytest.raises(ConfigError, match=r"cluster\.server_name.*host name"):
        mirror_config(
            tmp_path / "c", ["http://127.0.0.1:1"], cluster={**https, "server_name": "a b"}
        )
