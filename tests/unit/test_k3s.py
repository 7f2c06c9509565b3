"""registries.yaml for k3s/rke2: golden file, parsed back with PyYAML."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrorproxy.cli import main
from mirrorproxy.clientconf.k3s import render_registries_yaml
from mirrorproxy.config import Config, parse_config

GOLDEN = Path(__file__).parent.parent / "data" / "k3s"
MIRROR = "http://127.0.0.1:5000"


def make_config(namespaces: dict[str, list[str]]) -> Config:
    data: dict[str, Any] = {
        "namespaces": {
            name: {"upstreams": ups, **({"allow": ["*.io", "*.example"]} if name == "*" else {})}
            for name, ups in namespaces.items()
        }
    }
    return parse_config(data, source="test.toml", base_dir=Path("/"))


CONFIG = make_config(
    {
        "*": ["https://fallback.example"],
        "registry.k8s.io": ["https://registry.k8s.io"],
        "docker.io": ["https://registry-1.docker.io"],
        "myregistry:5000": ["http://myregistry:5000"],
    }
)


def check_golden(name: str, text: str) -> None:
    """Compare with tests/data/k3s/<name>; MIRRORPROXY_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("MIRRORPROXY_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


def test_golden_and_parses_as_k3s_expects() -> None:
    text = render_registries_yaml(CONFIG, MIRROR)
    check_golden("registries.yaml", text)
    assert yaml.safe_load(text) == {
        "mirrors": {
            "docker.io": {"endpoint": [MIRROR]},
            "myregistry:5000": {"endpoint": [MIRROR, "http://myregistry:5000"]},
            "registry.k8s.io": {"endpoint": [MIRROR]},
            "*": {"endpoint": [MIRROR]},
        }
    }
    # The wildcard comes last, where a reader looks for the catch-all.
    assert list(yaml.safe_load(text)["mirrors"])[-1] == "*"


def test_https_mirror_with_ca_gets_configs() -> None:
    text = render_registries_yaml(
        make_config({"docker.io": ["https://registry-1.docker.io"]}),
        "https://mirror.internal:5443",
        ca="/etc/mirrorproxy/ca.pem",
    )
    check_golden("registries-ca.yaml", text)
    assert yaml.safe_load(text)["configs"] == {
        "mirror.internal:5443": {"tls": {"ca_file": "/etc/mirrorproxy/ca.pem"}}
    }


def test_ca_needs_https() -> None:
    with pytest.raises(ValueError, match="https"):
        render_registries_yaml(CONFIG, MIRROR, ca="/ca.pem")


def test_cli_prints_yaml(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = tmp_path / "mirrorproxy.toml"
    cfg.write_text(
        '[server]\nlisten = "[::]:5001"\n'
        '[namespaces."docker.io"]\nupstreams = ["https://registry-1.docker.io"]\n'
    )
    assert main(["hosts", "--config", str(cfg), "--format", "k3s"]) == 0
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed == {"mirrors": {"docker.io": {"endpoint": ["http://[::1]:5001"]}}}


def test_the_nodes_login_to_the_mirror_goes_into_configs(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """k3s has containerd answer a mirror's challenge with ``configs.<mirror>.auth``."""
    cfg = tmp_path / "mirrorproxy.toml"
    cfg.write_text(
        '[server]\nlisten = "10.0.0.5:5000"\n'
        '[namespaces."docker.io"]\nupstreams = ["https://registry-1.docker.io"]\n'
    )
    secret = tmp_path / "password"
    secret.write_text('s3cr"et\n')
    args = ["hosts", "--config", str(cfg), "--format", "k3s", "--auth-user", "node"]
    assert main([*args, "--auth-password-file", str(secret)]) == 0
    parsed = yaml.safe_load(capsys.readouterr().out)
    assert parsed["configs"] == {
        "10.0.0.5:5000": {"auth": {"username": "node", "password": 's3cr"et'}}
    }

    assert main(args) == 2  # the user without the password
    assert "--auth-user and --auth-password-file go together" in capsys.readouterr().err
    other = ["hosts", "--config", str(cfg), "--auth-user", "node"]
    assert main([*other, "--auth-password-file", str(secret)]) == 2
    assert "--auth-user is for --format k3s" in capsys.readouterr().err
