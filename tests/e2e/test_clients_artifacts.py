"""OCI artifacts through the mirror: ctr and ORAS pull them, referrers are found both ways.

The artifact (``artifactType``, empty config, two titled file layers, ``subject`` =
the lab's OCI image) sits on the docker.io stand-in, a docker-registry 2.8 with no
referrers API: there the OCI 1.1 tag scheme (``sha256-<hex>``, an index) lists it,
and the mirror must answer the referrers endpoint with 404 so clients fall back to
that tag. A third namespace (ghcr.io) is a small upstream that implements the
referrers API: the mirror answers queries from it, ``artifactType`` filter applied
and ``OCI-Filters-Applied`` echoed.

ORAS is the ``oras`` Python package. It pulls by tag or digest, but version 0.2 has
no referrers call, so discovery sends the documented request through the client's
own HTTP session (``do_request``) and pulls what it finds with the client.
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import oras.client  # type: ignore[import-untyped]
import pytest

from tests.support import images
from tests.support.clientlab import (
    LabImage,
    LabMirror,
    Upstreams,
)
from tests.support.exchanges import (
    ClientMatrix,
    describe_all,
    last_error,
    served_problems,
)
from tests.support.procs import CTR_ENV_OVERRIDES, Containerd, ctr, ctr_images
from tests.support.referrersupstream import ReferrersUpstream

SBOM_TYPE = "application/vnd.example.sbom.v1+json"
SIGNATURE_TYPE = "application/vnd.example.signature.v1+json"
APP_REPO = "acme/app"


@pytest.fixture(scope="module")
def referrers_upstream(lab_upstreams: Upstreams) -> Iterator[ReferrersUpstream]:
    """ghcr.io stand-in: the lab's OCI image with an SBOM and a signature referring to it."""
    upstream = ReferrersUpstream()
    upstream.push(APP_REPO, "1", lab_upstreams.images["oci"].image)
    for artifact in _ghcr_artifacts(lab_upstreams).values():
        upstream.push(APP_REPO, None, artifact)
    yield upstream
    upstream.stop()


def _ghcr_artifacts(lab_upstreams: Upstreams) -> dict[str, images.Image]:
    subject = lab_upstreams.images["oci"].image
    return {
        SBOM_TYPE: images.build_artifact(subject, SBOM_TYPE, {"sbom.json": b'{"n": 1}\n'}),
        SIGNATURE_TYPE: images.build_artifact(subject, SIGNATURE_TYPE, {"sig.bin": b"\x01sig"}),
    }


