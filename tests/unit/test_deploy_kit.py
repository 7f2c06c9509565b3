"""docker/: the Dockerfile, DaemonSet and systemd unit parse and agree with the CLI and config.

Each file repeats facts that live elsewhere (flags, port, config and cache paths, uid);
these tests are what keeps the copies from drifting apart.
"""

from __future__ import annotations

import configparser
import io
import json
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml

from mirrorproxy.cli import build_parser
from mirrorproxy.config import Config, load_config
from mirrorproxy.hostscmd import hosts_command

DOCKER = Path(__file__).parent.parent.parent / "docker"
CONFIG_PATH = "/etc/mirrorproxy/config.toml"  # where every deployment keeps the config
UID = 10001


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(DOCKER / "config.toml")


def dockerfile() -> list[tuple[str, str]]:
    """Return (INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    out: list[tuple[str, str]] = []
    pending = ""
    for raw in (DOCKER / "Dockerfile").read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        out.append((keyword.upper(), rest.strip()))
        pending = ""
    return out


def final_stage() -> dict[str, list[str]]:
    """Instructions of the last stage, by keyword."""
    stages: list[dict[str, list[str]]] = []
    for keyword, args in dockerfile():
        if keyword == "FROM":
            stages.append({})
        stages[-1].setdefault(keyword, []).append(args)
    return stages[-1]


def manifests() -> dict[str, dict[str, Any]]:
    docs = list(yaml.safe_load_all((DOCKER / "daemonset.yaml").read_text()))
    return {doc["kind"]: doc for doc in docs}


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DOCKER / "mirrorproxy.service").read_text())
    return parser


# --- docker/config.toml


def test_config_is_node_local_with_the_standard_cache(config: Config) -> None:
    assert (config.server.host, config.server.port) == ("127.0.0.1", 5000)
    assert config.cache.dir == Path("/var/lib/mirrorproxy")
    assert "docker.io" in config.namespaces


# --- Dockerfile


def test_dockerfile(config: Config) -> None:
    stage = final_stage()
    assert stage["FROM"] == ["python:3.11-slim"]
    assert stage["USER"] == [f"{UID}:{UID}"]
    assert any(f"--uid {UID}" in run for run in stage["RUN"])
    assert stage["VOLUME"] == [str(config.cache.dir)]
    assert stage["EXPOSE"] == [str(config.server.port)]
    assert f"docker/config.toml {CONFIG_PATH}" in stage["COPY"]
    assert json.loads(stage["ENTRYPOINT"][0]) == ["mirrorproxy"]

    args = build_parser().parse_args(json.loads(stage["CMD"][0]))
    assert args.command == "serve"
    assert str(args.config) == CONFIG_PATH
    # The image listens on all interfaces of its own network namespace, same port.
    assert args.listen == f"0.0.0.0:{config.server.port}"


def test_dockerfile_healthcheck_uses_python_on_v2(config: Config) -> None:
    [healthcheck] = final_stage()["HEALTHCHECK"]
    cmd = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert cmd[0] == "python"
    assert f"http://127.0.0.1:{config.server.port}/v2/" in cmd[-1]
    compile(cmd[-1], "<healthcheck>", "exec")  # the probe is valid Python


# --- daemonset.yaml


def test_manifests_parse_and_embed_the_same_config(tmp_path: Path) -> None:
    docs = manifests()
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet"}
    embedded = docs["ConfigMap"]["data"]["config.toml"]
    assert embedded == (DOCKER / "config.toml").read_text()
    (tmp_path / "config.toml").write_text(embedded)
    load_config(tmp_path / "config.toml")


def _pod() -> dict[str, Any]:
    spec: dict[str, Any] = manifests()["DaemonSet"]["spec"]["template"]["spec"]
    return spec


def _mount(container: dict[str, Any], volume: str) -> str:
    [path] = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


def _host_path(volume: str) -> str:
    [path] = [v["hostPath"]["path"] for v in _pod()["volumes"] if v["name"] == volume]
    return str(path)


def test_daemonset_mirror_container(config: Config) -> None:
    pod = _pod()
    assert pod["hostNetwork"] is True
    [main] = pod["containers"]
    args = build_parser().parse_args(main["args"])
    assert args.command == "serve"
    assert args.listen is None  # the config's 127.0.0.1 is what a hostNetwork pod wants
    assert str(args.config) == CONFIG_PATH
    assert _mount(main, "config") == str(Path(CONFIG_PATH).parent)
    assert main["ports"][0]["containerPort"] == config.server.port
    probe = main["readinessProbe"]["httpGet"]
    assert (probe["host"], probe["port"], probe["path"]) == (
        config.server.host,
        config.server.port,
        "/v2/",
    )
    resources = main["resources"]
    assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
    assert main["securityContext"]["runAsUser"] == UID
    assert main["securityContext"]["runAsNonRoot"] is True
    # The cache: same path in the config, the container and on the node.
    assert _mount(main, "cache") == _host_path("cache") == str(config.cache.dir)


def test_daemonset_init_writes_hosts_into_the_nodes_certs_d(
    config: Config, tmp_path: Path
) -> None:
    pod = _pod()
    inits = {c["name"]: c for c in pod["initContainers"]}
    hosts = inits["hosts"]
    args = build_parser().parse_args(hosts["args"])
    assert args.command == "hosts"
    assert str(args.config) == CONFIG_PATH
    assert str(args.out) == _mount(hosts, "containerd-certs-d")
    assert _host_path("containerd-certs-d") == "/etc/containerd/certs.d"
    assert str(args.out) == "/host" + _host_path("containerd-certs-d")
    assert args.mirror_url is None  # derived from listen: the URL the probe checks
    images = {c["image"] for c in [*pod["initContainers"], *pod["containers"]]}
    assert len(images) == 1
    assert inits["cache-owner"]["command"] == ["chown", f"{UID}:{UID}", str(config.cache.dir)]

    # What the init container writes, with the config the pod gets.
    out = io.StringIO()
    assert (
        hosts_command(
            config, out_dir=tmp_path, mirror_url=None, fmt="containerd", dry_run=False, stdout=out
        )
        == 0
    )
    text = (tmp_path / "docker.io" / "hosts.toml").read_text()
    assert f'[host."http://127.0.0.1:{config.server.port}"]' in text


# --- mirrorproxy.service


def _exec(value: str) -> list[str]:
    """Split an Exec line, dropping systemd's prefix characters ("+", "-", ...)."""
    argv = shlex.split(value)
    argv[0] = argv[0].lstrip("+-@:!")
    return argv


