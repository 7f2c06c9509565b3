"""HTTP translation: parse the request, ask PullThrough, build the response.

No policy and no I/O of its own beyond writing the response body.
"""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any, BinaryIO

import aiohttp
from aiohttp import web
from aiohttp.abc import AbstractStreamWriter
from prometheus_client import CONTENT_TYPE_LATEST, Counter, generate_latest

from mirrorproxy import keys
from mirrorproxy.blobfill import BlobFill, FillFailed
from mirrorproxy.cache import BlobInfo
from mirrorproxy.errors import API_VERSION_HEADER, NotFound, Unavailable, Unsupported
from mirrorproxy.namespaces import route
from mirrorproxy.oci import (
    OCI_INDEX,
    Digest,
    filter_referrers,
    join_fields,
    parse_digest,
    parse_name,
    parse_range,
    parse_reference,
    parse_tags_query,
)
from mirrorproxy.pullthrough import HIT, MISS, STALE, Target
from mirrorproxy.requestctx import note_body_bytes, note_cache, note_ns
from mirrorproxy.upstream.client import UpstreamResponse

logger = logging.getLogger(__name__)

STALE_WARNING = '110 - "Response is Stale"'
BLOB_TYPE = "application/octet-stream"
SMALL_BLOB = 64 * 1024  # cached blobs up to this size are answered from one read
CONDITIONAL = ("Range", "If-Range", "If-None-Match", "If-Modified-Since", "If-Match")
UNSIZED_CHUNK = 1024 * 1024  # read size when the body must go through resp.write


def _target(request: web.Request) -> Target:
    ns, ns_name, repo = route(
        request.app[keys.CONFIG], request.query.get("ns"), request.match_info["name"]
    )
    note_ns(request, ns_name)
    return Target(ns=ns, ns_name=ns_name, repo=parse_name(repo))


async def v2_root(request: web.Request) -> web.Response:
    return web.json_response({})


async def manifest(request: web.Request) -> web.Response:
    target = _target(request)
    ref = parse_reference(request.match_info["reference"])
    pt = request.app[keys.PULLTHROUGH]
    answer = await pt.manifest(target, ref, join_fields(request.headers.getall("Accept", ())))
    note_cache(request, answer.result, answer.upstream)
    m = answer.manifest
    headers = {
        "Content-Type": m.media_type,
        "Docker-Content-Digest": str(m.digest),
        "ETag": f'"{m.digest}"',
    }
    if answer.result == STALE:
        headers["Warning"] = STALE_WARNING
    if request.method == "HEAD":
        resp = web.Response(headers=headers)
        resp.body = None
        return _with_length(resp, len(m.body))
    source = "cache" if answer.result in (HIT, STALE) else "upstream"
    metrics = request.app[keys.METRICS]
    metrics.child(metrics.cache_bytes, target.ns.name, source).inc(len(m.body))
    return web.Response(body=m.body, headers=headers)


async def blob(request: web.Request) -> web.StreamResponse:
    target = _target(request)
    digest = parse_digest(request.match_info["digest"])
    pt = request.app[keys.PULLTHROUGH]
    if request.method == "HEAD":
        head = await pt.blob_head(target, digest)
        note_cache(request, head.result, head.upstream)
        resp = web.Response(headers=_blob_headers(digest))
        resp.content_type = BLOB_TYPE
        return _with_length(resp, head.size)
    answer = await pt.blob(target, digest)
    if answer.info is not None:
        note_cache(request, HIT)
        return _serve_file(request, target, digest, answer.info)
    if answer.fill is not None:
        note_cache(request, MISS, answer.fill.upstream)
        return await _serve_fill(request, target, digest, answer.fill, answer.size)
    if answer.direct is not None:
        note_cache(request, MISS, answer.direct.upstream.url)
        return await _serve_direct(request, target, digest, answer.direct)
    raise RuntimeError("blob answer without file, fill or stream")  # pragma: no cover


def _serve_file(
    request: web.Request, target: Target, digest: Digest, info: BlobInfo
) -> web.StreamResponse:
    rng = _requested_range(request, info.size)
    sent = info.size if rng is None else rng[1] - rng[0] + 1
    metrics = request.app[keys.METRICS]
    metrics.child(metrics.cache_bytes, target.ns.name, "cache").inc(sent)
    if info.size <= SMALL_BLOB and not any(h in request.headers for h in CONDITIONAL):
        small = _read_small(info.path, info.size)
        if small is not None:
            return web.Response(
                body=small,
                headers={**_blob_headers(digest), "Content-Type": BLOB_TYPE},
            )
    # FileResponse brings sendfile, Range/If-Range and conditional requests.
    budget = request.app[keys.PULLTHROUGH].budget
    budget.pin(digest)  # never evicted while being sent
    return _PinnedFileResponse(
        info.path,
        unpin=lambda: budget.unpin(digest),
        chunk_size=1024 * 1024,
        headers={"Docker-Content-Digest": str(digest), "Content-Type": BLOB_TYPE},
    )


