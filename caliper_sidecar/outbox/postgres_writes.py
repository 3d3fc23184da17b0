"""The PostgreSQL outbox's write transactions, each on a connection inside the transaction
that `PostgresOutbox` opens around it: postgres.py decides when they run (group commits,
leases, the reserve on a full disk); this says what they change. The SQLite outbox's
counterpart is sqlite_writes.py.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Final

import asyncpg

from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox.base import (
    PRUNE_CHUNK,
    Append,
    AppendResult,
    PlatformJobOutcome,
    new_per_append,
)
from caliper_sidecar.outbox.postgres_room import Footprint, keep_reserve
from caliper_sidecar.states import DeadLetterReason

#: the channel appends and replays NOTIFY, so that every replica's dispatcher looks at once
CHANNEL: Final = "caliper_sidecar_appended"
#: the database server's clock: one clock for every replica
NOW: Final = "extract(epoch from clock_timestamp())::double precision"
#: the events a platform job was sent with
_JOB_SEQS: Final = "(SELECT seqs FROM platform_jobs WHERE id = $1)::bigint[]"
#: an event stored anew: a delivered one older than the dedupe window, received again
_STORED_ANEW: Final = """body = excluded.body, size = excluded.size,
    received_at = excluded.received_at, attempts = 0, first_attempt_at = NULL,
    last_attempt_at = NULL, last_error = NULL, delivered_at = NULL, platform_job = NULL,
    platform_id = NULL, confirmed_at = NULL, unconfirmed = NULL, sensor = excluded.sensor,
    sender = excluded.sender"""


async def insert_appends(
    conn: asyncpg.Connection,
    group: list[Append],
    dedupe_window_s: float,
    max_events: int,
    max_bytes: int,
    footprint: Footprint,
) -> list[AppendResult | OutboxUnavailable]:
    """A group commit's appends: the reserve refilled first, known ids skipped, capacity checked
    per append (all of it or none), one insert."""
    all_ids = [e.id for events, _ in group for e in events]
    # One round trip for the clock, the reserve and the totals.
    now, reserve_whole, depth, size = await conn.fetchrow(
        f"SELECT {NOW}, EXISTS (SELECT 1 FROM reserve), "
        "(SELECT sum(events) FROM totals), (SELECT sum(bytes) FROM totals)"
    )
    if not reserve_whole:
        await keep_reserve(conn)
    known = {
        r["id"]
        for r in await conn.fetch(
            "SELECT id FROM events WHERE id = ANY($1::text[]) AND "
            "(delivered_at IS NULL OR delivered_at >= $2) "
            "UNION ALL SELECT id FROM dead_letters WHERE id = ANY($1::text[])",
            all_ids,
            now - dedupe_window_s,
        )
    }
    depth, size = int(depth or 0), max(int(size or 0), await footprint.read(conn))
    fresh_by_append = new_per_append(
        [events for events, _ in group], known, depth, size, max_events, max_bytes
    )
    rows = [e for f in fresh_by_append if isinstance(f, list) for e in f]
    stored: set[str] = set()
    if rows:
        # A delivered event older than the dedupe window, not yet pruned, is stored anew; a
        # row another replica committed meanwhile stays as it is (not RETURNING).
        stored = {
            r["id"]
            for r in await conn.fetch(
                f"""
                WITH stored AS (
                    INSERT INTO events (id, body, size, received_at, sensor, sender)
                    SELECT id, body, length(body), {NOW}, sensor, sender
                    FROM unnest($1::text[], $2::bytea[], $4::text[], $5::text[])
                        AS t(id, body, sensor, sender)
                    ON CONFLICT (id) DO UPDATE SET {_STORED_ANEW}
                    WHERE events.delivered_at IS NOT NULL AND events.delivered_at < $3
                    RETURNING seq, id
                ), queued AS (
                    INSERT INTO queue (seq) SELECT seq FROM stored ON CONFLICT DO NOTHING
                )
                SELECT id FROM stored
                """,
                [e.id for e in rows],
                [e.body for e in rows],
                now - dedupe_window_s,
                [e.sensor for e in rows],
                [e.sender for e in rows],
            )
        }
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
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


async def record_ack(
    conn: asyncpg.Connection,
    claim: str,
    seqs: list[int],
    platform_job: str | None,
    unconfirmed: str | None,
    follower: str,
    lease_s: float,
) -> int:
    """Events delivered under this claim (the others were taken over: unchanged); a platform
    job they were sent in is followed by `follower` for a lease. How many were recorded."""
    done = [
        r["seq"]
        for r in await conn.fetch(
            f"""
            WITH dequeued AS (
                DELETE FROM queue WHERE seq = ANY($1::bigint[]) AND claimed_by = $2
                RETURNING seq
            )
            UPDATE events e SET delivered_at = {NOW}, platform_job = $3,
                unconfirmed = $4,
                body = CASE WHEN $3::text IS NULL THEN ''::bytea ELSE body END,
                attempts = attempts + 1,
                first_attempt_at = coalesce(first_attempt_at, {NOW}),
                last_attempt_at = {NOW}
            WHERE e.seq = ANY(ARRAY(SELECT seq FROM dequeued))
            RETURNING e.seq
            """,
            seqs,
            claim,
            platform_job,
            unconfirmed,
        )
    ]
    if platform_job is not None and done:
        await conn.execute(
            "INSERT INTO platform_jobs (id, sent_at, state, followed_by, follow_until, "
            f"seqs) VALUES ($1, {NOW}, 'waiting', $2, {NOW} + $3, $4) "
            "ON CONFLICT (id) DO UPDATE SET seqs = platform_jobs.seqs || excluded.seqs",
            platform_job,
            follower,
            lease_s,
            done,
        )
    return len(done)


async def prune(conn: asyncpg.Connection, after: int, dedupe_window_s: float) -> int | None:
    """Forget delivered events older than the dedupe window: one chunk of a walk through the
    events in seq order (roughly the order they were received and delivered in), from `after`.
    The seq to go on after, or None once the walk reached events too young to be forgotten.
    (An index on delivered_at would find them at once, but would make every acknowledgement
    write a new row version elsewhere: see schema version 3.)"""
    cutoff = await conn.fetchval(f"SELECT {NOW} - $1::double precision", dedupe_window_s)
    last, scanned, youngest = await conn.fetchrow(
        """
        WITH chunk AS (
            SELECT seq, received_at, delivered_at, platform_job FROM events
            WHERE seq > $1 ORDER BY seq LIMIT $2
        ), gone AS (
            DELETE FROM events WHERE seq IN (
                SELECT seq FROM chunk WHERE delivered_at < $3 AND NOT EXISTS (
                    SELECT 1 FROM platform_jobs p
                    WHERE p.id = chunk.platform_job AND p.state != 'unconfirmed'))
        )
        SELECT max(seq), count(*), max(received_at) FROM chunk
        """,
        after,
        PRUNE_CHUNK,
        cutoff,
    )
    await conn.execute("DELETE FROM jobs WHERE created_at < $1", cutoff)
    await conn.execute(
        "DELETE FROM platform_jobs WHERE state = 'unconfirmed' AND sent_at < $1", cutoff
    )
    return None if scanned < PRUNE_CHUNK or youngest >= cutoff else int(last)


async def record_failure(conn: asyncpg.Connection, claim: str, seqs: list[int], error: str) -> int:
    """A failed attempt of events held by this claim, which gives them back; how many."""
    status = await conn.execute(
        f"""
        WITH released AS (
            UPDATE queue SET claimed_by = NULL, claim_until = NULL
            WHERE seq = ANY($1::bigint[]) AND claimed_by = $2
            RETURNING seq
        )
        UPDATE events e SET attempts = attempts + 1,
            first_attempt_at = coalesce(first_attempt_at, {NOW}),
            last_attempt_at = {NOW}, last_error = $3
        WHERE e.seq = ANY(ARRAY(SELECT seq FROM released))
        """,
        seqs,
        claim,
        error[:1024],
    )
    return _count(status)


async def move_to_dead_letters(
    conn: asyncpg.Connection,
    seqs: Sequence[int],
    reason: str,
    status: int | None,
    response: str,
    claim: str | None,
) -> int:
    """Move these events (held by `claim`, when given) to the dead letters; the count."""
    moved = await conn.fetchval(
        """
        WITH dequeued AS (
            DELETE FROM queue WHERE seq = ANY($1::bigint[])
                AND ($6::text IS NULL OR claimed_by = $6)
            RETURNING seq
        ), gone AS (
            DELETE FROM events WHERE seq = ANY($1::bigint[])
                AND ($6::text IS NULL OR seq IN (SELECT seq FROM dequeued))
            RETURNING seq, id, body, received_at, attempts, first_attempt_at, sensor, sender
        ), dead AS (
            INSERT INTO dead_letters (id, body, received_at, reason, status, response,
                attempts, first_attempt_at, last_attempt_at, dead_lettered_at, sensor,
                sender)
            SELECT id, body, received_at, $2, $3, $4, attempts + 1,
                coalesce(first_attempt_at, $5), $5, $5, sensor, sender
            FROM gone ORDER BY seq
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
        time.time(),
        claim,
    )
    return int(moved)


