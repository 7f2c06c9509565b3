"""Docker Engine pulls each image kind by tag through the mirror, several times over.

dockerd 20.10 (``--registry-mirror``) sends six ``Accept`` lines in a random order,
often ``application/json`` first, and no ``ns=`` (Docker mirrors docker.io only, so
requests land in the default namespace). One pull proves little: every kind is
pulled ``PULLS`` times and every pull must come from the mirror with the upstream's
digest. A failing mirror makes dockerd fall back to Docker Hub, which the closed
local proxy stops; the mirror's access log shows what it answered.

The zstd image gets its own test: Docker 20.10 fetches it through the mirror but
cannot apply zstd layers (``failed to register layer: ... invalid tar header``), so
the mirror's part (manifest and every blob served) is what is asserted there.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.clientlab import (
    LabMirror,
    Upstreams,
    require_tools,
)
from tests.support.dockerd import Dockerd
from tests.support.exchanges import (
    ClientMatrix,
    Exchange,
    describe_all,
    last_error,
    manifest_exchanges,
    served_problems,
)

DOCKER_KINDS = ("v2s2", "oci", "oci-index", "docker-list")
PULLS = 4  # Docker orders its Accept lines at random on each pull


@pytest.fixture(scope="module")
def dockerd(lab_mirror: LabMirror) -> Iterator[Dockerd]:
    """One dockerd for the module, with the mirror as its registry mirror."""
    require_tools("dockerd", "docker", package="docker.io")
    daemon = Dockerd(lab_mirror.url)
    yield daemon
    daemon.cleanup()


@pytest.mark.parametrize("kind", DOCKER_KINDS)
def test_docker_pulls_each_kind_by_tag_from_the_mirror_every_time(
    kind: str,
    dockerd: Dockerd,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.images[kind]
    short = f"{lab.repo.removeprefix('library/')}:{lab.tag}"  # what a user types
    problems: list[str] = []
    seen: list[Exchange] = []
    for attempt in range(1, PULLS + 1):
        mark = lab_mirror.mark()
        proc = dockerd.docker("pull", short)
        exchanges = lab_mirror.exchanges(mark)
        seen += exchanges
        if proc.returncode != 0:
            problems.append(f"pull {attempt} failed: {last_error(proc.stderr)}")
        elif f"Digest: {lab.image.digest}" not in proc.stdout:
            problems.append(f"pull {attempt} reported another digest: {proc.stdout[-300:]}")
        by_tag = [
            e
            for e in manifest_exchanges(exchanges, lab.repo)
            if e.request.path.endswith(f"/manifests/{lab.tag}")
        ]
        if not any(e.status == 200 for e in by_tag):
            statuses = [e.status for e in by_tag]
            problems.append(f"pull {attempt}: the mirror answered the tag with {statuses}")
        if attempt == 1:  # later pulls find the layers in place and fetch only manifests
            problems += served_problems(
                exchanges, lab.repo, lab.image.blob_digests("linux/amd64"), ns="docker.io"
            )
    if not problems:
        inspect = dockerd.docker(
            "image", "inspect", "--format", "{{.Id}} {{.RootFS.Layers}}", short
        )
        expected = f"{lab.config_digest()} [{' '.join(lab.diff_ids())}]"
        if inspect.stdout.strip() != expected:
            problems.append(f"docker stored {inspect.stdout.strip()}, upstream {expected}")
    client_matrix.add("docker", kind, seen, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(seen)


def test_docker_fetches_a_zstd_image_from_the_mirror(
    dockerd: Dockerd,
    lab_mirror: LabMirror,
    lab_upstreams: Upstreams,
    client_matrix: ClientMatrix,
) -> None:
    lab = lab_upstreams.images["zstd"]
    log_start = len(dockerd.log_text())
    mark = lab_mirror.mark()
    proc = dockerd.docker("pull", f"{lab.repo.removeprefix('library/')}:{lab.tag}")
    exchanges = lab_mirror.exchanges(mark)
    problems = served_problems(
        exchanges, lab.repo, lab.image.blob_digests("linux/amd64"), ns="docker.io"
    )
    daemon_log = dockerd.log_text()[log_start:]
    if proc.returncode != 0 and "failed to register layer" not in daemon_log:
        # An engine that cannot unpack zstd fails after the download; anything
        # else is a failure of the pull itself.
        problems.append(f"pull failed before unpacking: {last_error(proc.stderr)}")
    client_matrix.add("docker", "zstd (fetch)", exchanges, problems)
    assert not problems, "\n".join(problems) + "\n" + describe_all(exchanges)
