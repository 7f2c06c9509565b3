"""Log setup, request-id stamping and formatting; the metrics listener's start-up error."""

from __future__ import annotations

import dataclasses
import json
import logging
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from mirrorproxy.commands.serve import ServeError, serve
from mirrorproxy.config import MetricsConfig, parse_config
from mirrorproxy.http.requestctx import current_request_id, request_id_from, safe_ns
from mirrorproxy.observability.log import (
    BatchingHandler,
    JsonFormatter,
    RequestIdFilter,
    TextFormatter,
    configure_logging,
)


@pytest.fixture
def restore_root() -> Iterator[None]:
    """configure_logging replaces the root handlers: put pytest's back afterwards."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    srcfile, threads, processes = logging._srcfile, logging.logThreads, logging.logProcesses
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    logging._srcfile, logging.logThreads, logging.logProcesses = srcfile, threads, processes


def _record(msg: str = "hello %s", *args: object, **extra: object) -> logging.LogRecord:
    record = logging.LogRecord("mirrorproxy.x", logging.INFO, __file__, 1, msg, args, None)
    record.__dict__.update(extra)
    return record


def test_filter_stamps_the_current_request_id() -> None:
    flt = RequestIdFilter()
    outside = _record()
    assert flt.filter(outside)
    assert outside.__dict__["request_id"] is None
    token = current_request_id.set("abc123")
    try:
        inside = _record()
        flt.filter(inside)
        explicit = _record(request_id="given")  # the access log passes its own
        flt.filter(explicit)
    finally:
        current_request_id.reset(token)
    assert inside.__dict__["request_id"] == "abc123"
    assert explicit.__dict__["request_id"] == "given"


def test_text_format_shows_the_request_id_only_when_there_is_one() -> None:
    fmt = TextFormatter()
    assert fmt.format(_record("hi %s", "there", request_id="r-1")).endswith(
        " INFO mirrorproxy.x [r-1]: hi there"
    )
    assert fmt.format(_record("hi")).endswith(" INFO mirrorproxy.x: hi")


def test_json_format_is_one_object_with_access_fields_flattened() -> None:
    access = {"method": "GET", "status": 200, "bytes": 12, "msg": "not overriding"}
    line = JsonFormatter().format(_record("x %d", 1, request_id="r-2", access=access))
    assert "\n" not in line
    out = json.loads(line)
    assert out["msg"] == "x 1"
    assert out["request_id"] == "r-2"
    assert (out["method"], out["status"], out["bytes"]) == ("GET", 200, 12)
    assert out["level"] == "info"
    assert out["logger"] == "mirrorproxy.x"
    assert "request_id" not in json.loads(JsonFormatter().format(_record()))


@pytest.mark.parametrize("fmt", ["text", "json"])
def test_configure_logging_installs_formatter_and_filter(fmt: str, restore_root: None) -> None:
    configure_logging("debug", fmt)
    root = logging.getLogger()
    assert root.level == logging.DEBUG
    (handler,) = root.handlers
    expected = JsonFormatter if fmt == "json" else TextFormatter
    assert isinstance(handler.formatter, expected)
    assert any(isinstance(f, RequestIdFilter) for f in handler.filters)


@pytest.mark.parametrize(
    ("value", "kept"),
    [("abc", True), ("a.b_c-D9", True), ("x" * 128, True), ("x" * 129, False)]
    + [(bad, False) for bad in ("", "a b", "a\nb", "ü", "a/b", "a;b", "%41")],
)
def test_request_id_from(value: str, kept: bool) -> None:
    got = request_id_from(value)
    assert (got == value) is kept
    assert request_id_from(None) != request_id_from(None)


def test_safe_ns_is_bounded_and_encoded() -> None:
    assert safe_ns("docker.io") == "docker.io"
    assert safe_ns("myregistry:5000") == "myregistry:5000"
    assert safe_ns("[::1]:5000") == "[::1]:5000"
    assert safe_ns("evil\nline x") == "evil%0Aline%20x"
    assert len(safe_ns("a" * 1000) or "") == 255
    assert safe_ns("") is None
    assert safe_ns(None) is None


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def test_serve_reports_a_taken_metrics_port_in_one_line(tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        config = parse_config(
            {
                "server": {"listen": f"127.0.0.1:{_free_port()}"},
                "cache": {"dir": str(tmp_path / "cache")},
                "namespaces": {"docker.io": {"upstreams": ["http://127.0.0.1:9"]}},
            },
            source="test",
            base_dir=tmp_path,
        )
        config = dataclasses.replace(config, metrics=MetricsConfig(listen=("127.0.0.1", port)))
        with pytest.raises(ServeError) as info:
            serve(config)
    assert str(info.value).startswith(f"cannot listen on 127.0.0.1:{port} for metrics: ")
    assert "\n" not in str(info.value)


def _info(msg: str, level: int = logging.INFO) -> logging.LogRecord:
    return logging.LogRecord("mirrorproxy.access", level, __file__, 1, msg, (), None)


def test_batching_handler_flushes_info_lines_in_batches_and_warnings_at_once(
    tmp_path: Path,
) -> None:
    with (tmp_path / "log").open("w", buffering=64 * 1024) as stream:
        handler = BatchingHandler(stream, interval=1.0)
        handler.setFormatter(logging.Formatter("%(message)s"))

        def on_disk() -> str:
            return (tmp_path / "log").read_text()

        handler.handle(_info("one"))
        handler.handle(_info("two"))
        assert on_disk() == ""  # held for the batch
        deadline = time.monotonic() + 5
        while on_disk() != "one\ntwo\n" and time.monotonic() < deadline:
            time.sleep(0.02)
        assert on_disk() == "one\ntwo\n"  # ... and written within the interval

        handler.handle(_info("three"))
        handler.handle(_info("trouble", logging.WARNING))
        assert on_disk() == "one\ntwo\nthree\ntrouble\n"  # a warning takes the batch along

        handler.handle(_info("last"))
        handler.flush()  # what logging.shutdown does at exit
        assert on_disk().endswith("trouble\nlast\n")
        handler.close()


def test_timestamps_are_formatted_per_second_but_exact() -> None:
    text, js = TextFormatter(), JsonFormatter()
    for created in (1_700_000_000.123, 1_700_000_000.987, 1_700_000_001.5):
        record = _info("x")
        record.created, record.msecs = created, (created % 1) * 1000
        expected = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(created))
        assert text.formatTime(record) == f"{expected},{int(record.msecs):03d}"
        utc = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(created))
        assert json.loads(js.format(record))["ts"] == f"{utc}.{int(record.msecs):03d}Z"
