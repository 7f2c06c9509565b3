"""A small registry upstream that implements the OCI 1.1 referrers API, in a thread.

Debian's docker-registry 2.8 has no ``GET /v2/<name>/referrers/<digest>``; this
stand-in has. It serves the images pushed into it (manifests by tag or digest,
blobs) and answers referrers queries from the ``subject`` of the manifests it
holds, honouring the ``artifactType`` filter and saying so with
``OCI-Filters-Applied``. It records each request's path and query, so a test can
see what the mirror forwarded. The standard library's threading HTTP server runs
it: the e2e tests are synchronous and the mirror is another process.
"""

from __future__ import annotations

import http.server
import json
import threading
import urllib.parse
from dataclasses import dataclass
from typing import Any

from tests.support import images

JOIN_TIMEOUT = 10.0


@dataclass(frozen=True, slots=True)
class Seen:
    """One request the upstream received."""

    method: str
    path: str
    query: dict[str, list[str]]


class ReferrersUpstream:
    """Serve pushed images and their referrers on ``127.0.0.1:<port>``."""

    def __init__(self) -> None:
        self._manifests: dict[tuple[str, str], tuple[str, bytes]] = {}  # (repo, ref)
        self._blobs: dict[str, bytes] = {}
        self._lock = threading.Lock()
        self.seen: list[Seen] = []
        owner = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def do_GET(self) -> None:
                owner._handle(self, head=False)

            def do_HEAD(self) -> None:
                owner._handle(self, head=True)

            def log_message(self, format: str, *args: Any) -> None:
                return  # requests are recorded in ``seen``

        self._server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def url(self) -> str:
        """``http://127.0.0.1:<port>``."""
        return f"http://127.0.0.1:{self._server.server_address[1]}"

    def push(self, repo: str, tag: str | None, image: images.Image) -> None:
        """Store an image's blobs and manifests; the top one also under ``tag``."""
        with self._lock:
            self._blobs.update(image.blobs)
            for digest, entry in image.manifests.items():
                self._manifests[(repo, digest)] = entry
            if tag is not None:
                self._manifests[(repo, tag)] = image.manifests[image.digest]

    def stop(self) -> None:
        """Stop serving and join the server thread."""
        self._server.shutdown()
        self._server.server_close()
        self._thread.join(JOIN_TIMEOUT)

    def referrers(self, repo: str, subject: str, artifact_type: str | None) -> bytes:
        """The referrers index of ``subject`` in ``repo``, optionally filtered."""
        found: list[images.Image] = []
        with self._lock:
            entries = [(ref, e) for (r, ref), e in self._manifests.items() if r == repo]
        for ref, (media_type, body) in entries:
            if not ref.startswith("sha256:"):
                continue  # each manifest once, under its digest
            doc = json.loads(body)
            if doc.get("subject", {}).get("digest") != subject:
                continue
            if artifact_type is not None and doc.get("artifactType") != artifact_type:
                continue
            found.append(
                images.Image(
                    blobs={},
                    manifests={ref: (media_type, body)},
                    digest=ref,
                    media_type=media_type,
                )
            )
        found.sort(key=lambda a: a.digest)
        return images.referrers_index(found)

    def _handle(self, req: http.server.BaseHTTPRequestHandler, *, head: bool) -> None:
        url = urllib.parse.urlsplit(req.path)
        query = urllib.parse.parse_qs(url.query)
        with self._lock:
            self.seen.append(Seen(req.command, url.path, query))
        parts = url.path.split("/")
        headers: dict[str, str] = {}
        status, body, ctype = (
            404,
            b'{"errors":[{"code":"NAME_UNKNOWN","message":"not here"}]}',
            "application/json",
        )
        if url.path in ("/v2/", "/v2"):
            status, body = 200, b"{}"
        elif len(parts) >= 5 and parts[1] == "v2":
            repo, kind, ref = "/".join(parts[2:-2]), parts[-2], parts[-1]
            if kind == "manifests":
                with self._lock:
                    entry = self._manifests.get((repo, ref))
                if entry is not None:
                    status, (ctype, body) = 200, entry
                    headers["Docker-Content-Digest"] = images.sha256_digest(body)
            elif kind == "blobs":
                with self._lock:
                    blob = self._blobs.get(ref)
                if blob is not None:
                    status, body, ctype = 200, blob, "application/octet-stream"
                    headers["Docker-Content-Digest"] = ref
            elif kind == "referrers":
                wanted = query.get("artifactType", [None])[0]
                status, body, ctype = 200, self.referrers(repo, ref, wanted), images.OCI_INDEX
                if wanted is not None:
                    headers["OCI-Filters-Applied"] = "artifactType"
        req.send_response(status)
        req.send_header("Content-Type", ctype)
        req.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            req.send_header(name, value)
        req.end_headers()
        if not head:
            req.wfile.write(body)
