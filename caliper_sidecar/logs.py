"""structlog set-up: JSON lines for machines, a readable console for people."""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from typing import Any, BinaryIO

import orjson
import structlog

from caliper_sidecar import __version__

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}
#: the level in force; changed by SIGHUP (set_level) without reconfiguring: loggers cache their
#: configuration on first use, so the filter reads this instead of being built in
_level = [logging.INFO]
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
        self.flusher = threading.Thread(
            target=self._flush_periodically, name="log-flush", daemon=True
        )
        self.flusher.start()
        atexit.register(self.flush)

    def stop(self) -> None:
        """Write what is pending and end the periodic flushes (a logger replaced by another:
        each left a thread waking five times a second for as long as the process lived)."""
        self._stopped.set()
        atexit.unregister(self.flush)
        self.flush()

    @property
    def pending(self) -> int:
        """Lines waiting for the next flush (bounded by MAX_PENDING_LINES)."""
        return len(self._pending)

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


def _stop_json_logger() -> None:
    if _json_logger is not None:
        _json_logger.stop()


class _Named:
    """A logger for one name: structlog's `add_logger_name` reads `.name`; the writing is
    the shared logger's (its methods, bound once, so a log call costs no extra lookup)."""

    def __init__(self, name: str, target: Any) -> None:
        self.name = name
        for method in ("debug", "info", "warning", "error", "critical", "exception", "msg"):
            setattr(self, method, getattr(target, method))


def _add_version(_: Any, __: str, event_dict: Any) -> Any:
    event_dict["version"] = __version__
    return event_dict


def configure_logging(level: str = "info", fmt: str = "json", stream: Any = None) -> None:
    """Route structlog and the standard library's loggers (aiohttp's, asyncio's) to one
    stream in one format: with JSON, every line is one object with the logger's name, the
    version, and a traceback as data (never plain multi-line text)."""
    global _json_logger
    stream = stream or sys.stderr
    set_level(level)
    shared: list[Any] = [
        structlog.processors.add_log_level,
        structlog.stdlib.add_logger_name,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
        _add_version,
    ]
    if fmt == "json":
        # Frames without their local variables: a local can hold a token or an event.
        tracebacks: Any = structlog.processors.ExceptionRenderer(
            structlog.tracebacks.ExceptionDictTransformer(show_locals=False)
        )
        renderer: Any = structlog.processors.JSONRenderer(serializer=orjson.dumps)
        _stop_json_logger()
        _json_logger = BufferedLineLogger(stream.buffer)
        target: Any = _json_logger
    else:
        tracebacks = structlog.processors.format_exc_info
        renderer = structlog.dev.ConsoleRenderer(
            colors=stream.isatty() and not os.environ.get("NO_COLOR")
        )
        target = structlog.PrintLogger(stream)
        _stop_json_logger()
        _json_logger = None

    def factory(name: str = "sidecar", *_: Any) -> _Named:
        return _Named(name, target)

    structlog.configure(
        processors=[_below_level, *shared, tracebacks, renderer],
        logger_factory=factory,
        cache_logger_on_first_use=True,
    )
    # Libraries that use the standard library (aiohttp's server errors, asyncio's) are
    # rendered by the same processors, into the same stream; aiohttp's access log is off: the
    # receiver logs one line per ingest request.
    text_renderer = (lambda *args: renderer(*args).decode()) if fmt == "json" else renderer
    handler = logging.StreamHandler(stream)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[*shared, structlog.stdlib.ExtraAdder()],
            processors=[
                structlog.stdlib.ProcessorFormatter.remove_processors_meta,
                tracebacks,
                text_renderer,
            ],
        )
    )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(max(_LEVELS[level], logging.WARNING))


class HotLine:
    """The ingest line, written once per request: the same JSON line structlog would write
    (the same keys; the timestamp always with microseconds), rendered straight to the buffer.

    Through structlog's processors the line cost a fifth of single-event ingest's throughput
    (BENCHMARKS.md, issue 33); one dict and one orjson call cost a fraction of that. With the
    console format (people reading, not a busy receiver) it is structlog's line as before.
    """

    def __init__(self, name: str) -> None:
        self._name = name
        self._structlog = structlog.get_logger(name)

    def info(self, event: str, **fields: Any) -> None:
        target = _json_logger
        if target is None:
            self._structlog.info(event, **fields)
            return
        if _dropped("info"):
            return
        fields["event"] = event
        fields["level"] = "info"
        fields["logger"] = self._name
        fields["timestamp"] = _utc_now()
        fields["version"] = __version__
        target.info(orjson.dumps(fields, default=repr))


_second: list[Any] = [-1, ""]


def _utc_now() -> str:
    """ISO 8601 UTC with microseconds (`2026-12-06T20:37:30.714813Z`); the date and time of
    the current second formatted once a second."""
    now = time.time()
    second = int(now)
    if second != _second[0]:
        _second[:] = [second, time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(second))]
    return f"{_second[1]}.{int((now - second) * 1_000_000):06d}Z"


def set_level(level: str) -> None:
    """Log at this level from now on (`log.level`; SIGHUP applies a new one)."""
    _level[0] = _LEVELS[level]
    logging.getLogger().setLevel(max(_LEVELS[level], logging.WARNING))


def _below_level(_: Any, method: str, event: Any) -> Any:
    if _dropped(method):
        raise structlog.DropEvent
    return event


def _dropped(method: str) -> bool:
    """A line logged by this method is below the level in force."""
    return _METHOD_LEVELS.get(method, logging.INFO) < _level[0]


_METHOD_LEVELS = {**_LEVELS, "exception": logging.ERROR, "critical": logging.CRITICAL}
