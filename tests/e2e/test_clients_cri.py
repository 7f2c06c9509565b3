"""containerd's CRI plugin (the kubelet's path) pulls every image kind through the mirror.

containerd runs with the CRI plugin on and ``config_path`` set to the directory
``mirrorproxy hosts --out`` wrote; the tests drive ``runtime.v1.ImageService`` over
gRPC like kubelet does (PullImage, ImageStatus, RemoveImage). containerd sends one
comma-joined ``Accept`` line and ``ns=<registry>``. When the mirror fails, the daemon
falls back to the real registry (``server`` in hosts.toml), which the closed local
proxy stops, and the CRI error then names only that fallback: the mirror's access
log says what it answered.
"""

from __future__ import annotations

import tomllib
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest

from tests.support.clientlab import (
    IMAGE_KINDS,
    LabImage,
    LabMirror,
    Upstreams,
)
from tests.support.cri import CriContainerd, CriImageClient, rpc_error_text
from tests.support.exchanges import (
    ClientMatrix,
    Exchange,
    describe_all,
    served_problems,
)


@pytest.fixture(scope="module")
def cri_hosts_dir(lab_mirror: LabMirror, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The hosts.toml directory `mirrorproxy hosts --out` writes."""
    out = tmp_path_factory.mktemp("cri-certs.d")
    proc = lab_mirror.hosts_cli("--out", str(out))
    assert proc.returncode == 0, f"mirrorproxy hosts --out: {proc.stderr}"
    return out


@pytest.fixture(scope="module")
def cri(cri_hosts_dir: Path) -> Iterator[CriImageClient]:
    """A CRI image client on a containerd that reads ``config_path``."""
    with CriContainerd(cri_hosts_dir) as ctd, CriImageClient(ctd.address) as client:
        yield client


def test_hosts_dir_points_every_namespace_at_the_mirror(
    cri_hosts_dir: Path, lab_mirror: LabMirror, lab_upstreams: Upstreams
) -> None:
    for ns in lab_upstreams.namespaces():
        hosts = tomllib.loads((cri_hosts_dir / ns / "hosts.toml").read_text())
        assert list(hosts["host"]) == [lab_mirror.url]


def _cri_cell(
    cri: CriImageClient,
    lab: LabImage,
    ref: str,
    mirror: LabMirror,
) -> tuple[list[str], list[Exchange]]:
    """Pull ``ref`` over CRI, check what the runtime stored, remove it.

    Returns:
        The problems found, and what containerd sent the mirror meanwhile.
    """
    mark = mirror.mark()
    problems: list[str] = []
    try:
        image_ref = cri.pull(ref)
    except grpc.RpcError as err:
        problems.append(f"PullImage failed: {rpc_error_text(err)}")
    else:
        status = cri.status(ref)
        if image_ref != lab.config_digest():
            problems.append(f"PullImage gave {image_ref}, upstream config {lab.config_digest()}")
        if status is None or lab.pinned not in status.repo_digests:
            problems.append(f"ImageStatus {status} lacks {lab.pinned}")
        cri.remove(ref)
        if cri.status(ref) is not None:
            problems.append("RemoveImage left the image in place")
    exchanges = mirror.exchanges(mark)
    problems += served_problems(
        exchanges, lab.repo, lab.image.blob_digests("linux/amd64"), ns=lab.registry
    )
    return problems, exchanges


@pytest.mark.parametrize("kind", [*IMAGE_KINDS, "second-ns"])
def test_cri_pulls_each_kind_through_the_mirror(
    kind: str,
    cri: CriImageClient,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.quay_tool if kind == "second-ns" else lab_upstreams.images[kind]
    problems, exchanges = _cri_cell(cri, lab, lab.ref, lab_mirror)
    client_matrix.add("cri", kind, exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)


def test_cri_pulls_an_index_by_digest(
    cri: CriImageClient,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.images["oci-index"]
    problems, exchanges = _cri_cell(cri, lab, lab.pinned, lab_mirror)
    client_matrix.add("cri", "index by digest", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)
