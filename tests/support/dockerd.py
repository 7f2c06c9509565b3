"""Docker Engine started by the tests: dockerd with a mirror, on a private containerd.

dockerd gets its own data-root, exec-root, pidfile and API socket, the vfs storage
driver and no networking set-up (no iptables, no bridge), so it touches nothing of
the machine's. It pulls itself (containerd only runs containers), so dockerd gets
the closed local proxy: when the mirror fails, its fallback to Docker Hub dies at
once instead of leaving the machine. Docker mirrors docker.io only, without ``ns=``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

from tests.support.procs import CTR_ENV_OVERRIDES, Containerd, _Process

START_TIMEOUT = 60.0
RUN_TIMEOUT = 120.0


def docker_cli() -> str | None:
    """The docker CLI shipped with dockerd (a newer one elsewhere on PATH may not fit)."""
    dockerd = shutil.which("dockerd")
    if dockerd is not None:
        beside = Path(dockerd).resolve().parent.parent / "bin" / "docker"
        if beside.exists():
            return str(beside)
    return shutil.which("docker")


class Dockerd(_Process):
    """``dockerd --registry-mirror MIRROR`` with all its state under a /tmp directory."""

    def __init__(self, mirror_url: str) -> None:
        cli = docker_cli()
        if cli is None:
            raise RuntimeError("no docker CLI found")
        self.cli = cli
        self.containerd = Containerd()
        # Unix socket paths must stay under 108 bytes: keep the directory short.
        self.dir = Path(tempfile.mkdtemp(prefix="dkd", dir="/tmp"))
        super().__init__(self.dir / "dockerd.log")
        self.socket = self.dir / "docker.sock"
        # Neither the machine's daemon.json nor a user's CLI config (credential
        # helpers, auths) may change what is pulled from where.
        config_file = self.dir / "daemon.json"
        config_file.write_text("{}\n")
        self.cli_config = self.dir / "cli"
        self.cli_config.mkdir()
        mirror_host = mirror_url.split("://", 1)[1]
        argv = [
            "dockerd",
            "--config-file",
            str(config_file),
            "--containerd",
            self.containerd.address,
            "--registry-mirror",
            mirror_url,
            "--insecure-registry",
            mirror_host,
            "--storage-driver",
            "vfs",
            "--iptables=false",
            "--ip6tables=false",
            "--bridge=none",
            "--data-root",
            str(self.dir / "data"),
            "--exec-root",
            str(self.dir / "exec"),
            "--pidfile",
            str(self.dir / "docker.pid"),
            "-H",
            f"unix://{self.socket}",
        ]
        try:
            self._spawn(argv, env=dict(os.environ) | CTR_ENV_OVERRIDES)
            self._wait_ready()
        except BaseException:
            self.cleanup()
            raise

    def _wait_ready(self) -> None:
        deadline = time.monotonic() + START_TIMEOUT
        while True:
            probe = self.docker("version", timeout=10)
            if probe.returncode == 0:
                return
            if not self.running or time.monotonic() > deadline:
                tail = "\n".join(self.log_text().splitlines()[-30:])
                raise RuntimeError(f"dockerd did not come up: {probe.stderr}\n{tail}")
            time.sleep(0.1)

    def docker(self, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``docker -H unix://SOCK ARGS...``; never raises on failure."""
        return subprocess.run(
            [self.cli, "-H", f"unix://{self.socket}", *args],
            capture_output=True,
            text=True,
            env=dict(os.environ) | {"DOCKER_CONFIG": str(self.cli_config)},
            timeout=timeout,
            check=False,
        )

    def cleanup(self) -> None:
        """Stop dockerd and its containerd; remove every directory they used."""
        self.stop(timeout=30)
        self.containerd.cleanup()
        shutil.rmtree(self.dir, ignore_errors=True)
