"""One S3 client on a private event loop, usable from any loop and from blocking code.

The cache's Protocols mix coroutines (the request path) with blocking methods
(maintenance, import, the command line). An aiobotocore client belongs to the loop
it was made on, so this one gets its own loop in a thread: coroutines hand their
calls over with ``call``, blocking code with ``run``. The secret key goes to the
client and nowhere else.

Every request is timed and reported to ``observe`` (op, seconds, failed), and every
failure that is not "no such object" becomes ``S3StoreError`` (a
``StoreUnavailable``), so callers see one kind of error whatever botocore,
aiohttp or the socket raised. Timeouts are short and retries few: a bucket that is
down must make requests fail in seconds, not hang.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import os
import threading
import time
from collections.abc import AsyncGenerator, Coroutine
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Any, TypeVar

from aiobotocore.config import AioConfig
from aiobotocore.session import get_session
from botocore.exceptions import ClientError
from types_aiobotocore_s3 import S3Client

from mirrorproxy.cache.s3errors import NO_BUCKET, REFUSED, TRANSPORT_ERRORS, Observer, timed
from mirrorproxy.cache.s3errors import S3StoreError as S3StoreError
from mirrorproxy.cache.s3errors import code as _code
from mirrorproxy.cache.s3errors import ignore as _ignore
from mirrorproxy.cache.s3errors import missing as missing
from mirrorproxy.config import S3Config

T = TypeVar("T")

MIB = 1024 * 1024
PART_SIZE = 16 * MIB  # bytes per multipart part (S3's minimum is 5 MiB)
CONNECT_TIMEOUT = 3.0  # seconds to connect to the endpoint
READ_TIMEOUT = 10.0  # seconds a response may go silent
ATTEMPTS = 2  # tries per request (botocore's "standard" retries, with backoff)


class S3Connection:
    """The client, its loop and its thread; ``close`` releases all three."""

    def __init__(
        self, config: S3Config, *, part_size: int = PART_SIZE, observe: Observer = _ignore
    ) -> None:
        self.config = config
        self.part_size = part_size
        self.observe = observe
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="s3", daemon=True)
        self._thread.start()
        self._exit = AsyncExitStack()
        # A CA bundle the environment names but that cannot be read must not stop
        # the client (None: botocore's own lookup, which reads AWS_CA_BUNDLE).
        bundle = os.environ.get("AWS_CA_BUNDLE")
        self._verify: bool | None = True if bundle and not Path(bundle).is_file() else None
        self.client: S3Client = self.run(self._open())
        self._closed = False

    async def _open(self) -> S3Client:
        c = self.config
        plain = c.endpoint.startswith("http://")
        aio = AioConfig(
            signature_version="s3v4",  # presigned URLs need it
            s3={"addressing_style": "path", "payload_signing_enabled": not plain},
            # Hashing every part on the loop costs CPU and stalls; TLS protects bodies.
            request_checksum_calculation="when_required",
            response_checksum_validation="when_required",
            retries={"max_attempts": ATTEMPTS, "mode": "standard"},
            connect_timeout=CONNECT_TIMEOUT,
            read_timeout=READ_TIMEOUT,
        )
        creds: dict[str, Any] = {}
        if c.access_key is not None and c.secret_key is not None:
            creds = {
                "aws_access_key_id": c.access_key,
                "aws_secret_access_key": c.secret_key.reveal(),
            }
        factory = get_session().create_client(
            "s3",
            endpoint_url=c.endpoint,
            region_name=c.region,
            config=aio,
            verify=self._verify,
            **creds,
        )
        return await self._exit.enter_async_context(factory)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop and wait (blocking; never from that loop)."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Start ``coro`` on the client's loop without waiting."""
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    async def call(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the client's loop, awaited from another loop."""
        return await asyncio.wrap_future(asyncio.run_coroutine_threadsafe(coro, self._loop))

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self.run(self._exit.aclose())
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join()
            self._loop.close()

    def key(self, *parts: str) -> str:
        return self.config.prefix + "/".join(parts)

    # -- calls made on the client's loop ---------------------------------------------

    def op(self, name: str) -> contextlib.AbstractAsyncContextManager[None]:
        """Time one request as ``name``; its failures become ``S3StoreError``."""
        return timed(name, self._where(), self.observe)

    def _where(self) -> str:
        return f"S3 bucket {self.config.bucket!r} at {self.config.endpoint}"

    async def check_bucket(self, *, write: bool = False) -> None:
        """Raise S3StoreError unless the bucket is there and our keys are accepted
        (and, with ``write``, an object can be written and removed)."""
        c = self.config
        step = "bucket"
        try:
            await self.client.head_bucket(Bucket=c.bucket)
            if write:
                step = "write"
                probe = self.key("tmp", f"probe-{os.getpid()}-{time.time_ns()}")
                await self.client.put_object(Bucket=c.bucket, Key=probe, Body=b"")
                await self.client.delete_object(Bucket=c.bucket, Key=probe)
        except ClientError as err:
            code = _code(err)
            if code in NO_BUCKET or (code == "404" and step == "bucket"):
                raise S3StoreError(f"{self._where()}: no such bucket", "bucket") from None
            if code in REFUSED:
                what = "refused our keys" if step == "bucket" else "refused a write"
                key = "secret_key" if c.access_key is not None else "access_key"
                raise S3StoreError(f"{self._where()}: {what} ({code})", key) from None
            raise S3StoreError(f"{self._where()}: refused ({code})") from None
        except TRANSPORT_ERRORS as err:
            raise S3StoreError(f"{self._where()}: unreachable ({type(err).__name__})") from None

    async def probe(self) -> None:
        """One cheap request: raises S3StoreError when the bucket cannot be used."""
        async with self.op("probe"):
            await self.client.head_bucket(Bucket=self.config.bucket)

    async def head(self, key: str) -> tuple[int, float] | None:
        """(size, last-modified seconds) of an object, or None when absent."""
        try:
            async with self.op("head"):
                r = await self.client.head_object(Bucket=self.config.bucket, Key=key)
        except ClientError as err:
            if missing(err):
                return None
            raise
        return r["ContentLength"], r["LastModified"].timestamp()

    async def get_bytes(self, key: str) -> bytes | None:
        """A small object's bytes (manifests, records), or None when absent."""
        try:
            async with self.op("get"):
                r = await self.client.get_object(Bucket=self.config.bucket, Key=key)
                async with r["Body"] as body:
                    data: bytes = await body.read()
        except ClientError as err:
            if missing(err):
                return None
            raise
        return data

    async def put_bytes(self, key: str, data: bytes) -> None:
        async with self.op("put"):
            await self.client.put_object(Bucket=self.config.bucket, Key=key, Body=data)

    async def delete(self, key: str) -> bool:
        """Remove ``key``; False when it was not there."""
        if await self.head(key) is None:
            return False
        async with self.op("delete"):
            await self.client.delete_object(Bucket=self.config.bucket, Key=key)
        return True

    async def copy(self, src: str, dst: str) -> None:
        b = self.config.bucket
        async with self.op("copy"):
            await self.client.copy_object(Bucket=b, Key=dst, CopySource={"Bucket": b, "Key": src})

    async def listing(self, prefix: str) -> list[tuple[str, int, float]]:
        """(key, size, last-modified) of every object under ``prefix``."""
        out: list[tuple[str, int, float]] = []
        pages = self.client.get_paginator("list_objects_v2")
        async with self.op("list"):
            async for page in pages.paginate(Bucket=self.config.bucket, Prefix=prefix):
                for obj in page.get("Contents", []):
                    out.append((obj["Key"], obj["Size"], obj["LastModified"].timestamp()))
        return out

    async def chunks(
        self, key: str, start: int = 0, end: int | None = None
    ) -> AsyncGenerator[bytes, None]:
        """The object's bytes [start, end) (a Range request); KeyError when absent."""
        kwargs: dict[str, Any] = {}
        if start or end is not None:
            kwargs["Range"] = f"bytes={start}-{'' if end is None else end - 1}"
        try:
            async with self.op("get"):
                r = await self.client.get_object(Bucket=self.config.bucket, Key=key, **kwargs)
        except ClientError as err:
            if missing(err):
                raise KeyError(key) from None
            raise
        async with r["Body"] as body:
            while True:
                async with self.op("read"):
                    chunk = await body.read(MIB)
                if not chunk:
                    return
                yield chunk

    async def presign(self, key: str, expires: float) -> str:
        """A URL that GETs ``key`` without credentials for ``expires`` seconds."""
        async with self.op("presign"):
            url: str = await self.client.generate_presigned_url(
                "get_object",
                Params={"Bucket": self.config.bucket, "Key": key},
                ExpiresIn=int(expires),
            )
        return url

    async def uploads(self) -> list[tuple[str, str, float]]:
        """(key, upload id, initiated) of the unfinished multipart uploads under the prefix."""
        out: list[tuple[str, str, float]] = []
        pages = self.client.get_paginator("list_multipart_uploads")
        async with self.op("list_uploads"):
            async for page in pages.paginate(Bucket=self.config.bucket, Prefix=self.config.prefix):
                for u in page.get("Uploads", []):
                    out.append((u["Key"], u["UploadId"], u["Initiated"].timestamp()))
        return out

    async def abort_upload(self, key: str, upload_id: str) -> None:
        try:
            async with self.op("abort_upload"):
                await self.client.abort_multipart_upload(
                    Bucket=self.config.bucket, Key=key, UploadId=upload_id
                )
        except ClientError as err:
            if not missing(err):
                raise
