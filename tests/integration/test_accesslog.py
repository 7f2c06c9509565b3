"""The access log and request ids, through a real mirror with the real access logger."""

from __future__ import annotations

import json
import logging
import re
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from aiohttp.test_utils import TestClient, TestServer

from mirrorproxy.http.accesslog import ACCESS_LOGGER, AccessLogger
from mirrorproxy.http.app import create_app
from mirrorproxy.observability.log import JsonFormatter, RequestIdFilter, TextFormatter
from tests.support.mirror import Mirror, MirrorClient, RunningFake, mirror_config
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.waiting import wait_for

GENERATED_ID = re.compile(r"[0-9a-f]{16}")


@pytest.fixture
def log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    """Capture everything, with request ids stamped as the CLI's handler does."""
    caplog.set_level(logging.DEBUG)
    caplog.handler.addFilter(RequestIdFilter())
    return caplog


@pytest.fixture
async def logged(
    fake: RunningFake, tmp_path: Path, log: pytest.LogCaptureFixture
) -> AsyncIterator[Mirror]:
    """A mirror served with the access logger ``serve`` uses."""
    config = mirror_config(tmp_path / "cache", [fake.url], tag_ttl="0s")
    server = TestServer(create_app(config), host="127.0.0.1")
    # TestServer drops constructor kwargs: runner options go to start_server.
    await server.start_server(access_log_class=AccessLogger)
    client: MirrorClient = TestClient(server)
    await client.start_server()
    yield Mirror(client, config)
    await client.close()


async def _access_record(log: pytest.LogCaptureFixture, rid: str) -> logging.LogRecord:
    """Wait (bounded) for the one access record of request ``rid``.

    aiohttp writes the line after the response is sent, so it may trail the client.
    """
    found: list[logging.LogRecord] = []

    def seen() -> bool:
        found[:] = [
            r
            for r in log.records
            if r.name == ACCESS_LOGGER and r.__dict__["access"]["request_id"] == rid
        ]
        return bool(found)

    await wait_for(seen)
    assert len(found) == 1
    return found[0]


async def test_one_line_per_request_with_cache_result_and_upstream(
    fake: RunningFake, logged: Mirror, log: pytest.LogCaptureFixture
) -> None:
    img = fake.registry.add_image(REPO, "3")
    layer = img.layer_digests[0]
    # A query secret other than ns must never reach the log.
    resp = await logged.client.get(manifest_path(REPO, "3") + "&token=s3cr3t")
    assert resp.status == 200
    body = await resp.read()
    rid = resp.headers["X-Request-Id"]
    assert GENERATED_ID.fullmatch(rid)

    record = await _access_record(log, rid)
    fields = record.__dict__["access"]
    assert fields["method"] == "GET"
    assert fields["path"] == f"/v2/{REPO}/manifests/3?ns={NS}"
    assert fields["ns"] == NS
    assert fields["status"] == 200
    assert fields["bytes"] == len(body)
    assert fields["cache"] == "miss"
    assert fields["upstream"] == fake.url
    assert 0 <= fields["duration"] < 5
    assert record.levelno == logging.INFO
    line = record.getMessage()
    assert f'"GET /v2/{REPO}/manifests/3?ns={NS}" 200 {len(body)}B ' in line
    assert f"ns={NS} cache=miss upstream={fake.url}" in line
    assert all("s3cr3t" not in r.getMessage() for r in log.records)

    as_json = json.loads(JsonFormatter().format(record))
    assert as_json["request_id"] == rid
    assert as_json["logger"] == ACCESS_LOGGER
    assert {k: as_json[k] for k in ("path", "status", "bytes", "cache", "upstream")} == {
        "path": fields["path"],
        "status": 200,
        "bytes": len(body),
        "cache": "miss",
        "upstream": fake.url,
    }
    assert "s3cr3t" not in json.dumps(as_json)
    assert TextFormatter().format(record).split(": ", 1)[0].endswith(f" [{rid}]")

    # A blob miss streams from the fill; its hit is sent from disk (sendfile).
    for result in ("miss", "hit"):
        resp = await logged.client.get(blob_path(REPO, layer))
        assert await resp.read() == img.layers[0]
        await wait_for(logged.blob_path(layer).exists)
        rid = resp.headers["X-Request-Id"]
        fields = (await _access_record(log, rid)).__dict__["access"]
        assert (fields["cache"], fields["bytes"]) == (result, len(img.layers[0]))
        assert fields["upstream"] == (fake.url if result == "miss" else None)


