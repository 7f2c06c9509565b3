"""``mirrorproxy serve --workers 2``: the real CLI in front of a FakeRegistry.

Clients reach both workers through the one address; a cold blob asked by 30 clients
at once crosses from upstream once and is written once; ``/metrics`` of any worker
sums them; a worker killed is started again; SIGTERM to the server stops every
worker, and a server killed outright leaves none behind.
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from tests.fakes.registry import payload
from tests.support.cluster import member_ports
from tests.support.mirror import FakeFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path
from tests.support.procs import MirrorProcess, mirror_config
from tests.support.waiting import WAIT, wait_for

KIB = 1024
MIB = 1024 * KIB
CLIENTS = 30


@pytest.fixture
def procs() -> Iterator[list[MirrorProcess]]:
    """The test's servers; stopped at teardown whatever happened."""
    started: list[MirrorProcess] = []
    yield started
    for proc in started:
        proc.stop()


async def start(
    procs: list[MirrorProcess], tmp_path: Path, fake: RunningFake, *, workers: int = 2
) -> MirrorProcess:
    port = member_ports(1)[0]  # below the ports the machine's other work uses
    config = mirror_config(port, tmp_path / "cache", {NS: [fake.url]})
    proc = MirrorProcess(
        tmp_path / "mirror", config, port, args=["--workers", str(workers)], start=False
    )
    procs.append(proc)
    await asyncio.to_thread(proc.start)  # the fake keeps serving meanwhile
    # /v2/ answers once one worker listens; the server says when all of them do.
    await wait_for(lambda: f"with {workers} workers" in proc.log_text())
    return proc


def children(pid: int) -> set[int]:
    path = Path(f"/proc/{pid}/task/{pid}/children")
    return {int(p) for p in path.read_text().split()} if path.exists() else set()


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except FileNotFoundError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


async def fetch(url: str) -> tuple[int, bytes]:
    """One request on a connection of its own (the kernel picks the worker)."""
    connector = aiohttp.TCPConnector(force_close=True)
    async with aiohttp.ClientSession(connector=connector) as session, session.get(url) as resp:
        return resp.status, await resp.read()


async def metric(url: str, name: str, **labels: str) -> float:
    status, body = await fetch(f"{url}/metrics")
    assert status == 200
    total = 0.0
    for family in text_string_to_metric_families(body.decode()):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                total += sample.value
    return total


def access_lines(proc: MirrorProcess, worker: str, what: str) -> list[str]:
    return [
        line
        for line in proc.log_text().splitlines()
        if f"[{worker}] INFO mirrorproxy.access" in line and what in line
    ]


async def test_thirty_clients_one_upstream_get_both_workers_one_metrics(
    start_fake: FakeFactory, procs: list[MirrorProcess], tmp_path: Path
) -> None:
    fake = await start_fake()
    data = payload(3 * MIB, "workers")
    digest = fake.registry.add_blob(data)
    fake.registry.faults.chunk_size = 256 * KIB
    fake.registry.faults.chunk_delay = 0.05  # the download takes about 0.6 s
    proc = await start(procs, tmp_path, fake)
    assert proc.pid is not None
    assert len(children(proc.pid)) == 2

    async with asyncio.timeout(WAIT):
        got = await asyncio.gather(
            *(fetch(f"{proc.url}{blob_path(REPO, digest)}") for _ in range(CLIENTS))
        )
    assert all(status == 200 for status, _ in got)
    assert all(body == data for _, body in got)
    assert len(fake.registry.calls("GET", "blobs")) == 1
    # Committed once: one file. The other worker's clients followed its relay of the
    # owner's answer through a temp file, dropped once they finished.
    cache = tmp_path / "cache"
    assert (cache / "blobs" / "sha256" / digest[7:9] / digest[7:]).read_bytes() == data
    await wait_for(lambda: list((cache / "tmp").glob("*")) == [])

    async with asyncio.timeout(WAIT):
        before = await metric(proc.url, "mirrorproxy_requests_total", method="HEAD")
        for _ in range(20):
            connector = aiohttp.TCPConnector(force_close=True)
            async with (
                aiohttp.ClientSession(connector=connector) as session,
                session.head(f"{proc.url}/v2/") as resp,
            ):
                assert resp.status == 200
        after = await metric(proc.url, "mirrorproxy_requests_total", method="HEAD")
        assert after - before == 20  # counted by whichever worker answered, summed
        assert await metric(proc.url, "mirrorproxy_workers") == 2
    await asyncio.sleep(0.3)  # log lines are written in batches
    blob_lines = {w: access_lines(proc, w, f"/blobs/{digest}") for w in ("w0", "w1")}
    assert all(blob_lines.values()), "both workers served clients"
    head_lines = {w: access_lines(proc, w, '"HEAD /v2/"') for w in ("w0", "w1")}
    assert sum(len(v) for v in head_lines.values()) == 20


