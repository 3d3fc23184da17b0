"""The PostgreSQL outbox's write transactions, each on a connection inside the transaction
that `PostgresStorage` opens around it: storage.py decides when they run (group commits,
leases, the reserve on a full disk); this says what they change. The SQLite outbox's
counterpart is sqlite/writes.py.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Final

import asyncpg

from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox.postgres.bodies import Partitions
from caliper_sidecar.outbox.postgres.room import Footprint, keep_reserve
from caliper_sidecar.outbox.postgres.schema import INGEST_LOCK
from caliper_sidecar.outbox.records import (
    PRUNE_CHUNK,
    Append,
    AppendResult,
    PlatformJobOutcome,
    new_per_append,
)
from caliper_sidecar.states import DeadLetterReason

#: the channel appends and replays NOTIFY, so that every replica's dispatcher looks at once
CHANNEL: Final = "caliper_sidecar_appended"
#: the database server's clock: one clock for every replica
NOW: Final = "extract(epoch from clock_timestamp())::double precision"
#: an event a sent row holds: delivered (the sent row `s`, of the event `e`)
IN_SENT: Final = "s.span @> e.seq AND e.seq = ANY(s.seqs)"
#: sent rows pruned at a time: PRUNE_CHUNK events in batches of 100
_PRUNE_SENT_ROWS: Final = PRUNE_CHUNK // 100
#: the seqs and ids of a platform job's events not yet confirmed
_JOB_EVENTS: Final = """
    SELECT q.seq, e.id FROM sent s CROSS JOIN unnest(s.seqs) AS q(seq)
    JOIN events e ON e.seq = q.seq
    WHERE s.platform_job = $1 AND s.confirmed_at IS NULL ORDER BY q.seq"""


async def insert_appends(
    conn: asyncpg.Connection,
    group: list[Append],
    dedupe_window_s: float,
    max_events: int,
    max_bytes: int,
    footprint: Footprint,
    partitions: Partitions,
) -> list[AppendResult | OutboxUnavailable]:
    """A group commit's appends: the reserve refilled first, known ids skipped, capacity checked
    per append (all of it or none), one insert."""
    all_ids = [e.id for events, _ in group for e in events]
    # One round trip for the clock, the reserve, the totals and the seqs drawn so far.
    now, reserve_whole, depth, size, last_seq = await conn.fetchrow(
        f"SELECT {NOW}, EXISTS (SELECT 1 FROM reserve), "
        "(SELECT sum(events) FROM totals), (SELECT sum(bytes) FROM totals), "
        "(SELECT last_value FROM events_seq_seq)"
    )
    partitions.stored(int(last_seq))
    if not reserve_whole:
        await keep_reserve(conn)
    # Known: waiting, dead-lettered, or delivered within the window; one delivered before it
    # and not yet pruned is stale: stored anew.
    found = await conn.fetch(
        f"""
        SELECT e.id, EXISTS (
            SELECT 1 FROM sent s WHERE {IN_SENT} AND s.delivered_at < $2) AS stale
        FROM events e WHERE e.id = ANY($1::text[])
        UNION ALL SELECT id, false FROM dead_letters WHERE id = ANY($1::text[])
        """,
        all_ids,
        now - dedupe_window_s,
    )
    known = {r["id"] for r in found if not r["stale"]}
    depth, size = int(depth or 0), max(int(size or 0), await footprint.read(conn))
    fresh_by_append = new_per_append(
        [events for events, _ in group], known, depth, size, max_events, max_bytes
    )
    rows = [e for f in fresh_by_append if isinstance(f, list) for e in f]
    stored: set[str] = set()
    if rows:
        stale = {r["id"] for r in found if r["stale"]} & {e.id for e in rows}
        if stale:
            await conn.execute("DELETE FROM events WHERE id = ANY($1::text[])", list(stale))
        stored = {
            r["id"]
            for r in await store_events(
                conn,
                [e.id for e in rows],
                [e.body for e in rows],
                [e.sensor for e in rows],
                [e.sender for e in rows],
                None,
            )
        }
    jobs = [
        (job, now, json.dumps([e.id for e in events]))
        for (events, job), fresh in zip(group, fresh_by_append, strict=True)
        if job is not None and isinstance(fresh, list)
    ]
    if jobs:
        await conn.executemany(
            "INSERT INTO jobs (id, created_at, event_ids) VALUES ($1, $2, $3) "
            "ON CONFLICT DO NOTHING",
            jobs,
        )
    results: list[AppendResult | OutboxUnavailable] = []
    for (events, _), outcome in zip(group, fresh_by_append, strict=True):
        if isinstance(outcome, OutboxUnavailable):
            results.append(outcome)
        else:
            accepted = sum(1 for e in outcome if e.id in stored)
            results.append(AppendResult(accepted, len(events) - accepted))
    return results


async def store_events(
    conn: asyncpg.Connection,
    ids: list[str],
    bodies: list[bytes],
    sensors: list[str | None],
    senders: list[str | None],
    received_at: list[float] | None,
) -> list[asyncpg.Record]:
    """Store new events (an id stored already stays as it is: a row another replica committed
    meanwhile); their (seq, id). Under INGEST_LOCK until the transaction ends: events commit in
    the order of their seqs, so a claim from `head` never passes one that commits later. The
    bodies' partitions must exist (see postgres_bodies)."""
    # The lock is taken before the first row's seq is drawn: its CTE is joined into every row.
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        WITH serial AS (SELECT pg_advisory_xact_lock({INGEST_LOCK})),
        stored AS (
            INSERT INTO events (id, size, received_at, sensor, sender)
            SELECT id, length(body), coalesce(received_at, {NOW}), sensor, sender
            FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[],
                $5::double precision[]) AS t(id, body, sensor, sender, received_at), serial
            ON CONFLICT (id) DO NOTHING
            RETURNING seq, id
        ), kept AS (
            INSERT INTO bodies (seq, body)
            SELECT stored.seq, t.body FROM stored
            JOIN unnest($1::text[], $2::bytea[]) AS t(id, body) USING (id)
        )
        SELECT seq, id FROM stored
        """,
        ids,
        bodies,
        sensors,
        senders,
        received_at if received_at is not None else [None] * len(ids),
    )
    if rows:
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    return rows


async def record_acks(
    conn: asyncpg.Connection,
    acks: Sequence[tuple[str, Sequence[int], str | None, str | None]],
    follower: str,
    lease_s: float,
) -> list[int]:
    """Events delivered, each (claim, seqs, platform job, why it cannot be confirmed), in one
    statement (schema version 4's acknowledge); how many of each were recorded."""
    recorded: list[int] = await conn.fetchval(
        "SELECT acknowledge($1, $2, $3, $4, $5, $6, $7)",
        [claim for claim, _, _, _ in acks],
        [seq for _, seqs, _, _ in acks for seq in seqs],
        [i for i, (_, seqs, _, _) in enumerate(acks, 1) for _ in seqs],
        [job for _, _, job, _ in acks],
        [why for _, _, _, why in acks],
        follower,
        lease_s,
    )
    return recorded


async def prune(conn: asyncpg.Connection, dedupe_window_s: float) -> bool:
    """Forget sent rows older than the dedupe window, and their events (not those of a
    platform job still followed), about PRUNE_CHUNK events at a time (a sent row holds a
    batch); True when more are left."""
    cutoff = await conn.fetchval(f"SELECT {NOW} - $1::double precision", dedupe_window_s)
    old = await conn.fetch(
        """
        SELECT id, seqs FROM sent s WHERE delivered_at < $1 AND NOT EXISTS (
            SELECT 1 FROM platform_jobs p
            WHERE p.id = s.platform_job AND p.state != 'unconfirmed')
        ORDER BY delivered_at LIMIT $2
        """,
        cutoff,
        _PRUNE_SENT_ROWS,
    )
    if old:
        # The events first: deleted while their sent rows stand, they are counted as
        # delivered, not as waiting events going.
        await conn.execute(
            "DELETE FROM events WHERE seq = ANY($1::bigint[])",
            [seq for r in old for seq in r["seqs"]],
        )
        await conn.execute("DELETE FROM sent WHERE id = ANY($1::bigint[])", [r["id"] for r in old])
    await conn.execute("DELETE FROM jobs WHERE created_at < $1", cutoff)
    await conn.execute(
        "DELETE FROM platform_jobs WHERE state = 'unconfirmed' AND sent_at < $1", cutoff
    )
    return len(old) >= _PRUNE_SENT_ROWS


async def record_failure(conn: asyncpg.Connection, claim: str, seqs: list[int], error: str) -> int:
    """A failed attempt of events held by this claim, which gives them back; how many."""
    return int(await conn.fetchval("SELECT give_back($1, $2, $3)", claim, seqs, error[:1024]))


async def release(conn: asyncpg.Connection, claim: str, seqs: list[int]) -> int:
    """Events of this claim given back untried; how many."""
    return int(await conn.fetchval("SELECT give_back($1, $2, NULL)", claim, seqs))


async def move_to_dead_letters(
    conn: asyncpg.Connection,
    seqs: Sequence[int],
    reason: str,
    status: int | None,
    response: str,
    claim: str | None,
) -> int:
    """Move these events (held by `claim`, when given) to the dead letters; the count."""
    if claim is not None:
        seqs = await conn.fetchval("SELECT take_from_claim($1, $2::bigint[])", claim, list(seqs))
    moved = await conn.fetchval(
        f"""
        WITH t AS (SELECT {NOW} AS now), gone AS (
            DELETE FROM events WHERE seq = ANY($1::bigint[])
            RETURNING seq, id, received_at, attempts, first_attempt_at, sensor, sender
        ), dead AS (
            INSERT INTO dead_letters (id, body, received_at, reason, status, response,
                attempts, first_attempt_at, last_attempt_at, dead_lettered_at, sensor,
                sender)
            SELECT id, coalesce(b.body, ''::bytea), received_at, $2, $3, $4, attempts + 1,
                coalesce(first_attempt_at, t.now), t.now, t.now, sensor, sender
            FROM gone LEFT JOIN bodies b USING (seq), t ORDER BY seq
            ON CONFLICT (id) DO UPDATE SET body = excluded.body, reason = excluded.reason,
                sensor = excluded.sensor, sender = excluded.sender,
                status = excluded.status, response = excluded.response,
                attempts = excluded.attempts, last_attempt_at = excluded.last_attempt_at,
                dead_lettered_at = excluded.dead_lettered_at
            RETURNING 1
        )
        SELECT count(*) FROM dead
        """,
        list(seqs),
        reason,
        status,
        response[:1024],
    )
    return int(moved)


async def take_dead_letters(
    conn: asyncpg.Connection, ids: list[str] | None, limit: int, replay: bool
) -> int:
    """Delete up to `limit` of the selected dead letters (all when `ids` is None), stored again
    as waiting events first when `replay`; how many."""
    chunk = await conn.fetch(
        "SELECT seq, id, body, received_at, sensor, sender FROM dead_letters "
        "WHERE $1::text[] IS NULL OR id = ANY($1) ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED",
        ids,
        limit,
    )
    if chunk and replay:
        await store_events(
            conn,
            [r["id"] for r in chunk],
            [r["body"] for r in chunk],
            [r["sensor"] for r in chunk],
            [r["sender"] for r in chunk],
            [r["received_at"] for r in chunk],
        )
    await conn.execute(
        "DELETE FROM dead_letters WHERE seq = ANY($1::bigint[])", [r["seq"] for r in chunk]
    )
    return len(chunk)


async def job_ids_sent_in(conn: asyncpg.Connection, job: str) -> list[str]:
    return [str(r["id"]) for r in await conn.fetch(_JOB_EVENTS, job)]


async def finish_platform_job(
    conn: asyncpg.Connection, job: str, outcome: PlatformJobOutcome
) -> int:
    """A finished platform job: its processed events confirmed, its failing ones dead-lettered,
    the others queued again; the job forgotten. How many were dead-lettered."""
    await conn.execute("SELECT 1 FROM sent WHERE platform_job = $1 FOR UPDATE", job)
    rows = await conn.fetch(_JOB_EVENTS, job)
    split = outcome.split([(r["seq"], r["id"]) for r in rows])
    if split.again:
        # Out of the job's sent rows, given back to be claimed (they wait again).
        await conn.execute(
            """
            WITH out AS (
                UPDATE sent SET seqs = ARRAY(
                    SELECT q FROM unnest(seqs) q WHERE q <> ALL($2::bigint[]) ORDER BY q)
                WHERE platform_job = $1
            ), back AS (
                INSERT INTO batches (lo, seqs) VALUES (($2::bigint[])[1], $2)
            )
            SELECT count_change(cardinality($2), (SELECT sum(size) FROM events
                WHERE seq = ANY($2)), 0, -cardinality($2), 0)
            """,
            job,
            sorted(split.again),
        )
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    if split.failing:
        await move_to_dead_letters(
            conn, split.failing, DeadLetterReason.PLATFORM_FAILED, None, outcome.reason, None
        )
    if split.confirmed:
        await conn.execute(
            f"UPDATE sent SET confirmed_at = {NOW}, platform_ids = $2::jsonb "
            "WHERE platform_job = $1 AND confirmed_at IS NULL",
            job,
            json.dumps({str(seq): pid for seq, pid in split.confirmed if pid is not None}),
        )
    await conn.execute("DELETE FROM platform_jobs WHERE id = $1", job)
    return len(split.failing)
