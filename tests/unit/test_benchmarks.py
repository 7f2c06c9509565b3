"""The benchmark suite's own logic: figures, the report, results.md, options.

The scenarios need root, nginx, wrk and containerd and take minutes, so they are not
run here; what decides what the report says is.
"""

from __future__ import annotations

import math
import tomllib
from pathlib import Path

import pytest

from benchmarks.report import Outcome, Series, fmt, ratio, render
from benchmarks.run import BEGIN, END, _scenarios, write_results
from benchmarks.sitestack import cluster_toml
from benchmarks.stack import NAMESPACE, BenchMirror, with_options
from mirrorproxy.config import parse_config
from tests.support.cluster import MAX_PORT, member_ports
from tests.support.procs import mirror_config


def test_series_medians_ratio_and_formatting() -> None:
    mirror, base = Series("mirror", "GB/s"), Series("proxy", "GB/s")
    for value, extra in ((0.5, 1.0), (0.3, 3.0), (0.4, 2.0)):
        mirror.add(value, client=0.2, server=1.0, upstream_gets=extra)
    base.add(0.8)
    assert mirror.median == 0.4
    assert mirror.figure("upstream_gets") == 2.0
    assert math.isnan(mirror.figure("absent"))
    assert ratio(mirror, base) == pytest.approx(0.5)
    assert ratio(mirror, Series("empty", "GB/s")) is None
    assert (fmt(6531.2, "req/s"), fmt(12.44, "ms"), fmt(0.4), fmt(float("nan"))) == (
        "6,531 req/s",
        "12.4 ms",
        "0.40",
        "n/a",
    )


def test_report_shows_ratio_verdict_spread_and_notes() -> None:
    mirror = Series("mirrorproxy (cold)", "GB/s", [0.3, 0.5, 0.4], [0.2], [1.1])
    base = Series("proxy (cold)", "GB/s", [0.8])
    missed = Outcome(2, "Cold blob", ">= 1.2x", [mirror, base], "0.40 GB/s", "proxy", 0.5, False)
    met = Outcome(5, "Memory", "< 150 MiB", [], "114 MiB", "-", None, True, ["peak RSS"])
    text = render([missed, met], title="Latest run", machine=["- m"], preamble=["p"])
    assert text.startswith("## Latest run\n")
    assert "| 2 | Cold blob | >= 1.2x | 0.40 GB/s | proxy | 0.50x | **no** | 0.00 |" in text
    assert "| 5 | Memory | < 150 MiB | 114 MiB | - | - | yes | 0.00 |" in text
    assert "| 2 | mirrorproxy (cold) | 0.40 GB/s (0.30-0.50) | 0.20 | 1.10 |  |" in text
    assert "- (5) peak RSS" in text


def test_results_file_keeps_what_was_written_by_hand(tmp_path: Path) -> None:
    path = tmp_path / "results.md"
    write_results(path, "## run 1\n")
    assert path.read_text() == f"# Benchmark results\n\n{BEGIN}\n## run 1\n{END}\n"
    path.write_text(path.read_text() + "\n## Findings\n\nwritten by hand\n")
    write_results(path, "## run 2\n")
    text = path.read_text()
    assert "run 1" not in text
    assert f"{BEGIN}\n## run 2\n{END}\n" in text
    assert text.endswith("\n## Findings\n\nwritten by hand\n")


def test_mirror_options_land_in_their_tables_and_the_mirror_accepts_them(
    tmp_path: Path,
) -> None:
    text = mirror_config(5000, tmp_path / "cache", {NAMESPACE: ["http://127.0.0.1:1"]})
    # The example the README and --help give, and a table the base config lacks.
    text = with_options(text, ["defaults.max_fetches=8", 'metrics.listen="127.0.0.1:9"'])
    config = parse_config(tomllib.loads(text), source="bench", base_dir=tmp_path)
    assert config.defaults.max_fetches == 8
    assert config.metrics.listen == ("127.0.0.1", 9)
    with pytest.raises(ValueError, match=r"section\.key=value"):
        with_options(text, ["max_fetches=8"])


def test_a_cluster_member_on_a_bucket_gets_a_config_the_mirror_accepts(tmp_path: Path) -> None:
    ports = member_ports(3)
    assert len(set(ports)) == 3
    assert all(p < MAX_PORT for p in ports)
    urls = [f"http://127.0.0.1:{p}" for p in ports]
    storage = (
        '\n[storage]\nbackend = "s3"\n[storage.s3]\nendpoint = "http://127.0.0.1:2"\n'
        'bucket = "b"\nprefix = "bench-1/"\naccess_key = "k"\nsecret_key = "s"\n'
        "redirect = true\n"
    )
    member = BenchMirror(
        tmp_path / "m",
        "http://127.0.0.1:1",
        options=["defaults.max_fetches=8"],
        extra=cluster_toml(urls, urls[1]) + storage,
        port=ports[1],
    )
    text = member.render(member.port)
    config = parse_config(tomllib.loads(text), source="bench", base_dir=tmp_path)
    assert member.port == ports[1]
    assert config.server.port == ports[1]
    assert config.cluster is not None
    assert (config.cluster.self_url, config.cluster.members) == (urls[1], tuple(urls))
    assert config.storage.s3 is not None
    assert (config.storage.s3.prefix, config.storage.s3.redirect) == ("bench-1/", True)
    assert config.defaults.max_fetches == 8


def test_scenario_choice() -> None:
    assert _scenarios("") == list(range(1, 12))
    assert _scenarios("3, 1,3") == [1, 3]
    with pytest.raises(SystemExit, match="unknown scenario"):
        _scenarios("12")
    with pytest.raises(SystemExit, match="scenario numbers"):
        _scenarios("1,x")
