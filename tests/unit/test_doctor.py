"""`mirrorproxy doctor` against real config.toml variants, hosts.toml files and a live /v2/.

The config.toml variants in tests/data/containerd were each started with Debian's
containerd 1.6.20 to confirm what their comments say containerd does with them.
"""

from __future__ import annotations

import http.server
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorproxy.cli import main
from mirrorproxy.clientconf.containerdcheck import (
    V3_DEFAULT_CONFIG_PATH,
    check_containerd_config,
    check_hosts_dir,
    check_hosts_toml,
    load_containerd_config,
)
from mirrorproxy.clientconf.doctor import check_mirror, installed_containerd_version, run_doctor
from mirrorproxy.clientconf.findings import Finding
from mirrorproxy.clientconf.hoststoml import render_all, write_hosts_files
from mirrorproxy.config import parse_config

ROOT = Path(__file__).parent.parent.parent
VARIANTS = ROOT / "tests" / "data" / "containerd"
EXAMPLES = ROOT / "config" / "containerd"


class _Registry(http.server.BaseHTTPRequestHandler):
    status = 200

    def do_GET(self) -> None:
        self.send_response(self.status if self.path == "/v2/" else 404)
        self.send_header("Content-Length", "2")
        self.end_headers()
        self.wfile.write(b"{}")

    def log_message(self, format: str, *args: object) -> None:
        pass


def _serve(status: int) -> Iterator[str]:
    handler = type("Handler", (_Registry,), {"status": status})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


@pytest.fixture
def mirror() -> Iterator[str]:
    """A stand-in mirror that answers GET /v2/ with 200."""
    yield from _serve(200)


@pytest.fixture
def closed_port_url() -> str:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    return f"http://127.0.0.1:{port}"


Version = tuple[int, int] | None


def analyze(path: Path, version: Version = (2, 0)) -> list[str]:
    data, findings = load_containerd_config(path)
    if data is not None or not findings:
        _, found = check_containerd_config(data, source=path.name, containerd_version=version)
        findings += found
    return [f.problem for f in findings]


# --- config.toml


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("v1-cri.toml", []),
        ("v1-full-names.toml", ["needs `version = 2`", "config_path is not set"]),
        ("v1-docker-cri-disabled.toml", ['disabled_plugins has "cri"', "config_path is not set"]),
        ("v2-default-1.6.toml", ["config_path is not set"]),
        ("v2-no-config-path.toml", ["config_path is not set"]),
        ("v2-cri-short-name.toml", ["[plugins.cri] is a version 1 name", "config_path is not"]),
        ("v2-configs-tls.toml", ["tls] next to config_path: containerd refuses"]),
        ("v2-auths.toml", ["auths] is deprecated"]),
        (
            "v2-with-v3-name.toml",
            ["is containerd 2.x's; 1.x never reads it", "config_path is not"],
        ),
        ("v2-imports.toml", ['imports "v2-imports.d/*.toml" is relative']),
        ("v3-old-registry-table.toml", ["registry] is ignored in a version 3 file"]),
        ("not-toml.toml", ["not valid TOML"]),
        ("version-9.toml", ["unknown config version 9"]),
    ],
)
def test_config_variants(name: str, expected: list[str]) -> None:
    problems = analyze(VARIANTS / name)
    assert len(problems) == len(expected), problems
    for problem, text in zip(problems, expected, strict=True):
        assert text in problem


def test_imported_config_path_counts(tmp_path: Path) -> None:
    drop_in = tmp_path / "conf.d"
    drop_in.mkdir()
    (drop_in / "registry.toml").write_text(
        'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "/srv/c"\n'
    )
    main_cfg = tmp_path / "config.toml"
    main_cfg.write_text(f'version = 2\nimports = ["{drop_in}/*.toml"]\n')
    data, findings = load_containerd_config(main_cfg)
    settings, found = check_containerd_config(data, source="x", containerd_version=(1, 6))
    assert findings == found == []
    assert settings is not None
    assert settings.config_path == ("/srv/c",)


