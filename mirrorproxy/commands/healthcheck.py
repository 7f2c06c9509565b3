"""``mirrorproxy healthcheck``: ask a running server whether it is alive, at the address it uses.

A container's HEALTHCHECK is fixed when the image is built, but the address the
server listens on is chosen when it is run (``--listen``, or a mounted config). So
without ``--config`` or ``--listen`` this finds the one running ``mirrorproxy serve``
process in ``/proc`` and reads its command line the way ``serve`` did: its
``--listen``, else its config's ``[server] listen`` (and ``tls_cert`` for the scheme).
It only probes; it never starts, stops or changes a server, and it does not parse
the server's config rules itself (``config`` does).
"""

from __future__ import annotations

import argparse
import os
import ssl
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from mirrorproxy.clientconf.hoststoml import default_mirror_url
from mirrorproxy.commands.errors import EXIT_FAIL, EXIT_OK, EXIT_USAGE, CliError
from mirrorproxy.config import (
    ConfigError,
    ServerConfig,
    load_config,
    parse_listen,
    with_overrides,
)

#: Parses a ``serve`` command line (the words after ``mirrorproxy``) as ``serve`` does.
ParseArgs = Callable[[Sequence[str]], argparse.Namespace]


class HealthcheckError(Exception):
    """The probe could not be made or failed; ``usage`` marks a caller's mistake."""

    def __init__(self, message: str, *, usage: bool = False) -> None:
        super().__init__(message)
        self.usage = usage


@dataclass(frozen=True, slots=True)
class ServeProcess:
    """A running ``mirrorproxy serve``: its pid, working directory and arguments."""

    pid: int
    cwd: Path | None  # None when /proc does not tell (another user's process)
    args: list[str]  # the words after ``mirrorproxy``, starting with ``serve``


def run(args: argparse.Namespace, parse: ParseArgs) -> int:
    """The ``healthcheck`` verb; ``parse`` reads a found ``serve`` command line."""
    try:
        server = target_server(args.config, args.listen, parse)
        url = probe(server, "/readyz" if args.ready else "/healthz", args.timeout)
    except HealthcheckError as err:
        raise CliError(str(err), EXIT_USAGE if err.usage else EXIT_FAIL) from None
    print(f"healthy: {url}")
    return EXIT_OK


def serve_args(argv: Sequence[str]) -> list[str] | None:
    """Return the words after ``mirrorproxy`` when ``argv`` runs ``mirrorproxy serve``.

    Covers the console script (``/path/python /path/bin/mirrorproxy serve ...``, as
    the kernel runs a script; or ``mirrorproxy ...`` first) and ``python -m mirrorproxy``.
    """
    for i, word in enumerate(argv[:4]):
        script = i < 2 and os.path.basename(word) == "mirrorproxy"
        module = word == "mirrorproxy" and i > 0 and argv[i - 1] == "-m"
        if (script or module) and argv[i + 1 : i + 2] == ["serve"]:
            return list(argv[i + 1 :])
    return None


def find_serve_processes(proc: Path = Path("/proc")) -> list[ServeProcess]:
    """List the ``mirrorproxy serve`` processes visible in ``proc``, this one excluded."""
    found = []
    for pid, argv in _cmdlines(proc):
        args = serve_args(argv)
        if args is None or pid == os.getpid():
            continue
        try:
            cwd: Path | None = Path(os.readlink(proc / str(pid) / "cwd"))
        except OSError:
            cwd = None
        found.append(ServeProcess(pid, cwd, args))
    return found


def _cmdlines(proc: Path) -> Iterator[tuple[int, list[str]]]:
    """Yield (pid, argv) for every process whose command line can be read."""
    try:
        entries = list(proc.iterdir())
    except OSError:
        return
    for entry in sorted(entries, key=lambda e: (len(e.name), e.name)):
        if not entry.name.isdigit():
            continue
        try:
            raw = (entry / "cmdline").read_bytes()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        argv = [w.decode(errors="replace") for w in raw.split(b"\0")[:-1]]
        if argv:
            yield int(entry.name), argv


def server_from_process(process: ServeProcess, parse: ParseArgs) -> ServerConfig:
    """Work out the ``[server]`` a running ``serve`` uses from its command line.

    Raises:
        HealthcheckError: its config path is relative and its directory unknown.
        ConfigError: its config no longer loads.
    """
    args = parse(process.args)
    config_path = Path(args.config)
    if not config_path.is_absolute():
        if process.cwd is None:
            if args.listen is not None:
                return listen_only(args.listen)  # the scheme would need the config: http
            raise HealthcheckError(
                f"pid {process.pid} runs with a relative --config {config_path} and its "
                "working directory is not readable: give --config or --listen"
            )
        config_path = process.cwd / config_path
    return with_overrides(load_config(config_path), listen=args.listen).server


def target_server(
    config: Path | None, listen: str | None, parse: ParseArgs, proc: Path = Path("/proc")
) -> ServerConfig:
    """Return the ``[server]`` to probe: from the flags, else from the running server.

    Raises:
        HealthcheckError: no flags and not exactly one ``serve`` process to ask.
        ConfigError: a config does not load, or ``--listen`` is malformed.
    """
    if config is not None:
        return with_overrides(load_config(config), listen=listen).server
    if listen is not None:
        return listen_only(listen)
    # An init wrapper (tini, catatonit) may show the same command line as its child.
    processes = list({(p.cwd, tuple(p.args)): p for p in find_serve_processes(proc)}.values())
    if not processes:
        raise HealthcheckError("no running `mirrorproxy serve` process found")
    if len(processes) > 1:
        pids = ", ".join(str(p.pid) for p in processes)
        raise HealthcheckError(
            f"{len(processes)} `mirrorproxy serve` processes are running (pids {pids}): "
            "give --config or --listen",
            usage=True,
        )
    return server_from_process(processes[0], parse)


def listen_only(listen: str) -> ServerConfig:
    """A plain-http ``[server]`` at ``listen``, for when no config is at hand.

    Raises:
        ConfigError: ``listen`` is not HOST:PORT.
    """
    try:
        host, port = parse_listen(listen)
    except ValueError as err:
        raise ConfigError("--listen", "", str(err)) from None
    return ServerConfig(host=host, port=port)


def probe(server: ServerConfig, path: str, timeout: float) -> str:
    """GET ``path`` on the server and return its URL if it answers 200.

    The server's own certificate is not checked: this asks whether the listener
    is alive, not who it is, and a wildcard bind is probed on loopback.

    Raises:
        HealthcheckError: no answer, or not 200.
    """
    url = default_mirror_url(server) + path
    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    # A proxy from the environment must never see a local probe.
    opener = urllib.request.build_opener(
        urllib.request.ProxyHandler({}), urllib.request.HTTPSHandler(context=context)
    )
    try:
        with opener.open(url, timeout=timeout) as resp:
            status = resp.status
    except urllib.error.HTTPError as err:
        status = err.code
        err.close()
    except (OSError, urllib.error.URLError) as err:
        reason = getattr(err, "reason", None) or err
        raise HealthcheckError(f"unhealthy: {url}: {reason}") from None
    if status != 200:
        hint = " (is the probe's address outside [server] allow?)" if status == 403 else ""
        raise HealthcheckError(f"unhealthy: {url}: HTTP {status}{hint}")
    return url
