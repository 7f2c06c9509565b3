"""`mirrorproxy healthcheck` finds the address in use and reports one line.

Processes are found in a fake /proc tree (this machine may run other servers); the
probe talks to a small stdlib HTTP server on loopback.
"""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorproxy.cli import EXIT_FAIL, EXIT_OK, EXIT_USAGE, build_parser, main
from mirrorproxy.commands.healthcheck import (
    HealthcheckError,
    find_serve_processes,
    probe,
    serve_args,
    target_server,
)
from mirrorproxy.config import ConfigError
from tests.support.procs import free_port
from tests.support.tls import CertKey, issue_server_cert, make_ca, missing_tls_tools

NS = '[namespaces."docker.io"]\nupstreams = ["https://registry-1.docker.io"]\n'
PARSE = build_parser().parse_args


def config_file(path: Path, listen: str, extra: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(f'[server]\nlisten = "{listen}"\n{extra}\n{NS}')
    return path


def fake_process(proc: Path, pid: int, argv: list[str], cwd: Path | None = None) -> None:
    d = proc / str(pid)
    d.mkdir(parents=True)
    (d / "cmdline").write_bytes(b"".join(w.encode() + b"\0" for w in argv))
    if cwd is not None:
        (d / "cwd").symlink_to(cwd)


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ["/opt/mp/bin/python3", "/opt/mp/bin/mirrorproxy", "serve", "-c", "x"],
            ["serve", "-c", "x"],
        ),
        (["mirrorproxy", "serve"], ["serve"]),
        (
            ["/usr/bin/python3", "-m", "mirrorproxy", "serve", "--listen", "h:1"],
            ["serve", "--listen", "h:1"],
        ),
        (["/usr/bin/python3", "-u", "-m", "mirrorproxy", "serve"], ["serve"]),
        (["/opt/mp/bin/python3", "/opt/mp/bin/mirrorproxy", "healthcheck"], None),
        (["/run/podman-init", "--", "mirrorproxy", "serve"], None),  # the init, not the server
        (["bash"], None),
    ],
)
def test_serve_args(argv: list[str], expected: list[str] | None) -> None:
    assert serve_args(argv) == expected


