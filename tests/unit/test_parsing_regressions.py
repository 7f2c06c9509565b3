"""Inputs that once slipped through the parsers (found in review), kept as regressions."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from mirrorproxy.cli import main
from mirrorproxy.config import ConfigError, parse_config, parse_listen, parse_upstream_url
from mirrorproxy.core.errors import NameInvalid
from mirrorproxy.core.namespaces import resolve
from mirrorproxy.core.oci import OCI_INDEX, OCI_MANIFEST, manifest_media_type, parse_range
from mirrorproxy.core.units import parse_duration

UP = {"upstreams": ["http://127.0.0.1:1"]}


def _config(data: dict[str, object], tmp_path: Path) -> None:
    parse_config(data, source="t.toml", base_dir=tmp_path)


def test_non_utf8_config_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n[namespaces.'docker.io']\nupstreams=['http://a']\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "not UTF-8" in err


@pytest.mark.parametrize("text", ["nan", "inf", "-1", "1e3", "infinity"])
def test_durations_must_be_finite_numbers(text: str) -> None:
    with pytest.raises(ValueError, match="duration"):
        parse_duration(text)


def test_upper_case_namespace_is_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="lower case"):
        _config({"namespaces": {"Docker.IO": UP}}, tmp_path)


def test_default_namespace_is_checked_even_with_a_wildcard(tmp_path: Path) -> None:
    wild = {**UP, "allow": ["*.io"]}
    with pytest.raises(ConfigError, match=r"server\.default_namespace"):
        _config({"server": {"default_namespace": "a b"}, "namespaces": {"*": wild}}, tmp_path)


def test_namespace_key_with_newline_stays_on_one_line(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as info:
        _config({"namespaces": {"a\nb": UP}}, tmp_path)
    assert "\n" not in str(info.value)


def test_media_type_comes_from_the_top_level_only() -> None:
    index = json.dumps(
        {"schemaVersion": 2, "manifests": [{"mediaType": OCI_MANIFEST, "digest": "x"}]}
    ).encode()
    assert manifest_media_type(index, None) == OCI_INDEX
    manifest = json.dumps(
        {"schemaVersion": 2, "config": {"mediaType": "application/vnd.oci.image.config.v1+json"}}
    ).encode()
    assert manifest_media_type(manifest, "application/json") == OCI_MANIFEST


def test_suffix_range_on_empty_blob_is_ignored() -> None:
    assert parse_range("bytes=-5", 0) is None


@pytest.mark.parametrize("url", ["http://h:0", "https://ho st", "http://a_b.example"])
def test_bad_upstream_hosts_and_ports(url: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        parse_upstream_url(url)


@pytest.mark.parametrize("text", ["a b:5000", "[:]:5000", "/tmp/s:80", "[zz]:1"])
def test_bad_listen_hosts(text: str) -> None:
    with pytest.raises(ValueError, match="bad"):
        parse_listen(text)


def test_ns_with_unicode_lookalike_is_invalid(tmp_path: Path) -> None:
    config = parse_config({"namespaces": {"docker.io": UP}}, source="t", base_dir=tmp_path)
    with pytest.raises(NameInvalid):
        resolve(config, "doc\u212aer.io")  # KELVIN SIGN lower-cases to "k"
