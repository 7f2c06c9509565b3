"""Shared set-up of the client-compatibility tests: upstreams, images, a tapped mirror.

``Upstreams`` starts Debian's docker-registry twice (standing in for docker.io and
quay.io) and pushes one image of every kind the clients must pull, once per
session. ``LabMirror`` runs ``mirrorproxy serve`` in front of them with JSON logs,
behind a ``HeaderTap`` that records what each client sent; ``exchanges`` pairs each
recorded request with the mirror's access-log line for it (``tests.support.exchanges``
judges them). Client wrappers live in their own modules; this one knows no client.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import images
from tests.support.exchanges import AccessLine, Exchange, parse_access_log
from tests.support.headertap import HeaderTap
from tests.support.procs import MirrorProcess, Registry, free_port, mirror_config
from tests.support.requirements import REQUIRE_E2E_ENV

KiB = 1024
LOG_SETTLE = 5.0  # seconds to wait for access lines (written in batches, <= 0.1 s late)
CLI_TIMEOUT = 60.0


def require_tools(*binaries: str, package: str) -> None:
    """Skip (fail under ``MIRRORPROXY_REQUIRE_E2E=1``) unless every binary is on PATH."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if not missing:
        return
    reason = f"{', '.join(missing)} not found on PATH (apt-get install {package})"
    if os.environ.get(REQUIRE_E2E_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@dataclass(frozen=True, slots=True)
class LabImage:
    """An image pushed to an upstream, under the registry name clients use for it."""

    kind: str  # what the matrix calls it, e.g. "oci-index"
    registry: str  # e.g. "docker.io"
    repo: str  # e.g. "library/ociindex"
    tag: str
    image: images.Image

    @property
    def name(self) -> str:
        """``registry/repo``."""
        return f"{self.registry}/{self.repo}"

    @property
    def ref(self) -> str:
        """``registry/repo:tag``."""
        return f"{self.name}:{self.tag}"

    @property
    def pinned(self) -> str:
        """``registry/repo@digest``."""
        return f"{self.name}@{self.image.digest}"

    def config_digest(self, platform: str = "linux/amd64") -> str:
        """The config blob of one platform: what Docker and CRI call the image id."""
        _, body = self.image.manifests[self.image.platforms[platform]]
        digest: str = json.loads(body)["config"]["digest"]
        return digest

    def diff_ids(self, platform: str = "linux/amd64") -> list[str]:
        """The uncompressed layer digests of one platform, from its config."""
        ids: list[str] = json.loads(self.image.blobs[self.config_digest(platform)])["rootfs"][
            "diff_ids"
        ]
        return ids


#: The image kinds every client pulls, in matrix order.
IMAGE_KINDS = ("v2s2", "oci", "oci-index", "docker-list", "zstd")


class Upstreams:
    """Two docker-registry upstreams holding one image of every kind, pushed once.

    ``images`` maps a kind to its image on the docker.io stand-in; ``quay_tool`` is
    ``quay.io/acme/tool:v5`` on the quay.io stand-in, whose repository and tag also
    exist on the docker.io one with other content, so a request routed to the wrong
    upstream gets a wrong digest rather than a lucky hit.
    """

    def __init__(self, workdir: Path) -> None:
        self.hub = Registry(workdir / "hub")
        self.quay = Registry(workdir / "quay")
        specs = {
            "v2s2": images.build_image([96 * KiB, 48 * KiB], seed=101, docker=True),
            "oci": images.build_image([96 * KiB, 48 * KiB], seed=102),
            "oci-index": images.build_index([64 * KiB, 32 * KiB], seed=103),
            "docker-list": images.build_index([64 * KiB, 32 * KiB], seed=104, docker=True),
            "zstd": images.build_image([96 * KiB, 48 * KiB], seed=105, compression="zstd"),
        }
        repos = {
            "v2s2": "library/v2s2",
            "oci": "library/oci",
            "oci-index": "library/ociindex",
            "docker-list": "library/dockerlist",
            "zstd": "library/zstd",
        }
        self.images = {
            kind: LabImage(kind, "docker.io", repos[kind], "1", image)
            for kind, image in specs.items()
        }
        self.quay_tool = LabImage(
            "second-ns", "quay.io", "acme/tool", "v5", images.build_image([64 * KiB], seed=106)
        )
        self.hub_tool = images.build_image([32 * KiB], seed=107)  # same name on docker.io
        subject = self.images["oci"]
        self.artifact = LabImage(
            "artifact",
            "docker.io",
            subject.repo,
            "sbom",
            images.build_artifact(
                subject.image,
                "application/vnd.example.sbom.v1+json",
                {"sbom.json": b'{"packages": []}\n', "notes.txt": b"built by the tests\n"},
                annotations={"org.example.kind": "sbom"},
            ),
        )
        self.conformance = LabImage(
            "conformance",
            "docker.io",
            "conformance/pull",
            "conftag",
            images.build_image([16 * KiB], seed=108),
        )
        for lab in (*self.images.values(), self.artifact, self.conformance):
            images.push(self.hub.url, lab.repo, lab.tag, lab.image)
        images.push(self.hub.url, self.quay_tool.repo, self.quay_tool.tag, self.hub_tool)
        images.push(self.quay.url, self.quay_tool.repo, self.quay_tool.tag, self.quay_tool.image)
        # docker-registry has no referrers API: the OCI 1.1 tag scheme stands in for it.
        images.put_manifest(
            self.hub.url,
            subject.repo,
            images.referrers_tag(subject.image.digest),
            images.OCI_INDEX,
            images.referrers_index([self.artifact.image]),
        )

    def namespaces(self) -> dict[str, list[str]]:
        """The mirror's namespaces: registry name -> upstream URLs."""
        return {"docker.io": [self.hub.url], "quay.io": [self.quay.url]}

    def stop(self) -> None:
        """Stop both registries."""
        self.hub.stop()
        self.quay.stop()


class LabMirror:
    """``mirrorproxy serve`` (JSON logs) in front of upstreams, behind a header tap.

    Clients are given ``url``/``host`` (the tap's); ``process.url`` is the mirror's
    own address.
    """

    def __init__(
        self,
        workdir: Path,
        namespaces: Mapping[str, Sequence[str]],
        *,
        default_namespace: str = "docker.io",
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        port = free_port()
        config = mirror_config(
            port, workdir / "cache", namespaces, default_namespace=default_namespace
        )
        self.process = MirrorProcess(workdir, config, port, args=["--log-format", "json"])
        self.tap = HeaderTap(port)
        try:
            self.tap.start()
        except RuntimeError:
            self.process.stop()
            raise

    @property
    def url(self) -> str:
        """What clients use as the mirror: ``http://127.0.0.1:<tap port>``."""
        return self.tap.url

    @property
    def host(self) -> str:
        """``127.0.0.1:<tap port>``."""
        return self.tap.host

    def mark(self) -> int:
        """A position in the request record, for ``exchanges(since=...)``."""
        return self.tap.mark()

    def access_lines(self) -> list[AccessLine]:
        """Every access-log line the mirror wrote so far."""
        return parse_access_log(self.process.log_text())

    def exchanges(self, since: int = 0) -> list[Exchange]:
        """Requests made after ``since`` with their access lines (waits for the log).

        Access lines are written in batches, so this polls (bounded by LOG_SETTLE)
        until every recorded request has its line.
        """
        deadline = time.monotonic() + LOG_SETTLE
        while True:
            requests = self.tap.requests(since)
            by_id = {a.request_id: a for a in self.access_lines() if a.request_id}
            pairs = [Exchange(r, by_id.get(r.request_id)) for r in requests]
            if all(p.access is not None for p in pairs) or time.monotonic() > deadline:
                return pairs
            time.sleep(0.05)

    def hosts_cli(self, *args: str) -> subprocess.CompletedProcess[str]:
        """Run ``mirrorproxy hosts --config <ours> --mirror-url <tap> ARGS...``."""
        return subprocess.run(
            [
                sys.executable,
                "-m",
                "mirrorproxy",
                "hosts",
                "--config",
                str(self.process.config_path),
                "--mirror-url",
                self.url,
                *args,
            ],
            capture_output=True,
            text=True,
            timeout=CLI_TIMEOUT,
            check=False,
        )

    def stop(self) -> None:
        """Stop the tap and the mirror."""
        self.tap.stop()
        self.process.stop()
