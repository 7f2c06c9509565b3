"""Scenarios 4 and 7: request rates with wrk (manifests by tag, many small blobs).

Both are warm: every path is fetched once through each cache before wrk starts.
The mirror answers a fresh tag from its cache; docker-registry's proxy asks the
upstream on every tag request, which is what the mirror is compared with.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from benchmarks import httpclient, wrk
from benchmarks.blob_scenarios import BASELINE, MIRROR, BenchError
from benchmarks.data import Blob, PushedImage
from benchmarks.measure import Meter
from benchmarks.plan import BASELINE_AGENT, MIRROR_AGENT, Context
from benchmarks.report import Outcome, Series, fmt, ratio
from benchmarks.stack import Server
from tests.support.images import MANIFEST_MEDIA_TYPES

NS_QUERY = "?ns=docker.io"  # what containerd adds; docker-registry and nginx ignore it


def _warm(base_url: str, paths: Sequence[str], headers: dict[str, str] | None = None) -> None:
    """GET every path once; raise if any fails."""
    got = asyncio.run(httpclient.fetch_all([base_url + p for p in paths], headers=headers))
    bad = [f.status for f in got if f.status != 200]
    if bad:
        raise BenchError(f"warming {base_url}: {len(bad)} of {len(got)} failed, e.g. {bad[0]}")


@dataclass(frozen=True, slots=True)
class _Target:
    """One server to drive with wrk, and how to read its upstream traffic."""

    series: Series
    server: Server
    script: Path
    agent: str | None  # its User-Agent in the upstream's log; None: not a cache
    profile: bool = False  # the mirror: sampled with --profile


def _measure(
    ctx: Context, t: _Target, *, connections: int, seconds: float, name: str
) -> wrk.WrkResult:
    before = ctx.upstream_count(t.agent) if t.agent is not None else 0
    with ctx.profiled(name if t.profile else ""), Meter(t.server.pid) as meter:
        res = wrk.run(
            t.server.url,
            t.script,
            connections=connections,
            seconds=seconds,
            threads=ctx.plan.wrk_threads,
        )
    extras = {"p50 ms": res.p50_ms, "p99 ms": res.p99_ms, "errors": float(res.errors)}
    if t.agent is not None:
        upstream = ctx.settled_upstream_count(t.agent) - before
        extras["upstream req/s"] = upstream / res.seconds if res.seconds else 0.0
    t.series.add(res.rate, client=res.usage.cores, server=meter.server.cores, **extras)
    if res.errors:
        ctx.log(f"  warning: {res.errors} errors from {t.series.label}")
    return res


def manifests(ctx: Context, image: PushedImage) -> Outcome:
    """Scenario 4: GET a manifest by tag, warm, from many connections."""
    st = ctx.stack
    plan = ctx.plan
    headers = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
    path = image.manifest_path + NS_QUERY
    script = wrk.write_script(st.root / "manifest.lua", [path], headers)
    targets = [
        _Target(Series(MIRROR, "req/s"), st.mirror, script, MIRROR_AGENT, profile=True),
        _Target(Series(BASELINE, "req/s"), st.baseline, script, BASELINE_AGENT),
        _Target(Series("upstream docker-registry (direct)", "req/s"), st.upstream, script, None),
    ]
    for t in targets:
        _warm(t.server.url, [path], headers)
    for r in range(plan.repeat):
        for t in targets:
            _measure(
                ctx,
                t,
                connections=plan.manifest_clients,
                seconds=plan.manifest_seconds,
                name=f"s4-{r}",
            )
        ctx.log(f"  manifests r{r}: mirror {targets[0].series.values[-1]:.0f} req/s")
    mirror, base = targets[0].series, targets[1].series
    q = ratio(mirror, base)
    return Outcome(
        4,
        f"Manifest by tag, warm, {plan.manifest_clients} connections, {plan.manifest_seconds:g} s",
        ">= 3x baseline req/s; p99 reported",
        [t.series for t in targets],
        headline=f"{fmt(mirror.median, 'req/s')}, p99 {fmt(mirror.figure('p99 ms'), 'ms')}",
        reference=f"proxy {fmt(base.median, 'req/s')}, p99 {fmt(base.figure('p99 ms'), 'ms')}",
        ratio=q,
        met=q is not None and q >= 3 and mirror.figure("errors") == 0,
    )


def small_blobs(ctx: Context, blobs: Sequence[Blob]) -> Outcome:
    """Scenario 7: many small cached blobs, round-robin from many connections."""
    st = ctx.stack
    plan = ctx.plan
    v2_paths = [b.v2_path() + NS_QUERY for b in blobs]
    v2_script = wrk.write_script(st.root / "small-v2.lua", v2_paths)
    files = ["/" + str(b.path.relative_to(st.nginx.root)) for b in blobs]
    file_script = wrk.write_script(st.root / "small-files.lua", files)
    targets = [
        _Target(Series(MIRROR, "req/s"), st.mirror, v2_script, MIRROR_AGENT, profile=True),
        _Target(Series(BASELINE, "req/s"), st.baseline, v2_script, BASELINE_AGENT),
        _Target(Series("nginx sendfile", "req/s"), st.nginx, file_script, None),
    ]
    _warm(st.mirror.url, v2_paths)
    _warm(st.baseline.url, v2_paths)
    for r in range(plan.repeat):
        for t in targets:
            _measure(
                ctx,
                t,
                connections=plan.small_clients,
                seconds=plan.small_seconds,
                name=f"s7-{r}",
            )
        ctx.log(f"  small blobs r{r}: mirror {targets[0].series.values[-1]:.0f} req/s")
    mirror, base, nginx = (t.series for t in targets)
    q = ratio(mirror, base)
    return Outcome(
        7,
        f"{len(blobs):,} x {blobs[0].size // 1024} KiB blobs, warm, "
        f"{plan.small_clients} connections",
        "req/s vs baseline proxy (no number set)",
        [mirror, base, nginx],
        headline=f"{fmt(mirror.median, 'req/s')}, p99 {fmt(mirror.figure('p99 ms'), 'ms')}",
        reference=f"proxy {fmt(base.median, 'req/s')}; nginx {fmt(nginx.median, 'req/s')}",
        ratio=q,
        met=None,
    )
