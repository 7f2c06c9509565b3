"""FakeRegistry variants that answer the way some real upstreams and their proxies do.

``CuttingRegistry`` drops the connection halfway through a manifest or tag-list
body; ``GzipRegistry`` compresses manifests when asked (and drops their digest
header, as some proxies do); ``PagingRegistry`` paginates ``tags/list`` with a
``Link`` and can refuse manifest HEADs with 405.
"""

from __future__ import annotations

import asyncio
import gzip
import json

from aiohttp import web

from tests.fakes.registry import FakeRegistry, Handler


class CuttingRegistry(FakeRegistry):
    """A FakeRegistry that sends half of a GET body, then drops the connection.

    ``cut`` names the kinds of request cut (``manifests``, ``tags``); the headers
    still announce the full length, as when a connection dies mid-transfer.
    """

    def __post_init__(self) -> None:
        super().__post_init__()
        self.cut: set[str] = set()
        self.app.middlewares.append(self._cut_body)

    @web.middleware
    async def _cut_body(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        full = await handler(request)
        if request.method != "GET" or not any(f"/{k}/" in request.path for k in self.cut):
            return full
        body = full.body if isinstance(full, web.Response) else None
        if full.status != 200 or not isinstance(body, bytes):
            return full
        resp = web.StreamResponse(
            headers={k: v for k, v in full.headers.items() if k.lower() != "content-length"}
        )
        resp.content_length = len(body)
        await resp.prepare(request)
        await resp.write(body[: len(body) // 2])
        await asyncio.sleep(0.05)  # let the client read the half before the close
        if request.transport is not None:
            request.transport.close()
        return resp


class GzipRegistry(FakeRegistry):
    """A registry behind a proxy with ``gzip on`` for JSON: compresses when asked to.

    Like some such proxies, it drops ``Docker-Content-Digest`` from compressed answers.
    """

    async def _manifest(self, request: web.Request) -> web.Response:
        resp = await super()._manifest(request)
        body = resp.body
        if (
            request.method != "GET"
            or resp.status != 200
            or "gzip" not in request.headers.get("Accept-Encoding", "")
            or not isinstance(body, bytes)
        ):
            return resp
        headers = {
            k: v
            for k, v in resp.headers.items()
            if k.lower() not in ("content-length", "docker-content-digest")
        }
        headers["Content-Encoding"] = "gzip"
        return web.Response(body=gzip.compress(body), headers=headers)


class PagingRegistry(FakeRegistry):
    """Paginates ``tags/list`` like distribution: a ``Link`` while more tags follow."""

    refuse_head: bool = False  # answer manifest HEADs with 405, as some registries do

    async def _tags_list(self, request: web.Request) -> web.Response:
        resp = await super()._tags_list(request)
        if resp.status != 200 or "n" not in request.query or resp.text is None:
            return resp
        repo, page = request.match_info["name"], json.loads(resp.text)["tags"]
        if page and page[-1] < max(t for (r, t) in self._tags if r == repo):
            n = request.query["n"]
            resp.headers["Link"] = f'</v2/{repo}/tags/list?last={page[-1]}&n={n}>; rel="next"'
        return resp

    async def _manifest(self, request: web.Request) -> web.Response:
        if self.refuse_head and request.method == "HEAD":
            return web.Response(status=405)
        return await super()._manifest(request)
