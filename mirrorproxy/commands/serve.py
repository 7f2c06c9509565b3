"""``mirrorproxy serve``: check the cache directory, bind, serve until a signal."""

from __future__ import annotations

import argparse
import logging
import os

from mirrorproxy.cache import StoreUnavailable
from mirrorproxy.commands.errors import EXIT_OK, CliError
from mirrorproxy.config import Config, load_config, with_overrides
from mirrorproxy.http import listener
from mirrorproxy.http.accesslog import AccessLogger
from mirrorproxy.http.app import create_app
from mirrorproxy.http.observability import MetricsListenError

logger = logging.getLogger(__name__)


class ServeError(Exception):
    """The server cannot start; the message is for the operator."""


def run(args: argparse.Namespace) -> int:
    """The ``serve`` verb: the config with the flags' overrides, logging, then serve."""
    from mirrorproxy.observability.log import configure_logging

    config = with_overrides(
        load_config(args.config),
        listen=args.listen,
        cache_dir=args.cache_dir,
        offline=args.offline,
        workers=args.workers,
    )
    workers = config.server.workers > 1
    configure_logging(args.log_level, args.log_format, worker="main" if workers else None)
    try:
        if workers:
            serve_workers(config, log_level=args.log_level, log_format=args.log_format)
        else:
            serve(config)
    except ServeError as err:
        logging.getLogger("mirrorproxy").debug("serve failed", exc_info=True)
        raise CliError(str(err)) from err
    return EXIT_OK


def check_cache_dir(config: Config) -> None:
    path = config.cache.dir
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ServeError(f"cannot create cache directory {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ServeError(f"cache directory {path} is not writable by this user")


def store_problem(config: Config, err: StoreUnavailable) -> str:
    """One line for a content store that cannot be used at start, naming the file
    and the ``[storage.s3]`` key to look at."""
    key = getattr(err, "key", None)
    where = f"storage.s3.{key}" if config.storage.s3 is not None and key else "storage"
    return f"{config.source}: {where}: {err}"


def serve(config: Config) -> None:
    """Serve until SIGINT/SIGTERM.

    Raises:
        ServeError: the cache directory or the content store is unusable, or the
            address cannot be bound.
    """
    check_cache_dir(config)
    app = create_app(config)
    s3 = config.storage.s3
    logger.info(
        "mirrorproxy starting on %s, cache %s, namespaces %s%s",
        config.server.listen,
        config.cache.dir if s3 is None else f"s3 bucket {s3.bucket!r} at {s3.endpoint}",
        ", ".join(config.namespaces),
        "; OFFLINE: serving only what is cached, never contacting upstreams"
        if config.cache.offline
        else "",
    )
    try:
        # web.run_app's job, with [server]'s TLS, connection cap and parser limits.
        listener.run(
            app,
            config.server,
            access_log_class=AccessLogger,
            handler_cancellation=False,
        )
    except MetricsListenError as err:
        raise ServeError(str(err)) from None
    except StoreUnavailable as err:
        raise ServeError(store_problem(config, err)) from None
    except OSError as err:
        raise ServeError(
            f"cannot listen on {config.server.listen}: {err.strerror or err}"
        ) from None


def serve_workers(config: Config, *, log_level: str, log_format: str) -> None:
    """Serve with ``[server] workers`` processes until SIGINT/SIGTERM (see ``workers``).

    Raises:
        ServeError: the cache directory or the address is unusable, or the workers
            could not be started or kept running.
    """
    from mirrorproxy.commands.workers import Workers, WorkersError

    check_cache_dir(config)
    logger.info(
        "mirrorproxy starting %d workers on %s, cache %s, namespaces %s%s",
        config.server.workers,
        config.server.listen,
        config.cache.dir,
        ", ".join(config.namespaces),
        "; OFFLINE" if config.cache.offline else "",
    )
    try:
        Workers(config, log_level=log_level, log_format=log_format).run()
    except WorkersError as err:
        raise ServeError(str(err)) from None
    except OSError as err:
        raise ServeError(
            f"cannot listen on {config.server.listen}: {err.strerror or err}"
        ) from None
