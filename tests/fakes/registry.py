"""FakeRegistry: an in-memory Registry V2 (pull side) with a request log and fault knobs.

It serves manifests and blobs from dicts, the way distribution answers a puller:
manifests by tag or digest (GET/HEAD, honouring ``Accept`` so one tag may resolve
to an index for clients accepting it and to a platform manifest for the others),
blobs with single ``Range`` requests (206 + ``Content-Range``), and ``tags/list``.

Every request is recorded before it is answered. Faults are set per instance on
``registry.faults`` (never through module globals) and can be changed between
requests of a running test: a fixed status for everything (with ``Retry-After``),
a delay before answering, a cut connection after N body bytes of a blob, wrong
blob bytes (all of them, or one in the middle), ignoring ``Range``, and a slow body.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field, fields

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER = "application/vnd.oci.image.layer.v1.tar+gzip"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
_INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})

_RANGE_RE = re.compile(r"bytes=(\d+)-(\d*)")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def sha256(data: bytes) -> str:
    """The OCI digest of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def payload(size: int, seed: str) -> bytes:
    """Deterministic pseudo-random bytes (distinct per seed), fast for a few MiB."""
    return hashlib.shake_256(seed.encode()).digest(size)


@dataclass(frozen=True, slots=True)
class Image:
    """A single-platform image pushed into a FakeRegistry."""

    repo: str
    tag: str
    digest: str  # of the manifest
    manifest: bytes
    config: bytes
    layers: tuple[bytes, ...]

    @property
    def config_digest(self) -> str:
        return sha256(self.config)

    @property
    def layer_digests(self) -> tuple[str, ...]:
        return tuple(sha256(layer) for layer in self.layers)


def _descriptor(media_type: str, data: bytes) -> dict[str, object]:
    return {"mediaType": media_type, "digest": sha256(data), "size": len(data)}


@dataclass(frozen=True, slots=True)
class RecordedRequest:
    """One request as the fake received it."""

    method: str
    path: str
    query: MultiDict[str]
    headers: CIMultiDictProxy[str]

    @property
    def kind(self) -> str:
        """``manifests``, ``blobs``, ``tags`` or ``other``."""
        for kind in ("manifests", "blobs", "tags"):
            if f"/{kind}/" in self.path:
                return kind
        return "other"


@dataclass(slots=True)
class Faults:
    """Knobs a test turns on a running fake; ``clear()`` restores normal service."""

    status: int | None = None  # answer every request with this status
    retry_after: str | None = None  # Retry-After sent with ``status``
    delay: float = 0.0  # seconds to wait before answering anything
    cut_after: int | None = None  # close the connection after this many blob body bytes
    cut_pause: float = 0.05  # let the client read those bytes before the close
    wrong_bytes: bool = False  # serve blob bodies with every byte flipped (same length)
    flip_at: int | None = None  # serve blob bodies with the byte at this offset flipped
    ignore_range: bool = False  # answer blob Range requests with 200 and the full body
    chunk_size: int = 64 * 1024  # blob body write size
    chunk_delay: float = 0.0  # seconds to sleep between blob body chunks (a slow body)

    def clear(self) -> None:
        """Turn every fault off."""
        defaults = Faults()
        for f in fields(self):
            setattr(self, f.name, getattr(defaults, f.name))


@dataclass(slots=True)
class _Manifest:
    media_type: str
    body: bytes