def _blob_headers(digest: Digest) -> dict[str, str]:
    """The digest, and an ETag that is the digest (the content never changes)."""
    return {"Docker-Content-Digest": str(digest), "ETag": f'"{digest}"'}


def _read_small(path: Path, size: int) -> bytes | None:
    """A small blob in one read on the loop (page cache): cheaper than a sendfile set-up."""
    try:
        with open(path, "rb", buffering=0) as f:
            data = f.read(size + 1)
    except OSError:
        return None  # evicted meanwhile, say: FileResponse reports it properly
    return data if len(data) == size else None


class _PinnedFileResponse(web.FileResponse):
    """A FileResponse that releases its cache pin once the file has been sent."""

    def __init__(self, path: Path, *, unpin: Callable[[], None], **kwargs: Any) -> None:
        super().__init__(path, **kwargs)
        self._unpin: Callable[[], None] | None = unpin

    async def prepare(self, request: web.BaseRequest) -> AbstractStreamWriter | None:
        try:
            return await super().prepare(request)
        finally:
            if self._unpin is not None:
                self._unpin()
                self._unpin = None


async def _serve_direct(
    request: web.Request, target: Target, digest: Digest, upstream: UpstreamResponse
) -> web.StreamResponse:
    """Relay an uncached blob from upstream; the client verifies the digest itself."""
    resp = web.StreamResponse()
    resp.headers.update(_blob_headers(digest))
    resp.content_type = BLOB_TYPE
    if upstream.content_length is not None:
        resp.content_length = upstream.content_length
    counter = request.app[keys.METRICS].cache_bytes.labels(target.ns.name, "upstream")
    sent = 0
    try:
        await resp.prepare(request)
        async for chunk in upstream.resp.content.iter_chunked(1024 * 1024):
            await resp.write(chunk)
            counter.inc(len(chunk))
            sent += len(chunk)
    except Exception as err:
        upstream.close()
        _cut(request, digest, err)
        return resp
    finally:
        upstream.release()
        note_body_bytes(request, sent)
    await resp.write_eof()
    return resp


def _requested_range(request: web.Request, size: int) -> tuple[int, int] | None:
    try:
        return parse_range(request.headers.get("Range"), size)
    except Exception:
        return None  # FileResponse answers 416 itself


async def _serve_fill(
    request: web.Request, target: Target, digest: Digest, fill: BlobFill, size: int | None
) -> web.StreamResponse:
    """Stream a blob that is still downloading, following the shared fill."""
    rng = parse_range(request.headers.get("Range"), size) if size is not None else None
    resp = web.StreamResponse(status=200 if rng is None else 206)
    resp.headers.update(_blob_headers(digest))
    resp.content_type = BLOB_TYPE
    start, end = 0, size
    if rng is not None and size is not None:
        start, end = rng[0], rng[1] + 1
        resp.headers["Content-Range"] = f"bytes {rng[0]}-{rng[1]}/{size}"
        resp.content_length = end - start
    elif size is not None:
        resp.content_length = size
        resp.headers["Accept-Ranges"] = "bytes"
    await resp.prepare(request)
    metrics = request.app[keys.METRICS]
    counter = metrics.child(metrics.cache_bytes, target.ns.name, "upstream")
    progress = [start]
    try:
        with fill.open_reader() as f:
            if end is None:
                await _follow_unsized(request, resp, fill, f, progress, counter)
            else:
                await _follow(request, fill, f, start, end, progress, counter)
    except Exception as err:
        # Headers are gone already: the only honest signal left is a cut connection
        # (an error body here would be read as blob bytes).
        _cut(request, digest, err)
        return resp
    finally:
        note_body_bytes(request, progress[0] - start)
    await resp.write_eof()
    return resp


