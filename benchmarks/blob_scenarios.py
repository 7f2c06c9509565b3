"""Scenarios 1, 2, 3 and 5: one big blob warm and cold, a herd, memory under load.

Cold means an empty cache: the mirror or the baseline proxy is restarted on an
emptied directory before each measurement. The upstream's file stays in the page
cache throughout, for every server alike.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence

from benchmarks import httpclient
from benchmarks.data import Blob
from benchmarks.measure import Meter, RssSampler, tree_rss_bytes
from benchmarks.plan import BASELINE_AGENT, MIRROR_AGENT, Context, MiB
from benchmarks.report import Outcome, Series, fmt, ratio
from benchmarks.stack import restart_registry

GB = 1e9
CPU_PER_GB = "CPU-s/GB"
COLD_RATIO = 1.0  # scenario 2's targets (the CPU issue): throughput against the baseline,
COLD_CPU = 1.2  # and the mirror's CPU seconds per GB of a verified, cached fill
MIRROR = "mirrorproxy"
BASELINE = "docker-registry proxy"


class BenchError(RuntimeError):
    """A server answered wrongly: the run's figures would mean nothing."""


def fetch_blob(
    ctx: Context, url: str, size: int, pid: int | None, name: str, *, settle: bool = False
) -> tuple[float, Meter]:
    """One timed GET on a fresh connection; returns bytes/s and the meter.

    ``settle``: the meter also waits for the server to go quiet (``Meter``).
    """
    with ctx.profiled(name), Meter(pid, settle=settle) as meter:
        got = asyncio.run(httpclient.fetch_once(url, expect_size=size))
    if not got.ok:
        raise BenchError(f"GET {url}: status {got.status}, {got.size} of {size} bytes")
    return got.rate, meter


def cold_blob(ctx: Context, blob: Blob) -> Outcome:
    """Scenario 2: first fetch through an empty cache, mirror against the baseline.

    Besides the rate, each cache's CPU per GB: the CPU seconds its process tree used
    for the fill, until it went quiet after the response (the mirror's fsync and
    rename, the baseline's own download into its storage), per GB of the blob.
    """
    st = ctx.stack
    gb = blob.size / GB
    mirror = Series(f"{MIRROR} (cold)", "GB/s")
    base = Series(f"{BASELINE} (cold)", "GB/s")
    direct = Series("upstream docker-registry (direct)", "GB/s")
    for r in range(ctx.plan.repeat):
        fills: dict[str, list[tuple[float, Meter]]] = {"mirror": [], "base": [], "direct": []}
        for i in range(ctx.plan.cold_samples):
            st.mirror.restart(wipe=True)
            url, pid = st.mirror.url + blob.v2_path(), st.mirror.pid
            name = f"s2-{r}-{i}"
            fills["mirror"].append(fetch_blob(ctx, url, blob.size, pid, name, settle=True))
            restart_registry(st.baseline, wipe=True)
            url, pid = st.baseline.url + blob.v2_path(), st.baseline.pid
            fills["base"].append(fetch_blob(ctx, url, blob.size, pid, "", settle=True))
            url, pid = st.upstream.url + blob.v2_path(), st.upstream.pid
            fills["direct"].append(fetch_blob(ctx, url, blob.size, pid, "", settle=True))
            ctx.log(
                f"  cold r{r}.{i}: mirror {fills['mirror'][-1][0] / GB:.2f} GB/s"
                f" {fills['mirror'][-1][1].server_total / gb:.2f} CPU-s/GB,"
                f" baseline {fills['base'][-1][0] / GB:.2f} GB/s"
                f" {fills['base'][-1][1].server_total / gb:.2f} CPU-s/GB"
            )
        for series, key in ((mirror, "mirror"), (base, "base"), (direct, "direct")):
            _add_median(series, fills[key], gb)
    q = ratio(mirror, base)
    cpu = mirror.figure(CPU_PER_GB)
    return Outcome(
        2,
        f"Cold blob {blob.size // MiB} MiB",
        f">= {COLD_RATIO}x baseline proxy, <= {COLD_CPU} CPU-s/GB",
        [mirror, base, direct],
        headline=f"{fmt(mirror.median, 'GB/s')}, {fmt(cpu, 'CPU-s/GB')}",
        reference=f"proxy {fmt(base.median, 'GB/s')}, {fmt(base.figure(CPU_PER_GB), 'CPU-s/GB')}",
        ratio=q,
        met=q is not None and q >= COLD_RATIO and cpu <= COLD_CPU,
        notes=[
            f"each repetition is the median of {ctx.plan.cold_samples} cold fetches per "
            "server (fresh process and empty storage each), servers in turn. "
            f"{CPU_PER_GB}: CPU seconds of the server's process tree from the request until "
            "it went quiet after the response (the mirror's fsync and rename; the "
            "baseline's second download of the blob into its storage, which its client "
            "does not wait for), per GB of the blob"
        ],
    )


