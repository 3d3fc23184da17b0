"""The SQLite and the PostgreSQL outbox draining the same backlog, side by side in one run
(issue 23).

    .venv/bin/python bench/backends.py [--events 50000 200000] [--server URL]

For each backlog size: the backlog written straight into a new SQLite file and into a fresh
PostgreSQL database (each in the sidecar's own schema), then one `caliper-sidecar run` on it
forwarding to its own fake TimeBack (`mock-upstream --ids-only`), with the same settings (batch
100, concurrency 4, linger 0), timed until the fake has every event. Reports events/s of each,
their ratio, and PostgreSQL's dead tuples per event delivered (every table of the outbox's
schema, before autovacuum has caught up: what vacuum has left to do).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Any

from common import fake_and_sidecar, get_json, machine
from delivery import fill as fill_sqlite
from postgres import dead_tuples, drop_database, fresh_database
from postgres import fill as fill_postgres


def drain(tmp: Path, events: int, outbox: dict[str, Any]) -> tuple[float, float]:
    """Seconds to drain the backlog already in this outbox, and the sidecar's peak RSS (MB)."""
    started = time.monotonic()
    fake, run = fake_and_sidecar(
        tmp, outbox=outbox, upstream={"linger_ms": 0}, log={"level": "warning"}
    )
    try:
        while get_json(f"{fake.url}/_mock/events?ids=false")["count"] < events:
            time.sleep(0.1)
        seconds = time.monotonic() - started
        peak = run.peak_rss_mb()
    finally:
        run.stop()
        fake.stop()
    return seconds, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, nargs="+", default=[50_000, 200_000])
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    print(machine())
    print(
        "| backlog drained | SQLite events/s | PostgreSQL events/s | ratio "
        "| PostgreSQL dead tuples per event | peak RSS SQLite / PostgreSQL (MB) |"
    )
    print("|---|---|---|---|---|---|")
    for events in args.events:
        with tempfile.TemporaryDirectory() as name:
            tmp = Path(name)
            path = tmp / "outbox.db"
            fill_sqlite(path, events)
            sqlite_s, sqlite_peak = drain(
                tmp, events, {"path": str(path), "max_events": events + 1}
            )
            url = asyncio.run(fresh_database(args.server))
            try:
                asyncio.run(fill_postgres(url, events))
                postgres_s, postgres_peak = drain(tmp, events, {"url": url})
                dead = asyncio.run(dead_tuples(url))
            finally:
                asyncio.run(drop_database(url))
        print(
            f"| {events:,} | {events / sqlite_s:,.0f} | {events / postgres_s:,.0f} | "
            f"{sqlite_s / postgres_s:.2f} | {dead / events:.2f} | "
            f"{sqlite_peak:.0f} / {postgres_peak:.0f} |",
            flush=True,
        )


if __name__ == "__main__":
    main()