def test_example_v2_config_is_clean() -> None:
    data, _ = load_containerd_config(EXAMPLES / "containerd1-v2.toml")
    settings, findings = check_containerd_config(data, source="x", containerd_version=(1, 6))
    assert findings == []
    assert settings is not None
    assert settings.version == 2
    assert settings.config_path == ("/etc/containerd/certs.d",)


def test_example_v3_config_needs_containerd_2() -> None:
    for version in [(2, 0), (2, 2), None]:
        assert analyze(EXAMPLES / "containerd2-v3.toml", version) == []
    # containerd 1.6 starts with it, reads it with version 2 names, and finds no config_path.
    names, unset = analyze(EXAMPLES / "containerd2-v3.toml", (1, 6))
    assert "1.x never reads it" in names
    assert 'config_path is not set in [plugins."io.containerd.grpc.v1.cri".registry]' in unset


def test_v3_registry_in_old_place_is_read_by_containerd_1() -> None:
    data, _ = load_containerd_config(VARIANTS / "v3-old-registry-table.toml")
    settings, findings = check_containerd_config(data, source="x", containerd_version=(1, 6))
    assert findings == []  # containerd 1.6 reads /srv/certs.d from it: tried
    assert settings is not None
    assert settings.config_path == ("/srv/certs.d",)


def test_example_legacy_config_is_caught() -> None:
    [problem] = analyze(EXAMPLES / "legacy-mirrors-broken.toml")
    assert "mirrors] next to config_path: containerd refuses to load the CRI plugin" in problem


def test_v3_without_config_path_uses_containerd_default() -> None:
    data, _ = load_containerd_config(VARIANTS / "v3-defaults.toml")
    settings, findings = check_containerd_config(data, source="x", containerd_version=(2, 0))
    assert findings == []
    assert settings is not None
    assert settings.config_path == V3_DEFAULT_CONFIG_PATH
    assert not settings.explicit


@pytest.mark.parametrize("version", [(2, 1), (2, 2), None])
def test_config_path_list_breaks_transfer_service_pulls(version: Version, tmp_path: Path) -> None:
    [problem] = analyze(VARIANTS / "v3-defaults.toml", version)
    assert "the default config_path lists several directories" in problem
    listed = tmp_path / "config.toml"
    listed.write_text(
        'version = 3\n[plugins."io.containerd.cri.v1.images".registry]\n'
        'config_path = "/etc/containerd/certs.d:/etc/docker/certs.d"\n'
    )
    [problem] = analyze(listed, version)
    assert 'config_path "/etc/containerd/certs.d:/etc/docker/certs.d" lists several' in problem
    # Pulling without the transfer service reads the list as a list.
    listed.write_text(
        'version = 3\n[plugins."io.containerd.cri.v1.images"]\nuse_local_image_pull = true\n'
    )
    assert analyze(listed, version) == []


def test_missing_config_depends_on_containerd_version(tmp_path: Path) -> None:
    missing = tmp_path / "config.toml"
    assert "does not exist" in analyze(missing, (1, 7))[0]
    assert "does not exist" in analyze(missing, None)[0]
    assert "lists several directories" in analyze(missing, (2, 1))[0]
    settings, findings = check_containerd_config(None, source="x", containerd_version=(2, 0))
    assert findings == []
    assert settings is not None
    assert settings.config_path == V3_DEFAULT_CONFIG_PATH


# --- hosts.toml

