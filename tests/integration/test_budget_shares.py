"""Budgets sharing one cache directory (``[server] workers``): each accounts for the
digests it owns within its share of ``max_size``, evicts only those, and picks up
what the others record for it."""

from __future__ import annotations

from pathlib import Path

from mirrorproxy.cache.blobs import FileBlobStore
from mirrorproxy.cache.budget import CacheBudget
from mirrorproxy.cache.index import BLOB
from mirrorproxy.cache.manifests import FileManifestStore
from mirrorproxy.core.oci import Digest
from mirrorproxy.core.rendezvous import blob_key, owner
from mirrorproxy.observability.metrics import Metrics
from tests.support.mirror import mirror_config
from tests.support.paths import NS

KIB = 1024
WORKERS = ("w0", "w1")


def owned_by(name: str) -> object:
    def owns(digest: Digest) -> bool:
        return owner(blob_key(str(digest)), WORKERS) == name

    return owns


def budgets(cache: Path) -> tuple[CacheBudget, CacheBudget, FileBlobStore]:
    config = mirror_config(cache, ["http://127.0.0.1:9"], cache={"max_size": "40KiB"})
    blobs = FileBlobStore(config.cache.dir)
    manifests = FileManifestStore(config.cache.dir)
    blobs.prepare()
    manifests.prepare()
    out = []
    for name in WORKERS:
        budget = CacheBudget(
            config.cache,
            blobs=blobs,
            manifests=manifests,
            metrics=Metrics(),
            owns=owned_by(name),  # type: ignore[arg-type]
            share=0.5,
        )
        budget.open()
        out.append(budget)
    return out[0], out[1], blobs


def store(blobs: FileBlobStore, data: bytes) -> Digest:
    digest = Digest.of(data)
    path = blobs.path_of(digest)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    return digest


def blobs_for(name: str, count: int, size: int) -> list[bytes]:
    """``count`` distinct payloads of ``size`` bytes that ``name`` owns."""
    found: list[bytes] = []
    i = 0
    while len(found) < count:
        data = i.to_bytes(4, "big") * (size // 4)
        if owner(blob_key(str(Digest.of(data))), WORKERS) == name:
            found.append(data)
        i += 1
    return found


async def test_each_counts_and_evicts_only_what_it_owns(tmp_path: Path) -> None:
    w0, w1, blobs = budgets(tmp_path / "cache")  # 20 KiB each
    mine = [store(blobs, d) for d in blobs_for("w0", 3, 8 * KIB)]
    theirs = [store(blobs, d) for d in blobs_for("w1", 4, 8 * KIB)]
    for d in theirs[:3]:  # w0 committed w1's (its owner was away, say)
        w0.committed(BLOB, d, 8 * KIB, NS, reservation=w0.reserve(d, 8 * KIB))
    for d in mine[:2]:
        w0.committed(BLOB, d, 8 * KIB, NS, reservation=w0.reserve(d, 8 * KIB))
    assert w0.total == 16 * KIB  # its own two only; w1's three are w1's to count
    await w1.flush()
    assert w1.total == 24 * KIB  # recorded by w0, picked up as w1's
    # One more 8 KiB blob of w0's evicts one of its own, none of w1's.
    w0.committed(BLOB, mine[2], 8 * KIB, NS, reservation=w0.reserve(mine[2], 8 * KIB))
    assert w0.total == 16 * KIB
    assert sum(blobs.path_of(d).exists() for d in mine) == 2
    assert all(blobs.path_of(d).exists() for d in theirs[:3])
    # w1, over its share, makes room among its own only.
    w1.committed(BLOB, theirs[3], 8 * KIB, NS, reservation=w1.reserve(theirs[3], 8 * KIB))
    assert w1.total == 16 * KIB
    assert sum(blobs.path_of(d).exists() for d in theirs) == 2
    assert sum(blobs.path_of(d).exists() for d in mine) == 2
    await w0.flush()
    assert w0.total == 16 * KIB  # w1's evictions changed nothing of w0's
    await w0.close()
    await w1.close()


async def test_a_pin_of_another_workers_blob_is_not_counted_as_in_use(tmp_path: Path) -> None:
    w0, w1, blobs = budgets(tmp_path / "cache")
    theirs = store(blobs, blobs_for("w1", 1, 8 * KIB)[0])
    w1.committed(BLOB, theirs, 8 * KIB, NS)
    w0.pin(theirs)  # w0 serves it: it must not think its own reclaimable shrank
    assert w0._reclaimable() == 0 == w0.total
    w0.unpin(theirs)
    await w0.close()
    await w1.close()