def test_systemd_unit(config: Config) -> None:
    service = unit()["Service"]
    start = _exec(service["ExecStart"])
    assert start[0] == "/usr/local/bin/mirrorproxy"
    args = build_parser().parse_args(start[1:])
    assert (args.command, str(args.config)) == ("serve", CONFIG_PATH)

    pre = _exec(service["ExecStartPre"])
    args = build_parser().parse_args(pre[1:])
    assert (args.command, str(args.config), str(args.out)) == (
        "hosts",
        CONFIG_PATH,
        "/etc/containerd/certs.d",
    )
    assert service["ExecStartPre"].startswith("+")  # needs root to write /etc/containerd

    assert Path("/var/lib") / service["StateDirectory"] == config.cache.dir
    assert service["DynamicUser"] == "yes"
    assert service["ProtectSystem"] == "strict"
    assert service["NoNewPrivileges"] == "yes"
    assert service["ConfigurationDirectory"] == Path(CONFIG_PATH).parent.name


@pytest.mark.skipif(shutil.which("systemd-analyze") is None, reason="needs systemd-analyze")
def test_systemd_accepts_the_unit(tmp_path: Path) -> None:
    # Point the unit at this venv's mirrorproxy so verify can check the binaries too.
    exe = Path(sys.executable).parent / "mirrorproxy"
    text = (DOCKER / "mirrorproxy.service").read_text()
    copy = tmp_path / "mirrorproxy.service"
    copy.write_text(text.replace("/usr/local/bin/mirrorproxy", str(exe)))
    result = subprocess.run(
        ["systemd-analyze", "verify", str(copy)], capture_output=True, text=True, check=False
    )
    assert result.returncode == 0, result.stderr
    assert "mirrorproxy.service" not in result.stderr, result.stderr
