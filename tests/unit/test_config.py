"""Unit tests for mirrorproxy.config: TOML in, frozen dataclasses or one-line errors out."""

from __future__ import annotations

import dataclasses
import re
from pathlib import Path

import pytest

from mirrorproxy.config import (
    WILDCARD,
    CacheConfig,
    Config,
    ConfigError,
    Namespace,
    ServerConfig,
    Upstream,
    UpstreamDefaults,
    load_config,
    parse_config,
    parse_listen,
    parse_upstream_url,
    with_overrides,
)

DOCKER = '[namespaces."docker.io"]\nupstreams = ["http://registry.internal:5000"]\n'

EXAMPLE = """
[server]
listen = "127.0.0.1:5000"          # host:port; [::1]:5000 works too
default_namespace = "docker.io"    # for requests that carry no ns=

[cache]
dir = "/var/lib/mirrorproxy"
tag_ttl = "5m"

[namespaces."docker.io"]
upstreams = ["https://mirror.gcr.io", "https://registry-1.docker.io"]   # tried in order

[namespaces."harbor.example.com"]
upstreams = [{ url = "http://10.0.0.5:80", ns = true }]
"""


def write(tmp_path: Path, text: str, name: str = "mirrorproxy.toml") -> Path:
    path = tmp_path / name
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    return path


def load(tmp_path: Path, text: str) -> Config:
    return load_config(write(tmp_path, text))


def config_error(tmp_path: Path, text: str) -> tuple[Path, ConfigError]:
    path = write(tmp_path, text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    return path, info.value


# --- the documented example and defaults -------------------------------------------------


def test_example_from_the_issue(tmp_path: Path) -> None:
    path = write(tmp_path, EXAMPLE)
    config = load_config(path)

    assert config.source == str(path)
    assert config.server == ServerConfig(
        host="127.0.0.1", port=5000, default_namespace="docker.io"
    )
    assert config.server.listen == "127.0.0.1:5000"
    assert config.cache.dir == Path("/var/lib/mirrorproxy")
    assert config.cache.tag_ttl == 300.0
    assert list(config.namespaces) == ["docker.io", "harbor.example.com"]

    docker = config.namespaces["docker.io"]
    assert docker.name == "docker.io"
    assert docker.tag_ttl == 300.0
    assert [u.url for u in docker.upstreams] == [
        "https://mirror.gcr.io",
        "https://registry-1.docker.io",
    ]
    assert docker.upstreams[0] == Upstream(
        url="https://mirror.gcr.io", origin="https://mirror.gcr.io", path="/v2"
    )
    assert [u.ns for u in docker.upstreams] == [False, False]

    harbor = config.namespaces["harbor.example.com"]
    assert harbor.upstreams == (
        Upstream(url="http://10.0.0.5:80", origin="http://10.0.0.5:80", path="/v2", ns=True),
    )


def test_minimal_config_uses_defaults(tmp_path: Path) -> None:
    config = load(tmp_path, DOCKER)
    assert config.server == ServerConfig(
        host="127.0.0.1", port=5000, default_namespace="docker.io"
    )
    assert config.cache == CacheConfig()
    assert config.cache.tag_ttl == 300.0
    assert config.cache.max_manifest_size == 4 * 1024 * 1024
    assert config.defaults == UpstreamDefaults()
    (upstream,) = config.namespaces["docker.io"].upstreams
    assert upstream.connect_timeout == 5.0
    assert upstream.read_timeout == 30.0
    assert upstream.ns is False


def test_no_default_namespace_without_docker_io(tmp_path: Path) -> None:
    config = load(tmp_path, '[namespaces."quay.io"]\nupstreams = ["https://quay.io"]\n')
    assert config.server.default_namespace is None


def test_explicit_default_namespace_wins_over_docker_io(tmp_path: Path) -> None:
    text = DOCKER + '[namespaces."quay.io"]\nupstreams = ["https://quay.io"]\n'
    config = load(tmp_path, text + '[server]\ndefault_namespace = "quay.io"\n')
    assert config.server.default_namespace == "quay.io"


def test_empty_default_namespace_means_unset(tmp_path: Path) -> None:
    config = load(tmp_path, DOCKER + '[server]\ndefault_namespace = ""\n')
    assert config.server.default_namespace == "docker.io"


def test_default_namespace_may_rely_on_wildcard(tmp_path: Path) -> None:
    text = '[namespaces."*"]\nupstreams = ["https://mirror.example"]\nallow = ["quay.io"]\n'
    config = load(tmp_path, text + '[server]\ndefault_namespace = "quay.io"\n')
    assert config.server.default_namespace == "quay.io"
    assert config.namespace("quay.io") is config.namespaces[WILDCARD]


def test_ipv6_listen(tmp_path: Path) -> None:
    config = load(tmp_path, DOCKER + '[server]\nlisten = "[::1]:5000"\n')
    assert (config.server.host, config.server.port) == ("::1", 5000)
    assert config.server.listen == "[::1]:5000"


def test_config_is_frozen(tmp_path: Path) -> None:
    config = load(tmp_path, DOCKER)
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]


