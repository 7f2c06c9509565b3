"""``mirrorproxy cache du|ls|verify|prune`` as separate processes next to a busy server.

While clients keep the mirror committing and evicting blobs (a 300 KiB budget,
blobs of 100 KiB), the commands run again and again. The read-only ones must not
write the index: no ``(unknown)`` rows, and afterwards every index entry is a file
of the running server's, recorded under its namespace. ``prune`` removes entries
and files together, so none is left without the other, and the server's total
follows.
"""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

from mirrorproxy.cache.index import BLOB, MANIFEST, CacheIndex
from tests.fakes.registry import OCI_MANIFEST, payload
from tests.support.mirror import Mirror, MirrorFactory, RunningFake
from tests.support.paths import NS, REPO, blob_path, manifest_path
from tests.support.procs import mirror_config
from tests.support.waiting import WAIT

KIB = 1024
MAX = 300 * KIB
BUDGET = {"max_size": "300KiB"}
SIZE = "mirrorproxy_cache_size_bytes"
ROUNDS = 3  # of every command
CLI_TIMEOUT = 60.0  # one command, a Python start-up on a loaded machine included
MAX_PULLS = 2000  # the load stops after this many pulls, or when the commands are done


def cli_config(mirror: Mirror, tmp_path: Path) -> Path:
    path = tmp_path / "cli.toml"
    path.write_text(
        mirror_config(5000, mirror.cache_dir, {NS: ["http://127.0.0.1:9"]}, cache=BUDGET)
    )
    return path


async def run_cli(config: Path, *args: str) -> tuple[int, str, str]:
    """Run ``mirrorproxy cache ...`` in its own process (bounded)."""
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "mirrorproxy",
        "cache",
        *args,
        "--config",
        str(config),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(CLI_TIMEOUT):
            out, err = await proc.communicate()
    except TimeoutError:
        proc.kill()
        await proc.wait()
        raise
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


class Load:
    """Clients pulling blobs round-robin (each pull commits one, evicting another)."""

    def __init__(self, mirror: Mirror, blobs: dict[str, bytes], *, allow_missing: bool) -> None:
        self.mirror, self.blobs, self.allow_missing = mirror, blobs, allow_missing
        self.stop = asyncio.Event()
        self.pulls = self.missing = 0

    async def client(self, offset: int) -> None:
        digests = sorted(self.blobs)
        i = offset
        while not self.stop.is_set() and self.pulls < MAX_PULLS:
            digest = digests[i % len(digests)]
            i += 1
            async with asyncio.timeout(WAIT):
                resp = await self.mirror.client.get(blob_path(REPO, digest))
                body = await resp.read()
            self.pulls += 1
            if resp.status == 404 and self.allow_missing:
                # prune deleted the file between the cache lookup and the open
                self.missing += 1
                continue
            assert resp.status == 200
            assert body == self.blobs[digest]

    async def run(self, clients: int) -> None:
        await asyncio.gather(*(self.client(n * 2) for n in range(clients)))


def index_matches_files(mirror: Mirror) -> None:
    """Every index entry is a content file and the other way round, all under NS."""
    index = CacheIndex(mirror.cache_dir / "index.db", read_only=True)
    try:
        entries = index.entries()
    finally:
        index.close()
    recorded = {(e.kind, e.digest): e.size for e in entries}
    on_disk = {
        (kind, f"sha256:{p.name}"): p.stat().st_size
        for kind, files in ((BLOB, mirror.blob_files()), (MANIFEST, mirror.manifest_files()))
        for p in files
    }
    assert recorded == on_disk
    assert {e.namespace for e in entries} <= {NS}


async def start(fake: RunningFake, start_mirror: MirrorFactory) -> tuple[Mirror, dict[str, bytes]]:
    mirror = await start_mirror([fake.url], cache=BUDGET)
    fake.registry.add_image(REPO, "3", layer_sizes=(10 * KIB,))
    resp = await mirror.client.get(manifest_path(REPO, "3"), headers={"Accept": OCI_MANIFEST})
    assert resp.status == 200
    blobs = {}
    for n in range(6):
        data = payload(100 * KIB, f"churn {n}")
        blobs[fake.registry.add_blob(data)] = data
    return mirror, blobs


async def settle(mirror: Mirror) -> None:
    await mirror.settled()
    await mirror.budget.flush()


def rows(out: str) -> list[list[str]]:
    return [line.split() for line in out.splitlines()[1:-1]]


async def test_read_only_commands_leave_a_busy_servers_index_alone(
    fake: RunningFake, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror, blobs = await start(fake, start_mirror)
    config = cli_config(mirror, tmp_path)
    load = Load(mirror, blobs, allow_missing=False)
    clients = asyncio.create_task(load.run(3))
    outputs: list[tuple[str, int, str, str]] = []
    try:
        for _ in range(ROUNDS):
            for command in ("du", "ls", "verify"):
                code, out, err = await run_cli(config, command)
                outputs.append((command, code, out, err))
    finally:
        load.stop.set()
        await clients
    await settle(mirror)

    assert load.pulls > len(outputs)  # the commands really ran next to the load
    assert await mirror.metric_sum("mirrorproxy_cache_evictions_total") > 0
    for command, code, out, err in outputs:
        assert (code, err) == (0, ""), (command, out, err)
        if command == "du":
            # Never an "(unknown)" row (none at all when every entry was just evicted).
            assert {r[0] for r in rows(out)} <= {NS}, out
        if command == "verify":
            assert out.splitlines()[-1].endswith(" 0 bad")
    index_matches_files(mirror)
    on_disk = sum(p.stat().st_size for p in mirror.blob_files() + mirror.manifest_files())
    assert on_disk <= MAX
    assert await mirror.metric(SIZE) == on_disk


async def test_prune_next_to_a_busy_server_keeps_index_and_files_together(
    fake: RunningFake, start_mirror: MirrorFactory, tmp_path: Path
) -> None:
    mirror, blobs = await start(fake, start_mirror)
    config = cli_config(mirror, tmp_path)
    load = Load(mirror, blobs, allow_missing=True)
    clients = asyncio.create_task(load.run(3))
    try:
        for _ in range(ROUNDS):
            code, out, err = await run_cli(config, "prune", "--to", "100KiB")
            assert (code, err) == (0, ""), out
            assert out.startswith("pruned ")
    finally:
        load.stop.set()
        await clients
    await settle(mirror)

    assert load.missing <= ROUNDS * 3  # only what a prune removed at that very moment
    index_matches_files(mirror)
    on_disk = sum(p.stat().st_size for p in mirror.blob_files() + mirror.manifest_files())
    assert await mirror.metric(SIZE) == on_disk
    code, out, _ = await run_cli(config, "verify")
    assert code == 0, out
