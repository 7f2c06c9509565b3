"""Command line: argument parsing and dispatch, nothing else.

Every subcommand returns an exit code; errors a user can fix (bad config, port in
use, unwritable cache) become one line on stderr, never a traceback.
"""

from __future__ import annotations

import argparse
import logging
import sqlite3
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from mirrorproxy import __version__
from mirrorproxy.config import Config, ConfigError, load_config, with_overrides

if TYPE_CHECKING:
    from mirrorproxy.core.reference import ImageRef

EXIT_OK = 0
EXIT_FAIL = 1
EXIT_USAGE = 2


class CliError(Exception):
    """A failure to report as one line with an exit code."""

    def __init__(self, message: str, code: int = EXIT_FAIL) -> None:
        super().__init__(message)
        self.code = code


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
        "--log-level", default="info", choices=["debug", "info", "warning", "error"]
    )
    serve.add_argument("--log-format", default="text", choices=["text", "json"])
    serve.set_defaults(func=_cmd_serve)

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
    hosts.set_defaults(func=_cmd_hosts)

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
    health.set_defaults(func=_cmd_healthcheck)

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
    doctor.set_defaults(func=_cmd_doctor)

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
    preload.set_defaults(func=_cmd_preload)

    images = sub.add_parser("images", help="print the image references found in lists or YAML")
    images.add_argument("sources", nargs="+", metavar="IMAGES", help=sources_help)
    images.set_defaults(func=_cmd_images)

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
        p.set_defaults(func=_cmd_cache)

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
    export.set_defaults(func=_cmd_export)

    import_ = sub.add_parser("import", help="verify an exported tar and add it to the cache")
    import_.add_argument("-c", "--config", required=True, type=Path)
    import_.add_argument("bundle", type=Path, help="a tar written by `mirrorproxy export`")
    import_.add_argument("--cache-dir", help="cache directory (overrides [cache] dir)")
    import_.set_defaults(func=_cmd_import)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
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
    return code


def _flush_logs() -> None:
    """Log lines are written in batches: out with them before the error line."""
    for handler in logging.getLogger().handlers:
        handler.flush()


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _cmd_serve(args: argparse.Namespace) -> int:
    from mirrorproxy.commands.serve import ServeError, serve
    from mirrorproxy.observability.log import configure_logging

    config = with_overrides(
        _load(args), listen=args.listen, cache_dir=args.cache_dir, offline=args.offline
    )
    configure_logging(args.log_level, args.log_format)
    try:
        serve(config)
    except ServeError as err:
        logging.getLogger("mirrorproxy").debug("serve failed", exc_info=True)
        raise CliError(str(err)) from err
    return EXIT_OK


def _cmd_hosts(args: argparse.Namespace) -> int:
    from mirrorproxy.commands.hosts import HostsError, hosts_command

    try:
        return hosts_command(
            _load(args),
            out_dir=args.out,
            mirror_url=args.mirror_url,
            fmt=args.fmt,
            dry_run=args.dry_run,
            stdout=sys.stdout,
            stderr=sys.stderr,
            ca=str(args.ca.absolute()) if args.ca is not None else None,
        )
    except HostsError as err:
        raise CliError(str(err), EXIT_USAGE if err.usage else EXIT_FAIL) from None


def _cmd_healthcheck(args: argparse.Namespace) -> int:
    from mirrorproxy.commands.healthcheck import HealthcheckError, probe, target_server

    try:
        server = target_server(args.config, args.listen, build_parser().parse_args)
        url = probe(server, "/readyz" if args.ready else "/healthz", args.timeout)
    except HealthcheckError as err:
        raise CliError(str(err), EXIT_USAGE if err.usage else EXIT_FAIL) from None
    print(f"healthy: {url}")
    return EXIT_OK


def _cmd_doctor(args: argparse.Namespace) -> int:
    import os

    from mirrorproxy.clientconf.doctor import DoctorError, doctor_command

    try:
        ok = doctor_command(
            config=_load(args) if args.config is not None else None,
            containerd_config=args.containerd_config,
            hosts_dir=args.hosts_dir,
            mirror_url=args.mirror_url,
            registries_conf=args.registries_conf,
            environ={
                k: os.environ[k] for k in ("HOME", "CONTAINERS_REGISTRIES_CONF") if k in os.environ
            },
            systemd_dirs=args.systemd_dir,
            proc_dir=args.proc_dir,
            stdout=sys.stdout,
        )
    except DoctorError as err:
        raise CliError(str(err), EXIT_USAGE) from None
    return EXIT_OK if ok else EXIT_FAIL