# --- upstream URLs and paths -----------------------------------------------------------


def test_upstream_with_path_keeps_it(tmp_path: Path) -> None:
    text = (
        '[namespaces."docker.io"]\n'
        'upstreams = ["https://harbor.example.com/v2/dockerhub-proxy/"]\n'
    )
    (upstream,) = load(tmp_path, text).namespaces["docker.io"].upstreams
    assert upstream.origin == "https://harbor.example.com"
    assert upstream.path == "/v2/dockerhub-proxy"
    assert upstream.url == "https://harbor.example.com/v2/dockerhub-proxy"


def test_upstream_table_options(tmp_path: Path) -> None:
    text = (
        "[defaults]\n"
        'connect_timeout = "2s"\n'
        'read_timeout = "1m"\n'
        '[namespaces."docker.io"]\n'
        'tag_ttl = "30s"\n'
        "upstreams = [\n"
        '  { url = "https://a.example", ns = true, connect_timeout = "250ms" },\n'
        '  { url = "https://b.example", read_timeout = 10 },\n'
        '  "https://c.example",\n'
        "]\n"
    )
    config = load(tmp_path, text)
    a, b, c = config.namespaces["docker.io"].upstreams
    assert config.namespaces["docker.io"].tag_ttl == 30.0
    assert (a.ns, a.connect_timeout, a.read_timeout) == (True, 0.25, 60.0)
    assert (b.ns, b.connect_timeout, b.read_timeout) == (False, 2.0, 10.0)
    assert (c.ns, c.connect_timeout, c.read_timeout) == (False, 2.0, 60.0)


def test_namespace_tag_ttl_defaults_to_cache_tag_ttl(tmp_path: Path) -> None:
    config = load(tmp_path, DOCKER + '[cache]\ntag_ttl = "1h"\n')
    assert config.namespaces["docker.io"].tag_ttl == 3600.0


@pytest.mark.parametrize(
    ("value", "seconds"), [("90", 90.0), ("1.5", 1.5), ('"90s"', 90.0), ('"1h30m"', 5400.0)]
)
def test_durations_accept_toml_numbers_and_strings(
    tmp_path: Path, value: str, seconds: float
) -> None:
    config = load(tmp_path, DOCKER + f"[cache]\ntag_ttl = {value}\n")
    assert config.cache.tag_ttl == seconds


def test_defaults_table(tmp_path: Path) -> None:
    text = DOCKER + '[defaults]\ncooldown = "2s"\nmax_cooldown = "2m"\n'
    assert load(tmp_path, text).defaults == UpstreamDefaults(cooldown=2.0, max_cooldown=120.0)


def test_cache_sizes(tmp_path: Path) -> None:
    text = DOCKER + '[cache]\nmax_manifest_size = "8MiB"\nmemory_manifests = 4096\n'
    cache = load(tmp_path, text).cache
    assert cache.max_manifest_size == 8 * 1024 * 1024
    assert cache.memory_manifests == 4096


# --- cache dir resolution -------------------------------------------------------------


def test_relative_cache_dir_resolves_against_config_dir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    path = write(tmp_path, DOCKER + '[cache]\ndir = "cache"\n', name="etc/mirrorproxy.toml")
    assert load_config(path).cache.dir == (tmp_path / "etc" / "cache").resolve()