def _add_median(series: Series, fills: Sequence[tuple[float, Meter]], gb: float) -> None:
    """One repetition's figures: the medians of its fills (rate, cores, CPU per GB)."""
    series.add(
        statistics.median(rate for rate, _ in fills) / GB,
        client=statistics.median(m.client.cores for _, m in fills),
        server=statistics.median(m.server.cores for _, m in fills),
        **{CPU_PER_GB: statistics.median(m.server_total / gb for _, m in fills)},
    )


def warm_blob(ctx: Context, blob: Blob) -> Outcome:
    """Scenario 1: a cached blob, mirror against nginx sendfile of the same file."""
    st = ctx.stack
    targets = {
        "nginx": (Series("nginx sendfile", "GB/s"), st.nginx.url_of(blob.path), st.nginx),
        "nginx-copied": (
            Series("nginx, sendfile off", "GB/s"),
            st.nginx.url_of(blob.path, copied=True),
            st.nginx,
        ),
        "mirror": (Series(f"{MIRROR} (warm)", "GB/s"), st.mirror.url + blob.v2_path(), st.mirror),
        "baseline": (
            Series(f"{BASELINE} (warm)", "GB/s"),
            st.baseline.url + blob.v2_path(),
            st.baseline,
        ),
    }
    for _, url, proc in targets.values():  # fill caches; not measured
        fetch_blob(ctx, url, blob.size, proc.pid, "")
    for r in range(ctx.plan.repeat):
        for key, (series, url, proc) in targets.items():
            rates, clients, servers = [], [], []
            for i in range(ctx.plan.warm_samples):
                name = f"s1-{r}-{i}" if key == "mirror" else ""
                rate, m = fetch_blob(ctx, url, blob.size, proc.pid, name)
                rates.append(rate / GB)
                clients.append(m.client.cores)
                servers.append(m.server.cores)
            series.add(
                statistics.median(rates),
                client=statistics.median(clients),
                server=statistics.median(servers),
            )
    nginx, copied, mirror, base = (t[0] for t in targets.values())
    q = ratio(mirror, nginx)
    return Outcome(
        1,
        f"Warm blob {blob.size // MiB} MiB",
        ">= 0.9x nginx sendfile",
        [nginx, copied, mirror, base],
        headline=fmt(mirror.median, "GB/s"),
        reference=f"nginx {fmt(nginx.median, 'GB/s')}",
        ratio=q,
        met=q is not None and q >= 0.9,
        notes=[
            f"median of {ctx.plan.warm_samples} GETs per server per repetition, one client, "
            "fresh connection each. On loopback the receiving client does the copy (see its "
            "CPU near 1 core), so this compares servers at one client's limit; server CPU of "
            "sendfile transfers is unreliable here (softirq time lands on whoever runs). "
            "The mirror copies file bytes to a loopback client (256 KiB writes) and uses "
            "sendfile for any other; nginx with sendfile off (256 KiB output buffers) is the "
            "like-for-like figure for that"
        ],
    )


def run_herd(
    ctx: Context,
    series: Series,
    url: str | Sequence[str],
    blob: Blob,
    expected: bytes,
    pid: int | Sequence[int] | None,
    agent: str | None,
    name: str = "",
) -> None:
    """Run one herd against ``url`` and record it in ``series``.

    ``url`` and ``pid`` may name several servers (the clients take the URLs in turn;
    the servers' CPU is summed). ``agent`` is the servers' User-Agent in the
    upstream's log (None: not a cache), for counting the upstream GETs the herd caused.
    """
    n = ctx.plan.herd_clients
    before = ctx.settled_upstream_count(agent, blob.digest, "GET") if agent else 0
    check = httpclient.Check(expected)
    with ctx.profiled(name), Meter(pid) as meter:
        wall, results = asyncio.run(
            httpclient.fetch_concurrently(url, n, expect_size=blob.size, check=check)
        )
    extras = {
        "slowest client s": max(f.elapsed for f in results),
        "bad clients": float(sum(1 for f in results if not f.ok)),
        "GB/s delivered": n * blob.size / wall / GB,
    }
    if agent:
        extras["upstream GETs"] = ctx.settled_upstream_count(agent, blob.digest, "GET") - before
    series.add(wall, client=meter.client.cores, server=meter.server.cores, **extras)