async def test_errors_heads_and_probes_are_logged_too(
    fake: RunningFake, logged: Mirror, log: pytest.LogCaptureFixture
) -> None:
    resp = await logged.client.get(manifest_path(REPO, "missing"))
    assert resp.status == 404
    rid = resp.headers["X-Request-Id"]
    record = await _access_record(log, rid)
    assert record.__dict__["access"]["status"] == 404
    assert record.__dict__["access"]["cache"] is None

    img = fake.registry.add_image(REPO, "3")
    resp = await logged.client.head(manifest_path(REPO, "3"))
    assert int(resp.headers["Content-Length"]) == len(img.manifest)
    access = (await _access_record(log, resp.headers["X-Request-Id"])).__dict__["access"]
    assert (access["method"], access["bytes"], access["cache"]) == ("HEAD", 0, "miss")

    # A blob HEAD says whether the cache answered or which upstream did.
    layer = img.layer_digests[0]
    for result, upstream in (("miss", fake.url), ("hit", None)):
        resp = await logged.client.head(blob_path(REPO, layer))
        assert int(resp.headers["Content-Length"]) == len(img.layers[0])
        access = (await _access_record(log, resp.headers["X-Request-Id"])).__dict__["access"]
        assert (access["method"], access["cache"], access["upstream"]) == (
            "HEAD",
            result,
            upstream,
        )
        if result == "miss":
            assert await (await logged.client.get(blob_path(REPO, layer))).read()
            await logged.settled()

    resp = await logged.client.get("/healthz")
    rid = resp.headers["X-Request-Id"]
    record = await _access_record(log, rid)
    assert record.levelno == logging.DEBUG  # probes every few seconds: not at info


@pytest.mark.parametrize(
    ("sent", "kept"),
    [
        ("build-42.step_7", True),
        ("A" * 128, True),
        ("A" * 129, False),  # too long
        ("has space", False),
        ("semi;colon", False),
        ("new\\nline", False),
        ("", False),
    ],
)
async def test_incoming_request_id_is_echoed_only_when_sane(
    mirror: Mirror, sent: str, kept: bool
) -> None:
    resp = await mirror.client.get("/v2/", headers={"X-Request-Id": sent})
    echoed = resp.headers["X-Request-Id"]
    if kept:
        assert echoed == sent
    else:
        assert GENERATED_ID.fullmatch(echoed)


async def test_error_answers_carry_the_request_id(mirror: Mirror) -> None:
    resp = await mirror.client.get("/v2/x/manifests/latest?ns=nowhere.example")
    assert resp.status >= 400
    assert GENERATED_ID.fullmatch(resp.headers["X-Request-Id"])
    resp = await mirror.client.get("/no/such/path", headers={"X-Request-Id": "abc"})
    assert resp.status == 404
    assert resp.headers["X-Request-Id"] == "abc"


async def test_records_logged_while_handling_carry_the_request_id(
    fake: RunningFake, logged: Mirror, log: pytest.LogCaptureFixture
) -> None:
    img = fake.registry.add_image(REPO, "3")
    layer = img.layer_digests[0]
    resp = await logged.client.get(blob_path(REPO, layer), headers={"X-Request-Id": "pull-1"})
    assert await resp.read() == img.layers[0]
    assert (await logged.client.get(manifest_path(REPO, "3"))).status == 200

    # The fill task was started by request pull-1 and logs under its id.
    await wait_for(lambda: any(r.getMessage().startswith("cached blob") for r in log.records))
    cached = [r for r in log.records if r.getMessage().startswith("cached blob")]
    assert [r.__dict__["request_id"] for r in cached] == ["pull-1"]

    # Every upstream down: the stale serve warns under the request's id.
    fake.registry.faults.status = 503
    resp = await logged.client.get(manifest_path(REPO, "3"), headers={"X-Request-Id": "r2"})
    assert resp.headers["Warning"].startswith("110 ")
    stale = [r for r in log.records if r.getMessage().startswith("serving stale")]
    assert [r.__dict__["request_id"] for r in stale] == ["r2"]
    record = await _access_record(log, "r2")
    assert record.__dict__["access"]["cache"] == "stale"
    # Outside any request, records have no id.
    logging.getLogger("mirrorproxy.test").warning("between requests")
    assert log.records[-1].__dict__["request_id"] is None
