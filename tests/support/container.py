"""The mirror's own container image for end-to-end tests: build it, run it with podman.

Owns calling ``docker/build.sh`` and driving one podman container (run, stop,
start, logs, healthcheck, the users of its processes), always with bounded
timeouts and with the command's output in every error. It knows nothing about
pytest, registries or containerd.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent.parent
BUILD_SH = REPO / "docker" / "build.sh"

#: Binaries the image tests need, with the Debian package that provides each.
IMAGE_BINARIES = {"podman": "podman", "mmdebstrap": "mmdebstrap", "runc": "runc"}

BUILD_TIMEOUT = 900.0  # a cold --local-base build downloads Debian and PyPI packages
PODMAN_TIMEOUT = 120.0

# This machine's kernel runs cgroups v1 and v2 side by side, where podman's default
# runtime (crun) cannot create containers; runc can. And podman sets no rlimits of
# its own unless told, which the kernel refuses here above the hard limits.
RUN_LIMITS = ("--ulimit", "nofile=20000:20000", "--ulimit", "nproc=4096:4096")


def missing_image_requirements() -> list[str]:
    """Return one reason per missing binary (empty when all are on PATH)."""
    return [
        f"`{binary}` not found on PATH (apt-get install {package})"
        for binary, package in IMAGE_BINARIES.items()
        if shutil.which(binary) is None
    ]


class CommandError(RuntimeError):
    """A command exited non-zero; the message carries its output."""


def run(
    argv: Sequence[str],
    *,
    timeout: float = PODMAN_TIMEOUT,
    env: Mapping[str, str] | None = None,
) -> str:
    """Run a command (with ``env`` added to the environment) and return its stdout.

    Raises:
        CommandError: it exited non-zero (stdout and stderr in the message).
    """
    proc = subprocess.run(
        list(argv),
        capture_output=True,
        text=True,
        timeout=timeout,
        env=None if env is None else os.environ | dict(env),
        check=False,
    )
    if proc.returncode != 0:
        output = f"{proc.stdout[-4000:]}\n{proc.stderr[-4000:]}"
        raise CommandError(f"{' '.join(argv)} exited {proc.returncode}\n{output}")
    return proc.stdout


def podman(*args: str, timeout: float = PODMAN_TIMEOUT) -> str:
    """Run ``podman --runtime runc ARGS`` and return its stdout (see RUN_LIMITS)."""
    return run(["podman", "--runtime", "runc", *args], timeout=timeout)


@dataclass(frozen=True, slots=True)
class BuiltImage:
    """What ``docker/build.sh`` made: the tag, the --save archive and its report."""

    tag: str
    archive: Path
    output: str  # build.sh's stdout, including the "built ... MB" line


def build_image(tag: str, archive: Path) -> BuiltImage:
    """Run ``docker/build.sh --local-base --save ARCHIVE TAG`` (no Docker Hub needed).

    Intermediate layers are not kept (BUILDAH_LAYERS=false): the sources differ on
    every run, so they would only pile up. build.sh's cached base is what saves time.

    Raises:
        CommandError: the build failed.
    """
    out = run(
        [str(BUILD_SH), "--local-base", "--save", str(archive), tag],
        timeout=BUILD_TIMEOUT,
        env={"BUILDAH_LAYERS": "false"},
    )
    return BuiltImage(tag, archive, out)


def remove_image(tag: str) -> None:
    """Remove an image from podman's store; a missing one is fine."""
    subprocess.run(
        ["podman", "rmi", "--force", tag], capture_output=True, timeout=PODMAN_TIMEOUT, check=False
    )


class Container:
    """One detached podman container on the host network, removed by ``remove()``."""

    def __init__(self, image: str, *, mounts: Sequence[str], command: Sequence[str]) -> None:
        self.name = f"mirrorproxy-test-{uuid.uuid4().hex[:12]}"
        self.image = image
        self.mounts = list(mounts)  # "-v" values: SRC:DST[:OPTIONS]
        self.command = list(command)

    def run(self) -> None:
        """Create and start it; the healthcheck is run by hand, not by a timer."""
        volumes = [arg for mount in self.mounts for arg in ("-v", mount)]
        podman(
            "run", "--detach", "--name", self.name, "--network", "host", *RUN_LIMITS,
            *volumes, self.image, *self.command,
        )  # fmt: skip

    def stop(self) -> int:
        """Stop it (SIGTERM, SIGKILL after 10 s) and return its exit code."""
        podman("stop", "--time", "10", self.name)
        return int(podman("inspect", "--format", "{{.State.ExitCode}}", self.name).strip())

    def start(self) -> None:
        podman("start", self.name)

    def logs(self) -> str:
        try:
            return podman("logs", self.name)
        except CommandError as err:
            return str(err)

    def healthcheck(self) -> subprocess.CompletedProcess[str]:
        """``podman healthcheck run``; never raises on an unhealthy answer."""
        return subprocess.run(
            ["podman", "--runtime", "runc", "healthcheck", "run", self.name],
            capture_output=True,
            text=True,
            timeout=PODMAN_TIMEOUT,
            check=False,
        )

    def health_status(self) -> str:
        return podman("inspect", "--format", "{{.State.Health.Status}}", self.name).strip()

    def host_pids(self) -> list[int]:
        """Host pids of every process in the container."""
        rows = podman("top", self.name, "hpid").split()[1:]
        return [int(pid) for pid in rows]

    def remove(self) -> None:
        subprocess.run(
            ["podman", "rm", "--force", "--time", "5", self.name],
            capture_output=True,
            timeout=PODMAN_TIMEOUT,
            check=False,
        )


def process_uids(host_pid: int) -> tuple[int, ...]:
    """Real, effective, saved and filesystem uid of a host process, from /proc."""
    for line in Path(f"/proc/{host_pid}/status").read_text().splitlines():
        if line.startswith("Uid:"):
            return tuple(int(field) for field in line.split()[1:])
    raise RuntimeError(f"no Uid line for pid {host_pid}")