@dataclass
class FakeRegistry:
    """An aiohttp app serving an in-memory registry; start it with ``aiohttp_server(reg.app)``."""

    faults: Faults = field(default_factory=Faults)
    requests: list[RecordedRequest] = field(default_factory=list, init=False, repr=False)
    blob_bytes_sent: int = field(default=0, init=False)  # blob body bytes, all responses
    _manifests: dict[tuple[str, str], _Manifest] = field(
        default_factory=dict, init=False, repr=False
    )
    # (repo, tag) -> media type -> digest, in the order the variants were added
    _tags: dict[tuple[str, str], dict[str, str]] = field(
        default_factory=dict, init=False, repr=False
    )
    _blobs: dict[str, bytes] = field(default_factory=dict, init=False, repr=False)
    referrers_api: bool = True  # False: 404 on the referrers path, like distribution 2.8
    # (repo, subject digest) -> descriptors of the manifests that refer to it
    referrers: dict[tuple[str, str], list[dict[str, object]]] = field(
        default_factory=dict, init=False, repr=False
    )
    app: web.Application = field(init=False, repr=False)

    def __post_init__(self) -> None:
        self.app = web.Application(middlewares=[self._record, self._faults])
        r = self.app.router
        r.add_get("/v2/", self._root)
        r.add_get(r"/v2/{name:.+}/manifests/{ref}", self._manifest)
        r.add_get(r"/v2/{name:.+}/blobs/{digest}", self._blob)
        r.add_get(r"/v2/{name:.+}/tags/list", self._tags_list)
        r.add_get(r"/v2/{name:.+}/referrers/{digest}", self._referrers)

    # -- content -----------------------------------------------------------------

    def add_manifest(
        self, repo: str, ref: str, media_type: str, body: bytes, *, digest: str | None = None
    ) -> str:
        """Store a manifest under its digest and, when ``ref`` is a tag, under the tag.

        A tag keeps one manifest per media type: adding a second type makes the
        tag Accept-dependent, adding the same type again moves the tag.

        Returns:
            The manifest's digest.
        """
        digest = digest or sha256(body)  # given: a signed schema1 (payload digest)
        self._manifests[(repo, digest)] = _Manifest(media_type, body)
        if ref != digest:
            self._tags.setdefault((repo, ref), {})[media_type] = digest
        return digest

    def add_image(
        self, repo: str, tag: str, *, layer_sizes: tuple[int, ...] = (4096,), seed: str = ""
    ) -> Image:
        """Push a config, layers and an OCI manifest tagged ``tag``."""
        seed = seed or f"{repo}:{tag}"
        config = json.dumps(
            {"architecture": "amd64", "os": "linux", "seed": seed}, sort_keys=True
        ).encode()
        layers = tuple(payload(n, f"{seed}/layer{i}") for i, n in enumerate(layer_sizes))
        for blob in (config, *layers):
            self.add_blob(blob)
        manifest = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_MANIFEST,
                "config": _descriptor(OCI_CONFIG, config),
                "layers": [_descriptor(OCI_LAYER, layer) for layer in layers],
            },
            indent=2,
        ).encode()
        digest = self.add_manifest(repo, tag, OCI_MANIFEST, manifest)
        return Image(repo, tag, digest, manifest, config, layers)

    def add_index(self, repo: str, tag: str, images: list[Image]) -> tuple[str, bytes]:
        """Tag an OCI index of ``images`` (amd64 first); return its digest and body."""
        archs = ("amd64", "arm64", "s390x", "ppc64le")
        body = json.dumps(
            {
                "schemaVersion": 2,
                "mediaType": OCI_INDEX,
                "manifests": [
                    {
                        **_descriptor(OCI_MANIFEST, img.manifest),
                        "platform": {"architecture": arch, "os": "linux"},
                    }
                    for img, arch in zip(images, archs, strict=False)
                ],
            },
            indent=2,
        ).encode()
        return self.add_manifest(repo, tag, OCI_INDEX, body), body

    def remove_tag(self, repo: str, tag: str) -> None:
        """Delete a tag (its manifests stay reachable by digest)."""
        self._tags.pop((repo, tag), None)

    def add_blob(self, data: bytes) -> str:
        """Store a blob (served under any repository); return its digest."""
        digest = sha256(data)
        self._blobs[digest] = data
        return digest

    def remove_blob(self, digest: str) -> None:
        self._blobs.pop(digest, None)

    # -- the request log ---------------------------------------------------------

    def calls(self, method: str | None = None, kind: str | None = None) -> list[RecordedRequest]:
        """Recorded requests, filtered by method and/or kind (manifests, blobs, tags)."""
        return [
            r
            for r in self.requests
            if (method is None or r.method == method) and (kind is None or r.kind == kind)
        ]

    def clear_log(self) -> None:
        self.requests.clear()

    # -- middlewares -------------------------------------------------------------

    @web.middleware
    async def _record(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        self.requests.append(
            RecordedRequest(
                method=request.method,
                path=request.path,
                query=MultiDict(request.query),
                headers=CIMultiDictProxy(CIMultiDict(request.headers)),
            )
        )
        return await handler(request)

    @web.middleware
    async def _faults(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        f = self.faults
        if f.delay:
            await asyncio.sleep(f.delay)
        if f.status is not None:
            headers = {"Retry-After": f.retry_after} if f.retry_after is not None else {}
            return _error(f.status, "UNAVAILABLE", "fault injected", headers=headers)
        return await handler(request)

    # -- handlers ----------------------------------------------------------------

    async def _root(self, request: web.Request) -> web.Response:
        return web.json_response({})

    async def _manifest(self, request: web.Request) -> web.Response:
        repo, ref = request.match_info["name"], request.match_info["ref"]
        digest = ref if ref.startswith("sha256:") else self._pick(repo, ref, request)
        m = self._manifests.get((repo, digest)) if digest is not None else None
        if digest is None or m is None:
            return _error(404, "MANIFEST_UNKNOWN", f"manifest {repo}:{ref} unknown")
        headers = {
            "Content-Type": m.media_type,
            "Docker-Content-Digest": digest,
            "Content-Length": str(len(m.body)),
        }
        if request.method == "HEAD":
            resp = web.Response(headers=headers)
            resp.body = None
            return resp
        return web.Response(body=m.body, headers=headers)

    def _pick(self, repo: str, tag: str, request: web.Request) -> str | None:
        """The tag's variant for this client's Accept header (distribution's choice)."""
        variants = self._tags.get((repo, tag))
        if not variants:
            return None
        # An index wins for a client that accepts it; the others get the platform manifest.
        ordered = sorted(variants.items(), key=lambda kv: kv[0] not in _INDEX_TYPES)
        # All Accept lines, as distribution reads them (containers/image sends six).
        accept = ", ".join(request.headers.getall("Accept", []))
        if not accept:
            return ordered[0][1]
        accepted = [p.split(";", 1)[0].strip() for p in accept.split(",")]
        for media_type, digest in ordered:
            if media_type in accepted or "*/*" in accepted:
                return digest
        return None  # like distribution: an index to a client that cannot take one is 404

    async def _blob(self, request: web.Request) -> web.StreamResponse:
        digest = request.match_info["digest"]
        data = self._blobs.get(digest)
        if data is None:
            return _error(404, "BLOB_UNKNOWN", f"blob {digest} unknown")
        if self.faults.wrong_bytes:
            data = bytes(b ^ 0xFF for b in data)
        flip = self.faults.flip_at
        if flip is not None and flip < len(data):
            data = data[:flip] + bytes([data[flip] ^ 0xFF]) + data[flip + 1 :]
        size = len(data)
        status, start, end = 200, 0, size
        headers = {"Docker-Content-Digest": digest, "Accept-Ranges": "bytes"}
        m = _RANGE_RE.fullmatch(request.headers.get("Range", "").replace(" ", ""))
        if m is not None and not self.faults.ignore_range:
            start = int(m.group(1))
            end = min(int(m.group(2)) + 1, size) if m.group(2) else size
            if start >= size or end <= start:
                return _error(416, "RANGE_INVALID", "range not satisfiable")
            status = 206
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        resp = web.StreamResponse(status=status, headers=headers)
        resp.content_type = "application/octet-stream"
        resp.content_length = end - start
        if request.method == "HEAD":
            await resp.prepare(request)
            return resp
        await resp.prepare(request)
        await self._send(request, resp, data[start:end])
        return resp

    async def _send(self, request: web.Request, resp: web.StreamResponse, body: bytes) -> None:
        f = self.faults
        limit = len(body) if f.cut_after is None else min(f.cut_after, len(body))
        pos = 0
        while pos < limit:
            chunk = body[pos : min(pos + f.chunk_size, limit)]
            await resp.write(chunk)
            pos += len(chunk)
            self.blob_bytes_sent += len(chunk)
            if f.chunk_delay and pos < limit:
                await asyncio.sleep(f.chunk_delay)
        if f.cut_after is not None and limit < len(body):
            await asyncio.sleep(f.cut_pause)  # let the bytes written so far go out
            if request.transport is not None:
                request.transport.close()
            return
        await resp.write_eof()

    async def _referrers(self, request: web.Request) -> web.Response:
        if not self.referrers_api:
            return _error(404, "UNSUPPORTED", "no such route")
        repo, subject = request.match_info["name"], request.match_info["digest"]
        doc = {
            "schemaVersion": 2,
            "mediaType": OCI_INDEX,
            "manifests": self.referrers.get((repo, subject), []),
        }
        return web.json_response(doc, content_type=OCI_INDEX)

    async def _tags_list(self, request: web.Request) -> web.Response:
        repo = request.match_info["name"]
        tags = sorted(t for (r, t) in self._tags if r == repo)
        if not tags:
            return _error(404, "NAME_UNKNOWN", f"repository {repo} unknown")
        last = request.query.get("last")
        if last:
            tags = [t for t in tags if t > last]
        n = request.query.get("n")
        if n is not None and n.isdigit():
            tags = tags[: int(n)]
        return web.json_response({"name": repo, "tags": tags})


def _error(
    status: int, code: str, message: str, *, headers: dict[str, str] | None = None
) -> web.Response:
    body = json.dumps({"errors": [{"code": code, "message": message}]})
    return web.Response(status=status, text=body, content_type="application/json", headers=headers)
