"""The JSON log writer: buffered, bounded, and harmless when its stream breaks."""

from __future__ import annotations

import asyncio
import io
import json
import logging
from datetime import datetime
from pathlib import Path

import aiohttp
import structlog

from caliper_sidecar import __version__, logs
from caliper_sidecar.logs import (
    MAX_PENDING_LINES,
    BufferedLineLogger,
    HotLine,
    configure_logging,
    flush_logs,
    set_level,
)
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, eventually, free_port, make_events, write_config


class Broken(io.BytesIO):
    def write(self, data: bytes) -> int:  # type: ignore[override]
        raise BrokenPipeError("the log collector went away")


class TestBufferedLineLogger:
    def test_info_is_buffered_warnings_are_not(self) -> None:
        stream = io.BytesIO()
        logger = BufferedLineLogger(stream)
        logger.info(b'{"event":"ingest"}')
        assert stream.getvalue() == b""
        logger.warning(b'{"event":"upstream_backing_off"}')
        assert stream.getvalue() == b'{"event":"ingest"}\n{"event":"upstream_backing_off"}\n'

    def test_buffer_is_bounded(self) -> None:
        stream = io.BytesIO()
        logger = BufferedLineLogger(stream)
        for _ in range(MAX_PENDING_LINES):
            logger.info(b"x")
        assert stream.getvalue().count(b"\n") == MAX_PENDING_LINES

    def test_a_logger_replaced_writes_its_lines_and_stops(self) -> None:
        """configure_logging again (tests, a command after another in one process): the old
        logger's lines are written and its flushing thread ends, rather than one more thread
        waking five times a second for as long as the process lives."""
        stream = io.BytesIO()
        text = io.TextIOWrapper(stream)  # held: collected, it would close the stream
        configure_logging("info", "json", stream=text)
        first = logs._json_logger
        assert first is not None
        assert first.flusher.is_alive()
        structlog.get_logger("sidecar.test").info("before")
        other = io.TextIOWrapper(io.BytesIO())
        configure_logging("info", "json", stream=other)
        assert b'"event":"before"' in stream.getvalue()
        first.flusher.join(timeout=5)
        assert not first.flusher.is_alive()

    def test_a_broken_stream_drops_lines_instead_of_failing(self) -> None:
        logger = BufferedLineLogger(Broken())
        for _ in range(MAX_PENDING_LINES + 5):
            logger.info(b"x")
        logger.warning(b"y")
        assert logger.pending < MAX_PENDING_LINES


