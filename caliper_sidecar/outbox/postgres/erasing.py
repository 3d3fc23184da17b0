"""Erasing a learner's events from the PostgreSQL outbox: found by the event's actor (or by id)
in `bodies` and `dead_letters`, deleted with their rows and what journeys are built from, in
one transaction; then the tables are rewritten (VACUUM FULL) so that no page of their files
still holds a deleted body.

A plain VACUUM would make the deleted tuples' space reusable, not overwrite it: a page keeps
their bytes until new rows happen to land there. VACUUM FULL writes each table (and its TOAST
table and indexes) into new files and unlinks the old ones; but it copies a deleted tuple that
a transaction still open may see ("recently dead"): a replica's claim that began before the
erase committed, under load, kept the dead letter's bytes in the new file one run in three. So
the rewrite first waits until no session of the database has a snapshot from before it began
(`settled`), so from before the erase. It locks one table at a time for
as long as copying it takes; the tables erase touches hold a backlog's bodies at most (the
partitions of `bodies`), and the replicas wait for the lock as for any other (their lock
timeout answers 503 rather than hang).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Final

import asyncpg

from caliper_sidecar.outbox.postgres.writes import NOW, hold_positions
from caliper_sidecar.outbox.records import ErasedRow

#: the actor of a stored body ({body}) is $1: the `actor` string, or `actor.id`
_ACTOR_IS: Final = """
    CASE jsonb_typeof(convert_from({body}, 'UTF8')::jsonb -> 'actor')
        WHEN 'string' THEN convert_from({body}, 'UTF8')::jsonb ->> 'actor'
        WHEN 'object' THEN convert_from({body}, 'UTF8')::jsonb -> 'actor' ->> 'id'
    END = $1::text
"""
#: a lease (`l`) a sender holds now: its events may be on their way
_LIVE: Final = f"l.claimed_by IS NOT NULL AND l.claim_until > {NOW}"
#: the tables erase deletes from, rewritten afterwards (`bodies` with its partitions)
#: the tables erase deletes from, itself or by the marks triggers (schema 6)
TABLES: Final = ("events", "bodies", "dead_letters", "destination_attempts", "jobs", "marks")


async def find_and_delete(
    conn: asyncpg.Connection,
    actor: str | None,
    ids: Sequence[str],
    dry_run: bool,
    destination_journeys: str,
) -> list[ErasedRow]:
    """See `Storage.erase_events`; in the caller's transaction. `destination_journeys` is
    the storage's query of (id, destination, state, attempts, last_error) by ids ($1)."""
    # Exclusive: no dead letter is replayed in place (its body restored) and nothing is
    # pruned while these rows go.
    await hold_positions(conn, exclusive=True)
    # A CASE, so that a pass by id alone ($1 NULL) reads no body.
    by_actor = f"CASE WHEN $1::text IS NULL THEN false ELSE {_ACTOR_IS.format(body='b.body')} END"
    events = await conn.fetch(
        f"""
        SELECT e.seq, e.id, e.upstream_dead, e.only_for,
            e.seq >= (SELECT next FROM head)
                OR EXISTS (SELECT 1 FROM batches l WHERE e.seq = ANY(l.seqs)) AS waiting,
            EXISTS (SELECT 1 FROM batches l WHERE e.seq = ANY(l.seqs) AND {_LIVE}) AS claimed
        FROM events e LEFT JOIN bodies b ON b.seq = e.seq
        WHERE (b.body IS NOT NULL AND {by_actor}) OR e.id = ANY($2::text[])
        ORDER BY e.seq FOR UPDATE OF e
        """,
        actor,
        list(ids),
    )
    found = [str(r["id"]) for r in events]
    dead = await conn.fetch(
        f"""
        SELECT seq, id, destination FROM dead_letters b
        WHERE {by_actor} OR id = ANY($2::text[]) OR id = ANY($3::text[])
        ORDER BY seq FOR UPDATE
        """,
        actor,
        list(ids),
        found,
    )
    rows: list[ErasedRow] = [
        (str(r["id"]), "dead_letter", str(r["destination"]), "dead_lettered") for r in dead
    ]
    dead_at = {(str(r["id"]), str(r["destination"])) for r in dead}
    for r in events:
        if r["only_for"] is not None and r["only_for"] != "upstream":
            continue  # stored again for one destination alone: never [upstream]'s
        state = "in_flight" if r["claimed"] else "waiting" if r["waiting"] else "delivered"
        if r["upstream_dead"]:
            state = "dead_lettered"
        rows.append((str(r["id"]), "event", "upstream", state))
    claimed = {
        (str(r["id"]), str(r["destination"]))
        for r in await conn.fetch(
            f"""
            SELECT e.id, l.destination FROM events e JOIN destination_batches l
                ON e.seq = ANY(l.seqs) AND {_LIVE}
            WHERE e.id = ANY($1::text[])
            """,
            found,
        )
    }
    for id_, name, state, *_ in await conn.fetch(destination_journeys, found):
        # A destination's dead letter is "done" there, as a delivery is: told apart here.
        done = "dead_lettered" if (id_, name) in dead_at else "delivered"
        if state == "waiting":
            done = "in_flight" if (id_, name) in claimed else "waiting"
        rows.append((str(id_), "event", str(name), done))
    if dry_run:
        return rows
    seqs = [int(r["seq"]) for r in events]
    # A body may outlive its event's row: one dead-lettered leaves `events` at once, its body
    # stays until its partition goes. Those are found by actor alone.
    await conn.execute(
        f"DELETE FROM bodies b WHERE b.seq = ANY($2::bigint[]) OR {by_actor}", actor, seqs
    )
    await conn.execute("DELETE FROM destination_attempts WHERE seq = ANY($1::bigint[])", seqs)
    # A lease (batches) that holds one of these seqs keeps it: a claim skips seqs whose
    # event is gone, and a sequence never draws a seq twice.
    await conn.execute("DELETE FROM events WHERE seq = ANY($1::bigint[])", seqs)
    await conn.execute(
        "DELETE FROM dead_letters WHERE seq = ANY($1::bigint[])", [int(r["seq"]) for r in dead]
    )
    await _drop_from_jobs(conn, sorted({r[0] for r in rows}))
    return rows


