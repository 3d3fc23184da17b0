"""Validation cost per event, against the cost of storing the event (issue 4).

    .venv/bin/python bench/validation_cost.py [--events 20000]

Validates the TimeBack sample events (timeback and caliper profiles), then appends the same
events to a real outbox in a temporary directory, 100 per append, with `synchronous` full and
normal. Prints microseconds per event for each, medians of five rounds.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.outbox import NewEvent, sqlite_outbox
from caliper_sidecar.tools.samples import sample_events
from caliper_sidecar.validation import validate_events

ROUNDS = 5


def events(n: int) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    while len(out) < n:
        out.extend(sample_events())
    return out[:n]


def time_validation(batch: list[dict[str, Any]], profile: str) -> float:
    started = time.perf_counter()
    for i in range(0, len(batch), 100):
        validate_events(batch[i : i + 100], "strict", profile)
    return (time.perf_counter() - started) / len(batch) * 1e6


async def time_storage(batch: list[dict[str, Any]], synchronous: str) -> float:
    rows = [
        NewEvent(f"urn:uuid:{uuid.uuid4()}", json.dumps(e, separators=(",", ":")).encode())
        for e in batch
    ]
    with tempfile.TemporaryDirectory() as tmp:
        async with sqlite_outbox(
            OutboxSettings(path=str(Path(tmp) / "o.db"), synchronous=synchronous)
        ) as outbox:
            started = time.perf_counter()
            for i in range(0, len(rows), 100):
                await outbox.append(rows[i : i + 100])
            return (time.perf_counter() - started) / len(rows) * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=20_000)
    n = parser.parse_args().events
    batch = events(n)
    results: dict[str, list[float]] = {}
    for _ in range(ROUNDS):
        results.setdefault("validate, timeback profile", []).append(
            time_validation(batch, "timeback")
        )
        results.setdefault("validate, caliper profile", []).append(
            time_validation(batch, "caliper")
        )
        for mode in ("full", "normal"):
            cost = asyncio.run(time_storage(batch, mode))
            results.setdefault(f"store (append x100, synchronous={mode})", []).append(cost)
    print(f"{n} events, median of {ROUNDS} rounds, microseconds per event")
    for name, values in results.items():
        print(f"  {name:45s} {statistics.median(values):8.1f}")
    store = statistics.median(results["store (append x100, synchronous=full)"])
    check = statistics.median(results["validate, timeback profile"])
    print(f"  validation / storage (full)                   {check / store:8.2f}")


if __name__ == "__main__":
    main()
