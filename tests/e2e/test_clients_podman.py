"""podman pulls every image kind through the mirror, configured by `mirrorproxy hosts`.

``mirrorproxy hosts --format registries-conf`` writes the containers-registries.conf
drop-in: one ``[[registry]]`` per namespace whose mirror location carries the
namespace as a path (``127.0.0.1:PORT/docker.io``), so podman's requests arrive as
``/v2/docker.io/library/x/...`` without ``ns=``, and the mirror routes them by that
prefix. quay.io/acme/tool:v5 exists on both upstreams with different content: only
routing by path gives the right digest. podman falls back to the real registry when
the mirror fails, which the closed local proxy stops; the mirror's access log shows
it served each pull.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

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
    Exchange,
    describe_all,
    last_error,
    served_problems,
)


@pytest.fixture(scope="module")
def registries_conf(lab_mirror: LabMirror, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The drop-in `mirrorproxy hosts --format registries-conf` prints, saved to a file."""
    require_tools("podman", package="podman")
    proc = lab_mirror.hosts_cli("--format", "registries-conf")
    assert proc.returncode == 0, f"mirrorproxy hosts --format registries-conf: {proc.stderr}"
    path = tmp_path_factory.mktemp("podman-conf") / "registries.conf"
    path.write_text(proc.stdout)
    return path


@pytest.fixture(scope="module")
def tools(registries_conf: Path, tmp_path_factory: pytest.TempPathFactory) -> ContainersTools:
    """podman with private vfs storage, the generated registries.conf, no way out."""
    return ContainersTools(tmp_path_factory.mktemp("podman"), registries_conf)


def test_registries_conf_names_the_mirror_with_a_path_per_namespace(
    registries_conf: Path, lab_mirror: LabMirror, lab_upstreams: Upstreams
) -> None:
    doc = tomllib.loads(registries_conf.read_text())
    by_prefix = {r["prefix"]: r for r in doc["registry"]}
    for ns in lab_upstreams.namespaces():
        mirrors = by_prefix[ns]["mirror"]
        assert [m["location"] for m in mirrors] == [f"{lab_mirror.host}/{ns}"]
        assert all(m["insecure"] is True for m in mirrors)


def _pull_problems(
    tools: ContainersTools,
    lab: LabImage,
    exchanges: list[Exchange],
    returncode: int,
    stderr: str,
    platform: str = "linux/amd64",
) -> list[str]:
    """Check a podman pull: it succeeded, stored the upstream's image, the mirror served it."""
    if returncode != 0:
        return [f"podman pull failed: {last_error(stderr)}"]
    problems: list[str] = []
    info = tools.podman_inspect(lab.ref)
    if f"sha256:{info['Id']}" != lab.config_digest(platform):
        problems.append(f"image id {info['Id']}, upstream config {lab.config_digest(platform)}")
    if info["RootFS"]["Layers"] != lab.diff_ids(platform):
        problems.append(f"layers {info['RootFS']['Layers']} differ from the upstream's")
    if f"{lab.name}@{lab.image.digest}" not in info["RepoDigests"]:
        problems.append(f"RepoDigests {info['RepoDigests']} lack {lab.image.digest}")
    problems += served_problems(
        exchanges, lab.repo, lab.image.blob_digests(platform), ns=lab.registry
    )
    return problems


@pytest.mark.parametrize("kind", IMAGE_KINDS)
def test_podman_pulls_each_image_kind_through_the_mirror(
    kind: str,
    tools: ContainersTools,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.images[kind]
    mark = lab_mirror.mark()
    proc = tools.podman("pull", lab.ref)
    exchanges = lab_mirror.exchanges(mark)
    problems = _pull_problems(tools, lab, exchanges, proc.returncode, proc.stderr)
    client_matrix.add("podman", kind, exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)


def test_podman_pulls_the_arm64_image_of_an_index(
    tools: ContainersTools,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.images["oci-index"]
    mark = lab_mirror.mark()
    proc = tools.podman("pull", "--arch", "arm64", lab.ref)
    exchanges = lab_mirror.exchanges(mark)
    problems = _pull_problems(
        tools, lab, exchanges, proc.returncode, proc.stderr, platform="linux/arm64"
    )
    if not problems and tools.podman_inspect(lab.ref)["Architecture"] != "arm64":
        problems.append("podman stored a non-arm64 image")
    client_matrix.add("podman", "index arm64", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)


def test_podman_pulls_a_second_namespace_from_its_own_upstream(
    tools: ContainersTools,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.quay_tool
    mark = lab_mirror.mark()
    proc = tools.podman("pull", lab.ref)
    exchanges = lab_mirror.exchanges(mark)
    problems = _pull_problems(tools, lab, exchanges, proc.returncode, proc.stderr)
    if not any(e.request.path.startswith("/v2/quay.io/acme/tool/") for e in exchanges):
        problems.append("podman did not address the mirror under /v2/quay.io/")
    client_matrix.add("podman", "quay.io by path", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)