async def test_sigterm_stops_every_worker(
    start_fake: FakeFactory, procs: list[MirrorProcess], tmp_path: Path
) -> None:
    fake = await start_fake()
    proc = await start(procs, tmp_path, fake)
    assert proc.pid is not None
    workers = children(proc.pid)
    assert len(workers) == 2
    assert await asyncio.to_thread(proc.stop) == 0
    assert not any(alive(pid) for pid in workers)
    log = proc.log_text()
    assert "Traceback" not in log


async def test_a_killed_worker_is_started_again_and_its_blobs_still_served(
    start_fake: FakeFactory, procs: list[MirrorProcess], tmp_path: Path
) -> None:
    fake = await start_fake()
    proc = await start(procs, tmp_path, fake)
    assert proc.pid is not None
    first = children(proc.pid)
    victim = min(first)
    os.kill(victim, signal.SIGKILL)
    await wait_for(lambda: re.search(r"worker w\d restarted", proc.log_text()) is not None)
    now = children(proc.pid)
    assert len(now) == 2
    assert victim not in now
    # Every blob, whichever worker owns it, is served (and fetched once).
    blobs = [payload(64 * KIB, f"after-{i}") for i in range(6)]
    digests = [fake.registry.add_blob(b) for b in blobs]
    async with asyncio.timeout(WAIT):
        for digest, data in zip(digests, blobs, strict=True):
            assert await fetch(f"{proc.url}{blob_path(REPO, digest)}") == (200, data)
    assert len(fake.registry.calls("GET", "blobs")) == len(blobs)


async def test_a_server_killed_outright_leaves_no_worker(
    start_fake: FakeFactory, procs: list[MirrorProcess], tmp_path: Path
) -> None:
    fake = await start_fake()
    proc = await start(procs, tmp_path, fake)
    assert proc.pid is not None
    workers = children(proc.pid)
    await asyncio.to_thread(proc.kill)
    await wait_for(lambda: not any(alive(pid) for pid in workers))


@pytest.mark.parametrize(
    ("server", "args", "expected"),
    [
        ("workers = 0", [], "{config}: server.workers: must be between 1 and 256, got 0"),
        ('workers = "many"', [], "{config}: server.workers: expected a number of processes"),
        ("", ["--workers", "many"], '--workers: expected a number of processes or "auto"'),
        (
            'workers = 2\n[cluster]\nself = "http://127.0.0.1:5000"\n'
            'members = ["http://127.0.0.1:5000"]',
            [],
            "{config}: server.workers: workers > 1 cannot be combined with [cluster]",
        ),
    ],
)
def test_config_errors_name_file_and_key(
    tmp_path: Path, server: str, args: list[str], expected: str
) -> None:
    config = tmp_path / "mirrorproxy.toml"
    config.write_text(
        f'[server]\n{server}\n[namespaces."docker.io"]\nupstreams = ["http://127.0.0.1:9"]\n'
    )
    out = subprocess.run(
        [sys.executable, "-m", "mirrorproxy", "serve", "--config", str(config), *args],
        capture_output=True,
        text=True,
        timeout=WAIT,
        check=False,
    )
    assert out.returncode == 2
    assert out.stderr.startswith("mirrorproxy: config error: " + expected.format(config=config))