GOOD = '[host."http://127.0.0.1:5000"]\ncapabilities = ["pull", "resolve"]\n'


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (GOOD, None),
        ('server = "https://registry-1.docker.io"\n' + GOOD, None),
        ('[host."http://127.0.0.1:5000/v2/"]\ncapabilities = ["pull", "resolve"]\n', None),
        ("[host.broken\n", "not valid TOML"),
        ('server = "http://127.0.0.1:5000"\n', "no [host"),
        ('[host."http://127.0.0.1:5000"]\ncapabilities = ["pull", "fetch"]\n', "capabilities"),
        ('[host."http://10.0.0.1:5000"]\ncapabilities = ["pull", "resolve"]\n', "does not send"),
        ('[host."http://127.0.0.1:5000"]\ncapabilities = ["pull"]\n', "the mirror may pull"),
        ('[host."http://127.0.0.1:5000"]\n', "pull/push/resolve"),
    ],
)
def test_hosts_toml_checks(text: str, expected: str | None) -> None:
    findings, _ = check_hosts_toml(
        text, source="/d/docker.io/hosts.toml", mirror_url="http://127.0.0.1:5000"
    )
    if expected is None:
        assert findings == []
    else:
        [finding] = findings
        assert expected in finding.problem
        assert "/d" in finding.fix or "capabilities" in finding.fix


def test_generated_files_pass(tmp_path: Path) -> None:
    config = parse_config(
        {"namespaces": {"docker.io": {"upstreams": ["https://registry-1.docker.io"]}}},
        source="t",
        base_dir=tmp_path,
    )
    write_hosts_files(tmp_path, render_all(config, "http://127.0.0.1:5000"))
    findings, hosts = check_hosts_dir(tmp_path, "http://127.0.0.1:5000")
    assert findings == []
    assert hosts == [["http://127.0.0.1:5000"]]


def test_empty_or_missing_hosts_dir(tmp_path: Path) -> None:
    [empty] = check_hosts_dir(tmp_path, None)[0]
    assert "no */hosts.toml" in empty.problem
    assert f"--out {tmp_path}" in empty.fix
    [missing] = check_hosts_dir(tmp_path / "nope", None)[0]
    assert "does not exist" in missing.problem


# --- the mirror


@pytest.mark.parametrize("status", [200, 401])
def test_mirror_answers(status: int) -> None:
    for url in _serve(status):
        assert check_mirror(url) is None


def test_mirror_not_a_registry() -> None:
    for url in _serve(404):
        finding = check_mirror(url)
        assert finding is not None
        assert "HTTP 404" in finding.problem


def test_mirror_down(closed_port_url: str) -> None:
    finding = check_mirror(closed_port_url, timeout=1)
    assert finding is not None
    assert "does not answer GET /v2/" in finding.problem


# --- the whole run


def node(tmp_path: Path, mirror_url: str) -> tuple[Path, Path]:
    """Return (config.toml, certs.d) of a node set up the way the docs say."""
    certs = tmp_path / "certs.d"
    config = parse_config(
        {
            "namespaces": {
                "docker.io": {"upstreams": ["https://registry-1.docker.io"]},
                "*": {"upstreams": ["https://fallback.example"], "allow": ["*.example"]},
            }
        },
        source="t",
        base_dir=tmp_path,
    )
    write_hosts_files(certs, render_all(config, mirror_url))
    toml = tmp_path / "config.toml"
    toml.write_text(
        f'version = 2\n[plugins."io.containerd.grpc.v1.cri".registry]\nconfig_path = "{certs}"\n'
    )
    return toml, certs


def test_healthy_node(tmp_path: Path, mirror: str) -> None:
    toml, certs = node(tmp_path, mirror)
    findings, summary = run_doctor(
        containerd_config=toml, hosts_dir=None, mirror_url=mirror, containerd_version=(1, 6)
    )
    assert findings == []
    assert summary.startswith("ok: ")
    assert f"2 hosts.toml in {certs}" in summary
    # Without --mirror-url the mirror is read from the hosts.toml files.
    findings, summary = run_doctor(
        containerd_config=toml, hosts_dir=None, mirror_url=None, containerd_version=(1, 6)
    )
    assert findings == []
    assert f"mirror {mirror} answers" in summary


def test_derived_mirror_down(tmp_path: Path, closed_port_url: str) -> None:
    toml, _ = node(tmp_path, closed_port_url)
    findings, _ = run_doctor(
        containerd_config=toml,
        hosts_dir=None,
        mirror_url=None,
        containerd_version=(1, 6),
        timeout=1,
    )
    assert [f.problem for f in findings] == [
        f"the mirror {closed_port_url} does not answer GET /v2/ ([Errno 111] Connection refused)"
    ]


