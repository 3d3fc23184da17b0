"""Bytes of outbox file per waiting event, for sizing the outbox volume (issue 5).

    .venv/bin/python bench/outbox_size.py [--events 100000]

Appends the TimeBack sample events (fresh ids) to a new outbox, checkpoints the WAL, and
divides the file size by the number of events.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import uuid
from pathlib import Path

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.outbox import NewEvent, sqlite_outbox
from caliper_sidecar.tools.samples import sample_events


async def measure(n: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "outbox.db"
        body_bytes = 0
        async with sqlite_outbox(
            OutboxSettings(path=str(path), synchronous="normal", max_events=n + 1)
        ) as outbox:
            for _ in range(0, n, 1000):
                batch = []
                while len(batch) < 1000:
                    for event in sample_events():
                        event["id"] = f"urn:uuid:{uuid.uuid4()}"
                        body = json.dumps(event, separators=(",", ":")).encode()
                        body_bytes += len(body)
                        batch.append(NewEvent(event["id"], body))
                await outbox.append(batch[:1000])
            stats = await outbox.stats()
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        conn.close()
        size = path.stat().st_size
        print(f"{stats.events} events, {stats.bytes / stats.events:.0f} bytes of JSON each")
        print(f"outbox file: {size / 1e6:.1f} MB, {size / stats.events:.0f} bytes per event")
        print(f"events per GiB of outbox: {2**30 / (size / stats.events):,.0f}")
        # Deliver them all: each is kept, body emptied, for outbox.dedupe_window_s.
        async with sqlite_outbox(
            OutboxSettings(path=str(path), synchronous="normal", max_events=n + 1)
        ) as outbox:
            while batch := (await outbox.claim_batch(1000, 10**9)).seqs:
                await outbox.acknowledge(batch)
        conn = sqlite3.connect(path)
        conn.execute("VACUUM")
        conn.close()
        kept = path.stat().st_size
        print(
            f"after delivering all of them: {kept / 1e6:.1f} MB, {kept / n:.0f} bytes per "
            "delivered event remembered for deduplication"
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=100_000)
    asyncio.run(measure(parser.parse_args().events))


if __name__ == "__main__":
    main()
