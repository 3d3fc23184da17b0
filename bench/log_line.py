"""What the ingest log line costs to write, through structlog and through HotLine (issue 33).

    .venv/bin/python bench/log_line.py [--calls 200000]

Both write the line the receiver writes for a single event (`configure_logging("info",
"json")`, a null stream; the buffer flushed every 0.2 s as in `run`), timed per call.
"""

from __future__ import annotations

import argparse
import os
import timeit
from typing import Any

import structlog
from common import machine

from caliper_sidecar import logs


class NullStream:
    """stderr's shape (a `buffer` for bytes), writing nowhere."""

    def __init__(self) -> None:
        self.buffer = open(os.devnull, "wb")  # noqa: SIM115 (open for the process's life)

    def isatty(self) -> bool:
        return False

    def write(self, text: str) -> int:
        return len(text)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=200_000)
    args = parser.parse_args()
    logs.configure_logging("info", "json", NullStream())
    fields: dict[str, Any] = {
        "path": "/caliper/event",
        "status": 202,
        "remote": "127.0.0.1",
        "duration_ms": 3.21,
        "sender": "room-12",
        "events": 1,
        "accepted": 1,
        "duplicates": 0,
        "job": None,
    }
    slow = structlog.get_logger("sidecar.receiver")
    hot = logs.HotLine("sidecar.receiver")
    print(f"machine: {machine()}; {args.calls:,} calls each, µs a call")
    for name, call in (
        ("structlog", lambda: slow.info("ingest", **fields)),
        ("HotLine", lambda: hot.info("ingest", **fields)),
    ):
        seconds = min(timeit.repeat(call, number=args.calls, repeat=3))
        print(f"  {name:10s} {seconds / args.calls * 1e6:6.2f}")


if __name__ == "__main__":
    main()
