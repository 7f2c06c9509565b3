"""``mirrorproxy images``, and the image lists every verb reads the same way.

``preload`` and ``export --images`` share ``read_images``: every bad line is
reported, then the command stops unless told to go on with the good ones.
The parsing itself lives in ``imagelists``.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from mirrorproxy.commands.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError
from mirrorproxy.commands.imagelists import read_sources
from mirrorproxy.core.reference import ImageRef


def run(args: argparse.Namespace) -> int:
    """Print the references found, one a line; exit 1 if any line was bad."""
    found = read_sources(args.sources, sys.stdin)
    for ref in found.refs:
        print(ref)
    for problem in found.problems:
        print(f"mirrorproxy: {problem}", file=sys.stderr)
    return EXIT_FAIL if found.problems else EXIT_OK


def read_images(sources: Sequence[str], keep_going: bool) -> tuple[list[ImageRef], bool]:
    """The references in ``sources``, and whether any line was bad (each one reported).

    Raises:
        CliError: a bad line without ``keep_going``, or no reference at all.
    """
    found = read_sources(sources, sys.stdin)
    for problem in found.problems:
        print(f"mirrorproxy: {problem}", file=sys.stderr)
    n = len(found.problems)
    if n and not keep_going:
        raise CliError(
            f"{n} bad {'line' if n == 1 else 'lines'}, nothing done "
            "(fix them, or --keep-going to go on with the good ones)",
            EXIT_USAGE,
        )
    if not found.refs:
        raise CliError(f"no image references in {' '.join(sources)}", EXIT_USAGE)
    return found.refs, bool(n)
