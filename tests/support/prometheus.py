"""A real Prometheus server (Debian's ``prometheus`` package) for end-to-end tests.

Starts it on a free loopback port with its config and TSDB in a temporary
directory, scraping given targets every second, and queries its HTTP API. Every
wait is bounded. Knows nothing about pytest; the skip policy is the test's.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from tests.support.procs import START_TIMEOUT, _log_tail, _Process, free_port

BINARY = "prometheus"
PACKAGE = "prometheus"
SCRAPE_INTERVAL = "1s"
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def missing_prometheus() -> str | None:
    """Why the Prometheus tests cannot run here, or None."""
    if shutil.which(BINARY) is None:
        return f"`{BINARY}` not found on PATH (apt-get install {PACKAGE})"
    return None


class PrometheusError(RuntimeError):
    """The API answered with an error, or not at all."""


class Prometheus(_Process):
    """``prometheus`` scraping ``targets`` (``host:port``) every second.

    Args:
        workdir: holds ``prometheus.yml``, the TSDB and the log.
        targets: scraped under ``job="mirrorproxy"``.
        rule_files: loaded as alerting/recording rules (evaluated every second).
    """

    def __init__(
        self, workdir: Path, targets: Sequence[str], *, rule_files: Sequence[Path] = ()
    ) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        super().__init__(workdir / "prometheus.log")
        self.workdir = workdir
        self.config_path = workdir / "prometheus.yml"
        config = {
            "global": {
                "scrape_interval": SCRAPE_INTERVAL,
                "scrape_timeout": SCRAPE_INTERVAL,
                "evaluation_interval": SCRAPE_INTERVAL,
            },
            "rule_files": [str(p) for p in rule_files],
            "scrape_configs": [
                {"job_name": "mirrorproxy", "static_configs": [{"targets": list(targets)}]}
            ],
        }
        self.config_path.write_text(json.dumps(config, indent=2) + "\n")  # JSON is YAML
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, *, attempts: int = 3, timeout: float = START_TIMEOUT) -> None:
        """Start on a free port and wait for ``/-/ready``; retry if it dies early."""
        for attempt in range(1, attempts + 1):
            self.port = free_port()
            self._spawn(
                [
                    BINARY,
                    f"--config.file={self.config_path}",
                    f"--storage.tsdb.path={self.workdir / 'tsdb'}",
                    f"--web.listen-address=127.0.0.1:{self.port}",
                    "--log.level=warn",
                ]
            )
            try:
                self._wait_ready(timeout)
                return
            except RuntimeError:
                exited = not self.running
                self.stop()
                if not exited or attempt == attempts:
                    raise

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                with _OPENER.open(f"{self.url}/-/ready", timeout=2) as resp:
                    if resp.status == 200:
                        return
            except (OSError, urllib.error.URLError):
                pass
            if not self.running:
                raise RuntimeError("prometheus exited before it was ready" + self._tail())
            if time.monotonic() > deadline:
                raise RuntimeError(f"prometheus not ready after {timeout}s" + self._tail())
            time.sleep(0.1)

    def _tail(self) -> str:
        return _log_tail(self.log_path)

    def api(self, path: str, **params: str) -> Any:
        """GET ``/api/v1/<path>`` and return its ``data``.

        Raises:
            PrometheusError: the API said ``error`` or could not be reached.
        """
        query = urllib.parse.urlencode(params)
        url = f"{self.url}/api/v1/{path}" + (f"?{query}" if query else "")
        try:
            with _OPENER.open(url, timeout=10) as resp:
                body = json.load(resp)
        except urllib.error.HTTPError as err:
            with err:
                body = json.load(err)
        except (OSError, urllib.error.URLError, ValueError) as err:
            raise PrometheusError(f"{url}: {err}") from err
        if body.get("status") != "success":
            raise PrometheusError(f"{url}: {body.get('errorType')}: {body.get('error')}")
        return body["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant vector query's result (``[{"metric": {...}, "value": [t, "v"]}]``)."""
        data = self.api("query", query=expr)
        if data["resultType"] != "vector":
            raise PrometheusError(f"{expr!r} gave a {data['resultType']}, not a vector")
        result: list[dict[str, Any]] = data["result"]
        return result

    def wait_for_scrape(self, timeout: float = 30.0) -> None:
        """Wait until every target has been scraped successfully at least once."""
        deadline = time.monotonic() + timeout
        while True:
            targets = self.api("targets")["activeTargets"]
            if targets and all(t["health"] == "up" for t in targets):
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"targets not up after {timeout}s: {targets}" + self._tail())
            time.sleep(0.2)
