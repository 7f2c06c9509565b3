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

from mirrorproxy import __version__
from mirrorproxy.config import Config, ConfigError, load_config, with_overrides

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

    hosts = sub.add_parser("hosts", help="write containerd hosts.toml files for the mirror")
    hosts.add_argument("-c", "--config", required=True, type=Path)
    hosts.add_argument("--out", type=Path, help="certs.d directory, e.g. /etc/containerd/certs.d")
    hosts.add_argument("--mirror-url", help="URL containerd uses to reach the mirror")
    hosts.add_argument("--format", dest="fmt", default="containerd", choices=["containerd", "k3s"])
    hosts.add_argument("--dry-run", action="store_true", help="print the files, write nothing")
    hosts.set_defaults(func=_cmd_hosts)

    doctor = sub.add_parser("doctor", help="check a node's containerd config for known traps")
    doctor.add_argument(
        "--containerd-config", type=Path, default=Path("/etc/containerd/config.toml")
    )
    doctor.add_argument("--hosts-dir", type=Path, help="default: config_path from config.toml")
    doctor.add_argument("--mirror-url", help="the mirror the node should use")
    doctor.set_defaults(func=_cmd_doctor)

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
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        code: int = args.func(args)
    except ConfigError as err:
        print(f"mirrorproxy: config error: {err}", file=sys.stderr)
        return EXIT_USAGE
    except CliError as err:
        print(f"mirrorproxy: {err}", file=sys.stderr)
        return err.code
    except KeyboardInterrupt:
        return 130
    return code


def _load(args: argparse.Namespace) -> Config:
    return load_config(args.config)


def _cmd_serve(args: argparse.Namespace) -> int:
    from mirrorproxy.log import configure_logging
    from mirrorproxy.server import ServeError, serve

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
    from mirrorproxy.hoststoml import hosts_command

    return hosts_command(
        _load(args),
        out_dir=args.out,
        mirror_url=args.mirror_url,
        fmt=args.fmt,
        dry_run=args.dry_run,
        stdout=sys.stdout,
    )


def _cmd_doctor(args: argparse.Namespace) -> int:
    from mirrorproxy.doctor import doctor_command

    return doctor_command(
        containerd_config=args.containerd_config,
        hosts_dir=args.hosts_dir,
        mirror_url=args.mirror_url,
        stdout=sys.stdout,
    )


def _cmd_cache(args: argparse.Namespace) -> int:
    from mirrorproxy import cachecmd
    from mirrorproxy.units import parse_duration, parse_size

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
