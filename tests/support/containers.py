"""podman and skopeo (containers/image clients) run with private state and no way out.

Both read mirrors from ``CONTAINERS_REGISTRIES_CONF`` and, when every mirror fails,
fall back to the real registry: the closed local proxy makes that fallback fail at
once, on loopback. podman keeps its images in a private ``--root``/``--runroot`` with
the vfs driver (no overlay mounts, nothing outside the test's directory).
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from tests.support.procs import CTR_ENV_OVERRIDES

RUN_TIMEOUT = 120.0


class ContainersTools:
    """Runs podman and skopeo with one registries.conf and one private storage."""

    def __init__(self, workdir: Path, registries_conf: Path | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir = workdir
        # The machine's containers.conf and a user's registry logins stay out of it.
        empty_conf = workdir / "containers.conf"
        empty_conf.write_text("")
        no_logins = workdir / "auth.json"
        no_logins.write_text('{"auths": {}}\n')
        self.env = (
            dict(os.environ)
            | CTR_ENV_OVERRIDES
            | {
                "CONTAINERS_CONF": str(empty_conf),
                "REGISTRY_AUTH_FILE": str(no_logins),
            }
        )
        if registries_conf is not None:
            self.env["CONTAINERS_REGISTRIES_CONF"] = str(registries_conf)

    def _run(
        self, argv: list[str], timeout: float, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            argv,
            capture_output=True,
            text=True,
            env=self.env,
            timeout=timeout,
            check=False,
            input=stdin,
        )

    def podman(
        self, *args: str, timeout: float = RUN_TIMEOUT, stdin: str | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``podman --root ... --storage-driver vfs ARGS...``; never raises on failure.

        ``stdin`` is written to its standard input (``login --password-stdin``).
        """
        base = [
            "podman",
            "--root",
            str(self.workdir / "root"),
            "--runroot",
            str(self.workdir / "runroot"),
            "--storage-driver",
            "vfs",
            "--events-backend",
            "none",
            "--cgroup-manager",
            "cgroupfs",
        ]
        return self._run([*base, *args], timeout, stdin)

    def podman_inspect(self, ref: str) -> dict[str, Any]:
        """``podman image inspect`` of one image, parsed.

        Raises:
            RuntimeError: podman failed.
        """
        proc = self.podman("image", "inspect", ref)
        if proc.returncode != 0:
            raise RuntimeError(f"podman image inspect {ref} failed: {proc.stderr}")
        found: list[dict[str, Any]] = json.loads(proc.stdout)
        return found[0]

    def skopeo(self, *args: str, timeout: float = RUN_TIMEOUT) -> subprocess.CompletedProcess[str]:
        """``skopeo ARGS...``; never raises on failure."""
        return self._run(["skopeo", *args], timeout)

    def skopeo_raw(
        self, *args: str, timeout: float = RUN_TIMEOUT
    ) -> subprocess.CompletedProcess[bytes]:
        """``skopeo ARGS...`` with stdout as bytes (``inspect --raw``)."""
        return subprocess.run(
            ["skopeo", *args],
            capture_output=True,
            env=self.env,
            timeout=timeout,
            check=False,
        )
