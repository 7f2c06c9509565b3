"""Logging setup, done once by the CLI: text or JSON lines, quiet third parties.

Every record emitted while a request is handled carries its id (``request_id``,
set by ``RequestIdFilter`` from ``requestctx.current_request_id``); access-log
records also carry their fields as ``access``, which the JSON formatter spreads
into top-level keys.

An access line per request is the busiest thing the server logs, so the setup keeps
it cheap: no caller lookup for records, timestamps formatted once a second, and
lines written in batches (``BatchingHandler``).

A server with workers logs as one stream: every process writes the same stderr, each
line names its process (``worker``: ``main`` or ``w0``, ``w1``...), and a worker
writes whole lines only, at most ``PIPE_BUF`` bytes at a time, so the kernel never
interleaves two processes' lines inside one another (``LineWriter``).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import select
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, TextIO

from mirrorproxy.http.requestctx import current_request_id

TEXT_FORMAT = "%(asctime)s%(worker_tag)s %(levelname)s %(name)s%(request_tag)s: %(message)s"


class RequestIdFilter(logging.Filter):
    """Stamp records with the id of the request being handled (if any)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if getattr(record, "request_id", None) is None:
            record.request_id = current_request_id.get()
        return True


FLUSH_INTERVAL = 0.1  # seconds a line may wait in the batch (warnings and worse: none)


class BatchingHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """A StreamHandler that writes lines in batches: one write per burst, not per line.

    Lines go into the stream's buffer and a background thread flushes it
    ``FLUSH_INTERVAL`` after the first unflushed line; a warning or error flushes at
    once, and so does ``logging.shutdown`` at exit. A ``kill -9`` may lose the last
    ``FLUSH_INTERVAL`` of info lines.
    """

    def __init__(self, stream: TextIO, interval: float = FLUSH_INTERVAL) -> None:
        super().__init__(stream)
        self.interval = interval
        self._dirty = threading.Event()
        self._closing = False
        threading.Thread(target=self._flusher, name="log-flush", daemon=True).start()

    def emit(self, record: logging.LogRecord) -> None:
        try:
            self.stream.write(self.format(record) + self.terminator)
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)
            return
        if record.levelno >= logging.WARNING:
            self.flush()
        else:
            self._dirty.set()

    def close(self) -> None:
        self._closing = True
        self._dirty.set()
        super().close()

    def _flusher(self) -> None:
        while not self._closing:
            self._dirty.wait()
            time.sleep(self.interval)
            self._dirty.clear()
            # The stream may be gone at exit; a broken one shows at the next emit.
            with contextlib.suppress(ValueError, OSError):
                self.flush()


class LineWriter:
    """A text stream onto a descriptor that writes whole lines, ``PIPE_BUF`` at a time.

    Writes of up to ``PIPE_BUF`` bytes to a pipe are atomic, and so is an append to a
    file: lines of several processes sharing stderr then never mix. A line longer
    than that is written alone (it may be interleaved; none of ours is that long).
    """

    LIMIT = 64 * 1024  # characters buffered before a flush is forced

    def __init__(self, fd: int) -> None:
        self._fd = fd
        self._parts: list[str] = []
        self._size = 0
        self._lock = threading.Lock()

    def write(self, text: str) -> int:
        with self._lock:
            self._parts.append(text)
            self._size += len(text)
            full = self._size >= self.LIMIT
        if full:
            self.flush()
        return len(text)

    def flush(self) -> None:
        with self._lock:
            data = "".join(self._parts).encode("utf-8", "backslashreplace")
            self._parts, self._size = [], 0
            chunk = bytearray()
            for line in data.splitlines(keepends=True):
                if chunk and len(chunk) + len(line) > select.PIPE_BUF:
                    self._write(bytes(chunk))
                    chunk.clear()
                chunk += line
            if chunk:
                self._write(bytes(chunk))

    def _write(self, data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(self._fd, view) :]


def _open_stderr() -> TextIO:
    """fd 2 with a buffer of its own (``sys.stderr`` flushes at every newline)."""
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, ValueError, OSError):
        return sys.stderr  # replaced by something without a descriptor (tests)
    return open(  # lives as long as the process
        fd, "w", buffering=64 * 1024, encoding="utf-8", errors="backslashreplace", closefd=False
    )


class _SecondCache:
    """``time.strftime`` of a record's second, computed once per second."""

    def __init__(self, fmt: str, convert: Callable[[float], time.struct_time]) -> None:
        self._fmt, self._convert = fmt, convert
        self._second = -1
        self._text = ""

    def __call__(self, created: float) -> str:
        second = int(created)
        if second != self._second:
            self._second, self._text = second, time.strftime(self._fmt, self._convert(second))
        return self._text


class TextFormatter(logging.Formatter):
    """Human-readable lines; ``[request-id]`` after the logger name when there is one,
    ``[worker]`` after the time in a server with workers."""

    def __init__(self, worker: str | None = None) -> None:
        super().__init__(TEXT_FORMAT)
        self._second = _SecondCache(self.default_time_format, self.converter)
        self._worker_tag = f" [{worker}]" if worker else ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        return f"{self._second(record.created)},{int(record.msecs):03d}"

    def format(self, record: logging.LogRecord) -> str:
        rid = getattr(record, "request_id", None)
        record.request_tag = f" [{rid}]" if rid else ""
        record.worker_tag = self._worker_tag
        return super().format(record)


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def __init__(self, worker: str | None = None) -> None:
        super().__init__()
        self._second = _SecondCache("%Y-%m-%dT%H:%M:%S", time.gmtime)
        self._worker = worker

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": f"{self._second(record.created)}.{int(record.msecs):03d}Z",
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if self._worker:
            out["worker"] = self._worker
        rid = getattr(record, "request_id", None)
        if rid:
            out["request_id"] = rid
        access = getattr(record, "access", None)
        if isinstance(access, dict):
            out.update((k, v) for k, v in access.items() if k not in out)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out)


def configure_logging(level: str = "info", fmt: str = "text", worker: str | None = None) -> None:
    """``worker``: this process's name in a server with workers (on every line)."""
    # Our formats show neither caller, thread nor process: do not collect them.
    logging._srcfile = None  # what the logging HOWTO advises to skip the caller lookup
    logging.logThreads = logging.logProcesses = logging.logMultiprocessing = False
    stream: TextIO = _open_stderr()
    if worker is not None and stream is not sys.stderr:
        stream = LineWriter(sys.stderr.fileno())  # type: ignore[assignment]
    handler = BatchingHandler(stream)
    handler.setFormatter(JsonFormatter(worker) if fmt == "json" else TextFormatter(worker))
    handler.addFilter(RequestIdFilter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's internals are chatty at debug and not about our requests.
    logging.getLogger("aiohttp.internal").setLevel(logging.WARNING)
    logging.getLogger("aiohttp.server").setLevel(logging.WARNING)