def test_relative_cache_dir_with_parent(tmp_path: Path) -> None:
    path = write(tmp_path, DOCKER + '[cache]\ndir = "../var/cache"\n', name="etc/c.toml")
    assert load_config(path).cache.dir == (tmp_path / "var" / "cache").resolve()


def test_relative_config_path_resolves_against_its_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    write(tmp_path, DOCKER + '[cache]\ndir = "data"\n', name="etc/c.toml")
    monkeypatch.chdir(tmp_path)
    assert load_config("etc/c.toml").cache.dir == (tmp_path / "etc" / "data").resolve()


def test_absolute_cache_dir_is_kept(tmp_path: Path) -> None:
    target = tmp_path / "abs"
    config = load(tmp_path, DOCKER + f'[cache]\ndir = "{target}"\n')
    assert config.cache.dir == target.resolve()


def test_cache_dir_expands_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    config = load(tmp_path, DOCKER + '[cache]\ndir = "~/mp"\n')
    assert config.cache.dir == (tmp_path / "home" / "mp").resolve()


def test_parse_config_base_dir(tmp_path: Path) -> None:
    data = {
        "cache": {"dir": "c"},
        "namespaces": {"docker.io": {"upstreams": ["https://registry-1.docker.io"]}},
    }
    config = parse_config(data, source="inline", base_dir=tmp_path)
    assert config.cache.dir == (tmp_path / "c").resolve()
    assert config.source == "inline"


# --- wildcard and Config.namespace ----------------------------------------------------


def test_wildcard_namespace_fallback(tmp_path: Path) -> None:
    text = DOCKER + (
        '[namespaces."*"]\nupstreams = ["https://mirror.example/v2/all"]\nallow = ["*.io"]\n'
    )
    config = load(tmp_path, text)
    wildcard = config.namespaces[WILDCARD]
    assert wildcard.name == "*"
    assert wildcard.upstreams[0].path == "/v2/all"
    assert config.namespace("docker.io") is config.namespaces["docker.io"]
    assert config.namespace("quay.io") is wildcard
    assert config.namespace("127.0.0.1:22") is None  # not on the wildcard's allowlist


def test_namespace_without_wildcard_is_none(tmp_path: Path) -> None:
    config = load(tmp_path, DOCKER)
    assert config.namespace("docker.io") is config.namespaces["docker.io"]
    assert config.namespace("quay.io") is None
    assert config.namespace("") is None


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1:5000", "[::1]:5000", "my-reg.example"])
def test_namespace_host_forms(tmp_path: Path, name: str) -> None:
    config = load(tmp_path, f'[namespaces."{name}"]\nupstreams = ["https://x.example"]\n')
    assert isinstance(config.namespace(name), Namespace)


# --- errors: one line, FILE: KEY: PROBLEM ----------------------------------------------

UP = '[namespaces."docker.io"]\n'