async def _drop_from_jobs(conn: asyncpg.Connection, ids: list[str]) -> None:
    """Take these ids out of the lists of event ids kept for an app's job ids."""
    await conn.execute(
        """
        UPDATE jobs SET event_ids = (
            SELECT coalesce(jsonb_agg(v ORDER BY n), '[]'::jsonb)::text
            FROM jsonb_array_elements_text(event_ids::jsonb) WITH ORDINALITY AS x(v, n)
            WHERE v <> ALL($1::text[])
        )
        WHERE event_ids::jsonb ?| $1::text[]
        """,
        ids,
    )


async def horizon(conn: asyncpg.Connection) -> int:
    """The first transaction id not yet given out, now, as a 32-bit `xid` (what
    `pg_stat_activity` shows): every transaction that committed before (an erase) is below."""
    return int(
        await conn.fetchval(
            "SELECT pg_snapshot_xmax(pg_current_snapshot())::text::bigint % 4294967296"
        )
    )


async def settled(conn: asyncpg.Connection, since: int) -> bool:
    """Whether no other session of this database holds a snapshot, or runs a transaction,
    from before `since` (a `horizon`): the rows deleted before it are then dead to all, and
    VACUUM FULL leaves them out. Every kind of session counts, autovacuum's too: one
    analyzing a table holds a snapshot as a client does (with clients alone, the dead letter
    of the end-to-end test was still copied one run in twenty)."""
    return bool(
        await conn.fetchval(
            """
            SELECT NOT EXISTS (
                SELECT 1 FROM pg_stat_activity
                WHERE datname = current_database() AND pid <> pg_backend_pid()
                    AND (age(backend_xmin) > age($1::xid) OR age(backend_xid) > age($1::xid))
            )
            """,
            since,
        )
    )


async def compact(conn: asyncpg.Connection) -> None:
    """VACUUM FULL the tables erase deletes from, one at a time (outside a transaction, as
    VACUUM must be); a partitioned table's partitions are each rewritten."""
    for table in TABLES:
        await conn.execute(f"VACUUM (FULL) {table}")
