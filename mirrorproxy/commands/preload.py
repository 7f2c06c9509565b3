"""``mirrorproxy preload``: the verb around ``prefetch``.

It reads the image lists, runs the fetch with a live display on a terminal (plain
lines elsewhere), prints the run's report and turns the outcome into an exit code:
1 when an image failed or a line of the lists was bad. Fetching is ``prefetch``'s;
drawing is ``progress``'s.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections import Counter
from collections.abc import Sequence

from rich.console import Console

from mirrorproxy.commands.errors import EXIT_FAIL, EXIT_OK, CliError
from mirrorproxy.commands.images import read_images
from mirrorproxy.commands.prefetch import ImageState, Options, Totals, preload
from mirrorproxy.commands.progress import LineReporter, TerminalReporter
from mirrorproxy.config import load_config, with_overrides
from mirrorproxy.core.units import format_size
from mirrorproxy.observability.log import configure_logging
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.pullthrough.engine import Engine


def run(args: argparse.Namespace) -> int:
    """Preload the listed images; exit 1 if any failed or a line was bad."""
    configure_logging("error" if sys.stdout.isatty() else "warning", "text")
    # Preloading means fetching: a config marked offline for serving is fine here.
    config = with_overrides(load_config(args.config), cache_dir=args.cache_dir, offline=False)
    refs, bad_lines = read_images(args.sources, args.keep_going)
    images = [ImageState(ref) for ref in refs]
    options = Options(
        tuple(args.platform), args.all_platforms, args.jobs, referrers=args.referrers
    )
    totals = Totals()

    async def fetch_all() -> None:
        async with Engine(config, Metrics()) as engine:
            if not sys.stdout.isatty():
                await preload(engine, images, options, LineReporter(sys.stdout), totals)
                return
            with TerminalReporter(Console(highlight=False)) as reporter:
                await preload(engine, images, options, reporter, totals)

    try:
        asyncio.run(fetch_all())
    except OSError as err:
        raise CliError(f"preload: {err}") from None
    for line in describe(images, totals):
        print(line)
    failed = [i for i in images if i.state != "done"]
    for image in failed:
        print(f"failed: {image.ref}: {image.error}", file=sys.stderr)
    return EXIT_FAIL if failed or bad_lines else EXIT_OK


def describe(images: Sequence[ImageState], totals: Totals) -> list[str]:
    """The run's report: images complete, bytes from upstream and cached, what was left out."""
    done = sum(1 for i in images if i.state == "done")
    failed = f"; {len(images) - done} failed" if done < len(images) else ""
    lines = [
        f"preloaded {done} of {len(images)} images{failed}",
        f"from upstream: {totals.blobs_fetched} blobs ({format_size(totals.bytes_fetched)}), "
        f"{totals.manifests_fetched} manifests",
        f"already cached: {totals.blobs_cached} blobs ({format_size(totals.bytes_cached)})",
    ]
    if totals.referrers:
        lines.append(f"with {totals.referrers} referrers (signatures, SBOMs)")
    by_why: dict[str, Counter[str]] = {}
    for (platform, why), n in totals.left_out.items():
        by_why.setdefault(why, Counter())[platform] += n
    for why, platforms in sorted(by_why.items()):
        which = ", ".join(f"{p} x{n}" for p, n in sorted(platforms.items()))
        lines.append(f"left out {sum(platforms.values())} platform manifests ({which}): {why}")
    return lines
