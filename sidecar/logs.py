"""structlog set-up: JSON lines for machines, a readable console for people."""

from __future__ import annotations

import atexit
import logging
import sys
import threading
from typing import Any, BinaryIO

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
FLUSH_EVERY_S = 0.2
MAX_PENDING_LINES = 10_000


class BufferedLineLogger:
    """Writes rendered JSON lines to a byte stream, flushing every FLUSH_EVERY_S.

    The receiver logs a line per ingest request; a write system call per line cost more than
    the rest of the log line. Warnings and errors are written at once; the rest within
    FLUSH_EVERY_S, and at exit. A SIGKILL may lose that much of the info lines, never events.
    """

    def __init__(self, stream: BinaryIO) -> None:
        self._stream = stream
        self._pending: list[bytes] = []
        self._lock = threading.Lock()
        self._stopped = threading.Event()
        threading.Thread(target=self._flush_periodically, name="log-flush", daemon=True).start()
        atexit.register(self.flush)

    def info(self, message: bytes) -> None:
        self._pending.append(message)
        if len(self._pending) >= MAX_PENDING_LINES:
            self.flush()

    debug = info

    def warning(self, message: bytes) -> None:
        self._pending.append(message)
        self.flush()

    error = critical = exception = msg = warning

    def flush(self) -> None:
        with self._lock:
            lines, self._pending = self._pending, []
            if not lines:
                return
            try:
                self._stream.write(b"\n".join(lines) + b"\n")
                self._stream.flush()
            except (OSError, ValueError):
                # stderr is gone (a closed pipe): the lines are dropped rather than kept in
                # memory for ever; logging must never be what takes the sidecar down.
                pass

    def _flush_periodically(self) -> None:
        while not self._stopped.wait(FLUSH_EVERY_S):
            self.flush()


_json_logger: BufferedLineLogger | None = None


def flush_logs() -> None:
    """Write out buffered log lines now (at shutdown)."""
    if _json_logger is not None:
        _json_logger.flush()


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Route structlog (and the standard library's loggers) to one stream in one format."""
    global _json_logger
    stream = stream or sys.stderr
    processors: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        structlog.processors.format_exc_info,
    ]
    if fmt == "json":
        processors.append(structlog.processors.JSONRenderer(serializer=orjson.dumps))
        flush_logs()
        _json_logger = BufferedLineLogger(stream.buffer)
        logger = _json_logger

        def factory(*args: Any) -> BufferedLineLogger:
            return logger

    else:
        processors.append(structlog.dev.ConsoleRenderer(colors=stream.isatty()))
        factory = structlog.PrintLoggerFactory(stream)  # type: ignore[assignment]
    structlog.configure(
        processors=processors,
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries that use the standard library (aiohttp's server errors) land in the same
    # stream; aiohttp's access log is off: the receiver logs one line per ingest request.
    handler = logging.StreamHandler(stream)
    handler.setFormatter(logging.Formatter("%(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))
