"""Where a PostgreSQL drain spends its CPU (issue 23): the sidecar, the database server's
processes and the fake TimeBack, in CPU seconds over one drain.

    .venv/bin/python bench/postgres_cpu.py [--events 300000] [--server URL]

The backlog is written straight into a fresh database (as bench/postgres.py does), then one
`caliper-sidecar run` drains it to the fake (`mock-upstream --ids-only`); CPU time is read from
/proc for the sidecar, the fake, and every process of the `postgres` user (the server's
backends, WAL writer, checkpointer and autovacuum) between the sidecar's start and the last
event's arrival. Needs the server on this machine.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

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
                started = time.monotonic()
                while get_json(f"{fake.url}/_mock/events?ids=false")["count"] < args.events:
                    time.sleep(0.2)
                wall = time.monotonic() - started
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


if __name__ == "__main__":
    main()
