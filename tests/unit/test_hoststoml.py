"""hosts.toml rendering (golden files, parse-back) and the atomic writer behind `hosts`."""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from mirrorproxy.cli import main
from mirrorproxy.clientconf.hoststoml import (
    default_mirror_url,
    host_directory,
    normalize_mirror_url,
    registry_server,
    render_all,
    render_hosts_toml,
    write_hosts_files,
)
from mirrorproxy.config import Config, ServerConfig, parse_config

GOLDEN = Path(__file__).parent.parent / "data" / "hoststoml"
MIRROR = "http://127.0.0.1:5000"


def make_config(namespaces: dict[str, list[str]], listen: str = "127.0.0.1:5000") -> Config:
    data: dict[str, Any] = {
        "server": {"listen": listen},
        "namespaces": {
            name: {"upstreams": ups, **({"allow": ["*.io", "*.example"]} if name == "*" else {})}
            for name, ups in namespaces.items()
        },
    }
    return parse_config(data, source="test.toml", base_dir=Path("/"))


CONFIG = make_config(
    {
        "docker.io": ["https://registry-1.docker.io"],
        "registry.k8s.io": ["https://registry.k8s.io"],
        "myregistry:5000": ["http://myregistry:5000"],
        "*": ["https://fallback.example"],
    }
)


