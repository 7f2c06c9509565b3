"""The servers under test, all on 127.0.0.1: upstream, baseline proxy, nginx, mirror.

Reuses the e2e process helpers (``tests/support/procs.py``): every server runs in its
own session with its output in a log file under the run directory, and ``Stack``
stops all of them when the block exits, whatever happened. Restarting a cache with
an empty directory is how a scenario gets a cold cache.
"""

from __future__ import annotations

import contextlib
import shutil
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from tests.support.procs import (
    MirrorProcess,
    Registry,
    _Process,
    free_port,
    mirror_config,
    wait_for_v2,
)

if TYPE_CHECKING:
    from benchmarks.sitestack import Site

NAMESPACE = "docker.io"


class Server(Protocol):
    """What scenarios need of any server: where it listens and which process it is."""

    @property
    def url(self) -> str: ...

    @property
    def pid(self) -> int | None: ...


class Nginx(_Process):
    """Debian's nginx serving ``root`` read-only with sendfile: the limit to compare with.

    A second port serves the same files with ``sendfile off`` (read and write
    through nginx's buffers): on loopback that is the other way a server can send.
    """

    def __init__(self, workdir: Path, root: Path) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / "nginx.log")
        self.workdir = workdir
        self.root = root
        self.port = 0
        self.copy_port = 0

    @property
    def url(self) -> str:
        """Base URL, e.g. ``http://127.0.0.1:8080``."""
        return f"http://127.0.0.1:{self.port}"

    def url_of(self, path: Path, *, copied: bool = False) -> str:
        """The URL nginx serves ``path`` (a file under ``root``) at (``copied``:
        with sendfile off)."""
        base = f"http://127.0.0.1:{self.copy_port}" if copied else self.url
        return f"{base}/{path.relative_to(self.root)}"

    def _write_config(self) -> Path:
        tmp = self.workdir / "tmp"
        tmp.mkdir(exist_ok=True)
        conf = self.workdir / "nginx.conf"
        conf.write_text(
            f"""# written by benchmarks/stack.py
user root;  # the run directory is private to root
worker_processes auto;
pid {self.workdir}/nginx.pid;
error_log {self.log_path} warn;
daemon off;
events {{ worker_connections 1024; }}
http {{
    access_log off;
    sendfile on;
    tcp_nopush on;
    keepalive_requests 1000000;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    types {{ }}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{self.port};
        root {self.root};
    }}
    server {{
        listen 127.0.0.1:{self.copy_port};
        root {self.root};
        sendfile off;
        output_buffers 2 256k;
    }}
}}
"""
        )
        return conf

    def start(self, *, attempts: int = 3) -> None:
        """Start on a free port; retry if it dies early (port taken meanwhile)."""
        for attempt in range(1, attempts + 1):
            self.port, self.copy_port = free_port(), free_port()
            conf = self._write_config()
            self._spawn(
                ["nginx", "-p", str(self.workdir), "-e", str(self.log_path), "-c", str(conf)]
            )
            try:
                wait_for_v2(self.port, proc=self.proc, log_path=self.log_path)
                return
            except RuntimeError:
                exited = not self.running
                self.stop()
                if not exited or attempt == attempts:
                    raise


