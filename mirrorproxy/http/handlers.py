"""HTTP translation: parse the request, ask PullThrough, build the response.

No policy and no I/O of its own beyond writing the response body.
"""

from __future__ import annotations

import logging
from dataclasses import replace

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from mirrorproxy.clientauth.middleware import authorize_target
from mirrorproxy.core.errors import (
    API_VERSION_HEADER,
    BlobUnknown,
    NotFound,
    Unavailable,
    Unsupported,
)
from mirrorproxy.core.namespaces import route
from mirrorproxy.core.oci import (
    OCI_INDEX,
    Digest,
    filter_referrers,
    join_fields,
    parse_digest,
    parse_name,
    parse_reference,
    parse_tags_query,
)
from mirrorproxy.core.rendezvous import FORWARDED_HEADER
from mirrorproxy.core.tuning import Tuning
from mirrorproxy.http import keys
from mirrorproxy.http.blobrules import (
    blob_headers,
    content_range,
    first_byte,
    not_modified,
    wanted_range,
)
from mirrorproxy.http.blobsend import Sender, Stalled
from mirrorproxy.http.requestctx import note_body_bytes, note_cache, note_ns
from mirrorproxy.pullthrough.answers import HIT, STALE, Target
from mirrorproxy.pullthrough.source import BlobFailed, BlobSource

logger = logging.getLogger(__name__)

STALE_WARNING = '110 - "Response is Stale"'


def _target(request: web.Request) -> Target:
    ns, ns_name, repo = route(
        request.app[keys.CONFIG], request.query.get("ns"), request.match_info["name"]
    )
    note_ns(request, ns_name)
    target = Target(ns=ns, ns_name=ns_name, repo=parse_name(repo))
    if request.app[keys.CONFIG].cluster is not None:
        # From a member: serve it here, never forward it again. To a member: the
        # client's own credentials go along, for the owner to check them again.
        target = replace(
            target,
            forwarded=FORWARDED_HEADER in request.headers,
            authorization=request.headers.get("Authorization"),
        )
    authorize_target(request, ns, ns_name, target.repo)  # [server.auth]: 401/403/429
    return target


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
    unchanged = not_modified(request.headers, digest)
    if request.method == "HEAD" or unchanged:
        head = await pt.blob_head(target, digest)
        note_cache(request, head.result, head.upstream)
        if unchanged:
            return web.Response(status=304, headers=blob_headers(digest))
        resp = web.Response(headers=blob_headers(digest))
        return _with_length(resp, head.size)
    for _ in range(2):  # a hit evicted before it could be opened is asked again
        source = await pt.blob(target, digest, first_byte=first_byte(request.headers, digest))
        location = await source.location()
        if location is not None:  # [storage.s3] redirect: the client fetches it itself
            note_cache(request, source.result, None)
            headers = {"Location": location, "Docker-Content-Digest": str(digest)}
            return web.Response(status=307, headers=headers)
        served = await _serve(request, target, source, pt.tuning)
        if served is not None:
            return served
    raise BlobUnknown(f"blob {digest} vanished while being served")


async def _serve(
    request: web.Request, target: Target, source: BlobSource, tuning: Tuning
) -> web.StreamResponse | None:
    """Answer with ``source``'s bytes; None if a cached blob was evicted meanwhile."""
    digest = source.digest
    note_cache(request, source.result, source.upstream)
    metrics = request.app[keys.METRICS]
    counter = metrics.child(metrics.cache_bytes, target.ns.name, _origin(source))
    rng = wanted_range(request.headers, digest, source.size)
    if rng is None:
        small = source.small(tuning.small_blob)
        if small is not None:
            counter.inc(len(small))
            return web.Response(body=small, headers=blob_headers(digest))
    stream = await source.open(rng)
    if stream is None:
        return None
    with stream:
        note_cache(request, source.result, stream.upstream)
        resp = _answer(digest, rng, stream.size)
        stall = request.app[keys.CONFIG].server.client_timeout
        sender = Sender(request, stall=stall, count=counter.inc, tuning=tuning)
        try:
            await resp.prepare(request)
            await sender.send(resp, stream)
        except Exception as err:
            # Headers are gone already: the only honest signal left is a cut connection
            # (an error body here would be read as blob bytes).
            _cut(request, digest, err)
            return resp
        finally:
            note_body_bytes(request, sender.sent)
    await resp.write_eof()
    return resp


def _origin(source: BlobSource) -> str:
    """Where the bytes come from, for ``cache_bytes``: the cache on a hit, else upstream."""
    return "cache" if source.result == HIT else "upstream"


def _answer(digest: Digest, rng: tuple[int, int] | None, size: int | None) -> web.StreamResponse:
    """The headers of a 200 (whole blob) or 206 (``rng``), with the length when known."""
    resp = web.StreamResponse(status=200 if rng is None else 206, headers=blob_headers(digest))
    if rng is not None and size is not None:
        resp.headers.update(content_range(rng, size))
        resp.content_length = rng[1] - rng[0] + 1
    elif size is not None:
        resp.content_length = size
    return resp


def _cut(request: web.Request, digest: Digest, err: Exception) -> None:
    """End a response whose headers were sent: drop the connection, log why.

    Dropped, not closed: what is still buffered for the client is never sent (it
    may be bytes of a download that failed).

    A client that went away or stopped reading is routine (INFO); a failed
    download is the upstream's fault (WARNING); anything else is a bug (ERROR).
    """
    if isinstance(err, ConnectionError):  # reset, broken pipe, aborted; aiohttp's too
        logger.info("blob %s: client went away (%s)", digest, str(err) or type(err).__name__)
    elif isinstance(err, Stalled):
        logger.info("blob %s: closing a client that stopped reading: %s", digest, err)
    elif isinstance(err, BlobFailed | EOFError | aiohttp.ClientError | TimeoutError):
        logger.warning("aborting blob %s: %s", digest, err)
    else:
        logger.error("aborting blob %s after an unexpected error", digest, exc_info=err)
    if request.transport is not None:
        request.transport.abort()


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
    data = request.app[keys.METRICS].render()
    resp = web.Response(body=data)
    resp.headers["Content-Type"] = CONTENT_TYPE_LATEST
    return resp


async def healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    """Ready when the content store can be used (the cache directory is writable; an
    S3 bucket answers): the probe is the store's, remembered for a moment."""
    problem = await request.app[keys.ENGINE].ready()
    if problem is not None:
        raise Unavailable(problem)
    return web.json_response({"status": "ready"}, headers=API_VERSION_HEADER)
