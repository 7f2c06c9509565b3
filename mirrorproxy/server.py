"""Running the app: check the cache directory, bind, serve until a signal."""

from __future__ import annotations

import logging
import os

from aiohttp import web

from mirrorproxy.app import create_app
from mirrorproxy.config import Config

logger = logging.getLogger(__name__)

ACCESS_LOG_FORMAT = '%a "%r" %s %b %Tfs'


class ServeError(Exception):
    """The server cannot start; the message is for the operator."""


def check_cache_dir(config: Config) -> None:
    path = config.cache.dir
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise ServeError(f"cannot create cache directory {path}: {err.strerror}") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ServeError(f"cache directory {path} is not writable by this user")


def serve(config: Config) -> None:
    """Serve until SIGINT/SIGTERM.

    Raises:
        ServeError: the cache directory is unusable or the address cannot be bound.
    """
    check_cache_dir(config)
    app = create_app(config)
    host, port = config.server.host, config.server.port
    logger.info(
        "mirrorproxy starting on %s, cache %s, namespaces %s",
        config.server.listen,
        config.cache.dir,
        ", ".join(config.namespaces),
    )
    try:
        web.run_app(
            app,
            host=host,
            port=port,
            print=None,
            access_log_format=ACCESS_LOG_FORMAT,
            handler_cancellation=False,
        )
    except OSError as err:
        raise ServeError(
            f"cannot listen on {config.server.listen}: {err.strerror or err}"
        ) from None