class BenchMirror(MirrorProcess):
    """``mirrorproxy serve`` with a chosen log level and extra config options.

    ``options`` are ``section.key=value`` strings with a raw TOML value, e.g.
    ``defaults.max_fetches=8``: they go into that table of the generated config.
    ``source`` runs the ``mirrorproxy`` package found in another directory (a
    patched copy, for before/after comparisons) instead of the installed one.
    ``extra`` is raw TOML appended to the config (``[storage]``, ``[cluster]``); it
    may be changed between restarts. ``port`` fixes the port (cluster members name
    each other's); without it every restart takes a fresh free one.
    """

    def __init__(
        self,
        workdir: Path,
        upstream_url: str,
        *,
        options: Sequence[str] = (),
        log_level: str = "info",
        source: Path | None = None,
        extra: str = "",
        port: int | None = None,
    ) -> None:
        self.cache_dir = workdir / "cache"
        self.upstream_url = upstream_url
        self.options = tuple(options)
        self.log_level = log_level
        self.source = source
        self.extra = extra
        self.fixed_port = port
        port = port or free_port()
        env = {"PYTHONPATH": str(source)} if source is not None else None
        super().__init__(workdir, self.render(port), port, env=env, start=False)

    def render(self, port: int) -> str:
        """The config text for ``port``, with ``options`` put into their tables."""
        text = mirror_config(
            port, self.cache_dir, {NAMESPACE: [self.upstream_url]}, extra=self.extra
        )
        return with_options(text, self.options)

    @property
    def argv(self) -> list[str]:
        """The command line, with ``--log-level``; ``-P`` keeps the cwd's package out."""
        python, *rest = super().argv
        flags = ["-P"] if self.source is not None else []
        return [python, *flags, *rest, "--log-level", self.log_level]

    def restart(self, *, wipe: bool) -> None:
        """Stop, optionally empty the cache directory, start on a fresh port (or the
        fixed one)."""
        self.stop()
        if wipe:
            shutil.rmtree(self.cache_dir, ignore_errors=True)
        self.port = self.fixed_port or free_port()
        self.config_path.write_text(self.render(self.port))
        self.start()


def with_options(config_text: str, options: Sequence[str]) -> str:
    """Insert ``section.key=value`` options into a TOML text's tables.

    Raises:
        ValueError: an option is not ``section.key=value``.
    """
    lines = config_text.splitlines()
    for option in options:
        name, eq, value = option.partition("=")
        section, dot, key = name.strip().rpartition(".")
        if not eq or not dot or not key:
            raise ValueError(f"mirror option must be section.key=value, got {option!r}")
        header = f"[{section}]"
        entry = f"{key} = {value.strip()}"
        if header in lines:
            lines.insert(lines.index(header) + 1, entry)
        else:
            lines += ["", header, entry]
    return "\n".join(lines) + "\n"


def restart_registry(reg: Registry, *, wipe: bool) -> None:
    """Stop a docker-registry, optionally empty its storage, start it on a fresh port."""
    reg.stop()
    if wipe:
        shutil.rmtree(reg.storage, ignore_errors=True)
    reg.start()


@dataclass
class Stack:
    """Every server of one run. ``upstream`` holds the images; the rest front it.

    ``exits`` stops them all; servers only some scenarios need (SeaweedFS, an S3
    mirror, cluster members: ``sitestack.py``) are started on first use, entered into
    it, and kept in ``site``.
    """

    root: Path
    upstream: Registry
    baseline: Registry
    nginx: Nginx
    mirror: BenchMirror
    exits: contextlib.ExitStack
    site: Site | None = None

    def cold(self, cache: str) -> Server:
        """Restart ``mirror`` or ``baseline`` with an empty cache and return it."""
        if cache == "mirror":
            self.mirror.restart(wipe=True)
            return self.mirror
        if cache == "baseline":
            restart_registry(self.baseline, wipe=True)
            return self.baseline
        raise ValueError(f"not a cache: {cache!r}")


@contextlib.contextmanager
def running_stack(
    root: Path,
    *,
    mirror_options: Sequence[str] = (),
    mirror_log_level: str = "info",
    mirror_source: Path | None = None,
) -> Iterator[Stack]:
    """Start upstream, baseline proxy, nginx and mirror; stop them all on exit."""
    with contextlib.ExitStack() as stack:
        upstream = stack.enter_context(Registry(root / "upstream"))
        baseline = stack.enter_context(Registry(root / "baseline", proxy_remoteurl=upstream.url))
        nginx = stack.enter_context(Nginx(root / "nginx", upstream.storage))
        nginx.start()
        mirror = stack.enter_context(
            BenchMirror(
                root / "mirror",
                upstream.url,
                options=mirror_options,
                log_level=mirror_log_level,
                source=mirror_source,
            )
        )
        mirror.restart(wipe=True)
        yield Stack(root, upstream, baseline, nginx, mirror, stack)
