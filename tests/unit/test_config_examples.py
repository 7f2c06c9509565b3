"""Every example config shipped in config/ loads as it is (with its secrets given)."""

from __future__ import annotations

from pathlib import Path

import pytest

from mirrorproxy.config import load_config

CONFIG_DIR = Path(__file__).resolve().parents[2] / "config"
EXAMPLES = sorted(CONFIG_DIR.glob("*.toml"))


def test_there_are_examples() -> None:
    assert {p.name for p in EXAMPLES} >= {"mirrorproxy.toml", "mirrorproxy-s3.toml"}


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.name)
def test_an_example_config_loads(path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MIRRORPROXY_S3_SECRET", "example-secret")
    config = load_config(path)
    assert config.namespaces


def test_the_s3_example_names_a_bucket_and_keeps_the_secret_out_of_sight(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("MIRRORPROXY_S3_SECRET", "example-secret")
    config = load_config(CONFIG_DIR / "mirrorproxy-s3.toml")
    s3 = config.storage.s3
    assert s3 is not None
    assert (s3.bucket, s3.redirect) == ("mirrorproxy", False)
    assert s3.secret_key is not None
    assert s3.secret_key.reveal() == "example-secret"
    assert "example-secret" not in repr(config)
