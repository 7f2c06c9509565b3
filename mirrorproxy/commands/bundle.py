"""``mirrorproxy export`` and ``mirrorproxy import``: the flags to ``bundle``'s work,
its report to the terminal, its errors to one line and an exit code.

The bundle format, its verification and the cache writes live in ``bundle``.
"""

from __future__ import annotations

import argparse
import sqlite3

from mirrorproxy.bundle import BundleError
from mirrorproxy.bundle.export import describe, export_bundle
from mirrorproxy.bundle.importer import import_bundle
from mirrorproxy.commands.errors import EXIT_FAIL, EXIT_OK, CliError, warn
from mirrorproxy.commands.images import read_images
from mirrorproxy.config import load_config, with_overrides
from mirrorproxy.core.reference import ImageRef
from mirrorproxy.core.units import format_size


def run_export(args: argparse.Namespace) -> int:
    """Write the cached images (all tags, or ``--images``) to the tar ``--out``."""
    config = with_overrides(load_config(args.config), cache_dir=args.cache_dir)
    refs: list[ImageRef] | None = None
    bad_lines = False
    if args.images is not None:
        refs, bad_lines = read_images(args.images, args.keep_going)
    try:
        result = export_bundle(config.cache.dir, args.out, refs, keep_going=args.keep_going)
    except (BundleError, OSError) as err:
        raise CliError(f"export: {err}") from None
    lines, warnings = describe(result, args.out)
    for line in warnings:
        warn(line)
    for line in lines:
        print(line)
    return EXIT_FAIL if bad_lines or (refs is not None and result.left_out) else EXIT_OK


def run_import(args: argparse.Namespace) -> int:
    """Verify the bundle whole, then add it to the cache; nothing is added if it fails."""
    config = with_overrides(load_config(args.config), cache_dir=args.cache_dir)
    try:
        result = import_bundle(config, args.bundle, warn=warn)
    except BundleError as err:
        raise CliError(f"import: {err}; nothing was imported") from None
    except (OSError, sqlite3.Error) as err:
        raise CliError(f"import: {err}") from None
    partial = (
        f" ({result.not_in_bundle} platform manifests were not in the bundle)"
        if result.not_in_bundle
        else ""
    )
    print(
        f"added {result.blobs} blobs ({format_size(result.blob_bytes)}), "
        f"{result.manifests} manifests, {result.tags} tags; "
        f"{result.present} already present{partial}"
    )
    return EXIT_OK
