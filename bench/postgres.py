"""The PostgreSQL outbox: draining a backlog with 1, 2 and 3 replicas, and batch ingest against
the storage's ceiling (issue 11).

    .venv/bin/python bench/postgres.py [--events 1000000] [--replicas 1 2 3] [--server URL]

Delivery: a backlog written straight into a fresh database (binary COPY into the sidecar's own
schema), then `caliper-sidecar run` replicas on it forwarding to the fake TimeBack (ids only),
timed until the fake has every event; events/s, each replica's peak RSS, and the dead tuples
left in the outbox's tables (what vacuum has to do). Ingest: the outbox's own append (group
commit, deduplication, capacity, 100-event appends from 16 concurrent senders) against a
ceiling, side by side in one run: raw asyncpg `copy_records_to_table` of the same events into
the same schema, 100 a transaction (each event's `events` row and its `bodies` row: what a
stored event is in schema version 4), into the tables the outbox's run has filled.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import tempfile
import time
import uuid
from pathlib import Path

import asyncpg
from common import Process, free_port, get_json, machine, sidecar

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.outbox import NewEvent, open_outbox
from caliper_sidecar.outbox.postgres.bodies import Partitions
from caliper_sidecar.outbox.postgres.schema import SCHEMA
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
    conn = await asyncpg.connect(url, server_settings={"search_path": SCHEMA})
    await Partitions().make_room(conn, count)
    for start in range(0, count, 100_000):
        await _copy_events(conn, rows(min(100_000, count - start)), start + 1)
    await conn.execute("SELECT setval('events_seq_seq', $1)", count)
    await conn.execute("ANALYZE events, bodies")
    await conn.close()


async def _copy_events(
    conn: asyncpg.Connection, events: list[tuple[str, bytes, int, float]], first_seq: int
) -> None:
    """COPY events into the outbox's tables (seqs from first_seq: the caller owns the
    sequence), each as its `events` row and its `bodies` row."""
    seqs = range(first_seq, first_seq + len(events))
    await conn.copy_records_to_table(
        "events",
        schema_name=SCHEMA,
        records=[(seq, i, size, at) for seq, (i, _, size, at) in zip(seqs, events, strict=True)],
        columns=["seq", "id", "size", "received_at"],
    )
    await conn.copy_records_to_table(
        "bodies",
        schema_name=SCHEMA,
        records=[(seq, body) for seq, (_, body, _, _) in zip(seqs, events, strict=True)],
        columns=["seq", "body"],
    )


async def dead_tuples(url: str) -> int:
    """Dead row versions in every table of the outbox's schema."""
    conn = await asyncpg.connect(url)
    value = await conn.fetchval(
        "SELECT sum(n_dead_tup) FROM pg_stat_user_tables WHERE schemaname = $1", SCHEMA
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
        conn = await asyncpg.connect(url, server_settings={"search_path": SCHEMA})
        copy_s = await _copy(conn, count)
        await conn.close()
    finally:
        await drop_database(url)
    ours, ceiling = count / outbox_s, count / copy_s
    return (
        f"| outbox append, 100-event appends, 16 senders | {ours:,.0f} |\n"
        f"| raw copy_records_to_table of events and bodies, 100 a commit | {ceiling:,.0f} |\n"
        f"| ratio | {ours / ceiling:.2f} |"
    )


async def _copy(conn: asyncpg.Connection, count: int) -> float:
    """Seconds to COPY `count` new events in transactions of 100, after the outbox's."""
    chunks = [rows(100) for _ in range(count // 100)]
    first = int(await conn.fetchval("SELECT nextval('events_seq_seq')"))
    await Partitions().make_room(conn, count)
    await conn.execute("SELECT setval('events_seq_seq', $1)", first + count)
    started = time.monotonic()
    for n, chunk in enumerate(chunks):
        async with conn.transaction():
            await _copy_events(conn, chunk, first + n * 100)
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
