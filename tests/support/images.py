"""Synthetic OCI/Docker images for end-to-end tests, and a tiny Registry V2 pusher.

Owns building deterministic images (seeded random layers as real gzip tars, configs,
manifests, multi-arch indexes) and pushing them to a plain-HTTP registry. It does
no network at import and keeps every blob in memory, because test images are small
(a few MiB at most); it must not grow into a general registry client.
"""

from __future__ import annotations

import asyncio
import gzip
import hashlib
import io
import json
import random
import ssl
import tarfile
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import zstandard

OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
OCI_LAYER_GZIP = "application/vnd.oci.image.layer.v1.tar+gzip"
OCI_LAYER_ZSTD = "application/vnd.oci.image.layer.v1.tar+zstd"
#: The empty JSON descriptor of OCI 1.1, the config of artifacts that have none.
OCI_EMPTY = "application/vnd.oci.empty.v1+json"
EMPTY_JSON = b"{}"
#: Annotation naming a file in an artifact layer (ORAS restores files by it).
TITLE_ANNOTATION = "org.opencontainers.image.title"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
DOCKER_MANIFEST_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_CONFIG = "application/vnd.docker.container.image.v1+json"
DOCKER_LAYER_GZIP = "application/vnd.docker.image.rootfs.diff.tar.gzip"

#: Every manifest media type we produce, for Accept headers.
MANIFEST_MEDIA_TYPES = (OCI_MANIFEST, OCI_INDEX, DOCKER_MANIFEST, DOCKER_MANIFEST_LIST)

DEFAULT_PLATFORMS = ("linux/amd64", "linux/arm64")

# Bounded on purpose: every request to a loopback registry should finish at once.
DEFAULT_TIMEOUT = 30.0


def sha256_digest(data: bytes) -> str:
    """Return the OCI digest string (``sha256:<hex>``) of ``data``."""
    return "sha256:" + hashlib.sha256(data).hexdigest()


