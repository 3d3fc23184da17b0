"""The JSON log writer: buffered, bounded, and harmless when its stream breaks."""

from __future__ import annotations

import io

from sidecar.logs import MAX_PENDING_LINES, BufferedLineLogger


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

    def test_a_broken_stream_drops_lines_instead_of_failing(self) -> None:
        logger = BufferedLineLogger(Broken())
        for _ in range(MAX_PENDING_LINES + 5):
            logger.info(b"x")
        logger.warning(b"y")
        assert len(logger._pending) < MAX_PENDING_LINES
