"""[cluster]: members static or from DNS, ``self`` among them, ``${VAR}`` in ``self``,
and every mistake named by file and key."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrorproxy.config import ClusterConfig, ConfigError, load_config, parse_config

DOCKER = '[namespaces."docker.io"]\nupstreams = ["http://registry.internal:5000"]\n'
THREE = 'members = ["http://10.0.0.1:5000", "http://10.0.0.2:5000", "HTTP://10.0.0.3:5000/"]\n'


def load(tmp_path: Path, text: str) -> ClusterConfig | None:
    path = tmp_path / "mirrorproxy.toml"
    path.write_text(DOCKER + text, encoding="utf-8")
    return load_config(path).cluster


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "mirrorproxy.toml") + ": ")
    return message.split(": ", 1)[1]


def test_no_cluster_by_default(tmp_path: Path) -> None:
    assert load(tmp_path, "") is None


def test_static_members_normalised_with_defaults(tmp_path: Path) -> None:
    got = load(tmp_path, '[cluster]\nself = "http://10.0.0.3:5000"\n' + THREE)
    assert got == ClusterConfig(
        self_url="http://10.0.0.3:5000",
        members=("http://10.0.0.1:5000", "http://10.0.0.2:5000", "http://10.0.0.3:5000"),
        refresh=10.0,
        peer_timeout=2.0,
    )


def test_members_from_dns_with_knobs(tmp_path: Path) -> None:
    text = (
        '[cluster]\nself = "http://10.0.0.3:5000"\n'
        'members_dns = "mirrorproxy-headless.mirrorproxy.svc.cluster.local:5000"\n'
        'refresh = "30s"\npeer_timeout = "500ms"\n'
    )
    got = load(tmp_path, text)
    assert got is not None
    assert got.members == ()
    assert got.members_dns == ("mirrorproxy-headless.mirrorproxy.svc.cluster.local", 5000)
    assert (got.refresh, got.peer_timeout) == (30.0, 0.5)


def test_self_expands_environment_variables() -> None:
    data = {
        "namespaces": {"docker.io": {"upstreams": ["http://registry.internal:5000"]}},
        "cluster": {"self": "http://${POD_IP}:${PORT}", "members_dns": "svc.local:5000"},
    }
    env = {"POD_IP": "10.1.2.3", "PORT": "5000"}
    got = parse_config(data, source="k8s.toml", base_dir=Path("."), environ=env).cluster
    assert got is not None
    assert got.self_url == "http://10.1.2.3:5000"
    with pytest.raises(ConfigError) as info:
        parse_config(data, source="k8s.toml", base_dir=Path("."), environ={"PORT": "1"})
    assert str(info.value) == (
        "k8s.toml: cluster.self: environment variable 'POD_IP'"
        " (in 'http://${POD_IP}:${PORT}') is not set"
    )


@pytest.mark.parametrize(
    ("text", "want"),
    [
        ("members = []\n", "cluster.self: missing"),
        ('self = "http://10.0.0.1:5000"\n', "cluster.members: give the members"),
        (
            'self = "http://10.0.0.1:5000"\n' + THREE + 'members_dns = "svc:5000"\n',
            "cluster.members_dns: give only one of members and members_dns",
        ),
        (
            'self = "http://10.0.0.9:5000"\n' + THREE,
            "cluster.self: http://10.0.0.9:5000 is not one",
        ),
        ('self = "http://10.0.0.1"\n' + THREE, "cluster.self: a member URL needs its port"),
        ('self = "ftp://10.0.0.1:21"\n' + THREE, "cluster.self: not an http(s)://host:port URL"),
        (
            'self = "http://10.0.0.1:5000"\nmembers = ["http://10.0.0.1:5000", 7]\n',
            "cluster.members[1]: expected a URL string, got int",
        ),
        (
            'self = "http://10.0.0.1:5000"\nmembers = ["http://10.0.0.1:5000/v2"]\n',
            "cluster.members[0]: a member URL is scheme://host:port and nothing else",
        ),
        (
            'self = "http://a:1"\nmembers = ["http://a:1", "http://A:1"]\n',
            "cluster.members[1]: http://a:1 is listed twice",
        ),
        ('self = "http://a:1"\nmembers_dns = "svc"\n', "cluster.members_dns: bad listen"),
        (
            'self = "http://a:1"\nmembers_dns = "svc:1"\nrefresh = "0s"\n',
            "cluster.refresh: must be longer than 0s",
        ),
        (
            'self = "http://a:1"\nmembers = ["http://a:1"]\nrefresh = "5s"\n',
            "cluster.refresh: only with members_dns",
        ),
        (
            'self = "http://a:1"\nmembers = ["http://a:1"]\npeers = 1\n',
            "cluster.peers: unknown key",
        ),
    ],
)
def test_mistakes_name_file_and_key(tmp_path: Path, text: str, want: str) -> None:
    assert error(tmp_path, "[cluster]\n" + text).startswith(want)


def test_the_cluster_example_lists_itself_among_the_members() -> None:
    # (every example loads: tests/unit/test_config_examples.py)
    example = Path(__file__).resolve().parents[2] / "config" / "mirrorproxy-cluster.toml"
    cluster = load_config(example).cluster
    assert cluster is not None
    assert cluster.self_url in cluster.members