def _canonical_json(obj: Any) -> bytes:
    """Serialise deterministically so the same inputs give the same digests."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":")).encode()


@dataclass(frozen=True, slots=True)
class Layer:
    """One gzip-compressed tar layer; ``digest`` names the gzip, ``diff_id`` the tar."""

    blob: bytes
    digest: str
    diff_id: str

    @property
    def size(self) -> int:
        """Compressed size, as a descriptor states it."""
        return len(self.blob)


Compression = Literal["gzip", "zstd"]


def make_layer(
    size: int, rng: random.Random, *, name: str = "data", compression: Compression = "gzip"
) -> Layer:
    """Build a layer holding ``size`` random bytes (split over two files if > 1 byte).

    Args:
        size: payload bytes inside the tar (the compressed blob is a little larger:
            random data does not compress).
        rng: seeded source, so a seed always yields the same digests.
        name: base name for the files in the tar.
        compression: ``gzip`` (every client reads it) or ``zstd`` (OCI only).

    Returns:
        The layer with its digest and diff_id.
    """
    if size < 0:
        raise ValueError(f"layer size must be >= 0, got {size}")
    first = size // 2 if size > 1 else size
    parts = [(f"{name}-0.bin", first)]
    if size - first > 0:
        parts.append((f"{name}-1.bin", size - first))
    raw = io.BytesIO()
    # TarInfo defaults (mtime=0, uid/gid 0, no names) keep the tar reproducible.
    with tarfile.open(fileobj=raw, mode="w", format=tarfile.PAX_FORMAT) as tar:
        for fname, n in parts:
            info = tarfile.TarInfo(fname)
            info.size = n
            info.mode = 0o644
            tar.addfile(info, io.BytesIO(rng.randbytes(n)))
    tar_bytes = raw.getvalue()
    if compression == "zstd":
        blob = zstandard.ZstdCompressor(level=1).compress(tar_bytes)
    else:
        blob = gzip.compress(tar_bytes, compresslevel=1, mtime=0)
    return Layer(blob=blob, digest=sha256_digest(blob), diff_id=sha256_digest(tar_bytes))


@dataclass(frozen=True, slots=True)
class Image:
    """An image (single manifest or index) with every byte it references.

    ``manifests`` is ordered children first, top last, which is the order a push
    must follow. ``platforms`` maps ``os/arch`` to that platform's manifest digest.
    """

    blobs: Mapping[str, bytes]
    manifests: Mapping[str, tuple[str, bytes]]
    digest: str
    media_type: str
    platforms: Mapping[str, str] = field(default_factory=dict)

    @property
    def body(self) -> bytes:
        """The top-level manifest or index bytes."""
        return self.manifests[self.digest][1]

    @property
    def size(self) -> int:
        """Length of the top-level manifest or index."""
        return len(self.body)

    def blob_digests(self, platform: str | None = None) -> set[str]:
        """Return the config and layer digests of one platform (all when None)."""
        if platform is None:
            return set(self.blobs)
        _, body = self.manifests[self.platforms[platform]]
        doc = json.loads(body)
        return {doc["config"]["digest"], *(la["digest"] for la in doc["layers"])}

    def total_size(self, platform: str | None = None) -> int:
        """Bytes of blobs a pull of ``platform`` (or all platforms) fetches."""
        return sum(len(self.blobs[d]) for d in self.blob_digests(platform))


def _split_platform(platform: str) -> tuple[str, str]:
    """Split ``os/arch`` and reject anything else early."""
    os_name, _, arch = platform.partition("/")
    if not os_name or not arch or "/" in arch:
        raise ValueError(f"platform must be os/arch, got {platform!r}")
    return os_name, arch


def build_image(
    layer_sizes: Sequence[int],
    *,
    seed: int = 0,
    platform: str = "linux/amd64",
    docker: bool = False,
    rng: random.Random | None = None,
    compression: Compression = "gzip",
) -> Image:
    """Build a single-platform image with one layer per entry of ``layer_sizes``.

    Args:
        layer_sizes: uncompressed payload bytes of each layer.
        seed: seeds the layer contents when ``rng`` is not given.
        platform: ``os/arch`` written into the config.
        docker: produce a Docker schema2 manifest instead of an OCI one.
        rng: share one source across several images (an index) for distinct layers.
        compression: of every layer; ``zstd`` needs an OCI manifest (Docker schema2
            has no media type for it).

    Returns:
        The image; its top digest is the manifest's.
    """
    if docker and compression != "gzip":
        raise ValueError("Docker schema2 layers are gzip only")
    rng = rng if rng is not None else random.Random(seed)  # noqa: S311 - test data
    os_name, arch = _split_platform(platform)
    layers = [
        make_layer(n, rng, name=f"layer{i}", compression=compression)
        for i, n in enumerate(layer_sizes)
    ]
    config = _canonical_json(
        {
            "architecture": arch,
            "os": os_name,
            "config": {"Cmd": ["/bin/true"]},
            "rootfs": {"type": "layers", "diff_ids": [la.diff_id for la in layers]},
        }
    )
    config_digest = sha256_digest(config)
    media_type = DOCKER_MANIFEST if docker else OCI_MANIFEST
    layer_type = DOCKER_LAYER_GZIP if docker else OCI_LAYER_GZIP
    if compression == "zstd":
        layer_type = OCI_LAYER_ZSTD
    manifest = _canonical_json(
        {
            "schemaVersion": 2,
            "mediaType": media_type,
            "config": {
                "mediaType": DOCKER_CONFIG if docker else OCI_CONFIG,
                "digest": config_digest,
                "size": len(config),
            },
            "layers": [
                {"mediaType": layer_type, "digest": la.digest, "size": la.size} for la in layers
            ],
        }
    )
    digest = sha256_digest(manifest)
    blobs = {config_digest: config} | {la.digest: la.blob for la in layers}
    return Image(
        blobs=blobs,
        manifests={digest: (media_type, manifest)},
        digest=digest,
        media_type=media_type,
        platforms={platform: digest},
    )


def build_index(
    layer_sizes: Sequence[int],
    *,
    seed: int = 0,
    platforms: Sequence[str] = DEFAULT_PLATFORMS,
    docker: bool = False,
) -> Image:
    """Build a multi-arch index over one image per platform (distinct layers each).

    Args:
        layer_sizes: layer sizes of every platform image.
        seed: seeds all contents.
        platforms: ``os/arch`` entries, in index order.
        docker: produce a Docker manifest list over schema2 manifests.

    Returns:
        The image; its top digest is the index's.
    """
    rng = random.Random(seed)  # noqa: S311 - reproducible test data, not crypto
    blobs: dict[str, bytes] = {}
    manifests: dict[str, tuple[str, bytes]] = {}
    descriptors: list[dict[str, Any]] = []
    by_platform: dict[str, str] = {}
    for platform in platforms:
        child = build_image(layer_sizes, platform=platform, docker=docker, rng=rng)
        blobs.update(child.blobs)
        manifests.update(child.manifests)
        by_platform[platform] = child.digest
        os_name, arch = _split_platform(platform)
        descriptors.append(
            {
                "mediaType": child.media_type,
                "digest": child.digest,
                "size": child.size,
                "platform": {"architecture": arch, "os": os_name},
            }
        )
    media_type = DOCKER_MANIFEST_LIST if docker else OCI_INDEX
    index = _canonical_json(
        {"schemaVersion": 2, "mediaType": media_type, "manifests": descriptors}
    )
    digest = sha256_digest(index)
    manifests[digest] = (media_type, index)
    return Image(
        blobs=blobs,
        manifests=manifests,
        digest=digest,
        media_type=media_type,
        platforms=by_platform,
    )


def build_artifact(
    subject: Image,
    artifact_type: str,
    files: Mapping[str, bytes],
    *,
    file_media_type: str = "application/octet-stream",
    annotations: Mapping[str, str] | None = None,
) -> Image:
    """Build an OCI 1.1 artifact (what ORAS pushes) that refers to ``subject``.

    The manifest carries ``artifactType``, the empty JSON config and one layer per
    file, titled with the file name, and names ``subject``'s top manifest as its
    ``subject``: a signature or SBOM attached to an image.

    Args:
        subject: the image the artifact is about.
        artifact_type: e.g. ``application/vnd.example.sbom.v1+json``.
        files: file name -> contents, one layer each, in order.
        file_media_type: media type of every file layer.
        annotations: manifest annotations (referrers lists repeat them).

    Returns:
        The artifact; ``platforms`` is empty.
    """
    layers = [
        {
            "mediaType": file_media_type,
            "digest": sha256_digest(data),
            "size": len(data),
            "annotations": {TITLE_ANNOTATION: name},
        }
        for name, data in files.items()
    ]
    doc: dict[str, Any] = {
        "schemaVersion": 2,
        "mediaType": OCI_MANIFEST,
        "artifactType": artifact_type,
        "config": {
            "mediaType": OCI_EMPTY,
            "digest": sha256_digest(EMPTY_JSON),
            "size": len(EMPTY_JSON),
        },
        "layers": layers,
        "subject": {
            "mediaType": subject.media_type,
            "digest": subject.digest,
            "size": subject.size,
        },
    }
    if annotations:
        doc["annotations"] = dict(annotations)
    manifest = _canonical_json(doc)
    digest = sha256_digest(manifest)
    blobs = {sha256_digest(EMPTY_JSON): EMPTY_JSON} | {
        sha256_digest(data): data for data in files.values()
    }
    return Image(
        blobs=blobs,
        manifests={digest: (OCI_MANIFEST, manifest)},
        digest=digest,
        media_type=OCI_MANIFEST,
    )


def artifact_type_of(artifact: Image) -> str:
    """The ``artifactType`` of an artifact built by ``build_artifact``."""
    value: str = json.loads(artifact.body)["artifactType"]
    return value


def referrers_index(artifacts: Sequence[Image]) -> bytes:
    """The OCI index listing ``artifacts`` as referrers (one descriptor each).

    Registries answer ``GET /v2/<name>/referrers/<digest>`` with it; registries
    without that API hold the same index under the tag ``referrers_tag(subject)``.
    """
    descriptors: list[dict[str, Any]] = []
    for artifact in artifacts:
        doc = json.loads(artifact.body)
        descriptor: dict[str, Any] = {
            "mediaType": artifact.media_type,
            "digest": artifact.digest,
            "size": artifact.size,
            "artifactType": doc["artifactType"],
        }
        if "annotations" in doc:
            descriptor["annotations"] = doc["annotations"]
        descriptors.append(descriptor)
    return _canonical_json({"schemaVersion": 2, "mediaType": OCI_INDEX, "manifests": descriptors})


def referrers_tag(subject_digest: str) -> str:
    """The fallback tag of OCI 1.1 for referrers of a digest (``sha256-<hex>``)."""
    algorithm, _, hex_part = subject_digest.partition(":")
    return f"{algorithm}-{hex_part}"


class RegistryHTTPError(RuntimeError):
    """A registry answered with an unexpected status; carries its body for the log."""

    def __init__(self, method: str, url: str, status: int, body: bytes) -> None:
        super().__init__(f"{method} {url} -> {status}: {body[:500]!r}")
        self.status = status


@dataclass(frozen=True, slots=True)
class Response:
    """What a test needs from one registry answer."""

    status: int
    headers: Mapping[str, str]  # names lower-cased
    body: bytes


# Loopback registries must never go through a proxy from the environment.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _opener(context: ssl.SSLContext | None) -> urllib.request.OpenerDirector:
    """The no-proxy opener, trusting ``context`` for https when given."""
    if context is None:
        return _OPENER
    return urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )


def request(
    method: str,
    url: str,
    *,
    data: bytes | None = None,
    headers: Mapping[str, str] | None = None,
    timeout: float = DEFAULT_TIMEOUT,
    ssl_context: ssl.SSLContext | None = None,
) -> Response:
    """Send one HTTP request; raise RegistryHTTPError on any status >= 400.

    Args:
        method: HTTP method.
        url: absolute ``http://`` or ``https://`` URL.
        data: request body.
        headers: request headers.
        timeout: seconds for connect and each read.
        ssl_context: TLS settings for https (e.g. trusting a test CA).

    Returns:
        Status, headers (names lower-cased) and body.

    Raises:
        RegistryHTTPError: the server answered with an error status.
    """
    if not url.startswith(("http://", "https://")):
        raise ValueError(f"not an http(s) URL: {url!r}")
    req = urllib.request.Request(  # noqa: S310 - scheme checked above
        url, data=data, method=method, headers=dict(headers or {})
    )
    try:
        with _opener(ssl_context).open(req, timeout=timeout) as resp:
            headers = {k.lower(): v for k, v in resp.headers.items()}
            return Response(resp.status, headers, resp.read())
    except urllib.error.HTTPError as err:
        with err:
            body = err.read()
        raise RegistryHTTPError(method, url, err.code, body) from err


def _push_blob(
    base: str,
    repo: str,
    digest: str,
    data: bytes,
    timeout: float,
    *,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Upload one blob monolithically: POST for a session, PUT it with ?digest=."""
    extra = dict(headers or {})
    resp = request(
        "POST",
        f"{base}/v2/{repo}/blobs/uploads/",
        headers=extra,
        timeout=timeout,
        ssl_context=ssl_context,
    )
    location = resp.headers.get("location")
    if not location:
        raise RuntimeError(f"registry gave no upload Location for {repo}")
    url = urllib.parse.urljoin(base + "/", location)
    sep = "&" if "?" in url else "?"
    url = f"{url}{sep}digest={urllib.parse.quote(digest, safe=':')}"
    request(
        "PUT",
        url,
        data=data,
        headers=extra | {"Content-Type": "application/octet-stream"},
        timeout=timeout,
        ssl_context=ssl_context,
    )


