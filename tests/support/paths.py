"""Request paths on the mirror, and the namespace and repository most tests pull.

Every path carries ``ns=`` as containerd sends it, so a test names the namespace
it means instead of relying on ``server.default_namespace``.
"""

from __future__ import annotations

NS = "docker.io"
REPO = "library/alpine"


def manifest_path(repo: str, ref: str, ns: str = NS) -> str:
    return f"/v2/{repo}/manifests/{ref}?ns={ns}"


def blob_path(repo: str, digest: str, ns: str = NS) -> str:
    return f"/v2/{repo}/blobs/{digest}?ns={ns}"