async def take_dead_letters(
    conn: asyncpg.Connection, ids: list[str] | None, limit: int, replay: bool
) -> int:
    """Delete up to `limit` of the selected dead letters (all when `ids` is None), stored again
    as waiting events first when `replay`; how many."""
    chunk = [
        r["seq"]
        for r in await conn.fetch(
            "SELECT seq FROM dead_letters WHERE $1::text[] IS NULL OR id = ANY($1) "
            "ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED",
            ids,
            limit,
        )
    ]
    if chunk and replay:
        await conn.execute(
            f"""
            WITH stored AS (
                INSERT INTO events (id, body, size, received_at, sensor, sender)
                SELECT id, body, length(body), received_at, sensor, sender
                FROM dead_letters
                WHERE seq = ANY($1::bigint[]) ORDER BY seq
                ON CONFLICT (id) DO UPDATE SET {_STORED_ANEW}
                RETURNING seq
            )
            INSERT INTO queue (seq) SELECT seq FROM stored ON CONFLICT DO NOTHING
            """,
            chunk,
        )
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    await conn.execute("DELETE FROM dead_letters WHERE seq = ANY($1::bigint[])", chunk)
    return len(chunk)


async def job_ids_sent_in(conn: asyncpg.Connection, job: str) -> list[str]:
    rows = await conn.fetch(
        f"SELECT id FROM events WHERE seq = ANY({_JOB_SEQS}) AND platform_job = $1 "
        "AND confirmed_at IS NULL ORDER BY seq",
        job,
    )
    return [str(r["id"]) for r in rows]