async def _follow(
    request: web.Request,
    fill: BlobFill,
    f: BinaryIO,
    start: int,
    end: int,
    progress: list[int],
    counter: Counter,
) -> None:
    """Send ``[start, end)``: live while at the head of the download, else from the file."""
    loop = asyncio.get_running_loop()
    pos = start
    while pos < end:
        live = fill.go_live(_transport(request), pos, end)
        if live is not None:
            before = pos
            try:
                await live.left
            finally:
                fill.leave(live)
            counter.inc(live.pos - before)
            progress[0] = pos = live.pos
            if pos > before:
                continue  # it moved on: maybe it can stay live
        limit = min(await fill.readable(pos), end)
        if limit <= pos:
            raise FillFailed(f"download ended at byte {pos} of {end}")
        # Read the transport after the wait: the client may have gone meanwhile.
        # The kernel copies file to socket (falls back to read/write on TLS).
        n = await loop.sendfile(_transport(request), f, pos, limit - pos)
        if not n:
            raise FillFailed(f"temp file ends before byte {pos}")
        counter.inc(n)
        progress[0] = pos = pos + n


async def _follow_unsized(
    request: web.Request,
    resp: web.StreamResponse,
    fill: BlobFill,
    f: BinaryIO,
    progress: list[int],
    counter: Counter,
) -> None:
    """No Content-Length upstream: aiohttp frames a chunked body, so every byte goes
    through ``resp.write`` (rare: registries state blob sizes)."""
    pos = 0
    while True:
        limit = await fill.readable(pos)
        if limit <= pos:
            return  # the download is complete and verified
        _transport(request)  # raises if the client went away while we waited
        data = await asyncio.to_thread(os.pread, f.fileno(), min(limit - pos, UNSIZED_CHUNK), pos)
        if not data:
            raise FillFailed(f"temp file ends before byte {pos}")
        await resp.write(data)
        counter.inc(len(data))
        progress[0] = pos = pos + len(data)


def _transport(request: web.Request) -> asyncio.Transport:
    transport = request.transport
    if transport is None or transport.is_closing():
        raise ConnectionResetError("client went away")
    return transport


def _cut(request: web.Request, digest: Digest, err: Exception) -> None:
    """End a response whose headers were sent: close the connection, log why."""
    if isinstance(err, ConnectionResetError | FillFailed | aiohttp.ClientError | TimeoutError):
        logger.warning("aborting blob %s: %s", digest, err)
    else:
        logger.error("aborting blob %s after an unexpected error", digest, exc_info=err)
    if request.transport is not None:
        request.transport.close()


def _with_length(resp: web.Response, size: int | None) -> web.Response:
    """A HEAD answer that states the length of the body it does not send."""
    if size is not None:
        resp.headers["Content-Length"] = str(size)
    return resp


async def tags_list(request: web.Request) -> web.Response:
    target = _target(request)
    params = parse_tags_query(request.query)
    tags = await request.app[keys.PULLTHROUGH].tags_list(target, params)
    resp = web.Response(body=tags.body)
    resp.headers["Content-Type"] = tags.content_type
    if tags.link is not None:
        resp.headers["Link"] = tags.link
    return resp


async def referrers(request: web.Request) -> web.Response:
    """The OCI 1.1 referrers API: signatures, SBOMs and other artifacts of a manifest."""
    target = _target(request)
    subject = parse_digest(request.match_info["digest"])
    artifact_type = request.query.get("artifactType")
    answer = await request.app[keys.PULLTHROUGH].referrers(target, subject)
    note_cache(request, answer.result, answer.upstream)
    body = answer.manifest.body
    headers = {"Content-Type": OCI_INDEX}
    if artifact_type is not None:
        body = filter_referrers(body, artifact_type)
        headers["OCI-Filters-Applied"] = "artifactType"
    if answer.result == STALE:
        headers["Warning"] = STALE_WARNING
    return web.Response(body=body, headers=headers)


async def unsupported(request: web.Request) -> web.Response:
    if request.method in ("GET", "HEAD"):
        raise NotFound(f"no such endpoint {request.path[:200]!r}")
    raise Unsupported(
        f"{request.method} is not supported by a pull-through mirror",
        headers={"Allow": "GET,HEAD"},
    )


async def metrics(request: web.Request) -> web.Response:
    data = generate_latest(request.app[keys.METRICS].registry)
    resp = web.Response(body=data)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    cache_dir = request.app[keys.CONFIG].cache.dir
    if not os.access(cache_dir / "tmp", os.W_OK):
        raise Unavailable(f"cache directory {cache_dir} is not writable")
    return web.json_response({"status": "ready"}, headers=API_VERSION_HEADER)
