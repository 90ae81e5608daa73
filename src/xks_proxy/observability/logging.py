"""JSON-lines logging: one line per request, and the proxy's own events.

Request lines carry requestMetadata (kmsRequestId above all), the outcome and the
latency (spec: Logging). They never carry plaintext, AAD or secrets: the service only
ever puts metadata, identifiers and our own error messages into a log record.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import time
from typing import Any, TextIO

import orjson

REQUEST_LOGGER_NAME = "xks_proxy.request"


class JsonFormatter(logging.Formatter):
    """Format a record as one JSON object per line."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": _iso_time(record.created),
            "level": record.levelname.lower(),
            "logger": record.name,
            "pid": record.process,
        }
        fields = getattr(record, "fields", None)
        if isinstance(fields, dict):
            line.update(fields)
        else:
            line["message"] = record.getMessage()
        if record.exc_info and record.exc_info[0] is not None:
            # The exception type only: tracebacks can carry local values.
            line["exception"] = record.exc_info[0].__name__
        return orjson.dumps(line, default=str).decode("utf-8")


def _iso_time(created: float) -> str:
    seconds = int(created)
    millis = int((created - seconds) * 1000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(seconds)) + f".{millis:03d}Z"


def configure_logging(level: str = "info", stream: TextIO | None = None) -> None:
    """Send every xks_proxy log (and uvicorn's) to ``stream`` as JSON lines."""
    _request_log.stream = stream
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for existing in list(root.handlers):
        root.removeHandler(existing)
    root.addHandler(handler)
    root.setLevel(level.upper())
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        named = logging.getLogger(name)
        named.handlers.clear()
        named.propagate = True
    logging.getLogger("uvicorn.access").disabled = True


PIPE_BUF = 4096  # writes up to this size to a pipe are never interleaved (POSIX)


class _RequestLog:
    """The per-request line, written without the logging module's machinery.

    It is the one log line on the hot path: one orjson call per request. Inside a
    running event loop, the lines of one loop step are written together at the end of
    it (call_soon): fewer write() calls, each of which would also hand the GIL to the
    HSM thread (or the audit thread, with fsync) and make the loop wait to get it
    back. Each write holds whole lines and at most PIPE_BUF bytes (a longer line
    alone), so lines from several workers sharing a pipe never interleave. Outside a
    loop a line is written at once. Same shape as JsonFormatter's lines.
    """

    def __init__(self) -> None:
        self.stream: TextIO | None = None
        self.pid = os.getpid()
        self._second = -1
        self._prefix = ""
        self._pending: list[bytes] = []
        self._flush_loop: asyncio.AbstractEventLoop | None = None  # a flush is due there

    def _time(self, now: float) -> str:
        second = int(now)
        if second != self._second:
            self._second = second
            self._prefix = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))
        return f"{self._prefix}.{int((now - second) * 1000):03d}Z"

    def write(self, fields: dict[str, Any]) -> None:
        if not _request_logger.isEnabledFor(logging.INFO):
            return
        if self.pid != os.getpid():  # a new process (spawned worker) has its own pid
            self.pid = os.getpid()
            self._pending.clear()
            self._flush_loop = None
        line: dict[str, Any] = {
            "time": self._time(time.time()),
            "level": "info",
            "logger": REQUEST_LOGGER_NAME,
            "pid": self.pid,
        }
        line.update(fields)
        self._pending.append(orjson.dumps(line, default=str) + b"\n")
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self.flush()
            return
        if self._flush_loop is loop:
            return  # this loop flushes at the end of its step
        if self._flush_loop is not None:
            self.flush()  # scheduled on a loop that stopped before flushing
        self._flush_loop = loop
        loop.call_soon(self.flush)

    def flush(self) -> None:
        """Write every pending line (whole lines, at most PIPE_BUF bytes per write)."""
        self._flush_loop = None
        pending = self._pending
        if not pending:
            return
        self._pending = []
        chunk: list[bytes] = []
        size = 0
        for line in pending:
            if chunk and size + len(line) > PIPE_BUF:
                self._emit(b"".join(chunk))
                chunk, size = [], 0
            chunk.append(line)
            size += len(line)
        self._emit(chunk[0] if len(chunk) == 1 else b"".join(chunk))

    def _emit(self, data: bytes) -> None:
        stream = self.stream
        if stream is None:
            try:
                os.write(2, data)
            except OSError:
                pass  # a closed stderr must not fail the request
        else:
            stream.write(data.decode("utf-8"))
            stream.flush()


_request_logger = logging.getLogger(REQUEST_LOGGER_NAME)
_request_log = _RequestLog()


def log_request(fields: dict[str, Any]) -> None:
    """Write one request line (at the end of the current event-loop step)."""
    _request_log.write(fields)


def flush_request_log() -> None:
    """Write the request lines still pending (at shutdown)."""
    _request_log.flush()