async def finish_platform_job(
    conn: asyncpg.Connection, job: str, outcome: PlatformJobOutcome, now: float
) -> int:
    """A finished platform job: its processed events confirmed, its failing ones dead-lettered,
    the others queued again; the job forgotten. How many were dead-lettered."""
    rows = await conn.fetch(
        f"SELECT seq, id FROM events WHERE seq = ANY({_JOB_SEQS}) AND platform_job = $1 "
        "AND confirmed_at IS NULL FOR UPDATE",
        job,
    )
    split = outcome.split([(r["seq"], r["id"]) for r in rows])
    if split.confirmed:
        await conn.executemany(
            "UPDATE events SET platform_id = $2, confirmed_at = $3, body = ''::bytea "
            "WHERE seq = $1",
            [(seq, platform_id, now) for seq, platform_id in split.confirmed],
        )
    if split.failing:
        await move_to_dead_letters(
            conn, split.failing, DeadLetterReason.PLATFORM_FAILED, None, outcome.reason, None
        )
    if split.again:
        await conn.execute(
            """
            WITH again AS (
                UPDATE events SET delivered_at = NULL, platform_job = NULL
                WHERE seq = ANY($1::bigint[]) RETURNING seq
            )
            INSERT INTO queue (seq) SELECT seq FROM again ON CONFLICT DO NOTHING
            """,
            split.again,
        )
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
    await conn.execute("DELETE FROM platform_jobs WHERE id = $1", job)
    return len(split.failing)


def _count(status: str) -> int:
    """The row count of a command status such as 'UPDATE 3'."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0