ERROR_CASES = [
    # unknown keys
    ("unknown-root", "bogus = 1\n" + DOCKER, "bogus", "unknown key"),
    (
        "unknown-server",
        DOCKER + '[server]\nlisten_addr = "x:1"\n',
        "server.listen_addr",
        "unknown key",
    ),
    ("unknown-cache", DOCKER + '[cache]\nsize = "1GiB"\n', "cache.size", "unknown key"),
    (
        "unknown-defaults",
        DOCKER + '[defaults]\ntimeout = "1s"\n',
        "defaults.timeout",
        "unknown key",
    ),
    (
        "unknown-namespace-key",
        UP + 'upstreams = ["https://a.example"]\nupstream = ["https://b.example"]\n',
        'namespaces."docker.io".upstream',
        "unknown key",
    ),
    (
        "unknown-upstream-key",
        UP + 'upstreams = ["https://a.example", { url = "https://b.example", insecure = true }]\n',
        'namespaces."docker.io".upstreams[1].insecure',
        "unknown key",
    ),
    # wrong types
    ("server-not-table", 'server = "x"\n' + DOCKER, "server", "expected a table, got a string"),
    ("namespaces-array", "namespaces = []\n", "namespaces", "expected a table, got an array"),
    (
        "namespace-not-table",
        '[namespaces]\n"docker.io" = "https://x.example"\n',
        'namespaces."docker.io"',
        "expected a table, got a string",
    ),
    (
        "listen-bool",
        DOCKER + "[server]\nlisten = true\n",
        "server.listen",
        "expected a string, got a boolean",
    ),
    (
        "default-ns-int",
        DOCKER + "[server]\ndefault_namespace = 5\n",
        "server.default_namespace",
        "expected str, got int",
    ),
    ("cache-dir-int", DOCKER + "[cache]\ndir = 5\n", "cache.dir", "expected str, got int"),
    (
        "tag-ttl-array",
        DOCKER + "[cache]\ntag_ttl = [1]\n",
        "cache.tag_ttl",
        "expected a string, got an array",
    ),
    (
        "upstreams-string",
        UP + 'upstreams = "https://x.example"\n',
        'namespaces."docker.io".upstreams',
        "expected list, got a string",
    ),
    (
        "upstream-int",
        UP + 'upstreams = ["https://x.example", 5]\n',
        'namespaces."docker.io".upstreams[1]',
        "expected a URL string or a table, got int",
    ),
    (
        "upstream-url-int",
        UP + "upstreams = [{ url = 5 }]\n",
        'namespaces."docker.io".upstreams[0].url',
        "expected str, got int",
    ),
    (
        "upstream-ns-string",
        UP + 'upstreams = [{ url = "https://x.example", ns = "yes" }]\n',
        'namespaces."docker.io".upstreams[0].ns',
        "expected bool, got a string",
    ),
    # bad URLs
    (
        "url-ftp",
        UP + 'upstreams = ["https://mirror.gcr.io", "ftp://registry.example"]\n',
        'namespaces."docker.io".upstreams[1].url',
        "not an http(s) URL",
    ),
    (
        "url-no-scheme",
        UP + 'upstreams = [{ url = "registry-1.docker.io" }]\n',
        'namespaces."docker.io".upstreams[0].url',
        "not an http(s) URL",
    ),
    (
        "url-no-host",
        UP + 'upstreams = ["https://"]\n',
        'namespaces."docker.io".upstreams[0].url',
        "not an http(s) URL",
    ),
    (
        "url-credentials",
        UP + 'upstreams = ["https://user:secret@registry.example"]\n',
        'namespaces."docker.io".upstreams[0].url',
        "credentials do not belong in the URL",
    ),
    (
        "url-query",
        UP + 'upstreams = ["https://registry.example/v2?x=1"]\n',
        'namespaces."docker.io".upstreams[0].url',
        "no query or fragment",
    ),
    (
        "url-bad-port",
        UP + 'upstreams = ["https://registry.example:99999"]\n',
        'namespaces."docker.io".upstreams[0].url',
        "bad port",
    ),
    (
        "url-missing",
        UP + "upstreams = [{ ns = true }]\n",
        'namespaces."docker.io".upstreams[0].url',
        "missing",
    ),
    ("url-empty", UP + 'upstreams = [""]\n', 'namespaces."docker.io".upstreams[0].url', "missing"),
    # no upstreams / namespaces
    (
        "upstreams-empty",
        UP + "upstreams = []\n",
        'namespaces."docker.io".upstreams',
        "no upstreams",
    ),
    (
        "upstreams-absent",
        UP + 'tag_ttl = "1m"\n',
        'namespaces."docker.io".upstreams',
        "no upstreams",
    ),
    (
        "upstreams-ip-namespace",
        '[namespaces."127.0.0.1:5000"]\nupstreams = []\n',
        'namespaces."127.0.0.1:5000".upstreams',
        "no upstreams",
    ),
    (
        "upstreams-bare-key",
        "[namespaces.localhost]\nupstreams = []\n",
        "namespaces.localhost.upstreams",
        "no upstreams",
    ),
    ("namespaces-missing", '[server]\nlisten = "127.0.0.1:5000"\n', "namespaces", "missing"),
    ("namespaces-empty", "[namespaces]\n", "namespaces", "no namespace configured"),
    # bad namespace names
    (
        "ns-space",
        '[namespaces."docker io"]\nupstreams = ["https://x.example"]\n',
        'namespaces."docker io"',
        "not a registry host name",
    ),
    (
        "ns-url",
        '[namespaces."https://docker.io"]\nupstreams = ["https://x.example"]\n',
        'namespaces."https://docker.io"',
        "not a registry host name",
    ),
    (
        "ns-path",
        '[namespaces."docker.io/library"]\nupstreams = ["https://x.example"]\n',
        'namespaces."docker.io/library"',
        "not a registry host name",
    ),
    (
        "ns-leading-dash",
        '[namespaces."-docker.io"]\nupstreams = ["https://x.example"]\n',
        'namespaces."-docker.io"',
        "not a registry host name",
    ),
    # bad durations and sizes
    ("ttl-words", DOCKER + '[cache]\ntag_ttl = "5 minutes"\n', "cache.tag_ttl", "bad duration"),
    ("ttl-negative", DOCKER + "[cache]\ntag_ttl = -5\n", "cache.tag_ttl", "negative duration"),
    (
        "ns-ttl",
        UP + 'upstreams = ["https://x.example"]\ntag_ttl = "soon"\n',
        'namespaces."docker.io".tag_ttl',
        "bad duration",
    ),
    (
        "upstream-timeout",
        UP + 'upstreams = [{ url = "https://x.example", read_timeout = "1x" }]\n',
        'namespaces."docker.io".upstreams[0].read_timeout',
        "bad duration",
    ),
    (
        "defaults-timeout",
        DOCKER + '[defaults]\nconnect_timeout = ""\n',
        "defaults.connect_timeout",
        "empty duration",
    ),
    (
        "cooldown-order",
        DOCKER + '[defaults]\ncooldown = "1m"\nmax_cooldown = "1s"\n',
        "defaults.max_cooldown",
        "must not be shorter than cooldown",
    ),
    (
        "size-words",
        DOCKER + '[cache]\nmax_manifest_size = "lots"\n',
        "cache.max_manifest_size",
        "bad size",
    ),
    (
        "size-negative",
        DOCKER + '[cache]\nmemory_manifests = "-1MiB"\n',
        "cache.memory_manifests",
        "bad size",
    ),
    ("cache-dir-empty", DOCKER + '[cache]\ndir = ""\n', "cache.dir", "must not be empty"),
    # bad listen
    (
        "listen-no-port",
        DOCKER + '[server]\nlisten = "localhost"\n',
        "server.listen",
        "bad listen address",
    ),
    (
        "listen-port-range",
        DOCKER + '[server]\nlisten = "127.0.0.1:70000"\n',
        "server.listen",
        "port 70000 out of range",
    ),
    (
        "listen-port-zero",
        DOCKER + '[server]\nlisten = "127.0.0.1:0"\n',
        "server.listen",
        "port 0 out of range",
    ),
    (
        "listen-bare-v6",
        DOCKER + '[server]\nlisten = "::1:5000"\n',
        "server.listen",
        "bad listen address",
    ),
    (
        "listen-int",
        DOCKER + "[server]\nlisten = 5000\n",
        "server.listen",
        "bad listen address '5000'",
    ),
    # default_namespace must be served
    (
        "default-ns-unknown",
        DOCKER + '[server]\ndefault_namespace = "quay.io"\n',
        "server.default_namespace",
        "'quay.io' is not a configured namespace",
    ),
]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [pytest.param(text, key, problem, id=id_) for id_, text, key, problem in ERROR_CASES],
)
def test_config_error_names_file_key_and_problem(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    path, err = config_error(tmp_path, text)
    message = str(err)
    assert message.startswith(f"{path}: {key}: "), message
    assert problem in message
    assert "\n" not in message
    assert err.source == str(path)
    assert err.key == key
    assert problem in err.message


def test_toml_syntax_error(tmp_path: Path) -> None:
    path, err = config_error(tmp_path, DOCKER + "[server\nlisten = \n")
    assert str(err).startswith(f"{path}: not valid TOML: ")
    assert err.key == ""
    assert "\n" not in str(err)


def test_duplicate_key_is_a_toml_error(tmp_path: Path) -> None:
    path, err = config_error(tmp_path, DOCKER + '[server]\nlisten = "a:1"\nlisten = "b:2"\n')
    assert str(err).startswith(f"{path}: not valid TOML: ")


def test_missing_file(tmp_path: Path) -> None:
    path = tmp_path / "absent.toml"
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert str(info.value) == f"{path}: no such file"
    assert info.value.key == ""


def test_directory_instead_of_file(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path)
    assert str(info.value).startswith(f"{tmp_path}: cannot read: ")


def test_parse_config_error_uses_source() -> None:
    with pytest.raises(ConfigError) as info:
        parse_config({"namespaces": {}}, source="inline.toml", base_dir=Path("/"))
    assert str(info.value) == "inline.toml: namespaces: no namespace configured"


def test_config_error_rendering() -> None:
    assert str(ConfigError("f.toml", "a.b", "bad")) == "f.toml: a.b: bad"
    assert str(ConfigError("f.toml", "", "bad")) == "f.toml: bad"
    err = ConfigError("f.toml", "a.b", "bad")
    assert (err.source, err.key, err.message) == ("f.toml", "a.b", "bad")


UPSTREAMS = {"upstreams": ["http://127.0.0.1:1"]}


def _parse(data: dict[str, object], tmp_path: Path) -> None:
    parse_config(data, source="t.toml", base_dir=tmp_path)


def test_upper_case_namespace_is_refused(tmp_path: Path) -> None:
    """Namespace names are lower case, as containerd sends them in ``ns=``."""
    with pytest.raises(ConfigError, match="lower case"):
        _parse({"namespaces": {"Docker.IO": UPSTREAMS}}, tmp_path)


def test_default_namespace_is_checked_even_with_a_wildcard(tmp_path: Path) -> None:
    """A wildcard namespace does not make an invalid ``default_namespace`` acceptable."""
    wild = {**UPSTREAMS, "allow": ["*.io"]}
    with pytest.raises(ConfigError, match=r"server\.default_namespace"):
        _parse({"server": {"default_namespace": "a b"}, "namespaces": {"*": wild}}, tmp_path)


def test_namespace_key_with_newline_stays_on_one_line(tmp_path: Path) -> None:
    """A namespace key with a newline still gives a one-line error."""
    with pytest.raises(ConfigError) as info:
        _parse({"namespaces": {"a\nb": UPSTREAMS}}, tmp_path)
    assert "\n" not in str(info.value)


# --- with_overrides -------------------------------------------------------------------


def test_with_overrides_listen(tmp_path: Path) -> None:
    config = load(tmp_path, DOCKER)
    updated = with_overrides(config, listen="0.0.0.0:6000")
    assert (updated.server.host, updated.server.port) == ("0.0.0.0", 6000)
    assert updated.server.default_namespace == "docker.io"
    assert (config.server.host, config.server.port) == ("127.0.0.1", 5000)
    assert updated.cache == config.cache


def test_with_overrides_listen_v6(tmp_path: Path) -> None:
    updated = with_overrides(load(tmp_path, DOCKER), listen="[::]:5001")
    assert updated.server.listen == "[::]:5001"


def test_with_overrides_none_keeps_everything(tmp_path: Path) -> None:
    config = load(tmp_path, DOCKER)
    assert with_overrides(config) == config


@pytest.mark.parametrize(
    ("listen", "problem"),
    [("nonsense", "bad listen address"), ("host:0", "port 0 out of range"), ("", "bad listen")],
)
def test_with_overrides_bad_listen(tmp_path: Path, listen: str, problem: str) -> None:
    with pytest.raises(ConfigError) as info:
        with_overrides(load(tmp_path, DOCKER), listen=listen)
    assert str(info.value).startswith("--listen: ")
    assert problem in str(info.value)


def test_with_overrides_cache_dir_relative_to_cwd(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = load(tmp_path, DOCKER)
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    assert with_overrides(config, cache_dir="cache").cache.dir == (work / "cache").resolve()
    assert with_overrides(config, cache_dir="cache").cache.tag_ttl == config.cache.tag_ttl


# --- parse_listen / parse_upstream_url ------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:5000", ("127.0.0.1", 5000)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
        ("localhost:65535", ("localhost", 65535)),
        ("[::1]:5000", ("::1", 5000)),
        ("[::]:1", ("::", 1)),
        ("[fe80::1%eth0]:5000", None),
        ("  127.0.0.1:5000 ", ("127.0.0.1", 5000)),
    ],
)
def test_parse_listen(text: str, expected: tuple[str, int] | None) -> None:
    if expected is None:
        with pytest.raises(ValueError, match="bad listen address"):
            parse_listen(text)
    else:
        assert parse_listen(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "",
        "5000",
        ":5000",
        "localhost",
        "::1:5000",
        "[::1]",
        "[::1]5000",
        "host:port",
        "h:-1",
        "h:",
    ],
)
def test_parse_listen_rejects(text: str) -> None:
    with pytest.raises(ValueError, match="bad listen address"):
        parse_listen(text)