@pytest.fixture(scope="module")
def mirror(
    lab_upstreams: Upstreams,
    referrers_upstream: ReferrersUpstream,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[LabMirror]:
    """The lab's namespaces plus ghcr.io, whose upstream has the referrers API."""
    namespaces = lab_upstreams.namespaces() | {"ghcr.io": [referrers_upstream.url]}
    lab = LabMirror(tmp_path_factory.mktemp("artifact-mirror"), namespaces)
    yield lab
    lab.stop()
    assert "Traceback" not in lab.process.log_text(), "the mirror logged a traceback"


@pytest.fixture
def oras_client(monkeypatch: pytest.MonkeyPatch, mirror: LabMirror) -> Any:
    """An ORAS client for the mirror over plain HTTP, with the closed local proxy."""
    for name, value in CTR_ENV_OVERRIDES.items():
        monkeypatch.setenv(name, value)
    return oras.client.OrasClient(hostname=mirror.host, insecure=True)


def _files(artifact: images.Image) -> dict[str, bytes]:
    """File name -> bytes of an artifact built by ``images.build_artifact``."""
    doc = json.loads(artifact.body)
    return {
        layer["annotations"][images.TITLE_ANNOTATION]: artifact.blobs[layer["digest"]]
        for layer in doc["layers"]
    }


def _pulled(paths: list[str]) -> dict[str, bytes]:
    return {Path(p).name: Path(p).read_bytes() for p in paths}


def test_ctr_pulls_an_artifact_through_the_mirror(
    mirror: LabMirror,
    lab_upstreams: Upstreams,
    containerd: Containerd,
    tmp_path: Path,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.artifact
    hosts = tmp_path / "certs.d"
    out = mirror.hosts_cli("--out", str(hosts))
    assert out.returncode == 0, out.stderr
    mark = mirror.mark()
    # `images pull` would try to unpack the artifact as a rootfs; `content fetch` is
    # ctr's pull without unpacking.
    proc = ctr(containerd, "content", "fetch", "--hosts-dir", str(hosts), lab.ref)
    exchanges = mirror.exchanges(mark)
    problems = [] if proc.returncode == 0 else [f"ctr fetch failed: {last_error(proc.stderr)}"]
    listed = ctr_images(containerd).get(lab.ref)
    if listed is None or listed.digest != lab.image.digest:
        problems.append(f"containerd lists {listed}, upstream digest {lab.image.digest}")
    for digest, data in lab.image.blobs.items():  # all text: ctr() decodes its output
        got = ctr(containerd, "content", "get", digest)
        if got.returncode != 0 or got.stdout.encode() != data:
            problems.append(f"content {digest[:19]} missing or different in containerd")
    problems += served_problems(exchanges, lab.repo, set(lab.image.blobs), ns="docker.io")
    client_matrix.add("ctr", "artifact", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)


def test_oras_pulls_an_artifact_by_tag_through_the_mirror(
    oras_client: Any,
    mirror: LabMirror,
    lab_upstreams: Upstreams,
    tmp_path: Path,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.artifact
    mark = mirror.mark()
    paths = oras_client.pull(target=f"{mirror.host}/{lab.repo}:{lab.tag}", outdir=str(tmp_path))
    exchanges = mirror.exchanges(mark)
    problems = [] if _pulled(paths) == _files(lab.image) else [f"ORAS pulled {paths}"]
    problems += served_problems(exchanges, lab.repo, ns="docker.io")
    client_matrix.add("oras", "artifact", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)


def _referrers(oras_client: Any, mirror: LabMirror, name: str, digest: str, query: str) -> Any:
    """GET the referrers endpoint through the mirror with the client's session."""
    url = f"http://{mirror.host}/v2/{name}/referrers/{digest}{query}"
    return oras_client.do_request(url, "GET", headers={"Accept": images.OCI_INDEX})


def test_oras_finds_referrers_through_the_mirror_and_pulls_them(
    oras_client: Any,
    mirror: LabMirror,
    lab_upstreams: Upstreams,
    referrers_upstream: ReferrersUpstream,
    tmp_path: Path,
    client_matrix: ClientMatrix,
) -> None:
    subject = lab_upstreams.images["oci"].image
    artifacts = _ghcr_artifacts(lab_upstreams)
    name = f"ghcr.io/{APP_REPO}"
    mark = mirror.mark()
    problems: list[str] = []

    every = _referrers(oras_client, mirror, name, subject.digest, "")
    listed = json.loads(every.content).get("manifests", []) if every.status_code == 200 else []
    if {d["digest"] for d in listed} != {a.digest for a in artifacts.values()}:
        problems.append(f"referrers without filter: {every.status_code} {every.content[:300]!r}")

    query = "?" + urllib.parse.urlencode({"artifactType": SBOM_TYPE})  # "+" must be %2B
    only = _referrers(oras_client, mirror, name, subject.digest, query)
    filtered = json.loads(only.content).get("manifests", []) if only.status_code == 200 else []
    if [d["digest"] for d in filtered] != [artifacts[SBOM_TYPE].digest]:
        problems.append(f"referrers filtered: {only.status_code} {only.content[:300]!r}")
    elif "artifactType" not in only.headers.get("OCI-Filters-Applied", ""):
        problems.append("the filtered answer does not say OCI-Filters-Applied: artifactType")
    # The mirror may forward the filter or filter one cached answer itself; either
    # way the answers come from the upstream's referrers API.
    if not any(s.path.endswith(f"/referrers/{subject.digest}") for s in referrers_upstream.seen):
        problems.append("the upstream's referrers API was never asked")

    for descriptor in listed:
        paths = oras_client.pull(
            target=f"{mirror.host}/{name}@{descriptor['digest']}", outdir=str(tmp_path)
        )
        expected = _files(artifacts[descriptor["artifactType"]])
        if _pulled(paths) != expected:
            problems.append(f"referrer {descriptor['digest'][:19]} pulled as {paths}")
    exchanges = mirror.exchanges(mark)
    client_matrix.add("oras", "referrers API", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)


def test_oras_falls_back_to_the_referrers_tag_when_upstream_has_no_api(
    oras_client: Any,
    mirror: LabMirror,
    lab_upstreams: Upstreams,
    tmp_path: Path,
    client_matrix: ClientMatrix,
) -> None:
    lab: LabImage = lab_upstreams.artifact
    subject = lab_upstreams.images["oci"]
    mark = mirror.mark()
    problems: list[str] = []
    api = _referrers(oras_client, mirror, subject.repo, subject.image.digest, "")
    if api.status_code != 404:
        problems.append(f"referrers API on an upstream without one answered {api.status_code}")
    tag = images.referrers_tag(subject.image.digest)
    index = oras_client.get_manifest(f"{mirror.host}/{subject.repo}:{tag}")
    listed = [(d["digest"], d.get("artifactType")) for d in index.get("manifests", [])]
    if listed != [(lab.image.digest, images.artifact_type_of(lab.image))]:
        problems.append(f"the {tag} tag lists {listed}")
    else:
        paths = oras_client.pull(
            target=f"{mirror.host}/{subject.repo}@{lab.image.digest}", outdir=str(tmp_path)
        )
        if _pulled(paths) != _files(lab.image):
            problems.append(f"artifact pulled as {paths}")
    exchanges = mirror.exchanges(mark)
    client_matrix.add("oras", "referrers tag", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)