def put_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    media_type: str,
    body: bytes,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> str:
    """PUT one manifest by tag or digest; return the digest the registry reports."""
    resp = request(
        "PUT",
        f"{registry_url.rstrip('/')}/v2/{repo}/manifests/{reference}",
        data=body,
        headers=dict(headers or {}) | {"Content-Type": media_type},
        timeout=timeout,
        ssl_context=ssl_context,
    )
    return resp.headers.get("docker-content-digest", "")


def push(
    registry_url: str,
    repo: str,
    tag: str | None,
    image: Image,
    *,
    timeout: float = DEFAULT_TIMEOUT,
    headers: Mapping[str, str] | None = None,
    ssl_context: ssl.SSLContext | None = None,
) -> None:
    """Push an image: blobs, child manifests by digest, then the top one by tag.

    Args:
        registry_url: e.g. ``http://127.0.0.1:5001``.
        repo: repository path, e.g. ``library/alpine``.
        tag: tag for the top manifest; None pushes it by digest only.
        image: what to push.
        timeout: per-request bound in seconds.
        headers: sent with every request; an ``Authorization`` value (Basic, or a
            Bearer token the test minted) pushes to a registry that requires auth.
        ssl_context: TLS settings for an ``https://`` registry (e.g. its test CA).

    Raises:
        RegistryHTTPError: the registry refused a request.
        RuntimeError: the registry computed a different manifest digest.
    """
    base = registry_url.rstrip("/")
    for digest, data in image.blobs.items():
        _push_blob(base, repo, digest, data, timeout, headers=headers, ssl_context=ssl_context)
    for digest, (media_type, body) in image.manifests.items():
        is_top = digest == image.digest
        ref = tag if is_top and tag is not None else digest
        got = put_manifest(
            base,
            repo,
            ref,
            media_type,
            body,
            timeout=timeout,
            headers=headers,
            ssl_context=ssl_context,
        )
        if got and got != digest:
            raise RuntimeError(f"registry stored {ref} as {got}, expected {digest}")


async def push_async(
    registry_url: str,
    repo: str,
    tag: str | None,
    image: Image,
    *,
    request_timeout: float = DEFAULT_TIMEOUT,
) -> None:
    """Run ``push`` in a worker thread, for async tests."""
    await asyncio.to_thread(push, registry_url, repo, tag, image, timeout=request_timeout)


def get_manifest(
    registry_url: str,
    repo: str,
    reference: str,
    *,
    accept: Sequence[str] = MANIFEST_MEDIA_TYPES,
    timeout: float = DEFAULT_TIMEOUT,
) -> Response:
    """GET a manifest by tag or digest, accepting every type we build."""
    return request(
        "GET",
        f"{registry_url.rstrip('/')}/v2/{repo}/manifests/{reference}",
        headers={"Accept": ", ".join(accept)},
        timeout=timeout,
    )


def delete_manifest(
    registry_url: str, repo: str, digest: str, *, timeout: float = DEFAULT_TIMEOUT
) -> None:
    """DELETE a manifest by digest (the registry must have delete enabled)."""
    request(
        "DELETE",
        f"{registry_url.rstrip('/')}/v2/{repo}/manifests/{digest}",
        timeout=timeout,
    )
