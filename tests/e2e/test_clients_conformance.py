"""The OCI distribution-spec v1.1.1 conformance suite's pull category, against the mirror.

The prebuilt suite lives in ``<repo>/../shared/tools/oci-conformance/`` (its README
says how it was built and run). The mirror is read-only, so the suite is given the
content the lab pushed into the upstream (namespace, tag, manifest and config blob
digests), which skips its own push set-up and delete tear-down; 14 pull specs run.
Their results come from the suite's junit.xml and are asserted one by one, so a
failure names the spec and the suite's message.
"""

from __future__ import annotations

import json
import os
import subprocess
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support.clientlab import LabMirror, Upstreams
from tests.support.requirements import REQUIRE_E2E_ENV

SUITE = (
    Path(__file__).resolve().parents[2].parent
    / "shared"
    / "tools"
    / "oci-conformance"
    / "conformance-v1.1.1.test"
)
PULL_PREFIX = "OCI Distribution Conformance Tests Pull "
#: The 14 specs v1.1.1 runs in the pull category with pre-existing content.
PULL_SPECS = (
    "Setup Get tag name from environment",
    "Pull blobs HEAD request to nonexistent blob should result in 404 response",
    "Pull blobs HEAD request to existing blob should yield 200",
    "Pull blobs GET nonexistent blob should result in 404 response",
    "Pull blobs GET request to existing blob URL should yield 200",
    "Pull manifests HEAD request to nonexistent manifest should return 404",
    "Pull manifests HEAD request to manifest[0] path (digest) should yield 200 response",
    "Pull manifests HEAD request to manifest[1] path (digest) should yield 200 response",
    "Pull manifests HEAD request to manifest path (tag) should yield 200 response",
    "Pull manifests GET nonexistent manifest should return 404",
    "Pull manifests GET request to manifest[0] path (digest) should yield 200 response",
    "Pull manifests GET request to manifest[1] path (digest) should yield 200 response",
    "Pull manifests GET request to manifest path (tag) should yield 200 response",
    "Error codes 400 response body should contain OCI-conforming JSON message",
)
RUN_TIMEOUT = 300.0


@dataclass(frozen=True, slots=True)
class SpecResult:
    """One conformance spec as junit.xml reports it."""

    name: str
    status: str  # passed, failed, skipped, ...
    message: str


def parse_junit(path: Path) -> list[SpecResult]:
    """Every pull-category spec in the suite's junit.xml, in file order."""
    results: list[SpecResult] = []
    for case in ET.parse(path).getroot().iter("testcase"):  # noqa: S314 - our own run's file
        name = case.get("name", "")
        if not name.startswith(PULL_PREFIX):
            continue  # the suite's reporters, not specs
        failure = case.find("failure")
        message = failure.get("message", "") if failure is not None else ""
        results.append(
            SpecResult(name.removeprefix(PULL_PREFIX), case.get("status", "?"), message)
        )
    return results


@pytest.fixture(scope="module")
def pull_results(
    lab_mirror: LabMirror, lab_upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> list[SpecResult]:
    """Run the pull category once against the mirror; return its spec results."""
    if not SUITE.exists():
        reason = f"conformance suite not found at {SUITE}"
        if os.environ.get(REQUIRE_E2E_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
        pytest.skip(reason)
    content = lab_upstreams.conformance
    config_digest = json.loads(content.image.body)["config"]["digest"]
    report = tmp_path_factory.mktemp("conformance")
    env = {
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"),
        "HOME": str(report),
        "OCI_ROOT_URL": lab_mirror.url,
        "OCI_NAMESPACE": content.repo,
        "OCI_TAG_NAME": content.tag,
        "OCI_MANIFEST_DIGEST": content.image.digest,
        "OCI_BLOB_DIGEST": config_digest,
        "OCI_TEST_PULL": "1",
        "OCI_TEST_PUSH": "0",
        "OCI_TEST_CONTENT_DISCOVERY": "0",
        "OCI_TEST_CONTENT_MANAGEMENT": "0",
        "OCI_REPORT_DIR": str(report),
        "OCI_HIDE_SKIPPED_WORKFLOWS": "0",
    }
    proc = subprocess.run(
        [str(SUITE), "-test.v", "-ginkgo.no-color", "-ginkgo.v"],
        capture_output=True,
        text=True,
        env=env,
        cwd=report,
        timeout=RUN_TIMEOUT,
        check=False,
    )
    junit = report / "junit.xml"
    assert junit.exists(), (
        f"the suite wrote no junit.xml (exit {proc.returncode}):\n{proc.stdout[-3000:]}"
    )
    return parse_junit(junit)


def test_conformance_runs_the_pull_specs_it_is_expected_to(
    pull_results: list[SpecResult],
) -> None:
    ran = [r.name for r in pull_results if r.status != "skipped"]
    assert sorted(ran) == sorted(PULL_SPECS)


@pytest.mark.parametrize("spec", PULL_SPECS)
def test_conformance_pull_spec_passes_against_the_mirror(
    spec: str, pull_results: list[SpecResult]
) -> None:
    found = [r for r in pull_results if r.name == spec and r.status != "skipped"]
    assert found, f"the suite did not run {spec!r}"
    result = found[0]
    assert result.status == "passed", (
        f"{spec}: {result.status}: {' '.join(result.message.split())}"
    )
