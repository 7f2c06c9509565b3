"""registries.conf drop-ins for podman, skopeo and CRI-O, from `hosts --format registries-conf`.

Golden files, parsed back with tomllib, plus
the command line: stdout, --out written atomically, and the one-line errors. skopeo 1.9
was pointed at the golden file's layout by hand to confirm the request paths:
`quay.io/org/tool:1` arrives as `GET /v2/quay.io/org/tool/manifests/1`.
"""

from __future__ import annotations

import os
import tomllib
from pathlib import Path
from typing import Any

import pytest

from mirrorproxy.cli import main
from mirrorproxy.clientconf.registriesconf import (
    GENERATED_MARK,
    path_problem,
    registry_entries,
    render_registries_conf,
)
from mirrorproxy.config import Config, parse_config

GOLDEN = Path(__file__).parent.parent / "data" / "registriesconf"
MIRROR = "http://127.0.0.1:5000"


def make_config(namespaces: dict[str, list[str]], **server: str) -> Config:
    data: dict[str, Any] = {
        "server": {"listen": "127.0.0.1:5000", **server},
        "namespaces": {
            name: {"upstreams": ups, **({"allow": ["*.example"]} if name == "*" else {})}
            for name, ups in namespaces.items()
        },
    }
    return parse_config(data, source="test.toml", base_dir=Path("/"))


CONFIG = make_config(
    {
        "docker.io": ["https://registry-1.docker.io"],
        "quay.io": ["https://quay.io"],
        "harbor.local": ["http://harbor.local"],
        "myregistry:5000": ["http://myregistry:5000"],
        "*": ["https://fallback.example"],
    }
)


def check_golden(name: str, text: str) -> None:
    """Compare with tests/data/registriesconf/<name>; MIRRORPROXY_UPDATE_GOLDEN=1 rewrites it."""
    path = GOLDEN / name
    if os.environ.get("MIRRORPROXY_UPDATE_GOLDEN"):
        path.write_text(text)
    assert text == path.read_text()


# --- registries.conf


def test_golden_and_parses_back() -> None:
    text = render_registries_conf(CONFIG, MIRROR)
    check_golden("50-mirrorproxy.conf", text)
    assert text.startswith(GENERATED_MARK)
    assert tomllib.loads(text) == {
        "registry": [
            {
                "prefix": "docker.io",
                "location": "docker.io",  # containers/image maps it to Docker Hub's API host
                "mirror": [{"location": "127.0.0.1:5000/docker.io", "insecure": True}],
            },
            {
                "prefix": "harbor.local",
                "location": "harbor.local",
                "insecure": True,  # the config reaches it over plain http only
                "mirror": [{"location": "127.0.0.1:5000/harbor.local", "insecure": True}],
            },
            {
                "prefix": "quay.io",
                "location": "quay.io",
                "mirror": [{"location": "127.0.0.1:5000/quay.io", "insecure": True}],
            },
        ]
    }


def test_the_example_of_one_namespace() -> None:
    config = make_config({"quay.io": ["https://quay.io"]})
    body = render_registries_conf(config, MIRROR).split("\n\n", 1)[1]
    assert body == (
        '[[registry]]\nprefix = "quay.io"\nlocation = "quay.io"\n'
        '[[registry.mirror]]\nlocation = "127.0.0.1:5000/quay.io"\ninsecure = true\n'
    )


def test_left_out_namespaces_get_a_comment_not_an_entry() -> None:
    text = render_registries_conf(CONFIG, MIRROR)
    comments = [line for line in text.splitlines() if line.startswith("# Left out: ")]
    assert len(comments) == 2
    assert comments[0].startswith('# Left out: "*": ')
    assert comments[1].startswith('# Left out: "myregistry:5000": a port')
    assert "myregistry" not in "".join(e["prefix"] for e in registry_entries(CONFIG, MIRROR))


@pytest.mark.parametrize(
    ("name", "ok"),
    [
        ("docker.io", True),
        ("registry.k8s.io", True),
        ("10.0.0.5", True),
        ("my-registry.example", True),
        ("myregistry:5000", False),
        ("[fd00::1]:5000", False),
        ("*", False),
    ],
)
def test_which_namespaces_can_be_a_path(name: str, ok: bool) -> None:
    assert (path_problem(name) is None) is ok


