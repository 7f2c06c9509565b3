"""What S3 failures mean to the store: one error type, and the timing of every request.

Any failure that is not "no such object" becomes ``S3StoreError`` (a
``StoreUnavailable``), whatever botocore, aiohttp or the socket raised, and each
request is reported to an ``Observer`` as (operation, seconds, failed): the store's
latency and error metrics, with a small fixed set of operation names.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Callable

import aiohttp
from botocore.exceptions import BotoCoreError, ClientError

from mirrorproxy.cache import StoreUnavailable

MISSING = frozenset({"404", "NoSuchKey", "NotFound", "NoSuchUpload"})
NO_BUCKET = frozenset({"NoSuchBucket"})
REFUSED = frozenset(
    {"403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch", "Forbidden"}
)
TRANSPORT_ERRORS = (BotoCoreError, aiohttp.ClientError, OSError, TimeoutError)

Observer = Callable[[str, float, bool], None]  # (operation, seconds, failed)


def ignore(op: str, seconds: float, failed: bool) -> None:
    return None


def code(err: ClientError) -> str:
    return str(err.response.get("Error", {}).get("Code", "?"))


def missing(err: ClientError) -> bool:
    """Whether S3 answered that the object (or upload) is not there."""
    return code(err) in MISSING


class S3StoreError(StoreUnavailable):
    """The bucket is unreachable, refuses our credentials, or does not exist.

    ``key`` names the ``[storage.s3]`` setting to look at (for the start-up line).
    """

    def __init__(self, message: str, key: str = "endpoint") -> None:
        super().__init__(message)
        self.key = key


@contextlib.asynccontextmanager
async def timed(name: str, where: str, observe: Observer) -> AsyncIterator[None]:
    """Time one request as ``name``; turn its failures into ``S3StoreError`` ("no
    such object" passes through as the ``ClientError`` it is, and is no failure)."""
    began = time.monotonic()
    failed = True
    try:
        yield
        failed = False
    except ClientError as err:
        if missing(err):
            failed = False
            raise
        raise S3StoreError(f"{where}: {name} failed ({code(err)})") from None
    except S3StoreError:
        raise
    except TRANSPORT_ERRORS as err:
        raise S3StoreError(f"{where}: unreachable ({type(err).__name__})") from None
    finally:
        observe(name, time.monotonic() - began, failed)
