"""What the per-row `events_in` trigger (the outbox's running totals) costs the packed insert.

    .venv/bin/python bench/totals_trigger.py [--commits 300] [--group 100]

The sidecar's schema and `writes.insert_appends` on a fresh 1 KB-page WAL outbox
(`synchronous = OFF`, so that the fsync does not drown the difference), `--commits` commits of
`--group` 1.1 KB events, with the trigger and with it dropped, alternated twice; µs an event
for the insert and for the COMMIT.
"""

from __future__ import annotations

import argparse
import json
import sqlite3
import tempfile
import time
import uuid
from pathlib import Path

from common import machine

from caliper_sidecar.outbox.records import NewEvent
from caliper_sidecar.outbox.sqlite import writes
from caliper_sidecar.outbox.sqlite.schema import migrate
from caliper_sidecar.tools.samples import sample_events


def run(body: bytes, commits: int, group: int, trigger: bool) -> tuple[float, float]:
    with tempfile.TemporaryDirectory() as tmp:
        conn = sqlite3.connect(Path(tmp) / "outbox.db", isolation_level=None)
        conn.execute("PRAGMA page_size = 1024")
        conn.execute("PRAGMA journal_mode = WAL")
        migrate(conn)
        conn.execute("PRAGMA synchronous = OFF")
        if not trigger:
            conn.execute("DROP TRIGGER events_in")
        inserting = committing = 0.0
        for n in range(commits):
            events = [NewEvent(str(uuid.uuid4()), body, None, None) for _ in range(group)]
            start = time.perf_counter()
            conn.execute("BEGIN IMMEDIATE")
            writes.insert_appends(conn, [(events, None)], time.time(), 3600, 10**9, 10**12)
            inserted = time.perf_counter()
            conn.execute("COMMIT")
            inserting += inserted - start
            committing += time.perf_counter() - inserted
            if n % 10 == 9:
                conn.execute("PRAGMA wal_checkpoint(PASSIVE)")
        conn.close()
    events_total = commits * group
    return inserting / events_total * 1e6, committing / events_total * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--commits", type=int, default=300)
    parser.add_argument("--group", type=int, default=100)
    args = parser.parse_args()
    body = json.dumps(sample_events()[6]).encode()[:1100].ljust(1100)
    print(f"machine: {machine()}; {args.commits} commits of {args.group} events, µs an event")
    for trigger in (True, False, True, False):
        insert, commit = run(body, args.commits, args.group, trigger)
        label = "with events_in" if trigger else "without it"
        print(f"  {label:16s} insert {insert:5.1f}   commit {commit:5.1f}")


if __name__ == "__main__":
    main()
