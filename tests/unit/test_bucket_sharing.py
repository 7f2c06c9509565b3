"""Members of a [cluster] over one bucket split its budget by the live member list:
each blob is accounted for by exactly one member, each within 1/N of max_size; with
``members_dns`` the owners, the share, the total and the index follow the list."""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Iterator
from pathlib import Path

from mirrorproxy.cache import Content
from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.config import ClusterConfig, Config, load_config
from mirrorproxy.core.oci import Digest, parse_digest
from mirrorproxy.core.rendezvous import blob_key, owner
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.engine import bucket_split
from mirrorproxy.pullthrough.touchreports import MemberSplit
from mirrorproxy.upstream.members import Members
from tests.support.mirror import mirror_config
from tests.support.waiting import wait_for

MEMBERS = ["http://127.0.0.1:5001", "http://127.0.0.1:5002", "http://127.0.0.1:5003"]
S3 = """
[storage]
backend = "s3"
[storage.s3]
endpoint = "http://127.0.0.1:8333"
bucket = "b"
access_key = "k"
secret_key = "s"
"""
KIB = 1024
RELIST_AFTER = 0.2


def config_text(me: str, *, s3: bool = True, dns: bool = False) -> str:
    members = (
        'members_dns = "mirrors.example.internal:5001"'
        if dns
        else "members = [" + ", ".join(f'"{m}"' for m in MEMBERS) + "]"
    )
    return (
        '[cache]\ndir = "/tmp/c"\nmax_size = "3GiB"\n'
        f'[cluster]\nself = "{me}"\n{members}\n'
        + (S3 if s3 else "")
        + '[namespaces."docker.io"]\nupstreams = ["http://127.0.0.1:9"]\n'
    )


def split_of(path: Path) -> MemberSplit | None:
    config = load_config(path)
    assert config.cluster is not None
    return bucket_split(config, Members(config.cluster, Metrics()))


def test_each_blob_has_exactly_one_accounting_member(tmp_path: Path) -> None:
    splits = []
    for i, me in enumerate(MEMBERS):
        path = tmp_path / f"m{i}.toml"
        path.write_text(config_text(me))
        split = split_of(path)
        assert split is not None
        assert split.share() == 1 / 3
        splits.append(split)
    digests = [
        parse_digest("sha256:" + hashlib.sha256(str(n).encode()).hexdigest()) for n in range(300)
    ]
    owned = [sum(s.owns(d) for s in splits) for d in digests]
    assert owned == [1] * len(digests)
    assert all(sum(s.owns(d) for d in digests) > 50 for s in splits)  # spread


def test_no_split_without_a_bucket(tmp_path: Path) -> None:
    path = tmp_path / "mp.toml"
    path.write_text(config_text(MEMBERS[0], s3=False))
    assert split_of(path) is None  # own disks: each its own budget
    path.write_text(config_text(MEMBERS[0], dns=True))
    assert split_of(path) is not None  # members from DNS: split by the live list


class Dns:
    """Answers lookups with the addresses a test sets."""

    def __init__(self, *answer: str) -> None:
        self.answer = list(answer)

    async def __call__(self, host: str, port: int) -> list[str]:
        return list(self.answer)


class CountedBlobs(FileBlobStore):
    """A filesystem blob store that counts its listings (a re-list reads them all)."""

    listings = 0

    def contents(self) -> Iterator[Content]:
        self.listings += 1
        return super().contents()


def url(address: str) -> str:
    return f"http://{address}:5000"


