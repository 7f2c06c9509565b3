"""Docker Engine's daemon.json entry from `hosts --format docker`, and the line beside it."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mirrorproxy.cli import main
from mirrorproxy.clientconf.dockerconf import docker_notice, render_daemon_json
from mirrorproxy.config import Config, parse_config

MIRROR = "http://127.0.0.1:5000"


def make_config(*names: str, **server: str) -> Config:
    data = {
        "server": {"listen": "0.0.0.0:5000", **server},
        "namespaces": {name: {"upstreams": [f"https://{name}"]} for name in names},
    }
    return parse_config(data, source="test.toml", base_dir=Path("/"))


def test_daemon_json() -> None:
    text = render_daemon_json(MIRROR)
    assert text == '{"registry-mirrors": ["http://127.0.0.1:5000"]}\n'
    assert json.loads(text) == {"registry-mirrors": [MIRROR]}
    with pytest.raises(ValueError, match="with a path"):
        render_daemon_json("http://127.0.0.1:5000/v2")  # dockerd refuses such a mirror


def test_notice_names_the_namespace_dockers_pulls_use() -> None:
    line, warning = docker_notice(make_config("docker.io", "quay.io"))
    assert not warning
    assert "Docker mirrors docker.io images only and sends no ns=" in line
    assert "default_namespace (docker.io)" in line  # docker.io is the default by itself
    line, warning = docker_notice(make_config("quay.io", default_namespace="quay.io"))
    assert warning
    assert "'quay.io'" in line
    unset = make_config("quay.io")
    assert unset.server.default_namespace is None
    line, warning = docker_notice(unset)
    assert warning
    assert "not set" in line


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mirrorproxy.toml"
    path.write_text(
        '[server]\nlisten = "0.0.0.0:5000"\n'
        '[namespaces."docker.io"]\nupstreams = ["https://registry-1.docker.io"]\n'
    )
    return path


def test_cli_prints_json_and_one_line(
    config_file: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hosts", "-c", str(config_file), "--format", "docker"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == {"registry-mirrors": ["http://127.0.0.1:5000"]}
    assert captured.err.count("\n") == 1
    assert captured.err.startswith("mirrorproxy: note: Docker mirrors docker.io images only")


def test_cli_warns_when_dockers_pulls_land_elsewhere(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "mirrorproxy.toml"
    path.write_text(
        '[server]\ndefault_namespace = "quay.io"\n'
        '[namespaces."docker.io"]\nupstreams = ["https://registry-1.docker.io"]\n'
        '[namespaces."quay.io"]\nupstreams = ["https://quay.io"]\n'
    )
    assert main(["hosts", "-c", str(path), "--format", "docker"]) == 0
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert err.startswith("mirrorproxy: warning: ")
    assert 'set default_namespace = "docker.io"' in err


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--out", "/etc/docker/daemon.json"], "redirect the output to /etc/docker/daemon.json"),
        (["--mirror-url", "http://m:5000/x"], "with a path"),
        (
            ["--mirror-url", "https://m:5443", "--ca", "ca.pem"],
            "put the CA in /etc/docker/certs.d/m:5443/ca.crt",
        ),
    ],
)
def test_cli_usage_errors_are_one_line(
    config_file: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    assert main(["hosts", "-c", str(config_file), "--format", "docker", *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert message in captured.err