class TestOneJsonStream:
    def lines(self, buffer: io.BytesIO) -> list[dict[str, object]]:
        flush_logs()
        return [json.loads(line) for line in buffer.getvalue().decode().splitlines() if line]

    def test_library_records_and_tracebacks_are_json_lines(self) -> None:
        """A library's log record (aiohttp's, with a traceback) is one JSON line like ours:
        the logger's name, the version, and the traceback as data, never plain text."""
        buffer = io.BytesIO()
        stream = io.TextIOWrapper(buffer, write_through=True)
        configure_logging("info", "json", stream)
        try:
            secret = "local-token-value"
            raise ValueError(f"a handler broke ({len(secret)})")
        except ValueError:
            logging.getLogger("aiohttp.server").exception("Error handling request")
        structlog.get_logger("sidecar.receiver").warning("ingest", status=400)
        stream.flush()
        lines = self.lines(buffer)
        assert len(lines) == 2, buffer.getvalue()
        library, ours = sorted(lines, key=lambda line: str(line["logger"]))
        assert library["logger"] == "aiohttp.server"
        assert library["level"] == "error"
        assert library["event"] == "Error handling request"
        assert "ValueError" in json.dumps(library["exception"])
        assert "local-token-value" not in buffer.getvalue().decode()  # no frame locals
        assert ours["logger"] == "sidecar.receiver"
        for line in lines:
            assert line["version"] == __version__
            assert "timestamp" in line

    def test_every_module_logger_names_itself(self) -> None:
        """Each module's logger carries its name into every line."""
        buffer = io.BytesIO()
        configure_logging("info", "json", io.TextIOWrapper(buffer, write_through=True))
        from caliper_sidecar.delivery import dispatcher

        dispatcher.log.warning("batch_failed", events=1)
        (line,) = self.lines(buffer)
        assert line["logger"] == "sidecar.dispatcher"

    def test_the_ingest_line_is_the_line_structlog_writes(self) -> None:
        """The ingest line, rendered without structlog's processors, has the same keys and
        values as structlog's line for the same call; only the timestamp is its own (the same
        ISO 8601 UTC form, always with microseconds)."""
        buffer = io.BytesIO()
        configure_logging("info", "json", io.TextIOWrapper(buffer, write_through=True))
        fields = {"path": "/caliper/event", "status": 202, "duration_ms": 1.25, "job": None}
        fields["warnings"] = ["0/actor: a warning"]
        HotLine("sidecar.receiver").info("ingest", **fields)
        structlog.get_logger("sidecar.receiver").info("ingest", **fields)
        hot, slow = self.lines(buffer)
        for line in (hot, slow):
            stamp = str(line.pop("timestamp"))
            assert datetime.fromisoformat(stamp.replace("Z", "+00:00")).tzinfo is not None
        assert hot == slow
        assert list(hot) == list(slow)  # in the same order, for people reading the raw line

    def test_the_ingest_line_follows_the_level_and_the_format(self) -> None:
        """Above info (SIGHUP to `warning`) the ingest line is not written; with the console
        format it is structlog's console line."""
        buffer = io.BytesIO()
        configure_logging("info", "json", io.TextIOWrapper(buffer, write_through=True))
        set_level("warning")
        HotLine("sidecar.receiver").info("ingest", status=202)
        assert self.lines(buffer) == []
        text = io.StringIO()
        configure_logging("info", "console", text)
        HotLine("sidecar.receiver").info("ingest", status=202)
        assert "ingest" in text.getvalue()
        assert "status" in text.getvalue()
        assert not text.getvalue().lstrip().startswith("{")


async def test_logs_never_hold_event_content(
    tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """A real `run` at debug level, in validation's warn mode (invalid events logged as they
    are taken), through refusals, splits, dead letters, a web filter's page and reconciliation:
    its log names ids, counts, labels and reasons, never an actor, a name or a body."""
    marker = "Zebulon-Quixote-Marker"
    port = free_port()
    config = write_config(
        tmp_path / "sidecar.toml",
        platform,
        tmp_path / "outbox.db",
        port,
        upstream__endpoint=platform.beyond_url,
        upstream__platform="beyond-ai",
        log__level="debug",
        validation__mode="warn",
        reconcile__after_s=0.2,
    )
    p = SidecarProcess(config, port, tmp_path / "sidecar.log")
    processes.append(p)
    await p.wait_ready()
    events = make_events(6)
    for e in events:
        e["actor"] = {"id": f"https://sis.example/users/{marker}", "type": "Person"}
        e["extensions"] = {"note": f"{marker} reading"}
    events[0]["eventTime"] = "not a time"  # invalid: taken, with a warning, in warn mode
    platform.fake.faults.refuse_ids = {events[1]["id"]}  # split, then dead-lettered
    platform.fake.faults.lose_ids = {events[2]["id"]}  # found missing, sent again, given up
    platform.fake.faults.web_filter = True
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{p.url}/v1/events", json=events) as resp:
            assert resp.status == 202, await resp.text()
        await asyncio.sleep(0.5)  # the filter's page answers a few sends
        platform.fake.faults.web_filter = False
        await platform.fake.wait_for({e["id"] for e in events[3:]})

        async def reconciled() -> bool:
            async with http.get(f"{p.url}/v1/events/{events[2]['id']}") as resp:
                return "resent" in [m["what"] for m in (await resp.json()).get("marks", [])]

        await eventually(reconciled, timeout=30)
    assert await p.terminate() == 0
    log = (tmp_path / "sidecar.log").read_bytes()
    assert b"unexpected_answer" in log or b"web filter" in log.lower()
    assert marker.encode() not in log
