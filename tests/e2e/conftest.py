"""Fixtures and skip policy for end-to-end tests with real containerd and docker-registry.

Without the binaries (or root) the suite skips with the reason and the apt package;
CI sets ``MIRRORPROXY_REQUIRE_E2E=1`` so a broken image fails instead of silently
skipping every end-to-end test.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path

import pytest

from tests.support.clientlab import LabMirror, Upstreams
from tests.support.exchanges import ClientMatrix
from tests.support.procs import (
    Containerd,
    MirrorFactory,
    MirrorProcess,
    Registry,
    RegistryFactory,
    free_port,
    missing_e2e_requirements,
)
from tests.support.requirements import REQUIRE_E2E_ENV
from tests.support.seaweed import SeaweedFS, running_seaweedfs


@pytest.fixture(scope="session", autouse=True)
def e2e_requirements() -> None:
    """Skip (or, when required, fail) every e2e test if a prerequisite is missing."""
    reasons = missing_e2e_requirements()
    if not reasons:
        return
    reason = "end-to-end prerequisites missing: " + "; ".join(reasons)
    if os.environ.get(REQUIRE_E2E_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="session")
def seaweedfs(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SeaweedFS]:
    """One real S3-compatible server (SeaweedFS) for the session; tests use key
    prefixes of their own."""
    with running_seaweedfs(tmp_path_factory.mktemp("seaweedfs")) as server:
        yield server


@pytest.fixture
def upstream_registry(e2e_requirements: None, tmp_path: Path) -> Iterator[RegistryFactory]:
    """Factory for plain (or proxy-mode) docker-registry instances."""
    started: list[Registry] = []
    counter = itertools.count()

    def make(*, proxy_remoteurl: str | None = None) -> Registry:
        reg = Registry(tmp_path / f"registry{next(counter)}", proxy_remoteurl=proxy_remoteurl)
        started.append(reg)
        return reg

    yield make
    for reg in started:
        reg.stop()


@pytest.fixture
def containerd(e2e_requirements: None) -> Iterator[Containerd]:
    """A private containerd per test: it starts in ~0.1 s and isolates content stores."""
    with Containerd() as ctd:
        yield ctd


@pytest.fixture
def hosts_dir(tmp_path: Path) -> Path:
    """An empty directory for ``ctr --hosts-dir``."""
    path = tmp_path / "certs.d"
    path.mkdir()
    return path


@pytest.fixture
def mirror_port() -> int:
    """A free port for the mirror, to put in its config before starting it."""
    return free_port()


@pytest.fixture
def mirror_process(e2e_requirements: None, tmp_path: Path) -> Iterator[MirrorFactory]:
    """Factory for mirror CLI subprocesses; all are stopped at teardown."""
    started: list[MirrorProcess] = []
    counter = itertools.count()

    def make(
        config_text: str,
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> MirrorProcess:
        proc = MirrorProcess(
            tmp_path / f"mirror{next(counter)}", config_text, port, env=env, args=args
        )
        started.append(proc)
        return proc

    yield make
    for proc in started:
        proc.stop()


# --- client-compatibility suite (tests/e2e/test_clients_*.py) ---

MATRIX_KEY = pytest.StashKey[ClientMatrix]()


@pytest.fixture(scope="session")
def lab_upstreams(
    e2e_requirements: None, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Upstreams]:
    """docker.io and quay.io stand-ins holding every image kind, pushed once per session."""
    upstreams = Upstreams(tmp_path_factory.mktemp("lab-upstreams"))
    yield upstreams
    upstreams.stop()


@pytest.fixture(scope="module")
def lab_mirror(
    lab_upstreams: Upstreams, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[LabMirror]:
    """A mirror per client module: each client starts from a cold cache (~1 s to start)."""
    mirror = LabMirror(tmp_path_factory.mktemp("lab-mirror"), lab_upstreams.namespaces())
    yield mirror
    mirror.stop()
    assert "Traceback" not in mirror.process.log_text(), "the mirror logged a traceback"


@pytest.fixture(scope="session")
def client_matrix(request: pytest.FixtureRequest) -> ClientMatrix:
    """Client x image kind results, printed after the run (see pytest_terminal_summary)."""
    matrix = ClientMatrix()
    request.config.stash[MATRIX_KEY] = matrix
    return matrix


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Print what each client sent the mirror and what it got, cell by cell."""
    matrix = terminalreporter.config.stash.get(MATRIX_KEY, None)
    if matrix is None or not matrix.rows:
        return
    terminalreporter.section("client matrix (what each client sent the mirror, and got)")
    for line in matrix.render():
        terminalreporter.write_line(line)