def _cmd_cache(args: argparse.Namespace) -> int:
    from mirrorproxy.commands import cache as cachecmd
    from mirrorproxy.core.units import parse_duration, parse_size

    config = with_overrides(_load(args), cache_dir=args.cache_dir)
    action = args.cache_command
    try:
        if action == "ls":
            return cachecmd.cmd_ls(config, args.namespace, sys.stdout)
        if action == "du":
            return cachecmd.cmd_du(config, sys.stdout)
        if action == "verify":
            return cachecmd.cmd_verify(config, sys.stdout)
        if args.older_than is None and args.to_size is None:
            raise CliError("cache prune: give --older-than and/or --to", EXIT_USAGE)
        try:
            older = parse_duration(args.older_than) if args.older_than is not None else None
            to_size = parse_size(args.to_size) if args.to_size is not None else None
        except ValueError as err:
            raise CliError(f"cache prune: {err}", EXIT_USAGE) from None
        return cachecmd.cmd_prune(config, older_than=older, to_size=to_size, out=sys.stdout)
    except (OSError, sqlite3.Error) as err:
        raise CliError(f"cache {action}: {err}") from None


def _read_images(sources: Sequence[str], keep_going: bool) -> tuple[list[ImageRef], bool]:
    """The references in ``sources``, and whether any line was bad (each one reported)."""
    from mirrorproxy.commands.imagelists import read_sources

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


def _cmd_images(args: argparse.Namespace) -> int:
    from mirrorproxy.commands.imagelists import read_sources

    found = read_sources(args.sources, sys.stdin)
    for ref in found.refs:
        print(ref)
    for problem in found.problems:
        print(f"mirrorproxy: {problem}", file=sys.stderr)
    return EXIT_FAIL if found.problems else EXIT_OK


def _cmd_preload(args: argparse.Namespace) -> int:
    import asyncio

    from rich.console import Console

    from mirrorproxy.commands.preload import ImageState, Options, Totals, describe, preload
    from mirrorproxy.commands.progress import LineReporter, TerminalReporter
    from mirrorproxy.observability.log import configure_logging
    from mirrorproxy.observability.metrics import Metrics
    from mirrorproxy.pullthrough.engine import Engine

    configure_logging("error" if sys.stdout.isatty() else "warning", "text")
    # Preloading means fetching: a config marked offline for serving is fine here.
    config = with_overrides(_load(args), cache_dir=args.cache_dir, offline=False)
    refs, bad_lines = _read_images(args.sources, args.keep_going)
    images = [ImageState(ref) for ref in refs]
    options = Options(
        tuple(args.platform), args.all_platforms, args.jobs, referrers=args.referrers
    )
    totals = Totals()

    async def run() -> None:
        async with Engine(config, Metrics()) as engine:
            if not sys.stdout.isatty():
                await preload(engine, images, options, LineReporter(sys.stdout), totals)
                return
            with TerminalReporter(Console(highlight=False)) as reporter:
                await preload(engine, images, options, reporter, totals)

    try:
        asyncio.run(run())
    except OSError as err:
        raise CliError(f"preload: {err}") from None
    for line in describe(images, totals):
        print(line)
    failed = [i for i in images if i.state != "done"]
    for image in failed:
        print(f"failed: {image.ref}: {image.error}", file=sys.stderr)
    return EXIT_FAIL if failed or bad_lines else EXIT_OK


def _warn(line: str) -> None:
    print(f"mirrorproxy: warning: {line}", file=sys.stderr)


def _cmd_export(args: argparse.Namespace) -> int:
    from mirrorproxy.bundle import BundleError
    from mirrorproxy.bundle.export import describe, export_bundle

    config = with_overrides(_load(args), cache_dir=args.cache_dir)
    refs, bad_lines = None, False
    if args.images is not None:
        refs, bad_lines = _read_images(args.images, args.keep_going)
    try:
        result = export_bundle(config.cache.dir, args.out, refs, keep_going=args.keep_going)
    except (BundleError, OSError) as err:
        raise CliError(f"export: {err}") from None
    lines, warnings = describe(result, args.out)
    for line in warnings:
        _warn(line)
    for line in lines:
        print(line)
    return EXIT_FAIL if bad_lines or (refs is not None and result.left_out) else EXIT_OK


def _cmd_import(args: argparse.Namespace) -> int:
    from mirrorproxy.bundle import BundleError
    from mirrorproxy.bundle.importer import import_bundle
    from mirrorproxy.core.units import format_size

    config = with_overrides(_load(args), cache_dir=args.cache_dir)
    try:
        result = import_bundle(config, args.bundle, warn=_warn)
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
