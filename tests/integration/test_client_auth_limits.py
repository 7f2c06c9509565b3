"""Failed logins: counted, throttled per client address, never logged.

The brute-force test sends 1,000 wrong passwords from 127.0.0.1 while another
client logs in from 127.0.0.2 and anonymous clients pull from the open namespace;
it asserts on statuses and counters only. The secrecy test serves the mirror the
way the CLI does (real listener, access logger, both log formats) with every
logger at DEBUG and searches everything logged for the credentials sent.
"""

from __future__ import annotations

import asyncio
import base64
import io
import ipaddress
import logging
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from pytest_aiohttp import AiohttpClient

from mirrorproxy.http.accesslog import AccessLogger
from mirrorproxy.http.app import create_app
from mirrorproxy.observability.log import JsonFormatter, TextFormatter
from tests.support import jwtkeys
from tests.support.authmirror import (
    OPEN,
    PRIVATE,
    USERS,
    AuthFiles,
    auth_config,
    basic,
    bearer,
    make_auth_files,
)
from tests.support.listening import listening, with_server
from tests.support.mirror import FakeFactory, Mirror, RunningFake

REPO = "team/app"
ATTEMPTS = 1000
LIMIT = 10


@pytest.fixture(scope="module")
def signer() -> jwtkeys.Signer:
    return jwtkeys.rsa_signer()


@pytest.fixture
def files(tmp_path: Path, signer: jwtkeys.Signer) -> AuthFiles:
    return make_auth_files(tmp_path / "auth", signer)


@pytest.fixture
async def fakes(start_fake: FakeFactory) -> dict[str, RunningFake]:
    out = {name: await start_fake() for name in (PRIVATE, OPEN)}
    for fake in out.values():
        fake.registry.add_image(REPO, "1")
    return out


def _manifest(ns: str) -> str:
    return f"/v2/{REPO}/manifests/1?ns={ns}"


async def test_brute_force_is_throttled_for_its_address_only(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    files: AuthFiles,
    fakes: dict[str, RunningFake],
) -> None:
    config = auth_config(
        tmp_path / "cache",
        files,
        {name: fake.url for name, fake in fakes.items()},
        auth={"max_failed_logins": LIMIT, "failed_login_window": "1h"},
    )
    client = await aiohttp_client(create_app(config))
    mirror = Mirror(client, config)
    url = str(client.make_url(_manifest(PRIVATE)))
    gate = asyncio.Semaphore(32)

    async def attack(i: int) -> int:
        async with gate:
            resp = await client.get(_manifest(PRIVATE), headers=basic("alice", f"guess-{i}"))
            await resp.read()
            if resp.status == 429:
                assert int(resp.headers["Retry-After"]) >= 1
                assert (await resp.json())["errors"][0]["code"] == "TOOMANYREQUESTS"
            return resp.status

    async def other_user(session: aiohttp.ClientSession) -> int:
        async with session.get(url, headers=basic("bob", USERS["bob"])) as resp:
            await resp.read()
            return resp.status

    async def anonymous_open() -> int:
        resp = await client.get(_manifest(OPEN))
        await resp.read()
        return resp.status

    elsewhere = aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    async with asyncio.timeout(120), aiohttp.ClientSession(connector=elsewhere) as session:
        results = await asyncio.gather(
            *(attack(i) for i in range(ATTEMPTS)),
            *(other_user(session) for _ in range(50)),
            *(anonymous_open() for _ in range(50)),
        )
    attacker = Counter(results[:ATTEMPTS])
    assert attacker == {401: LIMIT, 429: ATTEMPTS - LIMIT}
    assert results[ATTEMPTS:] == [200] * 100  # other clients: every request served
    # Only LIMIT passwords were ever checked; the rest were refused unchecked.
    assert await mirror.metric("mirrorproxy_client_auth_failures_total", scheme="basic") == LIMIT
    assert await mirror.metric("mirrorproxy_client_auth_throttled_total") == ATTEMPTS - LIMIT
    # The throttled address is locked out of logins, right password included (a
    # lockout that let the right password through would confirm a guess) ...
    resp = await client.get(_manifest(PRIVATE), headers=basic("alice", USERS["alice"]))
    assert resp.status == 429
    # ... while the other address still logs in.
    async with aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(local_addr=("127.0.0.2", 0))
    ) as session:
        assert await other_user(session) == 200


