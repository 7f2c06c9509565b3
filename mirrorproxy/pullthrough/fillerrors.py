"""How a failed download is told: its log line and metric, its clients' message, and
the error for a client still waiting for the response headers."""

from __future__ import annotations

import asyncio
import logging

from mirrorproxy.cache.blobs import CacheWriteError, DigestMismatch
from mirrorproxy.config import Namespace
from mirrorproxy.core.errors import BadGateway, BlobUnknown, RegistryError
from mirrorproxy.core.oci import Digest
from mirrorproxy.observability.metrics import Metrics
from mirrorproxy.upstream.client import UpstreamClient, UpstreamError, UpstreamResponse

logger = logging.getLogger(__name__)


def log_failure(
    metrics: Metrics,
    namespace: str,
    digest: Digest,
    err: BaseException,
    resp: UpstreamResponse | None,
) -> None:
    """Log a failed download once, at the level its cause deserves, and count it."""
    endpoint = resp.upstream.url if resp is not None else "-"
    if isinstance(err, DigestMismatch):
        metrics.digest_mismatches.labels(namespace).inc()
        logger.error("blob %s from %s discarded: %s", digest, endpoint, err)
    elif isinstance(err, CacheWriteError):
        metrics.cache_write_errors.inc()
        logger.error("blob %s: cache write failed: %s", digest, err)
    elif isinstance(err, UpstreamError | RegistryError):
        logger.warning("blob %s: %s", digest, err)
    elif not isinstance(err, asyncio.CancelledError):
        logger.error("blob %s: download from %s failed: %r", digest, endpoint, err)


def describe(err: BaseException) -> str:
    """Why a download failed, for the clients it cuts."""
    if isinstance(err, DigestMismatch):
        return f"the download failed verification ({err})"
    if isinstance(err, asyncio.CancelledError):
        return "the download was stopped"
    return str(err) or type(err).__name__


def client_error(err: BaseException, what: str) -> Exception:
    """What a client waiting for the response headers is told."""
    if isinstance(err, UpstreamError):
        return err.registry_error(BlobUnknown)
    if isinstance(err, RegistryError):
        return err
    return BadGateway(f"could not fetch {what}: {err}")


def check_resumed(
    resp: UpstreamResponse, size: int | None, digest: Digest, client: UpstreamClient, ns: Namespace
) -> None:
    """A resumed response must be the rest of the same blob: the same total size.

    Raises:
        BadGateway: the endpoint announces another size (and is cooled down).
    """
    total = resp.total
    if None not in (size, total) and total != size:
        client.mark_failed(ns, resp.upstream)
        raise BadGateway(
            f"{resp.upstream.url} has {total} bytes for blob {digest},"
            f" not the {size} the download started with"
        )