def test_https_mirror_is_not_insecure() -> None:
    text = render_registries_conf(CONFIG, "https://mirror.internal:5443")
    check_golden("https.conf", text)
    for entry in tomllib.loads(text)["registry"]:
        assert entry["mirror"] == [{"location": f"mirror.internal:5443/{entry['prefix']}"}]


def test_ipv6_mirror_keeps_its_brackets() -> None:
    [entry, *_] = registry_entries(CONFIG, "http://[::1]:5000")
    assert entry["mirror"][0]["location"] == "[::1]:5000/docker.io"


def test_refusals() -> None:
    with pytest.raises(ValueError, match="with a path"):
        render_registries_conf(CONFIG, "http://127.0.0.1:5000/sub")
    only_ports = make_config({"myregistry:5000": ["http://myregistry:5000"]})
    with pytest.raises(ValueError, match="no namespace"):
        render_registries_conf(only_ports, MIRROR)


# --- through the command line

CONFIG_TEXT = """\
[server]
listen = "0.0.0.0:5000"
[namespaces."docker.io"]
upstreams = ["https://registry-1.docker.io"]
[namespaces."quay.io"]
upstreams = ["https://quay.io"]
[namespaces."myregistry:5000"]
upstreams = ["http://myregistry:5000"]
"""


@pytest.fixture
def config_file(tmp_path: Path) -> Path:
    path = tmp_path / "mirrorproxy.toml"
    path.write_text(CONFIG_TEXT)
    return path


def test_cli_prints_without_out(config_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["hosts", "-c", str(config_file), "--format", "registries-conf"]) == 0
    captured = capsys.readouterr()
    assert captured.err == ""
    registries = tomllib.loads(captured.out)["registry"]
    assert [r["mirror"][0]["location"] for r in registries] == [
        "127.0.0.1:5000/docker.io",  # 0.0.0.0 is not dialable
        "127.0.0.1:5000/quay.io",
    ]


def test_cli_writes_atomically_and_keeps_a_hand_written_file(
    config_file: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "registries.conf.d" / "50-mirrorproxy.conf"
    args = ["hosts", "-c", str(config_file), "--format", "registries-conf", "--out", str(out)]
    assert main(args) == 0  # the directory is created
    assert capsys.readouterr().out == f"wrote {out}\n"
    out.write_text('[[registry]]\nlocation = "mine.example"\n')
    assert main(args) == 0
    assert capsys.readouterr().out == (f"wrote {out} (the previous file is kept as {out}.bak)\n")
    assert out.with_name(out.name + ".bak").read_text().startswith("[[registry]]")
    assert tomllib.loads(out.read_text())["registry"][0]["prefix"] == "docker.io"
    assert out.stat().st_mode & 0o777 == 0o644
    mtime = out.stat().st_mtime_ns
    assert main(args) == 0
    assert capsys.readouterr().out == f"unchanged {out}\n"
    assert out.stat().st_mtime_ns == mtime
    assert sorted(p.name for p in out.parent.iterdir()) == [out.name, out.name + ".bak"]
    # Our own file is replaced without another backup.
    assert main([*args, "--mirror-url", "http://10.0.0.5:5000"]) == 0
    assert capsys.readouterr().out == f"wrote {out}\n"
    assert "10.0.0.5:5000/quay.io" in out.read_text()


@pytest.mark.parametrize(
    ("extra", "message", "code"),
    [
        (
            ["--format", "registries-conf", "--mirror-url", "https://m:5443", "--ca", "ca.pem"],
            "/etc/containers/certs.d/m:5443/ca.crt",
            2,
        ),
        (["--format", "registries-conf", "--out", "DIR"], "a directory", 2),
        (["--format", "registries-conf", "--mirror-url", "http://m:5000/x"], "with a path", 2),
        (
            ["--format", "registries-conf", "--out", "DIR/mirrorproxy.toml/x.conf"],
            "cannot write",
            1,
        ),
    ],
)
def test_cli_errors_are_one_line(
    config_file: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    extra: list[str],
    message: str,
    code: int,
) -> None:
    extra = [a.replace("DIR", str(tmp_path)) for a in extra]
    assert main(["hosts", "-c", str(config_file), *extra]) == code
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.count("\n") == 1
    assert message in captured.err