async def test_failures_are_forgiven_over_the_window(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    files: AuthFiles,
    fakes: dict[str, RunningFake],
) -> None:
    config = auth_config(
        tmp_path / "cache",
        files,
        {name: fake.url for name, fake in fakes.items()},
        auth={"max_failed_logins": 2, "failed_login_window": "1s"},
    )
    client = await aiohttp_client(create_app(config))
    statuses = []
    for i in range(2):
        resp = await client.get(_manifest(PRIVATE), headers=basic("alice", f"x{i}"))
        statuses.append(resp.status)
    throttled = await client.get(_manifest(PRIVATE), headers=basic("alice", "x2"))
    assert statuses == [401, 401]
    assert throttled.status == 429
    assert throttled.headers["Retry-After"] == "1"  # a token comes back every 0.5 s
    await asyncio.sleep(0.6)  # 2 per second come back: at least one by now
    resp = await client.get(_manifest(PRIVATE), headers=basic("alice", USERS["alice"]))
    assert resp.status == 200


# -- secrecy -------------------------------------------------------------------------


class Capture(logging.Handler):
    """Every record, formatted both ways the CLI formats, plus its raw fields."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.text = io.StringIO()
        self.formats = (TextFormatter(), JsonFormatter())

    def emit(self, record: logging.LogRecord) -> None:
        for fmt in self.formats:
            self.text.write(fmt.format(record) + "\n")
        self.text.write(repr(record.__dict__) + "\n")


@pytest.fixture
def debug_log() -> Iterator[Capture]:
    root = logging.getLogger()
    capture, old_level = Capture(), root.level
    root.addHandler(capture)
    root.setLevel(logging.DEBUG)
    quiet = {n: logging.getLogger(n).level for n in ("aiohttp.server", "aiohttp.internal")}
    for name in quiet:
        logging.getLogger(name).setLevel(logging.DEBUG)
    try:
        yield capture
    finally:
        root.removeHandler(capture)
        root.setLevel(old_level)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


async def test_credentials_never_reach_the_log(
    tmp_path: Path,
    files: AuthFiles,
    fakes: dict[str, RunningFake],
    signer: jwtkeys.Signer,
    debug_log: Capture,
) -> None:
    config = auth_config(
        tmp_path / "cache",
        files,
        {name: fake.url for name, fake in fakes.items()},
        auth={"max_failed_logins": 3},
    )
    good_token = jwtkeys.mint(signer, jwtkeys.pull(f"{PRIVATE}/{REPO}"))
    bad_token = jwtkeys.mint(signer, jwtkeys.pull(f"{PRIVATE}/{REPO}"), expires_in=-900)
    wrong = "wr0ng-Secret-pw-Yt55"
    attempts = [
        basic("alice", USERS["alice"]),
        basic("alice", wrong),
        bearer(good_token),
        bearer(bad_token),
        basic("alice", wrong),
        basic("alice", wrong),  # throttled from here on
        basic("bob", USERS["bob"]),
    ]
    statuses = []
    async with (
        listening(with_server(config), access_log_class=AccessLogger) as m,
        aiohttp.ClientSession() as session,
    ):
        for path in ("/v2/", _manifest(PRIVATE)):
            for headers in attempts:
                async with session.get(m.url + path, headers=headers) as resp:
                    await resp.read()
                    statuses.append(resp.status)
    assert {200, 401, 429} <= set(statuses)  # every path ran
    log = debug_log.text.getvalue()
    assert "failed login" in log  # failures are logged ...
    secrets = {*USERS.values(), wrong, good_token, bad_token}
    secrets |= {h["Authorization"].split(" ", 1)[1] for h in attempts}
    for secret in secrets:  # ... without what was sent
        assert secret not in log
        assert base64.b64encode(secret.encode()).decode() not in log


# -- /metrics allowlist ---------------------------------------------------------------


async def test_metrics_allow_replaces_server_allow_for_metrics(
    aiohttp_client: AiohttpClient,
    tmp_path: Path,
    files: AuthFiles,
    fakes: dict[str, RunningFake],
) -> None:
    config = auth_config(
        tmp_path / "cache",
        files,
        {name: fake.url for name, fake in fakes.items()},
        metrics={"allow": ["10.0.0.0/8"]},
    )
    assert config.metrics.allow == (ipaddress.ip_network("10.0.0.0/8"),)
    client = await aiohttp_client(create_app(config))
    resp = await client.get("/metrics")
    assert resp.status == 403
    assert (await resp.json())["errors"][0]["code"] == "DENIED"
    assert (await client.get(_manifest(OPEN))).status == 200  # the API is not affected
    assert (await client.get("/healthz")).status == 200