def write_config(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mirrorproxy.toml"
    path.write_text(text)
    return path


def check_golden(name: str, text: str) -> None:
    """Compare with tests/data/hoststoml/<name>; MIRRORPROXY_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("MIRRORPROXY_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


# --- naming and addresses


@pytest.mark.parametrize(
    ("namespace", "directory"),
    [
        ("docker.io", "docker.io"),
        ("myregistry:5000", "myregistry:5000"),  # containerd also finds host:port on Linux
        ("[fd00::1]:5000", "[fd00::1]:5000"),
        ("*", "_default"),
    ],
)
def test_host_directory(namespace: str, directory: str) -> None:
    assert host_directory(namespace) == directory


def test_registry_server_follows_containerd_and_config() -> None:
    ns = CONFIG.namespaces
    assert registry_server(ns["docker.io"]) == "https://registry-1.docker.io"
    assert registry_server(ns["registry.k8s.io"]) == "https://registry.k8s.io"
    assert registry_server(ns["myregistry:5000"]) == "http://myregistry:5000"
    assert registry_server(ns["*"]) is None
    both = make_config({"r.example:5000": ["http://r.example:5000", "https://r.example:5000"]})
    assert registry_server(both.namespaces["r.example:5000"]) == "https://r.example:5000"


@pytest.mark.parametrize(
    ("host", "url"),
    [
        ("127.0.0.1", "http://127.0.0.1:5000"),
        ("0.0.0.0", "http://127.0.0.1:5000"),
        ("::", "http://[::1]:5000"),
        ("fd00::5", "http://[fd00::5]:5000"),
        ("mirror.internal", "http://mirror.internal:5000"),
    ],
)
def test_default_mirror_url(host: str, url: str) -> None:
    assert default_mirror_url(ServerConfig(host=host, port=5000)) == url


def test_normalize_mirror_url_accepts_and_trims() -> None:
    assert normalize_mirror_url("http://127.0.0.1:5000/") == "http://127.0.0.1:5000"
    assert normalize_mirror_url(" https://[::1]:5443 ") == "https://[::1]:5443"


@pytest.mark.parametrize(
    "url",
    ["127.0.0.1:5000", "ftp://m", "http://", "http://u:p@m", "http://m/?x=1", "http://m:99999"],
)
def test_normalize_mirror_url_rejects(url: str) -> None:
    with pytest.raises(ValueError, match=r"\S"):
        normalize_mirror_url(url)


# --- rendering


@pytest.mark.parametrize(
    ("namespace", "golden"),
    [
        ("docker.io", "docker.io.toml"),
        ("registry.k8s.io", "registry.k8s.io.toml"),
        ("myregistry:5000", "myregistry_5000.toml"),
        ("*", "_default.toml"),
    ],
)
def test_render_golden_and_parse_back(namespace: str, golden: str) -> None:
    ns = CONFIG.namespaces[namespace]
    text = render_hosts_toml(namespace, mirror_url=MIRROR, server=registry_server(ns))
    check_golden(golden, text)
    parsed = tomllib.loads(text)
    assert parsed["host"] == {MIRROR: {"capabilities": ["pull", "resolve"]}}
    assert parsed.get("server") == registry_server(ns)
    assert "push" not in text


def test_render_https_mirror_with_ca() -> None:
    text = render_hosts_toml(
        "docker.io",
        mirror_url="https://mirror.internal:5443",
        server="https://registry-1.docker.io",
        ca="/etc/mirrorproxy/ca.pem",
    )
    check_golden("https-ca.toml", text)
    host = tomllib.loads(text)["host"]["https://mirror.internal:5443"]
    assert host["ca"] == "/etc/mirrorproxy/ca.pem"


def test_ca_needs_https() -> None:
    with pytest.raises(ValueError, match="https"):
        render_hosts_toml("docker.io", mirror_url=MIRROR, server=None, ca="/ca.pem")


def test_ipv6_mirror_from_wildcard_listen() -> None:
    config = make_config({"docker.io": ["https://registry-1.docker.io"]}, listen="[::]:5000")
    files = render_all(config, default_mirror_url(config.server))
    assert tomllib.loads(files["docker.io"])["host"] == {
        "http://[::1]:5000": {"capabilities": ["pull", "resolve"]}
    }


@given(st.text(alphabet=st.characters(exclude_categories=["Cs"]), max_size=40))
def test_any_ca_path_round_trips(ca: str) -> None:
    # Quotes, backslashes, newlines and control characters must all be escaped.
    text = render_hosts_toml("docker.io", mirror_url="https://m:1", server=None, ca=ca)
    assert tomllib.loads(text)["host"]["https://m:1"]["ca"] == ca


def test_render_all_covers_every_namespace() -> None:
    files = render_all(CONFIG, MIRROR)
    assert list(files) == ["_default", "docker.io", "myregistry:5000", "registry.k8s.io"]
    for text in files.values():
        assert MIRROR in tomllib.loads(text)["host"]


# --- writer


def test_write_is_atomic_idempotent_and_leaves_others_alone(tmp_path: Path) -> None:
    out = tmp_path / "certs.d"
    (out / "quay.io").mkdir(parents=True)
    (out / "quay.io" / "hosts.toml").write_text('server = "https://quay.io"\n')
    (out / "registry.internal").mkdir()
    (out / "registry.internal" / "ca.crt").write_text("PEM")
    files = render_all(CONFIG, MIRROR)

    first = write_hosts_files(out, files)
    assert [r.changed for r in first] == [True] * 4
    assert all(r.backup is None for r in first)
    for name, text in files.items():
        path = out / name / "hosts.toml"
        assert path.read_text() == text
        assert path.stat().st_mode & 0o777 == 0o644
    mtimes = {r.path: r.path.stat().st_mtime_ns for r in first}

    second = write_hosts_files(out, files)
    assert [r.changed for r in second] == [False] * 4
    assert {r.path: r.path.stat().st_mtime_ns for r in second} == mtimes

    assert (out / "quay.io" / "hosts.toml").read_text() == 'server = "https://quay.io"\n'
    assert (out / "registry.internal" / "ca.crt").read_text() == "PEM"
    leftovers = [p for p in out.rglob("*") if p.name.startswith(".") or p.suffix == ".tmp"]
    assert leftovers == []


def test_hand_written_file_is_kept_as_backup(tmp_path: Path) -> None:
    (tmp_path / "docker.io").mkdir()
    (tmp_path / "docker.io" / "hosts.toml").write_text("# mine\n")
    [result] = write_hosts_files(tmp_path, {"docker.io": "new\n"})
    assert result.changed
    assert result.backup == tmp_path / "docker.io" / "hosts.toml.bak"
    assert result.backup.read_text() == "# mine\n"
    # Our own earlier output is simply replaced, without a backup.
    text = render_all(CONFIG, MIRROR)["docker.io"]
    (tmp_path / "docker.io" / "hosts.toml").write_text(text)
    [again] = write_hosts_files(tmp_path, {"docker.io": text.replace("5000", "5001")})
    assert again.changed
    assert again.backup is None


# --- the `hosts` command through the CLI

CONFIG_TEXT = """\
[server]
listen = "0.0.0.0:5000"
[namespaces."docker.io"]
upstreams = ["https://registry-1.docker.io"]
[namespaces."myregistry:5000"]
upstreams = ["http://myregistry:5000"]
"""


def test_cli_writes_then_reports_unchanged(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    cfg = write_config(tmp_path, CONFIG_TEXT)
    out = tmp_path / "certs.d"
    assert main(["hosts", "--config", str(cfg), "--out", str(out)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines == [
        f"wrote {out / 'docker.io' / 'hosts.toml'}",
        f"wrote {out / 'myregistry:5000' / 'hosts.toml'}",
    ]
    docker = tomllib.loads((out / "docker.io" / "hosts.toml").read_text())
    assert list(docker["host"]) == ["http://127.0.0.1:5000"]  # 0.0.0.0 is not dialable

    assert main(["hosts", "--config", str(cfg), "--out", str(out)]) == 0
    assert capsys.readouterr().out.startswith("unchanged ")


def test_cli_mirror_url_and_dry_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, CONFIG_TEXT)
    out = tmp_path / "certs.d"
    args = ["hosts", "-c", str(cfg), "--out", str(out), "--dry-run"]
    assert main([*args, "--mirror-url", "http://10.0.0.7:5000/"]) == 0
    printed = capsys.readouterr().out
    assert f"# ----- {out / 'docker.io' / 'hosts.toml'}" in printed
    assert '[host."http://10.0.0.7:5000"]' in printed
    assert not out.exists()
    assert main(["hosts", "-c", str(cfg), "--dry-run"]) == 0
    assert "# ----- myregistry:5000/hosts.toml" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        ([], "--out DIR is required"),
        (["--out", "OUT", "--mirror-url", "127.0.0.1:5000"], "--mirror-url: not an http(s) URL"),
        (["--format", "k3s", "--out", "OUT"], "--out is for --format containerd"),
    ],
)
def test_cli_usage_errors_are_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str
) -> None:
    cfg = write_config(tmp_path, CONFIG_TEXT)
    extra = [str(tmp_path / "out") if a == "OUT" else a for a in extra]
    assert main(["hosts", "--config", str(cfg), *extra]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert message in captured.err


def test_cli_missing_config_is_one_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["hosts", "--config", str(tmp_path / "nope.toml"), "--dry-run"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "no such file" in err


def test_cli_write_failure_is_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cfg = write_config(tmp_path, CONFIG_TEXT)
    out = tmp_path / "certs.d"
    out.mkdir()
    (out / "docker.io").write_text("a file where a directory belongs")
    assert main(["hosts", "--config", str(cfg), "--out", str(out)]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "cannot write" in err

    not_dir = tmp_path / "plain-file"
    not_dir.write_text("")
    assert main(["hosts", "--config", str(cfg), "--out", str(not_dir)]) == 2
    assert "not a directory" in capsys.readouterr().err
