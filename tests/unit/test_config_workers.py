"""[server] workers and ``serve --workers``: a count or "auto", refused with [cluster],
every mistake named by file (or flag) and key."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from mirrorproxy.config import ConfigError, load_config, with_overrides

DOCKER = '[namespaces."docker.io"]\nupstreams = ["http://registry.internal:5000"]\n'
CLUSTER = '[cluster]\nself = "http://10.0.0.1:5000"\nmembers = ["http://10.0.0.1:5000"]\n'


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mirrorproxy.toml"
    path.write_text(text + DOCKER, encoding="utf-8")
    return path


def error(tmp_path: Path, text: str) -> str:
    with pytest.raises(ConfigError) as info:
        load_config(write(tmp_path, text))
    return str(info.value)


def test_one_worker_by_default(tmp_path: Path) -> None:
    assert load_config(write(tmp_path, "")).server.workers == 1


@pytest.mark.parametrize(("value", "expected"), [("4", 4), ('"4"', 4), ('"auto"', None)])
def test_a_count_or_auto(tmp_path: Path, value: str, expected: int | None) -> None:
    got = load_config(write(tmp_path, f"[server]\nworkers = {value}\n")).server.workers
    assert got == (expected or len(os.sched_getaffinity(0)))


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        ("0", "must be between 1 and 256, got 0"),
        ("-2", 'expected a number of processes or "auto"'),
        ('"many"', "expected a number of processes or \"auto\", got 'many'"),
        ("true", 'expected a number or "auto", got a boolean'),
        ("1.5", 'expected a number or "auto", got float'),
        ("1000", "must be between 1 and 256"),
    ],
)
def test_bad_values_name_file_and_key(tmp_path: Path, value: str, problem: str) -> None:
    message = error(tmp_path, f"[server]\nworkers = {value}\n")
    assert message.startswith(f"{tmp_path / 'mirrorproxy.toml'}: server.workers: ")
    assert problem in message


def test_workers_with_a_cluster_are_refused_naming_both(tmp_path: Path) -> None:
    message = error(tmp_path, "[server]\nworkers = 2\n" + CLUSTER)
    assert message.startswith(f"{tmp_path / 'mirrorproxy.toml'}: server.workers: ")
    assert "[cluster]" in message
    # One worker and a cluster are fine.
    assert load_config(write(tmp_path, "[server]\nworkers = 1\n" + CLUSTER)).cluster


def test_the_flag_overrides_and_is_checked_the_same_way(tmp_path: Path) -> None:
    config = load_config(write(tmp_path, "[server]\nworkers = 3\n"))
    assert with_overrides(config, workers="2").server.workers == 2
    assert with_overrides(config, workers="auto").server.workers >= 1
    with pytest.raises(ConfigError, match=r"^--workers: must be between 1 and 256, got 0"):
        with_overrides(config, workers="0")
    clustered = load_config(write(tmp_path, CLUSTER))
    with pytest.raises(ConfigError) as info:
        with_overrides(clustered, workers="2")
    assert str(info.value).startswith(f"--workers: {tmp_path / 'mirrorproxy.toml'}: [cluster]: ")
