"""The PostgreSQL outbox: draining a backlog with 1, 2 and 3 replicas, and batch ingest against
the storage's ceiling (issue 11).

    .venv/bin/python bench/postgres.py [--events 1000000] [--replicas 1 2 3] [--server URL]

Delivery: a backlog written straight into a fresh database (binary COPY into the sidecar's own
schema), then `caliper-sidecar run` replicas on it forwarding to the fake TimeBack (ids only),
timed until the fake has every event; events/s, each replica's peak RSS, and the dead tuples
left in the events and queue tables (what vacuum has to do). Ingest: the outbox's own append
(group commit, deduplication, capacity, 100-event appends from 16 concurrent senders) against
two ceilings, side by side in one run: a raw asyncpg `copy_records_to_table` of the same rows
into the events table alone, and the same COPY followed by each row's `queue` row in the same
transaction (what makes a stored event a waiting one in this schema: the least any ingest into
it must write). Each ceiling writes into the table the ones before it have filled.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from common import Process, free_port, get_json, machine, sidecar

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.outbox import NewEvent, open_outbox
from caliper_sidecar.outbox.postgres_schema import SCHEMA
from caliper_sidecar.tools.samples import sample_events

PYTHON_FAKE = ["-m", "caliper_sidecar", "mock-upstream", "--ids-only"]


async def fresh_database(server: str) -> str:
    name = f"sidecar_bench_{uuid.uuid4().hex[:8]}"
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'CREATE DATABASE "{name}"')
    await admin.close()
    url = f"{server}/{name}"
    async with open_outbox(OutboxSettings(url=url), exclusive=False):
        pass  # creates the schema
    return url


async def drop_database(url: str) -> None:
    server, name = url.rsplit("/", 1)
    admin = await asyncpg.connect(f"{server}/postgres")
    await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    await admin.close()


def rows(count: int) -> list[tuple[str, bytes, int, float]]:
    """Stored events as the receiver stores them: each body carrying its own id."""
    samples = sample_events()
    now = time.time() - 3600
    out = []
    for i in range(count):
        event_id = f"urn:uuid:{uuid.uuid4()}"
        body = json.dumps({**samples[i % len(samples)], "id": event_id}).encode()
        out.append((event_id, body, len(body), now))
    return out


async def fill(url: str, count: int) -> None:
    conn = await asyncpg.connect(url)
    for start in range(0, count, 100_000):
        await conn.copy_records_to_table(
            "events",
            schema_name=SCHEMA,
            records=rows(min(100_000, count - start)),
            columns=["id", "body", "size", "received_at"],
        )
    await conn.execute(f"INSERT INTO {SCHEMA}.queue (seq) SELECT seq FROM {SCHEMA}.events")
    await conn.execute(f"ANALYZE {SCHEMA}.events, {SCHEMA}.queue")
    await conn.close()


async def dead_tuples(url: str) -> int:
    conn = await asyncpg.connect(url)
    value = await conn.fetchval(
        "SELECT sum(n_dead_tup) FROM pg_stat_user_tables WHERE schemaname = $1 "
        "AND relname IN ('events', 'queue')",
        SCHEMA,
    )
    await conn.close()
    return int(value or 0)


def deliver(server: str, count: int, replicas: int, tmp: Path) -> str:
    url = asyncio.run(fresh_database(server))
    try:
        asyncio.run(fill(url, count))
        fake_port = free_port()
        fake = Process([sys_python(), *PYTHON_FAKE, "--port", str(fake_port)], fake_port)
        runs = []
        started = time.monotonic()
        try:
            for _ in range(replicas):
                runs.append(
                    sidecar(
                        tmp,
                        free_port(),
                        outbox={"url": url},
                        upstream={"endpoint": f"{fake.url}/events/1.0/", "linger_ms": 0},
                        oauth={
                            "token_url": f"{fake.url}/auth/1.0/token",
                            "client_id": "sidecar",
                            "client_secret": "sidecar-secret",
                        },
                        log={"level": "warning"},
                    )
                )
            while get_json(f"{fake.url}/_mock/events?ids=false")["count"] < count:
                time.sleep(0.2)
            elapsed = time.monotonic() - started
            seen = get_json(f"{fake.url}/_mock/events?ids=false")
            peaks = [r.peak_rss_mb() for r in runs]
        finally:
            for r in runs:
                r.stop()
            fake.stop()
        dead = asyncio.run(dead_tuples(url))
    finally:
        asyncio.run(drop_database(url))
    return (
        f"| {replicas} | {count:,} | {count / elapsed:,.0f} | {elapsed:.1f} | "
        f"{', '.join(f'{p:.0f}' for p in peaks)} | {dead:,} | {seen['duplicates']} |"
    )


async def ingest(server: str, count: int) -> str:
    url = await fresh_database(server)
    try:
        batches = [[NewEvent(i, b) for i, b, _, _ in rows(100)] for _ in range(count // 100)]
        # Limits far above the run's size: what is measured is ingest, not a full outbox.
        unlimited = OutboxSettings(url=url, max_events=10**9, max_bytes=2**50)
        async with open_outbox(unlimited, exclusive=False) as box:
            queue = list(batches)
            started = time.monotonic()

            async def sender() -> None:
                while queue:
                    await box.append(queue.pop())

            await asyncio.gather(*(sender() for _ in range(16)))
            outbox_s = time.monotonic() - started
        conn = await asyncpg.connect(url)
        copy_s = await _copy(conn, count, queued=False)
        queued_s = await _copy(conn, count, queued=True)
        await conn.close()
    finally:
        await drop_database(url)
    ours, ceiling, queued = count / outbox_s, count / copy_s, count / queued_s
    return (
        f"| outbox append, 100-event appends, 16 senders | {ours:,.0f} |\n"
        f"| raw copy_records_to_table into events, 100 rows a commit | {ceiling:,.0f} |\n"
        f"| ratio | {ours / ceiling:.2f} |\n"
        f"| the same COPY and the rows' queue rows, 100 a commit | {queued:,.0f} |\n"
        f"| ratio | {ours / queued:.2f} |"
    )


async def _copy(conn: asyncpg.Connection, count: int, queued: bool) -> float:
    """Seconds to COPY `count` new events in transactions of 100 (with their queue rows)."""
    chunks = [rows(100) for _ in range(count // 100)]
    started = time.monotonic()
    for chunk in chunks:
        # Alone, each COPY commits by itself (an explicit transaction's BEGIN and COMMIT cost
        # it 15 % here); with its queue rows, both in one transaction.
        async with conn.transaction() if queued else contextlib.nullcontext():
            await conn.copy_records_to_table(
                "events",
                schema_name=SCHEMA,
                records=chunk,
                columns=["id", "body", "size", "received_at"],
            )
            if queued:
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.queue (seq) SELECT seq FROM {SCHEMA}.events "
                    f"WHERE id = ANY($1::text[])",
                    [r[0] for r in chunk],
                )
    return time.monotonic() - started


def sys_python() -> str:
    import sys

    return sys.executable


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=1_000_000)
    parser.add_argument("--replicas", type=int, nargs="*", default=[1, 2, 3])  # none: ingest only
    parser.add_argument("--ingest-events", type=int, default=200_000)
    parser.add_argument("--server", default="postgresql://postgres@127.0.0.1:5432")
    args = parser.parse_args()
    print(machine())
    print(
        "| replicas | backlog | events/s | seconds | peak RSS per replica (MB) "
        "| dead tuples after | duplicates |"
    )
    print("|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.replicas:
            print(deliver(args.server, args.events, n, Path(tmp)), flush=True)
    print()
    print("| ingest into PostgreSQL | events/s |")
    print("|---|---|")
    print(asyncio.run(ingest(args.server, args.ingest_events)))


if __name__ == "__main__":
    main()
