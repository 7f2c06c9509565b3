"""skopeo inspects and copies every image kind through the mirror, bytes as upstream's.

skopeo (containers/image) sends its six ``Accept`` types as six header lines. It is
pointed at the mirror as a registry (``docker://127.0.0.1:PORT/library/x:1``): no
``ns=``, so requests land in the default namespace (docker.io), whose upstream is
Debian's docker-registry holding the images the tests pushed. ``copy --all`` goes to
``dir:`` (which keeps manifests as they are; ``oci:`` would convert a Docker list)
and, for the multi-arch kinds, to a second docker-registry, read back by digest.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support import images
from tests.support.clientlab import (
    IMAGE_KINDS,
    LabImage,
    LabMirror,
    Upstreams,
    require_tools,
)
from tests.support.containers import ContainersTools
from tests.support.exchanges import (
    ClientMatrix,
    describe_all,
    last_error,
    served_problems,
)
from tests.support.procs import Registry

MULTI_ARCH = ("oci-index", "docker-list")


@pytest.fixture(scope="module")
def tools(tmp_path_factory: pytest.TempPathFactory) -> ContainersTools:
    """skopeo with the closed local proxy and no registries.conf of ours."""
    require_tools("skopeo", package="skopeo")
    return ContainersTools(tmp_path_factory.mktemp("skopeo"))


@pytest.fixture(scope="module")
def sink(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Registry]:
    """A registry to copy into, to read what skopeo wrote byte for byte."""
    reg = Registry(tmp_path_factory.mktemp("sink"))
    yield reg
    reg.stop()


def _source(mirror: LabMirror, lab: LabImage, by: str) -> str:
    ref = f"@{lab.image.digest}" if by == "digest" else f":{lab.tag}"
    return f"docker://{mirror.host}/{lab.repo}{ref}"


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_skopeo_inspect_through_mirror_matches_upstream(
    kind: str,
    tools: ContainersTools,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.images[kind]
    src = _source(lab_mirror, lab, "tag")
    mark = lab_mirror.mark()
    raw = tools.skopeo_raw("inspect", "--tls-verify=false", "--raw", src)
    parsed = tools.skopeo("inspect", "--tls-verify=false", src)
    exchanges = lab_mirror.exchanges(mark)

    problems: list[str] = []
    if raw.returncode != 0:
        problems.append(f"inspect --raw failed: {last_error(raw.stderr.decode(errors='replace'))}")
    elif raw.stdout != lab.image.body:
        problems.append(f"inspect --raw differs from the upstream's bytes: {raw.stdout[:200]!r}")
    if parsed.returncode != 0:
        problems.append(f"inspect failed: {last_error(parsed.stderr)}")
    else:
        info = json.loads(parsed.stdout)
        if info["Digest"] != lab.image.digest:
            problems.append(f"inspect says Digest {info['Digest']}, upstream {lab.image.digest}")
        if info["Layers"] != _layers(lab):
            problems.append(f"inspect lists layers {info['Layers']}")
    problems += served_problems(exchanges, lab.repo, ns="docker.io")
    client_matrix.add("skopeo", f"{kind} inspect", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)


def _layers(lab: LabImage) -> list[str]:
    """Layer digests of the platform skopeo inspect describes (linux/amd64)."""
    _, body = lab.image.manifests[lab.image.platforms["linux/amd64"]]
    return [la["digest"] for la in json.loads(body)["layers"]]


def _dir_problems(out: Path, image: images.Image) -> list[str]:
    """Compare a ``dir:`` copy with the image: top manifest, children, every blob."""
    problems: list[str] = []
    top = out / "manifest.json"
    if not top.exists() or top.read_bytes() != image.body:
        problems.append("dir: manifest.json differs from the upstream's index bytes")
    for digest, (_, body) in image.manifests.items():
        if digest == image.digest:
            continue
        child = out / f"{digest.split(':', 1)[1]}.manifest.json"
        if not child.exists() or child.read_bytes() != body:
            problems.append(f"dir: platform manifest {digest[:19]} missing or different")
    for digest, data in image.blobs.items():
        blob = out / digest.split(":", 1)[1]
        if not blob.exists() or blob.read_bytes() != data:
            problems.append(f"dir: blob {digest[:19]} missing or different")
    return problems


@pytest.mark.parametrize("by", ["tag", "digest"])
@pytest.mark.parametrize("kind", MULTI_ARCH)
def test_skopeo_copy_all_into_dir_is_byte_identical(
    kind: str,
    by: str,
    tools: ContainersTools,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
    tmp_path: Path,
) -> None:
    lab = lab_upstreams.images[kind]
    out = tmp_path / "copy"
    mark = lab_mirror.mark()
    proc = tools.skopeo(
        "--insecure-policy",
        "copy",
        "--all",
        "--src-tls-verify=false",
        _source(lab_mirror, lab, by),
        f"dir:{out}",
    )
    exchanges = lab_mirror.exchanges(mark)

    problems: list[str] = []
    if proc.returncode != 0:
        problems.append(f"copy --all failed: {last_error(proc.stderr)}")
    else:
        problems += _dir_problems(out, lab.image)
    problems += served_problems(exchanges, lab.repo, lab.image.blob_digests(), ns="docker.io")
    client_matrix.add("skopeo", f"{kind} copy-all by {by}", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)


@pytest.mark.parametrize("kind", MULTI_ARCH)
def test_skopeo_copy_all_into_registry_keeps_the_index(
    kind: str,
    tools: ContainersTools,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    sink: Registry,
) -> None:
    lab = lab_upstreams.images[kind]
    mark = lab_mirror.mark()
    proc = tools.skopeo(
        "--insecure-policy",
        "copy",
        "--all",
        "--src-tls-verify=false",
        "--dest-tls-verify=false",
        _source(lab_mirror, lab, "tag"),
        f"docker://{sink.host}/{lab.repo}:{lab.tag}",
    )
    exchanges = lab_mirror.exchanges(mark)
    assert proc.returncode == 0, proc.stderr[-800:] + "\n" + describe_all(exchanges)
    copied = images.get_manifest(sink.url, lab.repo, lab.image.digest)
    assert copied.body == lab.image.body
    for digest, (_, body) in lab.image.manifests.items():
        assert images.get_manifest(sink.url, lab.repo, digest).body == body
