"""Command line: argument parsing and dispatch, nothing else.

Every subcommand returns an exit code; errors a user can fix (bad config, port in
use, unwritable cache) become one line on stderr, never a traceback. Each verb's
work lives in ``mirrorproxy.commands``, imported only when that verb runs (so
``healthcheck`` and ``--version`` stay quick).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from mirrorproxy import __version__
from mirrorproxy.commands.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError
from mirrorproxy.config import ConfigError

__all__ = ["EXIT_FAIL", "EXIT_OK", "EXIT_USAGE", "CliError", "build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="mirrorproxy", description="A pull-through OCI registry mirror for containerd."
    )
    parser.add_argument("--version", action="version", version=f"mirrorproxy {__version__}")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    serve = sub.add_parser("serve", help="run the mirror")
    serve.add_argument("-c", "--config", required=True, type=Path, help="config file (TOML)")
    serve.add_argument("--listen", help="HOST:PORT to listen on (overrides [server] listen)")
    serve.add_argument("--cache-dir", help="cache directory (overrides [cache] dir)")
    serve.add_argument(
        "--offline",
        action="store_true",
        default=None,
        help="never contact upstreams; serve only what is cached (overrides [cache] offline)",
    )
    serve.add_argument(
        "--workers",
        metavar="N|auto",
        help='serving processes on the one address ("auto": one per core; overrides'
        " [server] workers)",
    )
    serve.add_argument(
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    serve.add_argument("--log-format", default="text", choices=["text", "json"])

    hosts = sub.add_parser("hosts", help="write the client configuration that uses the mirror")
    hosts.add_argument("-c", "--config", required=True, type=Path)
    hosts.add_argument(
        "--out",
        type=Path,
        help="containerd: certs.d directory, e.g. /etc/containerd/certs.d; "
        "registries-conf: the drop-in file (default: print it)",
    )
    hosts.add_argument("--mirror-url", help="URL clients use to reach the mirror")
    hosts.add_argument(
        "--format",
        dest="fmt",
        default="containerd",
        choices=["containerd", "k3s", "registries-conf", "docker"],
        help="containerd hosts.toml, k3s registries.yaml, containers-registries.conf "
        "(podman, skopeo, CRI-O) or Docker's daemon.json",
    )
    hosts.add_argument("--dry-run", action="store_true", help="print the files, write nothing")
    hosts.add_argument(
        "--ca", type=Path, help="CA file (on the node) that signed an https mirror's certificate"
    )
    hosts.add_argument(
        "--auth-user", help="k3s: the user the node logs in to the mirror as ([server.auth])"
    )
    hosts.add_argument(
        "--auth-password-file",
        type=Path,
        help="k3s: file holding that user's password (kept off the command line)",
    )

    health = sub.add_parser(
        "healthcheck",
        help="probe the running server's /healthz (for HEALTHCHECK, exec probes, scripts)",
        description=(
            "Probe /healthz (or /readyz) of the running server and exit 0 if it answers 200. "
            "Without --config and --listen, the one running `mirrorproxy serve` process is "
            "found and its own --listen or config is used."
        ),
    )
    health.add_argument("-c", "--config", type=Path, help="the server's config file")
    health.add_argument("--listen", help="HOST:PORT the server listens on (overrides the config)")
    health.add_argument("--ready", action="store_true", help="probe /readyz instead of /healthz")
    health.add_argument("--timeout", type=float, default=3.0, help="seconds (default 3)")

    doctor = sub.add_parser("doctor", help="check a node's client configuration for known traps")
    doctor.add_argument(
        "--containerd-config", type=Path, default=Path("/etc/containerd/config.toml")
    )
    doctor.add_argument("--hosts-dir", type=Path, help="default: config_path from config.toml")
    doctor.add_argument("--mirror-url", help="the mirror the node should use")
    doctor.add_argument(
        "-c", "--config", type=Path, help="the mirror's config: its namespaces and listen address"
    )
    doctor.add_argument(
        "--registries-conf",
        type=Path,
        help="registries.conf to check, with its .d directory "
        "(default: $CONTAINERS_REGISTRIES_CONF or /etc/containers/registries.conf)",
    )
    doctor.add_argument(
        "--systemd-dir",
        type=Path,
        action="append",
        help="unit directory to read containerd's and CRI-O's environment from (repeatable)",
    )
    doctor.add_argument("--proc-dir", type=Path, default=Path("/proc"), help="default: /proc")

    sources_help = (
        "image list (one reference a line), Kubernetes YAML file or directory, "
        "or - for standard input"
    )
    keep_going_help = "after reporting every bad line, go on with the good ones (then exit 1)"
    preload = sub.add_parser("preload", help="fetch images into the cache")
    preload.add_argument("-c", "--config", required=True, type=Path)
    preload.add_argument("sources", nargs="+", metavar="IMAGES", help=sources_help)
    preload.add_argument(
        "--platform",
        action="append",
        default=[],
        help="os/arch[/variant] to fetch from an index (repeatable; default: this host's)",
    )
    preload.add_argument("--all-platforms", action="store_true")
    preload.add_argument(
        "--no-referrers",
        dest="referrers",
        action="store_false",
        help="skip the images' referrers (signatures, SBOMs: fetched by default)",
    )
    preload.add_argument("--jobs", type=int, default=4, help="images fetched at once")
    preload.add_argument("--keep-going", action="store_true", help=keep_going_help)
    preload.add_argument("--cache-dir", help="cache directory (overrides [cache] dir)")

    images = sub.add_parser("images", help="print the image references found in lists or YAML")
    images.add_argument("sources", nargs="+", metavar="IMAGES", help=sources_help)

    cache = sub.add_parser("cache", help="inspect and maintain the cache (safe while serving)")
    cache_sub = cache.add_subparsers(dest="cache_command", required=True, metavar="ACTION")
    for name, help_text in (
        ("ls", "cached tags: repository, tag, digest, size, last use"),
        ("du", "bytes per namespace"),
        ("verify", "re-hash every entry; quarantine mismatches (exit 1 if any)"),
        ("prune", "remove entries unused for a while, or down to a size"),
    ):
        p = cache_sub.add_parser(name, help=help_text)
        p.add_argument("-c", "--config", required=True, type=Path)
        p.add_argument("--cache-dir", help="cache directory (overrides [cache] dir)")
        if name == "ls":
            p.add_argument("--namespace", help="only this registry, e.g. docker.io")
        if name == "prune":
            p.add_argument("--older-than", help="last used longer ago than this, e.g. 30d")
            p.add_argument("--to", dest="to_size", help="remove LRU entries down to this size")

    export = sub.add_parser("export", help="write cached images to an OCI image-layout tar")
    export.add_argument("-c", "--config", required=True, type=Path)
    export.add_argument("--out", required=True, type=Path, help="the tar to write, e.g. site.tar")
    export.add_argument(
        "--images",
        action="append",
        metavar="IMAGES",
        help=f"only these images (repeatable; default: every cached tag): {sources_help}",
    )
    export.add_argument("--keep-going", action="store_true", help=keep_going_help)
    export.add_argument("--cache-dir", help="cache directory (overrides [cache] dir)")

    import_ = sub.add_parser("import", help="verify an exported tar and add it to the cache")
    import_.add_argument("-c", "--config", required=True, type=Path)
    import_.add_argument("bundle", type=Path, help="a tar written by `mirrorproxy export`")
    import_.add_argument("--cache-dir", help="cache directory (overrides [cache] dir)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return _dispatch(args)
    except ConfigError as err:
        _flush_logs()
        print(f"mirrorproxy: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as err:
        _flush_logs()
        print(f"mirrorproxy: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130


def _dispatch(args: argparse.Namespace) -> int:
    """Run the verb ``args.command`` names, importing its module only now."""
    match args.command:
        case "serve":
            from mirrorproxy.commands import serve

            return serve.run(args)
        case "hosts":
            from mirrorproxy.commands import hosts

            return hosts.run(args)
        case "healthcheck":
            from mirrorproxy.commands import healthcheck

            return healthcheck.run(args, build_parser().parse_args)
        case "doctor":
            from mirrorproxy.commands import doctor

            return doctor.run(args)
        case "preload":
            from mirrorproxy.commands import preload

            return preload.run(args)
        case "images":
            from mirrorproxy.commands import images

            return images.run(args)
        case "cache":
            from mirrorproxy.commands import cache

            return cache.run(args)
        case "export":
            from mirrorproxy.commands import bundle

            return bundle.run_export(args)
        case "import":
            from mirrorproxy.commands import bundle

            return bundle.run_import(args)
    raise AssertionError(f"no verb {args.command!r}")  # argparse admits only the above


def _flush_logs() -> None:
    """Log lines are written in batches: out with them before the error line."""
    for handler in logging.getLogger().handlers:
        handler.flush()
