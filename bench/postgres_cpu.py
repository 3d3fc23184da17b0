"""Where a PostgreSQL drain spends its CPU (issue 23): the sidecar, the database server's
processes and the fake TimeBack, in CPU seconds over one drain.

    .venv/bin/python bench/postgres_cpu.py [--events 300000] [--server URL]

The backlog is written straight into a fresh database (as bench/postgres.py does), then one
`caliper-sidecar run` drains it to the fake (`mock-upstream --ids-only`); CPU time is read from
/proc for the sidecar, the fake, and every process of the `postgres` user (the server's
backends, WAL writer, checkpointer and autovacuum) between the sidecar's start and the last
event's arrival. Needs the server on this machine.

Then where the database's time goes, statement by statement: a thread samples
`pg_stat_activity` every 5 ms during the drain and counts, for the sidecar's connections, what
each was doing (the statement it was running, named by what it does, or waiting in an open
transaction for the sidecar's next statement). A sampling profiler of statements: it needs no
extension (pg_stat_statements would need a server restart), and costs the server one short
query per sample.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Iterable
from pathlib import Path

import asyncpg
from common import fake_and_sidecar, get_json, machine
from postgres import drop_database, fill, fresh_database


def cpu_seconds(pids: Iterable[int]) -> float:
    total = 0
    for pid in pids:
        try:
            fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue  # gone meanwhile
        total += int(fields[11]) + int(fields[12])  # utime + stime
    return total / os.sysconf("SC_CLK_TCK")


#: a statement of the sidecar's, by a fragment of its text, named by what it does
STATEMENTS = (
    ("claim_head(", "claim (move the head, lease the batch)"),
    ("SELECT e.seq, e.id, b.body", "claim: read the claimed events"),
    ("WITH unflushed", "claim: events given back"),
    ("acknowledge(", "acknowledge a group (batch rows out, sent rows in)"),
    ("FROM sent s WHERE delivered_at <", "prune"),
    ("pg_partition_tree", "bodies: partitions made or dropped"),
    ("UPDATE replicas", "heartbeat"),
    ("COMMIT", "commit (WAL flush)"),
)


def statement(query: str, state: str) -> str:
    if state.startswith("idle in transaction"):
        return "open transaction, waiting for the sidecar"
    for fragment, name in STATEMENTS:
        if fragment in query:
            return name
    return query.strip().split("\n")[0][:60]


class StatementSampler(threading.Thread):
    """Counts what the sidecar's database connections are doing, every 5 ms."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self.url = url
        self.counts: Counter[str] = Counter()
        self.samples = 0
        self.done = threading.Event()

    def run(self) -> None:
        asyncio.run(self._sample())

    async def _sample(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            while not self.done.is_set():
                rows = await conn.fetch(
                    "SELECT query, state FROM pg_stat_activity "
                    "WHERE application_name = 'caliper-sidecar' AND state != 'idle'"
                )
                self.samples += 1
                self.counts.update(statement(r["query"], r["state"]) for r in rows)
                await asyncio.sleep(0.005)
        finally:
            await conn.close()


def server_pids() -> list[int]:
    found = subprocess.run(["pgrep", "-u", "postgres"], capture_output=True, text=True)
    return [int(pid) for pid in found.stdout.split()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    url = asyncio.run(fresh_database(args.server))
    try:
        asyncio.run(fill(url, args.events))
        with tempfile.TemporaryDirectory() as tmp:
            fake, run = fake_and_sidecar(
                Path(tmp), outbox={"url": url}, upstream={"linger_ms": 0}, log={"level": "warning"}
            )
            try:
                before = [
                    cpu_seconds([run.proc.pid]),
                    cpu_seconds(server_pids()),
                    cpu_seconds([fake.proc.pid]),
                ]
                sampler = StatementSampler(url)
                sampler.start()
                started = time.monotonic()
                while get_json(f"{fake.url}/_mock/events?ids=false")["count"] < args.events:
                    time.sleep(0.2)
                wall = time.monotonic() - started
                sampler.done.set()
                sampler.join()
                after = [
                    cpu_seconds([run.proc.pid]),
                    cpu_seconds(server_pids()),
                    cpu_seconds([fake.proc.pid]),
                ]
            finally:
                run.stop()
                fake.stop()
    finally:
        asyncio.run(drop_database(url))
    print(machine())
    print(f"drained {args.events:,} events in {wall:.1f} s: {args.events / wall:,.0f} events/s")
    print("| process | CPU seconds | share of one core |")
    print("|---|---|---|")
    for name, a, b in zip(("sidecar", "PostgreSQL", "fake TimeBack"), before, after, strict=True):
        print(f"| {name} | {b - a:.1f} | {(b - a) / wall:.0%} |")
    print(f"\nthe sidecar's database connections, {sampler.samples:,} samples every 5 ms")
    print("| doing | connections busy with it, on average | share of the busy time |")
    print("|---|---|---|")
    busy = sum(sampler.counts.values())
    for doing, count in sampler.counts.most_common():
        print(f"| {doing} | {count / sampler.samples:.2f} | {count / busy:.0%} |")


if __name__ == "__main__":
    main()