@pytest.mark.parametrize("text", ["h:0", "h:65536", "h:99999999"])
def test_parse_listen_port_range(text: str) -> None:
    with pytest.raises(ValueError, match="out of range"):
        parse_listen(text)


@pytest.mark.parametrize(
    ("url", "origin", "path"),
    [
        ("https://mirror.gcr.io", "https://mirror.gcr.io", "/v2"),
        ("https://mirror.gcr.io/", "https://mirror.gcr.io", "/v2"),
        ("http://10.0.0.5:80", "http://10.0.0.5:80", "/v2"),
        ("https://registry.example:8443", "https://registry.example:8443", "/v2"),
        (
            "https://harbor.example.com/v2/dockerhub-proxy",
            "https://harbor.example.com",
            "/v2/dockerhub-proxy",
        ),
        (
            "https://harbor.example.com/v2/dockerhub-proxy/",
            "https://harbor.example.com",
            "/v2/dockerhub-proxy",
        ),
        ("https://r.example/v2/", "https://r.example", "/v2"),
        ("http://[::1]:5000", "http://[::1]:5000", "/v2"),
        ("http://[fd00::5]/v2/x", "http://[fd00::5]", "/v2/x"),
        ("HTTPS://Mirror.GCR.io", "https://mirror.gcr.io", "/v2"),
    ],
)
def test_parse_upstream_url(url: str, origin: str, path: str) -> None:
    assert parse_upstream_url(url) == (origin, path)


