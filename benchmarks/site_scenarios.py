"""Scenarios 9, 10 and 11: the S3 store against the filesystem store, and a cluster.

9 and 10 run the same mirror twice, once with its cache on the local filesystem (the
stack's mirror) and once in a SeaweedFS bucket on this machine (``sitestack.py``),
cold and warm, and warm once more with ``redirect = true`` (the client follows the
307 to SeaweedFS). 11 sends the herd of scenario 3 to three members of one
``[cluster]``, the clients spread over them in turn, against the same herd on one
mirror; on the filesystem (each member its own disk) and on one shared bucket.

Every figure is a ratio against a baseline measured in the same run; the order of
the two sides alternates between repetitions, so neither always runs first.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Callable, Sequence
from typing import TypeVar

from benchmarks import httpclient, sitestack
from benchmarks.blob_scenarios import CPU_PER_GB, GB, MIRROR, BenchError, fetch_blob, run_herd
from benchmarks.data import Blob
from benchmarks.measure import Meter, settled_cpu_seconds, tree_cpu_seconds
from benchmarks.plan import MIRROR_AGENT, Context, MiB
from benchmarks.report import Outcome, Series, fmt, ratio
from benchmarks.stack import BenchMirror

STORE_CPU = "SeaweedFS CPU-s/GB"
STORE_CORES = "SeaweedFS cores"
NO_TARGET = "S3 / filesystem, reported (no number set)"
T = TypeVar("T")


def _alternate(items: list[T], r: int) -> list[T]:
    """``items`` in order on even repetitions, reversed on odd ones."""
    return items if r % 2 == 0 else items[::-1]


def _measured(
    ctx: Context, server: BenchMirror, blob: Blob, store_pid: int, *, settle: bool
) -> tuple[float, Meter, float]:
    """One fetch through ``server``: bytes/s, its meter, and SeaweedFS's CPU seconds
    meanwhile (until it went quiet too, with ``settle``)."""
    s0 = tree_cpu_seconds(store_pid)
    rate, meter = fetch_blob(
        ctx, server.url + blob.v2_path(), blob.size, server.pid, "", settle=settle
    )
    s1 = settled_cpu_seconds(store_pid) if settle else tree_cpu_seconds(store_pid)
    return rate, meter, s1 - s0


def cold_store(ctx: Context, blob: Blob) -> Outcome:
    """Scenario 9: a first fetch through an empty cache, S3 against the filesystem.

    CPU per GB as in scenario 2: the mirror's process until it went quiet after the
    response (the S3 mirror completes its multipart upload then); SeaweedFS's own CPU
    is reported beside it, since on S3 the store does part of the work.
    """
    st = ctx.stack
    site = sitestack.site(st)
    gb = blob.size / GB
    fs = Series(f"{MIRROR} filesystem (cold)", "GB/s")
    s3 = Series(f"{MIRROR} S3 (cold)", "GB/s")

    def cold_fs() -> BenchMirror:
        st.mirror.restart(wipe=True)
        return st.mirror

    sides: list[tuple[Series, Callable[[], BenchMirror]]] = [(fs, cold_fs), (s3, site.cold_s3)]
    for r in range(ctx.plan.repeat):
        for series, cold in _alternate(sides, r):
            server = cold()
            rate, m, store = _measured(ctx, server, blob, site.store_pid, settle=True)
            figures = {CPU_PER_GB: m.server_total / gb, STORE_CPU: store / gb}
            series.add(rate / GB, client=m.client.cores, server=m.server.cores, **figures)
        ctx.log(
            f"  cold r{r}: filesystem {fs.values[-1]:.2f} GB/s"
            f" {fs.extras[CPU_PER_GB][-1]:.2f} CPU-s/GB, S3 {s3.values[-1]:.2f} GB/s"
            f" {s3.extras[CPU_PER_GB][-1]:.2f} CPU-s/GB (+{s3.extras[STORE_CPU][-1]:.2f} store)"
        )
    return Outcome(
        9,
        f"S3 store: cold blob {blob.size // MiB} MiB",
        NO_TARGET,
        [fs, s3],
        headline=(
            f"{fmt(s3.median, 'GB/s')}, {fmt(s3.figure(CPU_PER_GB), 'CPU-s/GB')} "
            f"(+ SeaweedFS {fmt(s3.figure(STORE_CPU))})"
        ),
        reference=(
            f"filesystem {fmt(fs.median, 'GB/s')}, {fmt(fs.figure(CPU_PER_GB), 'CPU-s/GB')}"
        ),
        ratio=ratio(s3, fs),
        notes=[
            "ratio: S3 / filesystem cold GB/s. A cold S3 cache is a new key prefix and an "
            "emptied local directory. CPU-s/GB: the mirror's process tree until it went "
            f"quiet after the response, per GB; {STORE_CPU}: the weed process (master, "
            "volume, filer, S3 gateway) over the same time, which the mirror's figure "
            "leaves out. SeaweedFS shares the two cores with mirror, upstream and client"
        ],
    )


def warm_store(ctx: Context, blob: Blob) -> Outcome:
    """Scenario 10: a cached blob, S3 (streamed, and redirected) against the filesystem."""
    st = ctx.stack
    site = sitestack.site(st)
    if not site.s3_mirror.running:  # scenario 9 did not run: fill a prefix now
        site.cold_s3()
    fetch_blob(
        ctx, site.s3_mirror.url + blob.v2_path(), blob.size, site.s3_mirror.pid, "", settle=True
    )
    redirect = site.redirecting()
    targets = [
        (Series(f"{MIRROR} filesystem (warm)", "GB/s"), st.mirror),
        (Series(f"{MIRROR} S3 (warm)", "GB/s"), site.s3_mirror),
        (Series(f"{MIRROR} S3, redirect = true (warm)", "GB/s"), redirect),
    ]
    for _, server in targets:  # fill what is not cached yet; not measured
        fetch_blob(ctx, server.url + blob.v2_path(), blob.size, server.pid, "", settle=True)
    status = asyncio.run(httpclient.first_status(redirect.url + blob.v2_path()))
    if status != 307:
        raise BenchError(f"the redirecting mirror answered {status}, not 307")
    for r in range(ctx.plan.repeat):
        for series, server in _alternate(targets, r):
            rates, clients, servers, stores = [], [], [], []
            for _ in range(ctx.plan.warm_samples):
                rate, m, store = _measured(ctx, server, blob, site.store_pid, settle=False)
                rates.append(rate / GB)
                clients.append(m.client.cores)
                servers.append(m.server.cores)
                stores.append(store / m.client.wall if m.client.wall > 0 else 0.0)
            series.add(
                statistics.median(rates),
                client=statistics.median(clients),
                server=statistics.median(servers),
                **{STORE_CORES: statistics.median(stores)},
            )
        ctx.log("  warm r{}: {}".format(r, ", ".join(f"{s.values[-1]:.2f}" for s, _ in targets)))
    fs, s3, redirected = (t[0] for t in targets)
    return Outcome(
        10,
        f"S3 store: warm blob {blob.size // MiB} MiB",
        NO_TARGET,
        [fs, s3, redirected],
        headline=f"{fmt(s3.median, 'GB/s')}; redirect {fmt(redirected.median, 'GB/s')}",
        reference=f"filesystem {fmt(fs.median, 'GB/s')}",
        ratio=ratio(s3, fs),
        notes=[
            f"ratio: S3 / filesystem warm GB/s; redirect / filesystem = "
            f"{fmt(ratio(redirected, fs) or float('nan'))}x. Median of "
            f"{ctx.plan.warm_samples} GETs per server per repetition, one client, fresh "
            "connection each. The filesystem mirror sends with sendfile; the S3 mirror "
            "streams one ranged GET from SeaweedFS; with redirect the client gets a 307 "
            "and reads SeaweedFS itself (server CPU is then the mirror's, nearly none; "
            f"{STORE_CORES} is weed's)"
        ],
    )


def _herd_pair(
    ctx: Context,
    blob: Blob,
    expected: bytes,
    one: tuple[Series, Callable[[], Sequence[BenchMirror]]],
    three: tuple[Series, Callable[[], Sequence[BenchMirror]]],
    r: int,
) -> None:
    """One herd on one mirror and one on three members, in alternating order."""
    for series, cold in _alternate([one, three], r):
        servers = cold()
        urls = [s.url + blob.v2_path() for s in servers]
        pids = [s.pid for s in servers if s.pid is not None]
        run_herd(ctx, series, urls, blob, expected, pids, MIRROR_AGENT)


def herd_cluster(ctx: Context, blob: Blob) -> Outcome:
    """Scenario 11: the herd of scenario 3 on three cluster members against one mirror."""
    st = ctx.stack
    site = sitestack.site(st)
    n = ctx.plan.herd_clients
    expected = blob.path.read_bytes()
    m = sitestack.MEMBERS
    one_fs = Series(f"{MIRROR} filesystem: 1 mirror, {n} clients", "s")
    many_fs = Series(f"{MIRROR} filesystem: {m} members, {n} clients", "s")
    one_s3 = Series(f"{MIRROR} S3: 1 mirror, {n} clients", "s")
    many_s3 = Series(f"{MIRROR} S3: {m} members on one bucket, {n} clients", "s")

    def fs_mirror() -> list[BenchMirror]:
        st.mirror.restart(wipe=True)
        return [st.mirror]

    for r in range(ctx.plan.repeat):
        _herd_pair(
            ctx,
            blob,
            expected,
            (one_fs, fs_mirror),
            (many_fs, lambda: site.cold_cluster(s3=False)),
            r,
        )
        _herd_pair(
            ctx,
            blob,
            expected,
            (one_s3, lambda: [site.cold_s3()]),
            (many_s3, lambda: site.cold_cluster(s3=True)),
            r,
        )
        ctx.log(
            f"  cluster herd r{r}: filesystem 1: {one_fs.values[-1]:.2f} s, {m}: "
            f"{many_fs.values[-1]:.2f} s; S3 1: {one_s3.values[-1]:.2f} s, {m}: "
            f"{many_s3.values[-1]:.2f} s"
        )
    every = [one_fs, many_fs, one_s3, many_s3]
    gets = [g for s in every for g in s.extras.get("upstream GETs", [])]
    bad = sum(b for s in every for b in s.extras.get("bad clients", []))
    return Outcome(
        11,
        f"Herd on a cluster: {n} clients, one cold {blob.size // MiB} MiB blob, {m} members",
        "1 upstream GET on 1 mirror and on 3 members, all bytes correct; wall 3 / 1 reported",
        every,
        headline=(
            f"{m} members {fmt(many_fs.median, 's')}, upstream GETs "
            f"{fmt(min(gets, default=float('nan')))}-{fmt(max(gets, default=float('nan')))}, "
            f"{'all' if bad == 0 else 'NOT all'} correct"
        ),
        reference=f"1 mirror {fmt(one_fs.median, 's')}",
        ratio=ratio(many_fs, one_fs),
        met=bool(gets) and all(g == 1 for g in gets) and bad == 0,
        notes=[
            f"ratio: wall time of the herd spread over {m} members (client i asks member "
            f"i mod {m}) / the same herd on one mirror, filesystem store. On one shared "
            f"bucket: {fmt(ratio(many_s3, one_s3) or float('nan'))}x; S3 / filesystem "
            f"for one mirror: {fmt(ratio(one_s3, one_fs) or float('nan'))}x. Upstream GETs "
            "are counted per herd in the upstream's log; server CPU is the members' sum. "
            "All members, SeaweedFS and the clients share this machine's cores, so this "
            "measures the cluster's overhead, not its added capacity"
        ],
    )
