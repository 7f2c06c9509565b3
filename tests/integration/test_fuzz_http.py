"""HTTP-level fuzzing: a bounded stream of hostile requests against a listening mirror.

A seeded generator builds raw requests from hostile pieces (traversal, percent- and
double-encoding, NUL and non-ASCII bytes, forbidden ``ns`` values, bad methods,
bad ``Range``, huge and numerous headers, broken framing) and sends them on real
sockets to the mirror started the way the CLI starts it. Afterwards: no answer was
a 5xx, every error was an OCI error body, nothing was written outside the cache's
own layout, the upstream was only asked for valid names, and nothing was logged at
error level. The seed is in the test id, so a failure replays exactly.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest

from mirrorproxy.core.errors import RegistryError
from mirrorproxy.core.oci import parse_name, parse_reference
from tests.support.listening import Listening, listening, with_server
from tests.support.mirror import RunningFake, mirror_config
from tests.support.paths import NS, REPO
from tests.support.rawhttp import RawResponse, request, send_raw

REQUESTS = 2000
WORKERS = 16
TIME_BUDGET = 30.0  # seconds for the whole run, sending included
SEED = 20261123

HEX = "0123456789abcdef"
_CACHE_FILE = re.compile(
    r"(blobs|manifests)/(sha256|sha512)/[0-9a-f]{2}/[0-9a-f]{64,128}"
    r"|tags/[0-9a-f]{2}/[0-9a-f]+\.json|tmp/[^/]+"
)


@dataclass(frozen=True, slots=True)
class Sent:
    raw: bytes
    method: str
    response: RawResponse | None


class Generator:
    """Hostile requests from a seeded RNG, some with a valid core so the cache works."""

    def __init__(self, seed: int, digests: list[str]) -> None:
        self.rng = random.Random(seed)  # noqa: S311 -- reproducible, not secret
        self.digests = digests

    def pick(self, *options: str) -> str:
        return self.rng.choice(options)

    def hexes(self, n: int) -> str:
        return "".join(self.rng.choice(HEX) for _ in range(n))

    def method(self) -> str:
        if self.rng.random() < 0.7:
            return self.pick("GET", "GET", "GET", "HEAD")
        return self.pick(
            "POST", "PUT", "DELETE", "PATCH", "OPTIONS", "TRACE", "PROPFIND", "get",
            "GeT", "BREW", "M-SEARCH", "G\x00T", "", "CONNECT",
        )  # fmt: skip

    def name(self) -> str:
        return self.pick(
            REPO, REPO, "library/../../etc", "%2e%2e/%2e%2e", "library%2Falpine", "a" * 300,
            "Library/Alpine", "\uff41lpine", "%00", "a%00b", "..", "%252e%252e",
            "library/alpine/../../..", "library//alpine", "/etc/passwd", "caf\u00e9",
            "alp\u0456ne", "a\\b", "a%5cb", "x" * 254,
        )  # fmt: skip

    def ref(self) -> str:
        return self.pick(
            "3", "latest", *self.digests, "sha256:" + self.hexes(64), "sha512:" + self.hexes(128),
            "sha1:" + self.hexes(40), "sha256:" + self.hexes(63), "sha256:../../x",
            "..%2F..%2Fx", "", "%00", "sha256%3A" + self.hexes(64), "SHA256:" + self.hexes(64),
            "sha256:" + self.hexes(64).upper(), ".hidden", "a" * 200, "md5:" + self.hexes(32),
        )  # fmt: skip

    def ns(self) -> str:
        return self.pick(
            "", f"ns={NS}", f"ns={NS}", "ns=127.0.0.1:22", "ns=169.254.169.254",
            "ns=%00", f"ns={NS}&ns=127.0.0.1", "ns=" + "a" * 300, "ns=DOCKER.IO",
            "ns=docker.io%2F..", "ns=[::1]:22", "ns=localhost", "n=" + "9" * 40 + "&last=%2e%2e",
        )  # fmt: skip

    def target(self) -> str:
        kind = self.pick("manifests", "manifests", "blobs", "blobs", "tags", "blobs/uploads")
        if kind == "tags":
            path = f"/v2/{self.name()}/tags/list"
        else:
            path = f"/v2/{self.name()}/{kind}/{self.ref()}"
        if self.rng.random() < 0.15:
            path = self.pick(
                "/v2/", "/v2", "/", "//v2/", "/healthz", "/readyz", "/v1/_ping", "*",
                "http://evil.example/v2/", "/v2/../../etc/passwd", "/" + "v" * 9000,
            )  # fmt: skip
        query = self.ns()
        target = f"{path}?{query}" if query else path
        if self.rng.random() < 0.7:  # most clients percent-encode what is not ASCII
            target = "".join(c if c.isascii() else quote(c) for c in target)
        if self.rng.random() < 0.1:  # one raw hostile byte somewhere
            at = self.rng.randrange(len(target) + 1)
            target = (
                target[:at] + self.pick("%", "\x00", " ", "\xff", "#", "\\", "\t") + target[at:]
            )
        return target

    def headers(self) -> list[str]:
        out = [] if self.rng.random() < 0.05 else ["Host: mirror"]
        if self.rng.random() < 0.3:
            rng = self.pick(
                "bytes=0-", "bytes=-0", "bytes=5-1", "bytes=0-1,2-3", "bytes=" + "9" * 30 + "-",
                "bytes=-", "bytes=abc", "bytes=" + "9" * 5000 + "-", "bytes=\u0663-",
                "bytes=0-" + "9" * 5000, "items=0-1", "bytes=10-20",
            )  # fmt: skip
            out.append(f"Range: {rng}")
        extras = [
            "Accept: application/vnd.oci.image.index.v1+json, */*;q=0.1",
            "Accept: " + ",".join(["x/y"] * 500),
            "X-Big: " + "b" * 20_000,
            "Authorization: Basic Zm9vOmJhcg==",
            "Transfer-Encoding: chunked",
            "Content-Length: -1",
            "Content-Length: 5",
            "X-Nul: a\x00b",
            "X-Forwarded-For: 10.0.0.1",
            "Connection: keep-alive, Upgrade",
            "Upgrade: websocket",
            "Expect: 100-continue",
        ]
        if self.rng.random() < 0.3:
            out.append(self.rng.choice(extras))
        if self.rng.random() < 0.02:
            out += [f"X-H{i}: v" for i in range(200)]
        return out

    def request(self) -> tuple[str, bytes]:
        method = self.method()
        lines = [f"{method} {self.target()} HTTP/1.1", *self.headers(), "Connection: close"]
        raw = ("\r\n".join(lines) + "\r\n\r\n").encode("utf-8", "surrogateescape")
        if "Content-Length: 5" in lines or "Transfer-Encoding: chunked" in lines:
            raw += self.pick("hello", "zz\r\n", "0\r\n\r\n").encode()
        return method, raw


async def _fuzz(m: Listening, gen: Generator) -> list[Sent]:
    queue = [gen.request() for _ in range(REQUESTS)]
    sent: list[Sent] = []

    async def worker() -> None:
        while queue:
            method, raw = queue.pop()
            resp = await send_raw(m.host, m.port, raw, head=method == "HEAD")
            sent.append(Sent(raw, method, resp))

    await asyncio.gather(*(worker() for _ in range(WORKERS)))
    return sent


def _files(root: Path) -> set[Path]:
    return {p for p in root.rglob("*") if p.is_file()}


def _valid_upstream_path(path: str) -> bool:
    m = re.fullmatch(r"/v2/(.+)/(manifests|blobs)/([^/]+)|/v2/(.+)/tags/list", path)
    if m is None:
        return False
    try:
        parse_name(m.group(1) or m.group(4))
        if m.group(3) is not None:
            parse_reference(m.group(3))
    except RegistryError:
        return False
    return True


@pytest.mark.parametrize("seed", [SEED, SEED + 1])
async def test_hostile_requests_get_clean_oci_errors(
    fake: RunningFake, tmp_path: Path, caplog: pytest.LogCaptureFixture, seed: int
) -> None:
    image = fake.registry.add_image(REPO, "3")
    digests = [image.digest, image.config_digest, *image.layer_digests]
    config = with_server(mirror_config(tmp_path / "cache", [fake.url]), client_timeout=2.0)
    outside_before = _files(tmp_path) - _files(tmp_path / "cache")
    caplog.set_level(logging.WARNING)

    started = time.monotonic()
    async with listening(config) as m:
        sent = await _fuzz(m, Generator(seed, digests))
        await asyncio.sleep(0.2)  # let background cache writes land
    elapsed = time.monotonic() - started

    assert len(sent) == REQUESTS
    assert elapsed < TIME_BUDGET
    answered = [s for s in sent if s.response is not None]
    assert len(answered) > REQUESTS * 0.95  # a few framing errors may just close
    for s in answered:
        assert s.response is not None
        status = s.response.status
        assert status < 500, (status, s.raw[:300])
        if status >= 400 and s.method != "HEAD":
            assert s.response.is_oci_error, (status, s.raw[:300], s.response.body[:300])
    assert {s.response.status for s in answered if s.response} & {200, 206}  # some got through

    # Nothing outside the cache dir, and only the cache's own layout inside it.
    assert _files(tmp_path) - _files(tmp_path / "cache") == outside_before
    for path in _files(tmp_path / "cache"):
        rel = path.relative_to(tmp_path / "cache").as_posix()
        assert _CACHE_FILE.fullmatch(rel) or "/" not in rel, rel

    # The upstream was only ever asked valid questions.
    assert fake.registry.requests
    for r in fake.registry.requests:
        assert r.method in ("GET", "HEAD")
        assert _valid_upstream_path(r.path), r.path
        assert r.query.get("ns") in (None, NS)

    errors = [r for r in caplog.records if r.levelno >= logging.ERROR]
    assert errors == [], [r.getMessage() for r in errors[:5]]


HEX64 = "0123456789abcdef" * 4


@pytest.mark.parametrize(
    ("target", "status", "upstream_path"),
    [
        (f"/v2/library%2Falpine/manifests/3?ns={NS}", 200, f"/v2/{REPO}/manifests/3"),
        (f"/v2/%2e%2e/%2e%2e/etc/manifests/3?ns={NS}", 400, None),
        (f"/v2/library/%2e%2e/%2e%2e/manifests/3?ns={NS}", 400, None),
        (f"/v2/%252e%252e/x/manifests/3?ns={NS}", 400, None),
        (f"/v2/a%00b/manifests/3?ns={NS}", 400, None),
        (f"/v2/{REPO}/manifests/..%2F..%2Fx?ns={NS}", 404, None),  # no such manifest
        (f"/v2/{REPO}/manifests/%2e%2e?ns={NS}", 404, None),
        (f"/v2/{REPO}/blobs/sha256%3A{HEX64}%2F..?ns={NS}", 400, None),
        (f"/v2/{REPO}/blobs/sha256%3A..%2F..%2F{HEX64[6:]}?ns={NS}", 400, None),
        (f"/v2/%EF%BD%81lpine/manifests/3?ns={NS}", 400, None),  # full-width a
        (f"/v2/{REPO}/manifests/3?ns=docker.io%2F..%2F127.0.0.1", 400, None),
        (f"/v2/{REPO}/manifests/3?ns=127.0.0.1%3A22", 404, None),
    ],
)
async def test_percent_encoded_paths(
    fake: RunningFake, tmp_path: Path, target: str, status: int, upstream_path: str | None
) -> None:
    """aiohttp decodes once; what the parsers then see is judged like any other value."""
    fake.registry.add_image(REPO, "3")
    config = with_server(mirror_config(tmp_path / "cache", [fake.url]))
    async with listening(config) as m:
        resp = await send_raw(m.host, m.port, request("GET", target))
    assert resp is not None
    assert resp.status == status
    if status >= 400:
        assert resp.is_oci_error
    assert [r.path for r in fake.registry.requests] == ([upstream_path] if upstream_path else [])


@pytest.mark.parametrize(
    "rng", ["bytes=" + "9" * 5000 + "-", "bytes=0-" + "9" * 5000, "bytes=\u0663-", "bytes=-0"]
)
@pytest.mark.parametrize("cached", [False, True])
async def test_absurd_ranges_are_not_server_errors(
    fake: RunningFake, tmp_path: Path, rng: str, cached: bool
) -> None:
    """Both blob paths (a miss streamed from upstream, a hit from disk) survive them."""
    image = fake.registry.add_image(REPO, "3", layer_sizes=(100_000,))
    target = f"/v2/{REPO}/blobs/{image.layer_digests[0]}?ns={NS}"
    config = with_server(mirror_config(tmp_path / "cache", [fake.url]))
    async with listening(config) as m:
        if cached:
            warm = await send_raw(m.host, m.port, request("GET", target), within=10.0)
            assert warm is not None
            assert warm.status == 200
            await asyncio.sleep(0.2)
        raw = request("GET", target, headers={"Range": rng}).decode().encode("utf-8")
        resp = await send_raw(m.host, m.port, raw, within=10.0)
    assert resp is not None
    assert resp.status in (200, 206, 416), resp.status
    if resp.status == 416:
        assert resp.headers["content-range"] == f"bytes */{len(image.layers[0])}"
    if resp.status == 200:
        assert resp.body == image.layers[0]