def payloads(count: int, size: int) -> list[bytes]:
    return [i.to_bytes(4, "big") * (size // 4) for i in range(count)]


def put(blobs: FileBlobStore, data: bytes) -> Digest:
    """Write a blob as another member would: into the store, not this index."""
    digest = Digest.of(data)
    path = blobs.path_of(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def split_budget(
    config: Config,
    blobs: FileBlobStore,
    manifests: FileManifestStore,
    split: MemberSplit,
    members: Members,
) -> CacheBudget:
    """An open budget whose part of the bucket follows ``members`` as it changes."""
    budget = CacheBudget(
        config.cache,
        blobs=blobs,
        manifests=manifests,
        metrics=Metrics(),
        owns=split.owns,
        share=split.share,
    )
    members.on_change.append(lambda: budget.reshare(relist_after=RELIST_AFTER))
    budget.open()
    return budget


async def test_the_budget_follows_the_members_dns_finds(tmp_path: Path) -> None:
    dns = Dns("127.0.0.1", "127.0.0.2")
    cluster = ClusterConfig(
        self_url=url("127.0.0.1"), members_dns=("mirrors.internal", 5000), refresh=3600.0
    )
    members = Members(cluster, Metrics(), resolver=dns)
    split = MemberSplit(cluster.self_url, members)
    assert split.share() == 1.0  # nothing looked up yet: alone, owns everything
    await members.start()
    assert split.share() == 0.5

    config = mirror_config(tmp_path / "cache", ["http://127.0.0.1:9"], cache={"max_size": "1MiB"})
    blobs = CountedBlobs(config.cache.dir)
    manifests = FileManifestStore(config.cache.dir)
    blobs.prepare()
    manifests.prepare()
    data = payloads(24, 4 * KIB)
    digests = [put(blobs, d) for d in data]
    budget = split_budget(config, blobs, manifests, split, members)
    try:
        assert blobs.listings == 1  # the listing at start
        mine = [d for d in digests if split.owns(d)]
        assert 0 < len(mine) < len(digests)
        assert budget.total == len(mine) * 4 * KIB
        assert budget.limit == 512 * KIB

        # Another member writes a blob; then the others leave: this one owns all.
        late = put(blobs, b"late" * KIB)
        dns.answer = ["127.0.0.1"]
        await members.refresh()
        assert budget.limit == 1024 * KIB  # at once
        await wait_for(lambda: budget.total == len(digests) * 4 * KIB)  # recounted
        await wait_for(lambda: blobs.listings == 2)  # re-listed once the list held still
        await wait_for(lambda: budget.total == (len(digests) + 1) * 4 * KIB)
        assert budget.index is not None
        assert budget.index.get("blob", str(late)) is not None

        # A member joins, leaves and joins again within the wait: one re-list.
        for answer in (["127.0.0.1", "127.0.0.3"], ["127.0.0.1"], ["127.0.0.1", "127.0.0.3"]):
            dns.answer = answer
            await members.refresh()
        assert budget.limit == 512 * KIB
        owned = [d for d in [*digests, late] if split.owns(d)]
        await wait_for(lambda: budget.total == len(owned) * 4 * KIB)
        await asyncio.sleep(RELIST_AFTER * 3)
        assert blobs.listings == 3

        # The same list again: nothing changes, nothing is listed.
        await members.refresh()
        await asyncio.sleep(RELIST_AFTER * 2)
        assert blobs.listings == 3
        assert budget.total == len(owned) * 4 * KIB
    finally:
        await budget.close()
        await members.close()


async def test_a_smaller_share_evicts_down_to_it(tmp_path: Path) -> None:
    dns = Dns("127.0.0.1")
    cluster = ClusterConfig(
        self_url=url("127.0.0.1"), members_dns=("mirrors.internal", 5000), refresh=3600.0
    )
    members = Members(cluster, Metrics(), resolver=dns)
    await members.start()
    split = MemberSplit(cluster.self_url, members)
    config = mirror_config(tmp_path / "cache", ["http://127.0.0.1:9"], cache={"max_size": "64KiB"})
    blobs = FileBlobStore(config.cache.dir)
    manifests = FileManifestStore(config.cache.dir)
    blobs.prepare()
    manifests.prepare()
    pair = (url("127.0.0.1"), url("127.0.0.2"))
    ours = [
        d for d in payloads(80, 4 * KIB) if owner(blob_key(str(Digest.of(d))), pair) == pair[0]
    ]
    for d in ours[:14]:  # blobs this member still owns once a second one joins
        put(blobs, d)
    budget = split_budget(config, blobs, manifests, split, members)
    try:
        assert budget.total == 56 * KIB  # alone: within 64 KiB
        dns.answer = ["127.0.0.1", "127.0.0.2"]
        await members.refresh()
        assert budget.limit == 32 * KIB
        await wait_for(lambda: budget.total == 32 * KIB)  # half the bucket: evicted down
        await asyncio.sleep(RELIST_AFTER * 2)
        assert budget.total == 32 * KIB
        assert len(list(blobs.contents())) == 8
    finally:
        await budget.close()
        await members.close()
