"""What ingest's insert costs the writer's thread, and what in it (issue 33, target 3).

    .venv/bin/python bench/insert_cost.py [--events 150000] [--group 100]

The sidecar's schema on a 1 KB-page WAL outbox (bench/wal_frames.py's `outbox`, `synchronous
= OFF` here, so that the fsync does not drown the differences), `--events` 1.1 KB events in
commits of `--group`, into a table that grows as an outbox's does until its dedupe window
prunes it; µs an event for insert and COMMIT, by fifths of the run, for:

  - schema 6: the lookup and the packed insert as released before schema 7, into a table
    whose `events.id` has a UNIQUE index;
  - now: `writes.insert_appends` (the dedupe lookup, the capacity check, the packed insert),
    and every 10 commits (with the checkpoint) `event_ids.index_tail`, as `run` does once a second;
  - without `events_in`: the same, the per-row trigger that keeps the totals dropped.
"""

from __future__ import annotations

import argparse
import sqlite3
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import forward
from common import machine
from wal_frames import _insert, _insert_schema_6, outbox

from caliper_sidecar.outbox.sqlite import writes
from caliper_sidecar.outbox.sqlite.event_ids import index_tail

Insert = Callable[[sqlite3.Connection, list[bytes]], None]


def run(
    lines: list[bytes], group: int, insert: Insert, setup: Callable[[Path], sqlite3.Connection]
) -> list[float]:
    """µs an event (insert and commit) for each fifth of the run."""
    with tempfile.TemporaryDirectory() as tmp:
        conn = setup(Path(tmp) / "outbox.db")
        conn.execute("PRAGMA synchronous = OFF")
        fifth = len(lines) // 5
        spent, costs = 0.0, []
        for start in range(0, len(lines), group):
            chunk = lines[start : start + group]
            began = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            insert(conn, chunk)
            conn.execute("COMMIT")
            spent += time.perf_counter() - began
            if (start // group) % 10 == 9:
                if insert is not _insert_schema_6:
                    began = time.perf_counter()
                    with writes.immediate(conn):
                        index_tail(conn)
                    spent += time.perf_counter() - began
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
            if (start + group) % fifth == 0:
                costs.append(spent / fifth * 1e6)
                spent = 0.0
        conn.close()
    return costs


def without_trigger(path: Path) -> sqlite3.Connection:
    conn = outbox(path)
    conn.execute("DROP TRIGGER events_in")
    return conn


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--events", type=int, default=150_000)
    parser.add_argument("--group", type=int, default=100)
    args = parser.parse_args()
    lines = forward.events(args.events)
    size = sum(map(len, lines)) / len(lines)
    print(
        f"machine: {machine()}; {args.events:,} events of {size:.0f} bytes in commits of "
        f"{args.group}; µs an event (insert + COMMIT, synchronous = OFF), by fifths of the run"
    )
    variants: list[tuple[str, Insert, Callable[[Path], sqlite3.Connection]]] = [
        ("schema 6", _insert_schema_6, lambda path: outbox(path, schema=6)),
        ("now", _insert, outbox),
        ("without events_in", _insert, without_trigger),
    ]
    for name, insert, setup in variants:
        costs = run(lines, args.group, insert, setup)
        print(f"  {name:22s} " + "  ".join(f"{c:5.1f}" for c in costs))


if __name__ == "__main__":
    main()
