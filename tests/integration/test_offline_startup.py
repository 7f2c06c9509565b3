"""`serve --offline` says so in its start-up line: an operator reading the log of an
air-gapped site must not wonder why nothing is fetched."""

from __future__ import annotations

from pathlib import Path

from tests.support.paths import NS
from tests.support.procs import MirrorProcess, free_port, mirror_config


def test_start_up_line_says_offline(tmp_path: Path) -> None:
    port = free_port()
    config = mirror_config(port, tmp_path / "cache", {NS: ["http://127.0.0.1:9"]})
    with MirrorProcess(tmp_path / "mirror", config, port, args=["--offline"]) as proc:
        proc.stop()
    starting = [line for line in proc.log_text().splitlines() if "starting on" in line]
    assert len(starting) == 1
    assert starting[0].endswith(
        "; OFFLINE: serving only what is cached, never contacting upstreams"
    )

    online = free_port()
    config = mirror_config(online, tmp_path / "cache", {NS: ["http://127.0.0.1:9"]})
    with MirrorProcess(tmp_path / "online", config, online) as proc:
        proc.stop()
    assert "OFFLINE" not in proc.log_text()