def test_finds_the_server_and_reads_its_config(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    config_file(tmp_path / "etc" / "mp.toml", "0.0.0.0:5123")
    fake_process(
        proc,
        1,
        ["/opt/mp/bin/python3", "/opt/mp/bin/mirrorproxy", "serve", "-c", "etc/mp.toml"],
        tmp_path,
    )
    fake_process(proc, 7, ["/bin/sh"], tmp_path)
    (proc / "self").mkdir()
    [found] = find_serve_processes(proc)
    assert (found.pid, found.cwd) == (1, tmp_path)
    server = target_server(None, None, PARSE, proc)
    assert (server.host, server.port, server.tls_cert) == ("0.0.0.0", 5123, None)


def test_the_servers_listen_flag_wins_over_its_config(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    conf = config_file(tmp_path / "mp.toml", "127.0.0.1:5000")
    argv = [
        "python3",
        "-m",
        "mirrorproxy",
        "serve",
        "--config",
        str(conf),
        "--listen",
        "127.0.0.2:6000",
    ]
    fake_process(proc, 1, argv)  # no cwd link: an absolute config still loads
    server = target_server(None, None, PARSE, proc)
    assert (server.host, server.port) == ("127.0.0.2", 6000)


@pytest.mark.skipif(bool(missing_tls_tools()), reason="needs openssl")
def test_tls_in_the_servers_config_makes_an_https_probe(tmp_path: Path) -> None:
    cert = issue_server_cert(make_ca(tmp_path / "ca"), tmp_path / "server")
    with _serving(cert) as port:
        tls = f'tls_cert = "{cert.cert}"\ntls_key = "{cert.key}"'
        conf = config_file(tmp_path / "mp.toml", f"127.0.0.1:{port}", tls)
        fake_process(tmp_path / "proc", 1, ["mirrorproxy", "serve", "-c", str(conf)])
        server = target_server(None, None, PARSE, tmp_path / "proc")
        # Its own certificate is not checked: the probe asks "alive?", not "who?".
        assert probe(server, "/healthz", 3.0) == f"https://127.0.0.1:{port}/healthz"


def test_an_init_wrapper_and_its_child_count_once(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    conf = config_file(tmp_path / "mp.toml", "127.0.0.1:5000")
    for pid in (1, 2):
        fake_process(
            proc, pid, ["python3", "/bin/mirrorproxy", "serve", "-c", str(conf)], tmp_path
        )
    assert target_server(None, None, PARSE, proc).port == 5000


def test_two_different_servers_need_a_flag(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    for pid in (10, 20):
        fake_process(proc, pid, ["mirrorproxy", "serve", "-c", f"/etc/{pid}.toml"], tmp_path)
    with pytest.raises(
        HealthcheckError, match=r"pids 10, 20\): give --config or --listen"
    ) as info:
        target_server(None, None, PARSE, proc)
    assert info.value.usage


def test_no_server_running_is_unhealthy(tmp_path: Path) -> None:
    (tmp_path / "proc").mkdir()
    with pytest.raises(HealthcheckError, match="no running `mirrorproxy serve`") as info:
        target_server(None, None, PARSE, tmp_path / "proc")
    assert not info.value.usage


def test_relative_config_without_a_known_directory(tmp_path: Path) -> None:
    proc = tmp_path / "proc"
    fake_process(proc, 3, ["mirrorproxy", "serve", "-c", "mp.toml"])
    with pytest.raises(HealthcheckError, match=r"relative --config mp\.toml"):
        target_server(None, None, PARSE, proc)
    fake_process(proc, 4, ["mirrorproxy", "serve", "-c", "mp.toml", "--listen", "127.0.0.1:7"])
    (proc / "3" / "cmdline").unlink()
    assert target_server(None, None, PARSE, proc).port == 7


def test_flags_win_over_discovery(tmp_path: Path) -> None:
    conf = config_file(tmp_path / "mp.toml", "[::]:5000")
    empty = tmp_path / "proc"
    empty.mkdir()
    assert target_server(conf, None, PARSE, empty).host == "::"
    assert target_server(conf, "127.0.0.1:9", PARSE, empty).port == 9
    assert target_server(None, "127.0.0.1:8", PARSE, empty).port == 8
    with pytest.raises(ConfigError, match="--listen"):
        target_server(None, "nowhere", PARSE, empty)


STATUSES = {"/healthz": 200, "/readyz": 503}


class _Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        self.send_response(STATUSES.get(self.path, 404))
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


@contextlib.contextmanager
def _serving(cert: CertKey | None = None) -> Iterator[int]:
    """Serve STATUSES on a loopback port (over TLS with ``cert``) while in the block."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
    if cert is not None:
        context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        context.load_cert_chain(cert.cert, cert.key)
        server.socket = context.wrap_socket(server.socket, server_side=True)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1]
    finally:
        server.shutdown()
        server.server_close()
        thread.join(timeout=5)


@pytest.fixture
def http_port() -> Iterator[int]:
    with _serving() as port:
        yield port


def test_probe_answers(http_port: int) -> None:
    server = target_server(None, f"0.0.0.0:{http_port}", PARSE)
    assert probe(server, "/healthz", 3.0) == f"http://127.0.0.1:{http_port}/healthz"
    with pytest.raises(HealthcheckError, match=r"unhealthy: .*/readyz: HTTP 503"):
        probe(server, "/readyz", 3.0)


def test_cli_one_line_and_exit_codes(
    http_port: int, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # A proxy in the environment must not be asked about a local address.
    monkeypatch.setenv("http_proxy", "http://127.0.0.1:9")
    assert main(["healthcheck", "--listen", f"127.0.0.1:{http_port}"]) == EXIT_OK
    assert capsys.readouterr().out == f"healthy: http://127.0.0.1:{http_port}/healthz\n"

    assert main(["healthcheck", "--listen", f"127.0.0.1:{http_port}", "--ready"]) == EXIT_FAIL
    err = capsys.readouterr().err
    assert err.count("\n") == 1
    assert "HTTP 503" in err

    closed = free_port()
    assert main(["healthcheck", "--listen", f"127.0.0.1:{closed}", "--timeout", "2"]) == EXIT_FAIL
    err = capsys.readouterr().err
    assert err.startswith(f"mirrorproxy: unhealthy: http://127.0.0.1:{closed}/healthz: ")
    assert err.count("\n") == 1

    assert main(["healthcheck", "--listen", "nowhere"]) == EXIT_USAGE
