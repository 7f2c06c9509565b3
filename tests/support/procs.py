"""Real processes for end-to-end tests: docker-registry, containerd, ctr, the mirror CLI.

Owns starting each binary on loopback with its state in a temporary directory,
waiting (always bounded) until it serves, capturing its output to a log file that
failures can show, and stopping it (SIGTERM, then SIGKILL after a timeout). It knows
nothing about pytest; fixtures and skip policy live in ``tests/e2e/conftest.py``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import IO, Any, Protocol, Self

START_TIMEOUT = 15.0
STOP_TIMEOUT = 10.0
CTR_TIMEOUT = 120.0
POLL_INTERVAL = 0.05

#: Binaries the e2e suite needs, with the Debian package that provides each.
E2E_BINARIES = {
    "docker-registry": "docker-registry",
    "containerd": "containerd",
    "ctr": "containerd",
}

# ctr falls back to the `server` of hosts.toml (a real registry) when every mirror
# fails; pointing proxies at a closed local port makes that fallback fail at once.
CTR_ENV_OVERRIDES = {
    "HTTPS_PROXY": "http://127.0.0.1:9",
    "HTTP_PROXY": "http://127.0.0.1:9",
    "NO_PROXY": "127.0.0.1,localhost",
    "https_proxy": "http://127.0.0.1:9",
    "http_proxy": "http://127.0.0.1:9",
    "no_proxy": "127.0.0.1,localhost",
}

_NO_PROXY_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def _unverified_context() -> ssl.SSLContext:
    """TLS without checks: a readiness probe only asks whether something listens."""
    ctx = ssl.create_default_context()
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    return ctx


_NO_PROXY_TLS_OPENER = urllib.request.build_opener(
    urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=_unverified_context())
)


def missing_e2e_requirements() -> list[str]:
    """Return one human reason per missing e2e prerequisite (empty when all present)."""
    reasons = [
        f"`{binary}` not found on PATH (apt-get install {package})"
        for binary, package in E2E_BINARIES.items()
        if shutil.which(binary) is None
    ]
    if os.geteuid() != 0:
        reasons.append("containerd needs root (run the e2e tests as root)")
    return reasons


def free_port() -> int:
    """Return a TCP port that was free on 127.0.0.1 a moment ago.

    Another process may take it before ours binds; starters retry on early exit.
    """
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def v2_answers(port: int, *, timeout: float = 2.0, scheme: str = "http") -> bool:
    """Tell whether anything speaking HTTP answers ``GET /v2/`` (any status counts).

    With ``scheme="https"`` the certificate is not checked: this only probes.
    """
    opener = _NO_PROXY_TLS_OPENER if scheme == "https" else _NO_PROXY_OPENER
    try:
        with opener.open(f"{scheme}://127.0.0.1:{port}/v2/", timeout=timeout):
            return True
    except urllib.error.HTTPError:
        return True  # 401 and friends still mean a registry is listening
    except (OSError, urllib.error.URLError):
        return False


def wait_for_v2(
    port: int,
    *,
    timeout: float = START_TIMEOUT,
    proc: subprocess.Popen[bytes] | None = None,
    log_path: Path | None = None,
    scheme: str = "http",
) -> None:
    """Poll ``http://127.0.0.1:PORT/v2/`` until it answers, for at most ``timeout`` s.

    Args:
        port: loopback port to poll.
        timeout: overall bound in seconds.
        proc: when given, stop waiting as soon as it exits.
        log_path: its output, quoted in the error.
        scheme: ``https`` for a TLS server (its certificate is not checked).

    Raises:
        RuntimeError: the process exited, or the deadline passed.
    """
    deadline = time.monotonic() + timeout
    while True:
        if v2_answers(port, scheme=scheme):
            return
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(
                f"process exited with {proc.returncode} before /v2/ answered on {port}"
                + _log_tail(log_path)
            )
        if time.monotonic() > deadline:
            raise RuntimeError(
                f"/v2/ on port {port} not up after {timeout}s" + _log_tail(log_path)
            )
        time.sleep(POLL_INTERVAL)


def _log_tail(log_path: Path | None, lines: int = 40) -> str:
    """Format the end of a log for an error message."""
    if log_path is None or not log_path.exists():
        return ""
    tail = log_path.read_text(errors="replace").splitlines()[-lines:]
    return f"\n--- last lines of {log_path} ---\n" + "\n".join(tail)


class _Process:
    """A child process whose output goes to a log file; stop() always reaps it."""

    def __init__(self, log_path: Path) -> None:
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self._log: IO[bytes] | None = None

    def _spawn(self, argv: Sequence[str], *, env: Mapping[str, str] | None = None) -> None:
        """Start ``argv`` with stdout and stderr appended to the log."""
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            start_new_session=True,  # a Ctrl-C in pytest must not hit it before stop()
        )

    @property
    def pid(self) -> int | None:
        """The child's pid while it has one."""
        return self.proc.pid if self.proc is not None else None

    @property
    def running(self) -> bool:
        """Whether the child is still alive."""
        return self.proc is not None and self.proc.poll() is None

    def log_text(self) -> str:
        """Everything the process printed so far."""
        if not self.log_path.exists():
            return ""
        return self.log_path.read_text(errors="replace")

    def stop(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Send SIGTERM, wait up to ``timeout`` s, then SIGKILL; return the exit code."""
        proc, self.proc = self.proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
            try:
                code = proc.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                proc.kill()
                code = proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def kill(self, timeout: float = STOP_TIMEOUT) -> int | None:
        """Send SIGKILL (a crash: no cleanup runs), reap it, return the exit code.

        Unlike ``stop()`` the object can be started again with ``start()``, e.g. to
        restart a crashed server on the same state.
        """
        proc, self.proc = self.proc, None
        code: int | None = None
        if proc is not None:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
            code = proc.wait(timeout=timeout)
        if self._log is not None:
            self._log.close()
            self._log = None
        return code

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class Registry(_Process):
    """Debian's ``docker-registry`` on 127.0.0.1 with filesystem storage in ``workdir``.

    With ``proxy_remoteurl`` it runs as distribution's own pull-through cache, the
    baseline the mirror is compared with. ``extra_config`` adds or extends top-level
    sections of its YAML config (e.g. ``{"auth": {...}, "http": {"tls": {...}}}``; a
    table given for an existing section is merged into it); with ``http.tls`` set the
    registry serves HTTPS and ``url`` says so.
    """

    def __init__(
        self,
        workdir: Path,
        *,
        proxy_remoteurl: str | None = None,
        extra_config: Mapping[str, Any] | None = None,
        start: bool = True,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / "registry.log")
        self.workdir = workdir
        self.storage = workdir / "storage"
        self.config_path = workdir / "registry.yml"
        self.proxy_remoteurl = proxy_remoteurl
        self.extra_config: dict[str, Any] = dict(extra_config or {})
        self.port = 0
        if start:
            self.start()

    @property
    def scheme(self) -> str:
        """``https`` when ``extra_config`` gives ``http.tls``, else ``http``."""
        http = self.extra_config.get("http")
        return "https" if isinstance(http, Mapping) and http.get("tls") else "http"

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:5001`` (``https://`` with TLS)."""
        return f"{self.scheme}://127.0.0.1:{self.port}"

    @property
    def host(self) -> str:
        """``127.0.0.1:PORT``, as image references and hosts.toml use it."""
        return f"127.0.0.1:{self.port}"

    def _write_config(self) -> None:
        """Write the YAML config (JSON is valid YAML, and quotes paths for us)."""
        config: dict[str, object] = {
            "version": 0.1,
            "log": {"level": "warn"},
            "storage": {
                "filesystem": {"rootdirectory": str(self.storage)},
                "delete": {"enabled": True},
            },
            "http": {"addr": self.host},
        }
        if self.proxy_remoteurl is not None:
            config["proxy"] = {"remoteurl": self.proxy_remoteurl}
        for key, value in self.extra_config.items():
            current = config.get(key)
            if isinstance(current, dict) and isinstance(value, Mapping):
                config[key] = current | dict(value)
            else:
                config[key] = value
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")

    def start(self, *, attempts: int = 3) -> None:
        """Start on a fresh free port; retry if it dies early (port taken meanwhile)."""
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            self._write_config()
            self._spawn(["docker-registry", "serve", str(self.config_path)])
            try:
                wait_for_v2(self.port, proc=self.proc, log_path=self.log_path, scheme=self.scheme)
                return
            except RuntimeError:
                exited = not self.running
                self.stop()
                if not exited or attempt == attempts:
                    raise

    def requests(self) -> list[tuple[str, str]]:
        """Parse the access log into ``(method, path?query)`` pairs, oldest first.

        Lines look like ``127.0.0.1 - - [date] "GET /v2/... HTTP/1.1" 200 ...``.
        """
        out: list[tuple[str, str]] = []
        for line in self.log_text().splitlines():
            _, quote, rest = line.partition('] "')
            if not quote:
                continue
            parts = rest.split(" ", 2)
            if len(parts) >= 2 and parts[1].startswith("/"):
                out.append((parts[0], parts[1]))
        return out


def _short_tmpdir(prefix: str) -> Path:
    """Make a directory under /tmp: unix socket paths must stay under 108 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class Containerd(_Process):
    """A private containerd: root, state and socket under a short temporary dir.

    The CRI plugin is disabled by default so the daemon touches nothing outside its
    directory and starts in well under a second.
    """

    def __init__(
        self,
        *,
        disable_cri: bool = True,
        extra_config: str = "",
        start: bool = True,
    ) -> None:
        self.dir = _short_tmpdir("ctd")
        super().__init__(self.dir / "containerd.log")
        self.address = str(self.dir / "sock")
        self.config_path = self.dir / "config.toml"
        disabled = '["io.containerd.grpc.v1.cri"]' if disable_cri else "[]"
        self.config_path.write_text(
            "version = 2\n"
            f"root = {json.dumps(str(self.dir / 'root'))}\n"
            f"state = {json.dumps(str(self.dir / 'state'))}\n"
            f"disabled_plugins = {disabled}\n"
            "[grpc]\n"
            f"  address = {json.dumps(self.address)}\n"
            '[plugins."io.containerd.internal.v1.opt"]\n'
            f"  path = {json.dumps(str(self.dir / 'opt'))}\n" + extra_config
        )
        if start:
            self.start()

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the daemon and wait until ``ctr version`` reaches it."""
        self._spawn(["containerd", "--config", str(self.config_path)])
        deadline = time.monotonic() + timeout
        while True:
            probe = subprocess.run(
                ["ctr", "--address", self.address, "version"],
                capture_output=True,
                timeout=5,
                check=False,
            )
            if probe.returncode == 0:
                return
            if not self.running or time.monotonic() > deadline:
                self.stop()
                raise RuntimeError(
                    f"containerd did not come up: {probe.stderr.decode(errors='replace')}"
                    + _log_tail(self.log_path)
                )
            time.sleep(POLL_INTERVAL)

    def cleanup(self) -> None:
        """Stop the daemon and remove its directory (content store included)."""
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.cleanup()


def ctr(
    ctd: Containerd, *args: str, timeout: float = CTR_TIMEOUT
) -> subprocess.CompletedProcess[str]:
    """Run ``ctr --address SOCK ARGS...`` with proxies pointed at a closed port.

    Never raises on a non-zero exit: tests assert on ``returncode`` and show stderr.
    """
    env = os.environ | CTR_ENV_OVERRIDES
    return subprocess.run(
        ["ctr", "--address", ctd.address, *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=timeout,
        check=False,
    )


def ctr_pull(
    ctd: Containerd,
    ref: str,
    hosts_dir: Path,
    *,
    platform: str | None = None,
    all_platforms: bool = False,
    timeout: float = CTR_TIMEOUT,
) -> subprocess.CompletedProcess[str]:
    """Pull ``ref`` the way a node would, resolving mirrors from ``hosts_dir``.

    Without ``platform`` or ``all_platforms``, ctr pulls only the host platform of
    an index.
    """
    args = ["images", "pull", "--hosts-dir", str(hosts_dir)]
    if platform is not None:
        args += ["--platform", platform]
    if all_platforms:
        args.append("--all-platforms")
    return ctr(ctd, *args, ref, timeout=timeout)


def ctr_rm(ctd: Containerd, ref: str) -> subprocess.CompletedProcess[str]:
    """Remove an image and (with --sync) garbage-collect its content right away."""
    return ctr(ctd, "images", "rm", "--sync", ref, timeout=STOP_TIMEOUT * 3)


@dataclass(frozen=True, slots=True)
class CtrImage:
    """One row of ``ctr images ls``."""

    ref: str
    media_type: str
    digest: str
    platforms: tuple[str, ...]


def ctr_images(ctd: Containerd) -> dict[str, CtrImage]:
    """List images by reference, parsed from ``ctr images ls``.

    Raises:
        RuntimeError: ctr failed.
    """
    proc = ctr(ctd, "images", "ls", timeout=STOP_TIMEOUT * 3)
    if proc.returncode != 0:
        raise RuntimeError(f"ctr images ls failed: {proc.stderr}")
    images: dict[str, CtrImage] = {}
    # Columns: REF TYPE DIGEST SIZE PLATFORMS LABELS. Only SIZE holds a space
    # ("301.4 KiB"), so anchor on the digest column and count from it.
    for line in proc.stdout.splitlines()[1:]:
        cols = line.split()
        at = next((i for i, c in enumerate(cols) if c.startswith("sha256:")), -1)
        if at != 2 or len(cols) < at + 4:
            continue
        images[cols[0]] = CtrImage(
            ref=cols[0],
            media_type=cols[1],
            digest=cols[2],
            platforms=tuple(p for p in cols[at + 3].split(",") if p and p != "-"),
        )
    return images


def write_hosts_toml(hosts_dir: Path, registry_name: str, server: str, mirror_url: str) -> Path:
    """Write ``<hosts_dir>/<registry_name>/hosts.toml`` sending pulls to one mirror.

    Args:
        hosts_dir: the directory given to ``ctr --hosts-dir``.
        registry_name: e.g. ``docker.io`` or ``127.0.0.1:5000``; ``:`` is kept
            (containerd also looks up ``host_port_``).
        server: the real registry, which ctr tries last.
        mirror_url: e.g. ``http://127.0.0.1:PORT``; plain HTTP.

    Returns:
        The path written.
    """
    path = hosts_dir / registry_name / "hosts.toml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(
        f"server = {json.dumps(server)}\n"
        "\n"
        f"[host.{json.dumps(mirror_url)}]\n"
        '  capabilities = ["pull", "resolve"]\n'
    )
    return path


#: An upstream as ``mirror_config`` takes it: a URL, or a table of upstream options
#: (``{"url": ..., "username": ..., "ca": ..., "skip_verify": True, ...}``).
UpstreamSpec = str | Mapping[str, str | bool | int | float]


def _toml_upstream(spec: UpstreamSpec) -> str:
    """Render one upstream as a TOML string or inline table.

    JSON strings, numbers and booleans are valid TOML values, so json.dumps quotes.
    """
    if isinstance(spec, str):
        return json.dumps(spec)
    items = ", ".join(f"{json.dumps(k)} = {json.dumps(v)}" for k, v in spec.items())
    return "{ " + items + " }"


def mirror_config(
    port: int,
    cache_dir: Path,
    namespaces: Mapping[str, Sequence[UpstreamSpec]],
    *,
    default_namespace: str = "docker.io",
    tag_ttl: str = "5m",
    extra: str = "",
    cache: Mapping[str, str | bool | int | float] | None = None,
) -> str:
    """Render the mirror's TOML config (the server's documented contract).

    Args:
        port: loopback port to listen on.
        cache_dir: the cache directory.
        namespaces: registry name -> upstreams (URLs, or tables of upstream
            options such as credentials, TLS files and proxy), tried in order.
        default_namespace: used when a request carries no ``ns``.
        tag_ttl: how long a resolved tag is trusted.
        extra: raw TOML appended verbatim, for options not modelled here.
        cache: more ``[cache]`` keys, e.g. ``{"max_size": "300KiB", "offline": True}``.

    Returns:
        The TOML text.
    """
    lines = [
        "[server]",
        f'listen = "127.0.0.1:{port}"',
        f"default_namespace = {json.dumps(default_namespace)}",
        "",
        "[cache]",
        f"dir = {json.dumps(str(cache_dir))}",
        f"tag_ttl = {json.dumps(tag_ttl)}",
    ]
    lines += [f"{key} = {json.dumps(value)}" for key, value in (cache or {}).items()]
    for name, upstreams in namespaces.items():
        lines += [
            "",
            f"[namespaces.{json.dumps(name)}]",
            "upstreams = [" + ", ".join(_toml_upstream(u) for u in upstreams) + "]",
        ]
    return "\n".join(lines) + "\n" + extra


class RegistryFactory(Protocol):
    """Start one more docker-registry; the fixture stops all of them at teardown."""

    def __call__(self, *, proxy_remoteurl: str | None = None) -> Registry: ...


class MirrorFactory(Protocol):
    """Start the mirror CLI with a config text; ``port`` must match its ``listen``.

    ``env`` is merged over the mirror's environment (see ``MirrorProcess``), ``args``
    are appended to its ``serve`` command line (e.g. ``["--log-level", "debug"]``).
    """

    def __call__(
        self,
        config_text: str,
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
    ) -> MirrorProcess: ...


class MirrorProcess(_Process):
    """The real ``python -m mirrorproxy serve`` CLI as a subprocess.

    Runs the same entry point operators run, so start-up, config loading and
    SIGTERM handling are covered, not just ``create_app``.
    """

    def __init__(
        self,
        workdir: Path,
        config_text: str,
        port: int,
        *,
        env: Mapping[str, str] | None = None,
        args: Sequence[str] = (),
        start: bool = True,
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / "mirror.log")
        self.port = port
        self.args = list(args)
        self.config_path = workdir / "mirrorproxy.toml"
        self.config_path.write_text(config_text)
        self.env = dict(os.environ) | {
            "PYTHONUNBUFFERED": "1",
            "NO_PROXY": "127.0.0.1,localhost",
            "no_proxy": "127.0.0.1,localhost",
        }
        if env is not None:
            self.env |= env
        if start:
            self.start()

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:5000``."""
        return f"http://127.0.0.1:{self.port}"

    @property
    def argv(self) -> list[str]:
        """The command line, for error messages and reruns by hand."""
        return [
            sys.executable,
            "-m",
            "mirrorproxy",
            "serve",
            "--config",
            str(self.config_path),
            *self.args,
        ]

    def start(self, timeout: float = START_TIMEOUT) -> None:
        """Start the server and wait until ``/v2/`` answers on its port."""
        self._spawn(self.argv, env=self.env)
        try:
            wait_for_v2(self.port, timeout=timeout, proc=self.proc, log_path=self.log_path)
        except RuntimeError:
            self.stop()
            raise