def test_hosts_dir_elsewhere(tmp_path: Path, mirror: str) -> None:
    toml, certs = node(tmp_path, mirror)
    other = tmp_path / "other"
    other.mkdir()
    findings, _ = run_doctor(
        containerd_config=toml, hosts_dir=other, mirror_url=mirror, containerd_version=(1, 6)
    )
    assert f"config_path {certs} does not include {other}" in findings[0].problem
    assert "no */hosts.toml" in findings[1].problem


def hermetic(tmp_path: Path) -> list[str]:
    """Doctor options that keep it away from this machine's units, processes and podman."""
    empty = tmp_path / "empty"
    empty.mkdir(exist_ok=True)
    return [
        "--systemd-dir",
        str(empty),
        "--proc-dir",
        str(empty),
        "--registries-conf",
        str(empty / "registries.conf"),
    ]


def test_cli_ok_and_exit_codes(
    tmp_path: Path, mirror: str, capsys: pytest.CaptureFixture[str]
) -> None:
    toml, _ = node(tmp_path, mirror)
    args = ["doctor", *hermetic(tmp_path), "--containerd-config", str(toml)]
    args += ["--mirror-url", mirror + "/"]
    assert main(args) == 0
    out = capsys.readouterr().out
    assert out.count("\n") == 1
    assert out.startswith("ok: ")

    assert main([*args[:-1], "http://127.0.0.1:1"]) == 1
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3  # two files point elsewhere, and nothing answers there
    assert all(line.startswith("PROBLEM ") and " -> fix: " in line for line in lines)


def test_cli_broken_legacy_config(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    config = EXAMPLES / "legacy-mirrors-broken.toml"
    args = ["doctor", *hermetic(tmp_path), "--containerd-config", str(config)]
    assert main([*args, "--hosts-dir", str(tmp_path)]) == 1
    out = capsys.readouterr().out
    assert "containerd refuses to load the CRI plugin" in out
    assert "Traceback" not in out


def test_cli_usage_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["doctor", "--mirror-url", "localhost:5000"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert "--mirror-url" in captured.err


def test_finding_line() -> None:
    assert Finding("a", "b").line() == "PROBLEM a -> fix: b"


def test_containerd_version_from_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    fake = tmp_path / "containerd"
    fake.write_text(
        "#!/bin/sh\necho 'containerd github.com/containerd/containerd/v2 v2.0.4 1a43cb6a'\n"
    )
    fake.chmod(0o755)
    monkeypatch.setenv("PATH", str(tmp_path))
    assert installed_containerd_version() == (2, 0)
    fake.write_text("#!/bin/sh\necho 'containerd github.com/containerd/containerd 1.6.20~ds1'\n")
    assert installed_containerd_version() == (1, 6)
    monkeypatch.setenv("PATH", str(tmp_path / "empty"))
    assert installed_containerd_version() is None


def test_mirror_read_from_hosts_files(tmp_path: Path, mirror: str) -> None:
    toml, certs = node(tmp_path, mirror)
    for name in ("docker.io", "_default"):
        (certs / name / "hosts.toml").write_text(
            f'[host."{mirror}/v2"]\ncapabilities = ["pull", "resolve"]\n'
        )
    _, summary = run_doctor(
        containerd_config=toml, hosts_dir=None, mirror_url=None, containerd_version=(1, 6)
    )
    assert summary.endswith(f"; mirror {mirror} answers /v2/")
    # Files that disagree name no mirror, so nothing is probed.
    (certs / "_default" / "hosts.toml").write_text(GOOD)
    findings, summary = run_doctor(
        containerd_config=toml, hosts_dir=None, mirror_url=None, containerd_version=(1, 6)
    )
    assert findings == []
    assert "answers /v2/" not in summary