@pytest.mark.parametrize(
    ("url", "problem"),
    [
        ("", "not an http(s) URL"),
        ("mirror.gcr.io", "not an http(s) URL"),
        ("ftp://mirror.gcr.io", "not an http(s) URL"),
        ("file:///etc/passwd", "not an http(s) URL"),
        ("unix:///run/registry.sock", "not an http(s) URL"),
        ("https://", "not an http(s) URL"),
        ("https:///v2", "not an http(s) URL"),
        ("https://user@r.example", "credentials"),
        ("https://user:pw@r.example", "credentials"),
        ("https://r.example?x=1", "no query or fragment"),
        ("https://r.example#frag", "no query or fragment"),
        ("https://r.example:99999", "bad port"),
        ("https://r.example:abc", "bad port"),
    ],
)
def test_parse_upstream_url_rejects(url: str, problem: str) -> None:
    with pytest.raises(ValueError, match=re.escape(problem)):
        parse_upstream_url(url)


@pytest.mark.parametrize("url", ["http://h:0", "https://ho st", "http://a_b.example"])
def test_bad_upstream_hosts_and_ports(url: str) -> None:
    """Upstream URLs with port 0, a space or an underscore in the host are refused."""
    with pytest.raises(ValueError, match="bad"):
        parse_upstream_url(url)


@pytest.mark.parametrize("text", ["a b:5000", "[:]:5000", "/tmp/s:80", "[zz]:1"])
def test_bad_listen_hosts(text: str) -> None:
    """Listen addresses with a bad host (a space, an empty or bad IPv6, a path) are refused."""
    with pytest.raises(ValueError, match="bad"):
        parse_listen(text)
