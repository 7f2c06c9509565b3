"""Image references as people write them, normalised the way containerd does.

``alpine:3`` is ``docker.io/library/alpine:3``; ``registry.k8s.io/pause:3.9`` and
``quay.io/org/img@sha256:...`` keep their registry. Pure; used by preload and the
bundle commands.
"""

from __future__ import annotations

from dataclasses import dataclass

from mirrorproxy.core.errors import RegistryError
from mirrorproxy.core.oci import Digest, parse_digest, parse_name, parse_reference

DOCKER_HUB = "docker.io"


@dataclass(frozen=True, slots=True)
class ImageRef:
    registry: str  # "docker.io", "registry.k8s.io", "myregistry:5000"
    repository: str  # "library/alpine"
    tag: str | None = None
    digest: Digest | None = None

    @property
    def reference(self) -> str | Digest:
        """What to resolve: the digest when pinned, else the tag."""
        if self.digest is not None:
            return self.digest
        return self.tag or "latest"

    def __str__(self) -> str:
        out = f"{self.registry}/{self.repository}"
        if self.tag is not None:
            out += f":{self.tag}"
        if self.digest is not None:
            out += f"@{self.digest}"
        return out


def parse_image_reference(text: str) -> ImageRef:
    """Parse and normalise one reference.

    Raises:
        ValueError: not a valid image reference (the message says why).
    """
    s = text.strip()
    if not s:
        raise ValueError("empty image reference")
    name, digest = s, None
    if "@" in s:
        name, _, raw_digest = s.partition("@")
        try:
            digest = parse_digest(raw_digest)
        except RegistryError as err:
            raise ValueError(f"{text!r}: {err.message}") from None
    tag = None
    last = name.rsplit("/", 1)[-1]
    if ":" in last:
        name, _, tag = name.rpartition(":")
    first, sep, rest = name.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        registry, repo = first.lower(), rest
    else:
        registry, repo = DOCKER_HUB, name
    if registry in ("index.docker.io", "registry-1.docker.io"):
        registry = DOCKER_HUB
    if registry == DOCKER_HUB and "/" not in repo:
        repo = f"library/{repo}"
    try:
        parse_name(repo)
        if tag is not None:
            parse_reference(tag)
    except RegistryError as err:
        raise ValueError(f"{text!r}: {err.message}") from None
    if tag is None and digest is None:
        tag = "latest"
    return ImageRef(registry, repo, tag, digest)
