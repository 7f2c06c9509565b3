"""[storage]: the filesystem by default, or an S3 bucket whose secret never shows."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest

from mirrorproxy.config import ConfigError, S3Config, Secret, StorageConfig, load_config

DOCKER = '[namespaces."docker.io"]\nupstreams = ["http://registry.internal:5000"]\n'
S3 = """
[storage]
backend = "s3"

[storage.s3]
endpoint = "http://127.0.0.1:8333"
bucket = "mirrorproxy"
access_key = "AK"
"""


def load(tmp_path: Path, text: str) -> StorageConfig:
    path = tmp_path / "mirrorproxy.toml"
    path.write_text(DOCKER + text, encoding="utf-8")
    return load_config(path).storage


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load(tmp_path, text)
    message = str(info.value)
    assert message.startswith(str(tmp_path / "mirrorproxy.toml") + ": ")
    return message


def test_the_filesystem_is_the_default(tmp_path: Path) -> None:
    assert load(tmp_path, "") == StorageConfig("filesystem", None)
    assert load(tmp_path, '[storage]\nbackend = "filesystem"\n') == StorageConfig()


def test_an_s3_store_with_each_way_of_giving_the_secret(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    want = S3Config(
        endpoint="http://127.0.0.1:8333",
        bucket="mirrorproxy",
        region="eu-west-1",
        prefix="site/",
        access_key="AK",
        secret_key=Secret("s3cr3t"),
        redirect=True,
    )
    extra = 'region = "eu-west-1"\nprefix = "site"\nredirect = true\n'
    assert load(tmp_path, S3 + extra + 'secret_key = "s3cr3t"\n').s3 == want
    (tmp_path / "secret").write_text("s3cr3t\n")
    assert load(tmp_path, S3 + extra + 'secret_key_file = "secret"\n').s3 == want
    monkeypatch.setenv("MP_S3_SECRET", "s3cr3t")
    assert load(tmp_path, S3 + extra + 'secret_key_env = "MP_S3_SECRET"\n').s3 == want
    assert "s3cr3t" not in repr(want)
    monkeypatch.setenv("MP_S3_ACCESS", "AK")
    keyless = S3.replace('access_key = "AK"\n', 'access_key_env = "MP_S3_ACCESS"\n')
    assert load(tmp_path, keyless + extra + 'secret_key_env = "MP_S3_SECRET"\n').s3 == want


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ('[storage]\nbackend = "nfs"\n', "storage.backend", "expected one of"),
        ('[storage]\nbackend = "s3"\n', "storage.s3", "missing"),
        ('[storage.s3]\nbucket = "b"\n', "storage.s3", 'only with backend = "s3"'),
        (S3.replace("http://127.0.0.1:8333", "127.0.0.1:8333"), "storage.s3.endpoint", "http"),
        (S3.replace('bucket = "mirrorproxy"', ""), "storage.s3.bucket", "missing"),
        (S3, "storage.s3.secret_key", "give both"),
        (S3 + 'secret_key = "x"\nsecret_key_env = "Y"\n', "storage.s3.secret_key_env", "only one"),
        (S3 + 'secret_key_env = "MP_NOT_SET_ANYWHERE"\n', "storage.s3.secret_key_env", "not set"),
        (S3 + 'secret_key = "x"\nregionn = "r"\n', "storage.s3.regionn", "unknown key"),
    ],
)
def test_bad_storage_settings_name_the_key(
    tmp_path: Path, text: str, key: str, problem: str
) -> None:
    message = error(tmp_path, text)
    assert f": {key}: " in message
    assert problem in message


def test_the_secret_is_not_in_any_error(tmp_path: Path) -> None:
    message = error(tmp_path, S3 + 'secret_key = "hunter2-s3"\nendpoint_typo = 1\n')
    assert "hunter2-s3" not in message


def test_serve_with_an_unreachable_s3_endpoint_says_so_in_one_line(tmp_path: Path) -> None:
    config = tmp_path / "mp.toml"
    config.write_text(
        f'[server]\nlisten = "127.0.0.1:{_free_port()}"\n'
        f'[cache]\ndir = "{tmp_path / "cache"}"\n'
        '[storage]\nbackend = "s3"\n'
        '[storage.s3]\nendpoint = "http://127.0.0.1:9"\nbucket = "b"\n'
        'access_key = "k"\nsecret_key = "hunter2-s3"\n'
        '[namespaces."docker.io"]\nupstreams = ["http://127.0.0.1:9"]\n'
    )
    # A process of its own: serve configures logging, which must not outlive the test.
    proc = subprocess.run(
        [sys.executable, "-m", "mirrorproxy", "serve", "--config", str(config)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 1
    problem = [line for line in proc.stderr.splitlines() if line.startswith("mirrorproxy: ")]
    assert len(problem) == 1, proc.stderr
    assert f"{config}: storage.s3.endpoint: " in problem[0]
    assert "unreachable" in problem[0]
    assert "Traceback" not in proc.stderr
    assert "hunter2-s3" not in proc.stderr


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port
