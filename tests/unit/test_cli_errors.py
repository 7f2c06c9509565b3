"""The CLI turns config problems into exit code 2 and one line on stderr.

No test here starts the server: ``serve`` is replaced by a function that fails.
"""

from __future__ import annotations

from pathlib import Path

import pytest

import mirrorproxy.commands.serve
from mirrorproxy import __version__
from mirrorproxy.cli import EXIT_USAGE, main
from mirrorproxy.config import Config

PREFIX = "mirrorproxy: config error: "
GOOD = '[namespaces."docker.io"]\nupstreams = ["https://registry-1.docker.io"]\n'


@pytest.fixture(autouse=True)
def no_server(monkeypatch: pytest.MonkeyPatch) -> None:
    def serve(config: Config) -> None:
        pytest.fail(f"the server must not start in these tests ({config.source})")

    monkeypatch.setattr(mirrorproxy.commands.serve, "serve", serve)


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "mirrorproxy.toml"
    path.write_text(text, encoding="utf-8")
    return path


def one_error_line(capsys: pytest.CaptureFixture[str]) -> str:
    out, err = capsys.readouterr()
    assert out == ""
    lines = err.splitlines()
    assert len(lines) == 1, err
    assert err.endswith("\n")
    assert lines[0].startswith(PREFIX)
    return lines[0]


@pytest.mark.parametrize(
    ("text", "key", "problem"),
    [
        ("bogus = 1\n" + GOOD, "bogus", "unknown key"),
        (
            '[namespaces."docker.io"]\nupstreams = ["https://mirror.gcr.io", "ftp://x"]\n',
            'namespaces."docker.io".upstreams[1].url',
            "not an http(s) URL",
        ),
        (
            '[namespaces."docker.io"]\nupstreams = []\n',
            'namespaces."docker.io".upstreams',
            "no upstreams",
        ),
        (GOOD + '[cache]\ntag_ttl = "soon"\n', "cache.tag_ttl", "bad duration"),
        (GOOD + '[server]\nlisten = "nowhere"\n', "server.listen", "bad listen address"),
    ],
)
@pytest.mark.parametrize("command", ["serve", "hosts"])
def test_bad_config(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    command: str,
    text: str,
    key: str,
    problem: str,
) -> None:
    path = write(tmp_path, text)
    assert main([command, "-c", str(path)]) == EXIT_USAGE == 2
    line = one_error_line(capsys)
    assert line.startswith(f"{PREFIX}{path}: {key}: ")
    assert problem in line


def test_missing_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "absent.toml"
    assert main(["serve", "--config", str(path)]) == 2
    assert one_error_line(capsys) == f"{PREFIX}{path}: no such file"


def test_toml_syntax_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, "[server\n")
    assert main(["serve", "-c", str(path)]) == 2
    assert one_error_line(capsys).startswith(f"{PREFIX}{path}: not valid TOML: ")


def test_non_utf8_config_is_one_line_exit_2(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A config file that is not UTF-8 is exit 2 and one line naming the encoding."""
    path = tmp_path / "latin1.toml"
    path.write_bytes(b"# caf\xe9\n[namespaces.'docker.io']\nupstreams=['http://a']\n")
    assert main(["serve", "--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "not UTF-8" in err


def test_bad_listen_flag(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = write(tmp_path, GOOD)
    assert main(["serve", "-c", str(path), "--listen", "nowhere"]) == 2
    line = one_error_line(capsys)
    assert line.startswith(f"{PREFIX}--listen: bad listen address")


def test_usage_error_exits_2(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["serve"])
    assert info.value.code == 2
    assert "--config" in capsys.readouterr().err


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"mirrorproxy {__version__}"
