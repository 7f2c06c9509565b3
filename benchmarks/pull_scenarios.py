"""Scenario 6: ``ctr images pull`` of a many-layer image, as a node would pull it.

A private containerd (``tests/support/procs.Containerd``) pulls ``docker.io/<repo>``
through hosts.toml files that name the mirror, the baseline proxy, or the upstream
itself as the only host. Before each pull the image and its content are removed
(``ctr images rm --sync``), so every pull fetches and unpacks every layer; cold
and warm refer to the cache in front of the upstream.
"""

from __future__ import annotations

import os
from pathlib import Path

from benchmarks.blob_scenarios import BASELINE, MIRROR, BenchError
from benchmarks.data import PushedImage
from benchmarks.measure import Meter, run_measured
from benchmarks.plan import Context
from benchmarks.report import Outcome, Series, fmt
from benchmarks.stack import NAMESPACE, restart_registry
from tests.support.procs import CTR_ENV_OVERRIDES, Containerd, ctr_rm, write_hosts_toml

# Every mirror failing makes ctr fall back to `server`; with the proxies of
# CTR_ENV_OVERRIDES that fallback dies at once instead of leaving the machine.
FALLBACK_SERVER = "https://registry-1.docker.io"


def _hosts_dir(root: Path, name: str, url: str) -> Path:
    hosts = root / "certs.d" / name
    write_hosts_toml(hosts, NAMESPACE, FALLBACK_SERVER, url)
    return hosts


def _pull(
    ctx: Context, ctd: Containerd, ref: str, hosts: Path, series: Series, pid: int | None
) -> None:
    """Pull ``ref`` from nothing and record its wall time and ctr's CPU."""
    rm = ctr_rm(ctd, ref)
    if rm.returncode != 0 and "not found" not in rm.stderr:
        raise BenchError(f"ctr images rm {ref}: {rm.stderr}")
    argv = ["ctr", "--address", ctd.address, "images", "pull", "--hosts-dir", str(hosts), ref]
    with Meter(pid) as meter:
        done = run_measured(argv, env=os.environ | CTR_ENV_OVERRIDES, timeout=600)
    if done.returncode != 0:
        raise BenchError(f"ctr pull {ref} via {hosts} failed:\n{done.stderr[-2000:]}")
    series.add(done.usage.wall, client=done.usage.cores, server=meter.server.cores)


def containerd_pull(ctx: Context, image: PushedImage) -> Outcome:
    """Scenario 6: cold and warm pulls through the mirror and the baseline; direct pulls."""
    st = ctx.stack
    ref = f"{NAMESPACE}/{image.repo}:{image.tag}"
    n_layers = len(image.image.blobs) - 1
    size_mib = image.image.total_size() / (1024 * 1024)
    m_cold, m_warm = Series(f"{MIRROR} cold", "s"), Series(f"{MIRROR} warm", "s")
    b_cold, b_warm = Series(f"{BASELINE} cold", "s"), Series(f"{BASELINE} warm", "s")
    direct = Series("upstream docker-registry (direct)", "s")
    with Containerd() as ctd:
        for r in range(ctx.plan.repeat):
            st.mirror.restart(wipe=True)
            hosts = _hosts_dir(st.root, f"mirror{r}", st.mirror.url)
            with ctx.profiled(f"s6-cold-{r}"):
                _pull(ctx, ctd, ref, hosts, m_cold, st.mirror.pid)
            with ctx.profiled(f"s6-warm-{r}"):
                _pull(ctx, ctd, ref, hosts, m_warm, st.mirror.pid)
            restart_registry(st.baseline, wipe=True)
            hosts = _hosts_dir(st.root, f"baseline{r}", st.baseline.url)
            _pull(ctx, ctd, ref, hosts, b_cold, st.baseline.pid)
            _pull(ctx, ctd, ref, hosts, b_warm, st.baseline.pid)
            hosts = _hosts_dir(st.root, "upstream", st.upstream.url)
            _pull(ctx, ctd, ref, hosts, direct, st.upstream.pid)
            cold, warm = m_cold.values[-1], m_warm.values[-1]
            ctx.log(f"  ctr r{r}: mirror cold {cold:.2f} s, warm {warm:.2f} s")
        ctr_rm(ctd, ref)
    speedup = b_warm.median / m_warm.median if m_warm.values and b_warm.values else None
    return Outcome(
        6,
        f"ctr pull, {n_layers} layers ({size_mib:.0f} MiB)",
        "cold and warm vs baseline and direct (no number set)",
        [m_cold, m_warm, b_cold, b_warm, direct],
        headline=f"cold {fmt(m_cold.median, 's')}, warm {fmt(m_warm.median, 's')}",
        reference=(
            f"proxy cold {fmt(b_cold.median, 's')}, warm {fmt(b_warm.median, 's')}; "
            f"direct {fmt(direct.median, 's')}"
        ),
        ratio=speedup,
        met=None,
        notes=[
            "ratio: proxy warm time / mirror warm time (above 1: the mirror is faster); "
            "client CPU is ctr's; every pull also unpacks in containerd"
        ],
    )
