"""Scenario 8: ``[server] workers = 2`` against one worker, on this machine's cores.

A second mirror with ``workers = 2`` runs next to the run's one-worker mirror, each
on a cache of its own. Manifests by tag and small blobs (both warm) are driven by
wrk against both, interleaved in every repetition (A, B, A, B...), so background
load hits both alike; then 30 clients ask the two-worker mirror for one cold blob,
and the upstream's log counts the GETs it caused (one, whichever worker owns it).
"""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

from benchmarks import wrk
from benchmarks.blob_scenarios import MIRROR, BenchError, run_herd
from benchmarks.data import Blob, PushedImage
from benchmarks.plan import MIRROR_AGENT, Context
from benchmarks.rate_scenarios import NS_QUERY, _measure, _Target, _warm
from benchmarks.report import Outcome, Series, fmt, ratio
from benchmarks.stack import BenchMirror
from tests.support.images import MANIFEST_MEDIA_TYPES

WORKERS = 2
HERD_CLIENTS = 30
START_WITHIN = 60.0  # seconds for every worker to listen


def _start_workers_mirror(ctx: Context) -> BenchMirror:
    st = ctx.stack
    mirror = BenchMirror(
        st.root / "mirror-workers",
        st.upstream.url,
        options=[*st.mirror.options, f"server.workers={WORKERS}"],
        log_level=st.mirror.log_level,
        source=st.mirror.source,
    )
    _restart(mirror)
    return mirror


def _restart(mirror: BenchMirror) -> None:
    """Restart on an empty cache and wait until every worker listens (/v2/ answers
    once the first one does; the server logs when all of them do)."""
    said = f"with {WORKERS} workers"
    before = mirror.log_text().count(said)
    mirror.restart(wipe=True)
    deadline = time.monotonic() + START_WITHIN
    while mirror.log_text().count(said) <= before:
        if time.monotonic() > deadline or not mirror.running:
            mirror.stop()
            raise BenchError(f"the {WORKERS}-worker mirror did not start; see {mirror.log_path}")
        time.sleep(0.1)


def workers(ctx: Context, image: PushedImage, blobs: Sequence[Blob], herd_blob: Blob) -> Outcome:
    """Scenario 8: one worker vs ``WORKERS``: manifests and small blobs; a cold herd."""
    st, plan = ctx.stack, ctx.plan
    one = st.mirror
    one.restart(wipe=True)
    many = _start_workers_mirror(ctx)
    try:
        headers = {"Accept": ", ".join(MANIFEST_MEDIA_TYPES)}
        manifest = image.manifest_path + NS_QUERY
        manifest_script = wrk.write_script(st.root / "w-manifest.lua", [manifest], headers)
        small = [b.v2_path() + NS_QUERY for b in blobs]
        small_script = wrk.write_script(st.root / "w-small.lua", small)
        label1, label2 = f"{MIRROR}, 1 worker", f"{MIRROR}, {WORKERS} workers"
        m1, m2 = Series(f"{label1}: manifests", "req/s"), Series(f"{label2}: manifests", "req/s")
        s1, s2 = (
            Series(f"{label1}: small blobs", "req/s"),
            Series(f"{label2}: small blobs", "req/s"),
        )
        for server in (one, many):
            _warm(server.url, [manifest], headers)
            _warm(server.url, small)
        for r in range(plan.repeat):
            for series, server in ((m1, one), (m2, many)):
                t = _Target(series, server, manifest_script, MIRROR_AGENT)
                _measure(
                    ctx,
                    t,
                    connections=plan.manifest_clients,
                    seconds=plan.manifest_seconds,
                    name="",
                )
            for series, server in ((s1, one), (s2, many)):
                t = _Target(series, server, small_script, MIRROR_AGENT)
                _measure(
                    ctx, t, connections=plan.small_clients, seconds=plan.small_seconds, name=""
                )
            ctx.log(
                f"  workers r{r}: manifests {m1.values[-1]:.0f} -> {m2.values[-1]:.0f} req/s,"
                f" small blobs {s1.values[-1]:.0f} -> {s2.values[-1]:.0f} req/s"
            )
        herd = Series(f"{label2}: {HERD_CLIENTS} clients, one cold blob", "s")
        expected = herd_blob.path.read_bytes()
        for _ in range(plan.repeat):
            _restart(many)
            run_herd(
                ctx,
                herd,
                many.url + herd_blob.v2_path(),
                herd_blob,
                expected,
                many.pid,
                MIRROR_AGENT,
            )
    finally:
        many.stop()
    qm, qs = ratio(m2, m1), ratio(s2, s1)
    gets = herd.extras.get("upstream GETs", [])
    bad = herd.extras.get("bad clients", [])
    one_get = bool(gets) and all(g == 1 for g in gets) and all(b == 0 for b in bad)
    return Outcome(
        8,
        f"[server] workers = {WORKERS} vs 1: manifests by tag ({plan.manifest_clients} conns), "
        f"{len(blobs):,} small blobs ({plan.small_clients} conns), warm; cold herd",
        ">= 1.5x one worker for each; herd still 1 upstream GET",
        [m1, m2, s1, s2, herd],
        headline=(
            f"manifests x{fmt(qm or float('nan'))}, small blobs x{fmt(qs or float('nan'))};"
            f" herd {fmt(herd.figure('upstream GETs'))} upstream GET(s)"
        ),
        reference=f"1 worker: {fmt(m1.median, 'req/s')}, {fmt(s1.median, 'req/s')}",
        ratio=qm,
        met=qm is not None and qs is not None and qm >= 1.5 and qs >= 1.5 and one_get,
        notes=[
            f"{WORKERS} workers on a machine of {_cores()} cores, wrk on the same cores;"
            " A/B interleaved in every repetition."
        ],
    )


def _cores() -> int:
    return len(os.sched_getaffinity(0))