def herd(ctx: Context, blob: Blob) -> Outcome:
    """Scenario 3: many clients ask for one uncached blob at the same moment."""
    st = ctx.stack
    n = ctx.plan.herd_clients
    expected = blob.path.read_bytes()
    single = Series(f"{MIRROR}: 1 client (cold)", "s")
    crowd = Series(f"{MIRROR}: {n} clients (cold)", "s")
    base = Series(f"{BASELINE}: {n} clients (cold)", "s")
    floor = Series(f"nginx sendfile: {n} clients (same file)", "s")
    for r in range(ctx.plan.repeat):
        st.mirror.restart(wipe=True)
        rate, m = fetch_blob(ctx, st.mirror.url + blob.v2_path(), blob.size, st.mirror.pid, "")
        single.add(blob.size / rate, client=m.client.cores, server=m.server.cores)
        st.mirror.restart(wipe=True)
        url = st.mirror.url + blob.v2_path()
        run_herd(ctx, crowd, url, blob, expected, st.mirror.pid, MIRROR_AGENT, f"s3-{r}")
        restart_registry(st.baseline, wipe=True)
        url = st.baseline.url + blob.v2_path()
        run_herd(ctx, base, url, blob, expected, st.baseline.pid, BASELINE_AGENT)
        run_herd(ctx, floor, st.nginx.url_of(blob.path), blob, expected, st.nginx.pid, None)
        gets_now = crowd.extras["upstream GETs"][-1]
        ctx.log(f"  herd r{r}: mirror {crowd.values[-1]:.2f} s, {gets_now:.0f} upstream GETs")
    q = crowd.median / single.median if single.values and crowd.values else None
    one_get = all(g == 1 for g in crowd.extras.get("upstream GETs", []))
    all_ok = all(b == 0 for b in crowd.extras.get("bad clients", []))
    return Outcome(
        3,
        f"Herd: {n} clients, one cold {blob.size // MiB} MiB blob",
        "1 upstream GET, all bytes correct, wall <= 1.3x one cold fetch",
        [single, crowd, base, floor],
        headline=(
            f"{fmt(crowd.median, 's')}, {fmt(crowd.figure('upstream GETs'))} upstream GET(s), "
            f"{'all' if all_ok else 'NOT all'} correct"
        ),
        reference=(
            f"1 cold fetch {fmt(single.median, 's')}; "
            f"nginx to {n} clients {fmt(floor.median, 's')}"
        ),
        ratio=q,
        met=q is not None and q <= 1.3 and one_get and all_ok,
        notes=[
            f"ratio: herd wall time / one cold fetch. Every client's bytes are compared with "
            f"the upstream's file. The herd moves {n}x the bytes of one fetch to clients on "
            f"the same machine, so nginx sending the already-cached file to {n} clients is "
            f"the floor here: herd / nginx = {fmt(ratio(crowd, floor) or float('nan'))}x"
        ],
    )


def memory(ctx: Context, blob: Blob) -> Outcome:
    """Scenario 5: peak RSS while a cold blob streams to several clients."""
    st = ctx.stack
    n = ctx.plan.memory_clients
    limit = ctx.plan.memory_limit_mib
    mirror = Series(f"{MIRROR}: peak RSS", "MiB")
    base = Series(f"{BASELINE}: peak RSS", "MiB")
    for r in range(ctx.plan.repeat):
        for series, cache, agent in (
            (mirror, "mirror", MIRROR_AGENT),
            (base, "baseline", BASELINE_AGENT),
        ):
            server = st.cold(cache)
            pid = server.pid
            if pid is None:
                raise BenchError(f"{cache} is not running")
            url = server.url + blob.v2_path()
            name = f"s5-{r}" if cache == "mirror" else ""
            before = ctx.settled_upstream_count(agent, blob.digest, "GET")
            idle = tree_rss_bytes(pid)
            with ctx.profiled(name), RssSampler(pid) as rss, Meter(pid) as m:
                wall, results = asyncio.run(
                    httpclient.fetch_concurrently(url, n, expect_size=blob.size)
                )
            gets = ctx.settled_upstream_count(agent, blob.digest, "GET") - before
            if any(not f.ok for f in results):
                raise BenchError(f"memory scenario: a client got a bad answer from {url}")
            series.add(
                rss.peak / MiB,
                client=m.client.cores,
                server=m.server.cores,
                **{
                    "RSS before MiB": idle / MiB,
                    "wall s": wall,
                    "GB/s delivered": n * blob.size / wall / GB,
                    "upstream GETs": gets,
                },
            )
        ctx.log(f"  memory r{r}: mirror {mirror.values[-1]:.0f} MiB")
    peak = max(mirror.values) if mirror.values else float("nan")
    return Outcome(
        5,
        f"Memory: cold {fmt(blob.size / MiB)} MiB blob to {n} clients",
        f"peak RSS < {limit:.0f} MiB",
        [mirror, base],
        headline=f"{fmt(peak, 'MiB')} (max over repeats)",
        reference=f"proxy {fmt(max(base.values) if base.values else float('nan'), 'MiB')}",
        ratio=None,
        met=peak < limit,
        notes=["peak RSS is the larger of 10 ms sampling of the process tree and VmHWM"],
    )
