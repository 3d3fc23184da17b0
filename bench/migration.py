"""How long opening an outbox file of the release before schema 7 takes, and what it needs.

    .venv/bin/python bench/migration.py [--waiting 100000] [--delivered 100000]

A schema-6 file (1 KB pages, as that release created them) is filled with `--waiting` 1.1 KB
events and `--delivered` delivered ones (bodies emptied, as acknowledgements leave them),
then opened by this release's SqliteStorage, which rebuilds the events table without its
UNIQUE index on id and fills `event_ids` (schema 7). It prints the seconds the open took and
the disk the outbox took (the file and its WAL) before, at most while it opened (sampled
every 20 ms) and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sqlite3
import tempfile
import threading
import time
import uuid
from pathlib import Path

import forward
from common import machine

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.outbox.sqlite.schema import migrate
from caliper_sidecar.outbox.sqlite.storage import PAGE_SIZE, SqliteStorage


def size(path: Path) -> int:
    wal = Path(f"{path}-wal")
    return path.stat().st_size + (wal.stat().st_size if wal.exists() else 0)


def fill(path: Path, waiting: int, delivered: int) -> None:
    conn = sqlite3.connect(path, isolation_level=None)
    conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
    conn.execute("PRAGMA journal_mode = WAL")
    migrate(conn, upto=6)
    lines = forward.events(1000)
    now = time.time()
    conn.execute("BEGIN")
    for n in range(waiting + delivered):
        body = lines[n % len(lines)]
        done = n < delivered
        conn.execute(
            "INSERT INTO events (id, body, size, received_at, delivered_at) VALUES (?, ?, ?, ?, ?)",
            (
                f"urn:uuid:{uuid.uuid4()}",
                b"" if done else body,
                len(body),
                now,
                now if done else None,
            ),
        )
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()


async def open_once(path: Path) -> tuple[float, int]:
    """Seconds the open took, and the most disk the outbox took meanwhile."""
    storage = SqliteStorage(OutboxSettings(path=str(path)))
    most, opened = size(path), threading.Event()

    def sample() -> None:
        nonlocal most
        while not opened.wait(0.02):
            most = max(most, size(path))

    sampler = threading.Thread(target=sample)
    sampler.start()
    began = time.perf_counter()
    await storage.open(lambda: None)
    took = time.perf_counter() - began
    opened.set()
    sampler.join()
    await storage.close()
    return took, most


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--waiting", type=int, default=100_000)
    parser.add_argument("--delivered", type=int, default=100_000)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(dir=Path(__file__).parent) as tmp:
        path = Path(tmp, "outbox.db")
        fill(path, args.waiting, args.delivered)
        before = size(path)
        took, largest = asyncio.run(open_once(path))
        conn = sqlite3.connect(path)
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        (version,) = conn.execute("PRAGMA user_version").fetchone()
        (indexed,) = conn.execute("SELECT count(*) FROM event_ids").fetchone()
        conn.close()
        print(
            json.dumps(
                {
                    "machine": machine(),
                    "waiting": args.waiting,
                    "delivered": args.delivered,
                    "schema": version,
                    "ids_indexed": indexed,
                    "open_s": round(took, 2),
                    "file_mb_before": round(before / 1e6, 1),
                    "file_and_wal_mb_at_most": round(largest / 1e6, 1),
                    "file_mb_after": round(size(path) / 1e6, 1),
                }
            )
        )


if __name__ == "__main__":
    main()
