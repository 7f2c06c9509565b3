"""Credentials and tokens never reach the log, even at debug level.

Runs every upstream-auth flow (anonymous and authenticated Bearer, token renewal,
Basic, wrong credentials, a client's own Authorization header) against the
in-process token server and registry of ``test_upstream_auth``, through the
mirror started the way the CLI starts it (same listener, access logger and log
formatters), with every logger at DEBUG. Then the whole log, as text and as JSON
lines and with each record's raw fields, is searched for the password, the Basic
header value and every token the token server issued.
"""

from __future__ import annotations

import base64
import io
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from pytest_aiohttp import AiohttpServer

from mirrorproxy.config import parse_config
from mirrorproxy.http.accesslog import AccessLogger
from mirrorproxy.observability.log import JsonFormatter, TextFormatter
from tests.integration.test_upstream_auth import BLOB_DIGEST, PASSWORD, USER, AuthRegistry
from tests.support.listening import listening, with_server

WRONG_PASSWORD = "wr0ng-pa55-Qx7"
CLIENT_TOKEN = "client-own-token-Zk93"
CLIENT_BASIC = base64.b64encode(b"client-user:client-pw-Hj28").decode()


class Capture(logging.Handler):
    """Keep every record, formatted both ways the CLI can format them."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.text = io.StringIO()
        self.text_format = TextFormatter()
        self.json_format = JsonFormatter()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)
        self.text.write(self.text_format.format(record) + "\n")
        self.text.write(self.json_format.format(record) + "\n")
        self.text.write(repr(record.__dict__) + "\n")


@pytest.fixture
def debug_log() -> Iterator[Capture]:
    root = logging.getLogger()
    capture = Capture()
    old_level = root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    # Loggers the CLI quiets are opened up too: nothing may hide a leak here.
    quiet = {
        name: logging.getLogger(name).level for name in ("aiohttp.server", "aiohttp.internal")
    }
    for name in quiet:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


async def _pull(
    aiohttp_server: AiohttpServer, cache: Path, reg: AuthRegistry, **upstream: Any
) -> list[int]:
    """Start a mirror in front of ``reg`` and pull through it; return the statuses."""
    server = await aiohttp_server(reg.app())
    reg.base = str(server.make_url("")).rstrip("/")
    config = parse_config(
        {
            "cache": {"dir": str(cache)},
            "namespaces": {"docker.io": {"upstreams": [{"url": reg.base, **upstream}]}},
        },
        source="test",
        base_dir=cache.parent,
    )
    statuses = []
    async with (
        listening(
            with_server(config),
            access_log_class=AccessLogger,
        ) as m,
        aiohttp.ClientSession() as session,
    ):
        for path, auth in [
            ("/v2/library/app/manifests/1?ns=docker.io", f"Bearer {CLIENT_TOKEN}"),
            (f"/v2/library/app/blobs/{BLOB_DIGEST}?ns=docker.io", f"Basic {CLIENT_BASIC}"),
            ("/v2/library/other/manifests/2?ns=docker.io", None),
        ]:
            headers = {"Authorization": auth} if auth else {}
            async with session.get(m.url + path, headers=headers) as resp:
                await resp.read()
                statuses.append(resp.status)
        reg.valid.clear()  # revoke every token: the mirror renews
        async with session.get(m.url + "/v2/library/app/manifests/3?ns=docker.io") as resp:
            statuses.append(resp.status)
    return statuses


async def test_no_secret_in_debug_logs_of_every_auth_flow(
    aiohttp_server: AiohttpServer, tmp_path: Path, debug_log: Capture
) -> None:
    registries = [
        AuthRegistry(),  # anonymous Bearer
        AuthRegistry(need_credentials=True),  # Bearer, credentials to the token server
        AuthRegistry(scheme="basic"),  # Basic to the registry itself
        AuthRegistry(need_credentials=True),  # wrong credentials
        AuthRegistry(scheme="basic"),  # wrong credentials, Basic
    ]
    creds: list[dict[str, str]] = [
        {},
        {"username": USER, "password": PASSWORD},
        {"username": USER, "password": PASSWORD},
        {"username": USER, "password": WRONG_PASSWORD},
        {"username": USER, "password": WRONG_PASSWORD},
    ]
    results = [
        await _pull(aiohttp_server, tmp_path / f"cache{i}", reg, **c)
        for i, (reg, c) in enumerate(zip(registries, creds, strict=True))
    ]
    assert results[:3] == [[200, 200, 200, 200]] * 3  # the flows really ran
    assert all(s == 502 for r in results[3:] for s in r)

    issued = {tok for reg in registries for tok in reg.valid} | {
        tok for reg in registries for tok in _issued(reg)
    }
    assert issued  # tokens were handed out, so there was something to leak
    secrets = {
        PASSWORD,
        WRONG_PASSWORD,
        base64.b64encode(f"{USER}:{PASSWORD}".encode()).decode(),
        base64.b64encode(f"{USER}:{WRONG_PASSWORD}".encode()).decode(),
        CLIENT_TOKEN,
        CLIENT_BASIC,
        *issued,
    }
    logging.getLogger("mirrorproxy.upstream").debug("control: %s", "canary-Vb41")
    log = debug_log.text.getvalue()
    assert "canary-Vb41" in log  # the capture does see what the mirror's loggers say
    assert len(debug_log.records) > 20  # debug logging was on and the flows logged
    leaked = sorted(s for s in secrets if s in log)
    assert leaked == []


def _issued(reg: AuthRegistry) -> set[str]:
    """Every token the registry saw presented (including those since revoked)."""
    return {a[7:] for a in reg.seen_auth if a.startswith("Bearer ") and a[7:]}
