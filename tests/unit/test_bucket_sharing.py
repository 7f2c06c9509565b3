"""Members of a static [cluster] over one bucket split its budget: each blob is
accounted for by exactly one member, each within 1/N of max_size."""

from __future__ import annotations

import hashlib
from pathlib import Path

from mirrorproxy.config import load_config
from mirrorproxy.core.oci import parse_digest
from mirrorproxy.pullthrough.engine import bucket_sharing

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


def test_each_blob_has_exactly_one_accounting_member(tmp_path: Path) -> None:
    sharings = []
    for i, me in enumerate(MEMBERS):
        path = tmp_path / f"m{i}.toml"
        path.write_text(config_text(me))
        sharing = bucket_sharing(load_config(path))
        assert sharing is not None
        assert sharing.share == 1 / 3
        assert sharing.reconcile  # each member's index is its own
        sharings.append(sharing)
    digests = [
        parse_digest("sha256:" + hashlib.sha256(str(n).encode()).hexdigest()) for n in range(300)
    ]
    owned = [sum(s.owns(d) for s in sharings) for d in digests]
    assert owned == [1] * len(digests)
    assert all(sum(s.owns(d) for d in digests) > 50 for s in sharings)  # spread


def test_no_split_without_a_bucket_or_without_a_fixed_member_list(tmp_path: Path) -> None:
    path = tmp_path / "mp.toml"
    path.write_text(config_text(MEMBERS[0], s3=False))
    assert bucket_sharing(load_config(path)) is None  # own disks: each its own budget
    path.write_text(config_text("http://127.0.0.1:5001", dns=True))
    assert bucket_sharing(load_config(path)) is None
