"""The PostgreSQL outbox's write transactions, each on a connection inside the transaction
that `PostgresStorage` opens around it: storage.py decides when they run (group commits,
leases, the reserve on a full disk); this says what they change. The SQLite outbox's
counterpart is sqlite/writes.py.
"""

from __future__ import annotations

import json
import uuid
from collections.abc import Mapping, Sequence
from typing import Any, Final

import asyncpg

from caliper_sidecar.config import UPSTREAM
from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox.postgres.bodies import Partitions
from caliper_sidecar.outbox.postgres.room import Footprint, keep_reserve
from caliper_sidecar.outbox.postgres.schema import INGEST_LOCK, POSITIONS_LOCK, RECONCILING
from caliper_sidecar.outbox.records import (
    PRUNE_CHUNK,
    Append,
    AppendResult,
    DestinationPlan,
    Mark,
    PlatformJobOutcome,
    Replay,
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
#: the lowest position of the destinations (kept_from()), the largest seq without any
_KEPT_FROM: Final = "coalesce((SELECT kept_from()), 9223372036854775807)"
#: a dead letter that is there already (the same event, the same destination) is replaced
_DEAD_AGAIN: Final = """
    ON CONFLICT (id, destination) DO UPDATE SET body = excluded.body, reason = excluded.reason,
        sensor = excluded.sensor, sender = excluded.sender,
        status = excluded.status, response = excluded.response,
        attempts = excluded.attempts, last_attempt_at = excluded.last_attempt_at,
        dead_lettered_at = excluded.dead_lettered_at"""
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
    per append (all of it or none), the destinations that do not block made to shed what
    would lag beyond the limits, one insert."""
    all_ids = [e.id for events, _ in group for e in events]
    # One round trip for the clock, the reserve, the totals, the seqs drawn so far and what
    # waits for the destinations.
    now, reserve_whole, depth, size, last_seq, blocking, lagging = await conn.fetchrow(
        f"SELECT {NOW}, EXISTS (SELECT 1 FROM reserve), "
        "(SELECT sum(events) FROM totals), (SELECT sum(bytes) FROM totals), "
        "(SELECT last_value FROM events_seq_seq), "
        "(SELECT max(waiting) FROM destination_waiting WHERE blocks), "
        "(SELECT array_agg((name, waiting)) FROM destination_waiting WHERE NOT blocks)"
    )
    partitions.stored(int(last_seq))
    if not reserve_whole:
        await keep_reserve(conn)
    # Known: waiting, dead-lettered, or delivered within the window; one delivered before it
    # and not yet pruned is stale: stored anew, unless a destination still needs its row (it
    # is still in the outbox: known).
    found = await conn.fetch(
        f"""
        SELECT e.id, e.seq < {_KEPT_FROM} AND EXISTS (
            SELECT 1 FROM sent s WHERE {IN_SENT} AND s.delivered_at < $2) AS stale
        FROM events e WHERE e.id = ANY($1::text[])
        UNION ALL SELECT id, false FROM dead_letters WHERE id = ANY($1::text[])
        """,
        all_ids,
        now - dedupe_window_s,
    )
    known = {r["id"] for r in found if not r["stale"]}
    # The events a blocking destination waits for fill the outbox as [upstream]'s do; the two
    # are mostly the same events, so the larger count is what the outbox holds. (By count
    # only: what a destination waits for weighs in bytes as far as [upstream]'s waiting
    # events and the footprint of the tables show it, since the bytes of each destination's
    # own backlog would take a scan of its bodies.)
    depth = max(int(depth or 0), int(blocking or 0))
    size = max(int(size or 0), await footprint.read(conn))
    fresh_by_append = new_per_append(
        [events for events, _ in group], known, depth, size, max_events, max_bytes
    )
    rows = [e for f in fresh_by_append if isinstance(f, list) for e in f]
    for name, waiting in lagging or ():
        if (excess := int(waiting) + len(rows) - max_events) > 0:
            await shed(conn, name, excess, max_events)
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
    only_for: list[str | None] | None = None,
) -> list[asyncpg.Record]:
    """Store new events (an id stored already stays as it is: a row another replica committed
    meanwhile); their (seq, id). Under INGEST_LOCK until the transaction ends: events commit in
    the order of their seqs, so a claim from `head` never passes one that commits later. The
    bodies' partitions must exist (see postgres_bodies). `only_for`: the one queue each is
    for (None: every queue)."""
    # The lock is taken before the first row's seq is drawn: its CTE is joined into every row.
    rows: list[asyncpg.Record] = await conn.fetch(
        f"""
        WITH serial AS (SELECT pg_advisory_xact_lock({INGEST_LOCK})),
        stored AS (
            INSERT INTO events (id, size, received_at, sensor, sender, only_for)
            SELECT id, length(body), coalesce(received_at, {NOW}), sensor, sender, only_for
            FROM unnest($1::text[], $2::bytea[], $3::text[], $4::text[],
                $5::double precision[], $6::text[])
                AS t(id, body, sensor, sender, received_at, only_for), serial
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
        only_for if only_for is not None else [None] * len(ids),
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
        *_by_owner([seqs for _, seqs, _, _ in acks]),
        [job for _, _, job, _ in acks],
        [why for _, _, _, why in acks],
        follower,
        lease_s,
    )
    return recorded


async def record_destination_acks(
    conn: asyncpg.Connection, name: str, acks: Sequence[tuple[str, Sequence[int]]]
) -> list[int]:
    """Events a destination took, each (claim, seqs), in one statement (schema version 5's
    destination_acknowledge); how many of each were recorded."""
    recorded: list[int] = await conn.fetchval(
        "SELECT destination_acknowledge($1, $2, $3, $4)",
        name,
        [claim for claim, _ in acks],
        *_by_owner([seqs for _, seqs in acks]),
    )
    return recorded


def _by_owner(groups: Sequence[Sequence[int]]) -> tuple[list[int], list[int]]:
    """Seqs of several acknowledgements as two arrays: every seq, and the (1-based) number
    of the acknowledgement it belongs to."""
    return [seq for seqs in groups for seq in seqs], [
        i for i, seqs in enumerate(groups, 1) for _ in seqs
    ]


async def hold_positions(conn: asyncpg.Connection, exclusive: bool = False) -> None:
    """Until the transaction ends, no position is lowered (shared: before deleting rows or
    bodies below the lowest position, read in a later statement) or nothing deletes below it
    (exclusive: lowering one, a dead letter replayed in place)."""
    take = "pg_advisory_xact_lock" if exclusive else "pg_advisory_xact_lock_shared"
    await conn.execute(f"SELECT {take}($1)", POSITIONS_LOCK)


async def prune(conn: asyncpg.Connection, dedupe_window_s: float) -> bool:
    """Forget sent rows older than the dedupe window, and their events (not those of a
    platform job still followed, nor those a destination has not passed, nor, where
    reconciliation is on, those still to be checked), about PRUNE_CHUNK
    events at a time (a sent row holds a batch), and events [upstream] dead-lettered that
    every destination has passed; True when more are left."""
    await hold_positions(conn)
    cutoff = await conn.fetchval(f"SELECT {NOW} - $1::double precision", dedupe_window_s)
    old = await conn.fetch(
        f"""
        SELECT id, seqs FROM sent s WHERE delivered_at < $1 AND NOT EXISTS (
            SELECT 1 FROM platform_jobs p
            WHERE p.id = s.platform_job AND p.state != 'unconfirmed')
            AND upper(s.span) <= {_KEPT_FROM}
            AND (s.checked_at IS NOT NULL OR NOT {RECONCILING})
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
    passed = await conn.execute(
        f"""
        DELETE FROM events WHERE seq IN (
            SELECT seq FROM events WHERE upstream_dead AND seq < {_KEPT_FROM}
            ORDER BY seq LIMIT $1)
        """,
        PRUNE_CHUNK,
    )
    await conn.execute("DELETE FROM jobs WHERE created_at < $1", cutoff)
    await conn.execute(
        "DELETE FROM platform_jobs WHERE state = 'unconfirmed' AND sent_at < $1", cutoff
    )
    return len(old) >= _PRUNE_SENT_ROWS or int(passed.split()[-1]) >= PRUNE_CHUNK


async def record_failure(
    conn: asyncpg.Connection,
    claim: str,
    seqs: list[int],
    error: str,
    destination: str | None = None,
) -> int:
    """A failed attempt of events held by this claim (of [upstream], or of a destination),
    which gives them back; how many."""
    return int(
        await conn.fetchval(
            "SELECT give_back($1, $2, $3, $4)", claim, seqs, error[:1024], destination
        )
    )


async def release(
    conn: asyncpg.Connection, claim: str, seqs: list[int], destination: str | None = None
) -> int:
    """Events of this claim given back untried; how many."""
    return int(await conn.fetchval("SELECT give_back($1, $2, NULL, $3)", claim, seqs, destination))


async def move_to_dead_letters(
    conn: asyncpg.Connection,
    seqs: Sequence[int],
    reason: str,
    status: int | None,
    response: str,
    claim: str | None,
) -> int:
    """Move these events (held by `claim`, when given) to [upstream]'s dead letters; the
    count. One a destination still needs keeps its row, out of [upstream]'s queue
    (`upstream_dead`), until pruning finds every destination past it."""
    if claim is not None:
        seqs = await conn.fetchval("SELECT take_from_claim($1, $2::bigint[])", claim, list(seqs))
    await hold_positions(conn)
    moved, kept, kept_bytes = await conn.fetchrow(
        f"""
        WITH t AS (SELECT {NOW} AS now, {_KEPT_FROM} AS kept_from), gone AS (
            DELETE FROM events e USING t WHERE e.seq = ANY($1::bigint[]) AND e.seq < t.kept_from
            RETURNING e.seq, e.id, e.received_at, e.attempts, e.first_attempt_at, e.sensor,
                e.sender
        ), kept AS (
            UPDATE events e SET upstream_dead = true FROM t
            WHERE e.seq = ANY($1::bigint[]) AND e.seq >= t.kept_from
            RETURNING e.seq, e.id, e.received_at, e.attempts, e.first_attempt_at, e.sensor,
                e.sender, e.size, EXISTS (SELECT 1 FROM sent s WHERE {IN_SENT}) AS delivered
        ), dead AS (
            INSERT INTO dead_letters (id, body, received_at, reason, status, response,
                attempts, first_attempt_at, last_attempt_at, dead_lettered_at, sensor,
                sender)
            SELECT id, coalesce(b.body, ''::bytea), received_at, $2, $3, $4, attempts + 1,
                coalesce(first_attempt_at, t.now), t.now, t.now, sensor, sender
            FROM (
                SELECT seq, id, received_at, attempts, first_attempt_at, sensor, sender
                FROM gone
                UNION ALL
                SELECT seq, id, received_at, attempts, first_attempt_at, sensor, sender
                FROM kept
            ) d LEFT JOIN bodies b USING (seq), t ORDER BY seq
            {_DEAD_AGAIN}
            RETURNING 1
        )
        SELECT (SELECT count(*) FROM dead), (SELECT count(*) FROM kept WHERE NOT delivered),
            (SELECT coalesce(sum(size), 0) FROM kept WHERE NOT delivered)
        """,
        list(seqs),
        reason,
        status,
        response[:1024],
    )
    if kept:  # (a row deleted is counted by its trigger; one kept stopped waiting too)
        await conn.execute("SELECT count_change($1, $2, 0, 0, 0)", -kept, -kept_bytes)
    return int(moved)


async def destination_dead_letters(
    conn: asyncpg.Connection,
    name: str,
    seqs: Sequence[int],
    reason: str,
    status: int | None,
    response: str,
    claim: str | None,
) -> int:
    """Dead-letter these events (held by `claim`, when given) for one destination alone:
    done there, rows and bodies left to the others; the count. The attempt that decided it
    is counted when there was one (`claim`: not when shed for lagging)."""
    if claim is not None:
        seqs = await conn.fetchval(
            "SELECT take_from_claim($1, $2::bigint[], $3)", claim, list(seqs), name
        )
    moved = await conn.fetchval(
        f"""
        WITH t AS (SELECT {NOW} AS now), dead AS (
            INSERT INTO dead_letters (id, body, received_at, reason, status, response,
                attempts, first_attempt_at, last_attempt_at, dead_lettered_at, sensor,
                sender, destination)
            SELECT e.id, coalesce(b.body, ''::bytea), e.received_at, $3, $4, $5,
                coalesce(a.attempts, 0) + $6::boolean::integer,
                CASE WHEN $6 THEN coalesce(a.first_attempt_at, t.now) ELSE a.first_attempt_at END,
                CASE WHEN $6 THEN t.now ELSE a.last_attempt_at END, t.now, e.sensor, e.sender, $2
            FROM events e LEFT JOIN bodies b ON b.seq = e.seq
            LEFT JOIN destination_attempts a ON a.destination = $2 AND a.seq = e.seq, t
            WHERE e.seq = ANY($1::bigint[]) ORDER BY e.seq
            {_DEAD_AGAIN}
            RETURNING 1
        ), tried AS (
            DELETE FROM destination_attempts WHERE destination = $2 AND seq = ANY($1::bigint[])
        )
        SELECT count(*) FROM dead
        """,
        list(seqs),
        name,
        reason,
        status,
        response[:1024],
        claim is not None,
    )
    return int(moved)


async def shed(conn: asyncpg.Connection, name: str, count: int, max_events: int) -> int:
    """Dead-letter the `count` oldest events waiting for a destination that does not block
    (destination_lagging), so that it never holds more than `max_events`: ingest goes on,
    and the others keep their places. The oldest of those given back (after a failure, or
    a lease that expired) and of those never claimed; what is in flight stays. How many."""
    # The ingest lock first, as set_destinations takes it, then the destination's row.
    await conn.execute("SELECT pg_advisory_xact_lock($1)", INGEST_LOCK)
    await conn.execute("SELECT 1 FROM destinations WHERE name = $1 FOR UPDATE", name)
    # The leases given back are held by this shedding for a moment (what a claim is taking
    # now is passed over): take_from_claim then takes the oldest out of them.
    holder = f"shed:{uuid.uuid4().hex}"
    await conn.execute(
        f"""
        UPDATE destination_batches SET claimed_by = $2 WHERE id IN (
            SELECT id FROM destination_batches
            WHERE destination = $1 AND (claimed_by IS NULL OR claim_until < {NOW})
            FOR UPDATE SKIP LOCKED)
        """,
        name,
        holder,
    )
    oldest, last_ahead = await conn.fetchrow(
        """
        WITH ahead AS (
            SELECT e.seq AS s FROM events e, destinations d
            WHERE d.name = $1 AND e.seq >= d.next AND (e.only_for IS NULL OR e.only_for = $1)
            ORDER BY e.seq LIMIT $3
        ), oldest AS (
            SELECT s FROM (
                SELECT unnest(seqs) AS s FROM destination_batches WHERE claimed_by = $2
                UNION SELECT s FROM ahead
            ) c ORDER BY s LIMIT $3
        )
        SELECT coalesce(array_agg(s ORDER BY s), '{}'),
            max(s) FILTER (WHERE s IN (SELECT s FROM ahead))
        FROM oldest
        """,
        name,
        holder,
        count,
    )
    await conn.execute("SELECT take_from_claim($1, $2::bigint[], $3)", holder, oldest, name)
    await conn.execute(
        "UPDATE destination_batches SET claimed_by = NULL, claim_until = NULL "
        "WHERE claimed_by = $1",
        holder,
    )
    if last_ahead is not None:
        await conn.execute(
            "UPDATE destinations SET next = $2 WHERE name = $1", name, last_ahead + 1
        )
    if not oldest:
        return 0
    return await destination_dead_letters(
        conn,
        name,
        oldest,
        DeadLetterReason.DESTINATION_LAGGING,
        None,
        f"more than {max_events} events waited for this destination",
        None,
    )


async def set_destinations(conn: asyncpg.Connection, plans: Sequence[DestinationPlan]) -> None:
    """The destinations' state as configured: a new one starts after the newest event, a
    known one keeps its place, one no longer configured is forgotten (its dead letters
    stay). Idempotent: every replica does it at start, alike."""
    # Under the ingest lock every seq drawn has committed (or never will): the newest is
    # exact, and a destination that starts after it gets every event from then on.
    await conn.execute("SELECT pg_advisory_xact_lock($1)", INGEST_LOCK)
    names = [plan.name for plan in plans]
    for table, column in (
        ("destination_batches", "destination"),
        ("destination_attempts", "destination"),
        ("destinations", "name"),
    ):
        await conn.execute(f"DELETE FROM {table} WHERE {column} <> ALL($1::text[])", names)
    await conn.execute(
        """
        INSERT INTO destinations (name, next, blocks, dead_letters)
        SELECT p.name, newest_seq() + 1, p.blocks,
            (SELECT count(*) FROM dead_letters d WHERE d.destination = p.name)
        FROM unnest($1::text[], $2::boolean[]) AS p(name, blocks)
        ON CONFLICT (name) DO UPDATE SET blocks = excluded.blocks
        """,
        names,
        [plan.blocks for plan in plans],
    )


#: the dead letters chosen ($1 ids, all when NULL; $2 of one destination, all when NULL):
#: when replayed ($3), only those with a queue to go back to
_CHOSEN: Final = """
    ($1::text[] IS NULL OR id = ANY($1)) AND ($2::text IS NULL OR destination = $2)
    AND (NOT $3 OR destination = 'upstream' OR destination IN (SELECT name FROM destinations))
"""


async def take_dead_letters(
    conn: asyncpg.Connection,
    ids: list[str] | None,
    limit: int,
    replay: bool,
    destination: str | None,
) -> int:
    """Delete up to `limit` of the selected dead letters (all when `ids` is None; of one
    destination, or of all), each queued again for its own destination first when `replay`
    (see `requeue`); how many."""
    chunk = await conn.fetch(
        "SELECT seq, id, destination, body, received_at, sensor, sender FROM dead_letters "
        f"WHERE {_CHOSEN} ORDER BY seq LIMIT $4 FOR UPDATE SKIP LOCKED",
        ids,
        destination,
        replay,
        limit,
    )
    if chunk and replay:
        await requeue(conn, [dict(r) for r in chunk])
    await conn.execute(
        "DELETE FROM dead_letters WHERE seq = ANY($1::bigint[])", [r["seq"] for r in chunk]
    )
    return len(chunk)


async def rows_to_replay(
    conn: asyncpg.Connection, ids: list[str] | None, limit: int, destination: str | None
) -> list[int]:
    """The seqs of the rows the next chunk of dead letters to replay still has (their
    bodies' partitions must exist before they are queued again in place)."""
    rows = await conn.fetch(
        "SELECT e.seq FROM events e WHERE e.id IN (SELECT id FROM dead_letters "
        f"WHERE {_CHOSEN} ORDER BY seq LIMIT $4)",
        ids,
        destination,
        True,
        limit,
    )
    return [int(r["seq"]) for r in rows]


async def replay(conn: asyncpg.Connection, events: Sequence[Replay], mark: str) -> None:
    """Events queued again, each for its queues (`requeue`, delivered ones included): a dead
    letter of it there is taken (it is on its way again), and it is marked `mark` there."""
    letters: list[dict[str, Any]] = [
        {
            "id": e.id,
            "destination": queue,
            "body": e.body,
            "received_at": e.received_at,
            "sensor": e.sensor,
            "sender": e.sender,
        }
        for e in events
        for queue in dict.fromkeys(e.queues)
    ]
    await requeue(conn, letters, again=True)
    ids: list[str] = [r["id"] for r in letters]
    queues: list[str] = [r["destination"] for r in letters]
    await conn.execute(
        "DELETE FROM dead_letters d USING unnest($1::text[], $2::text[]) AS r(id, destination) "
        "WHERE d.id = r.id AND d.destination = r.destination",
        ids,
        queues,
    )
    await add_marks(conn, [Mark(i, mark, q) for i, q in zip(ids, queues, strict=True)])


async def add_marks(conn: asyncpg.Connection, marks: Sequence[Mark]) -> None:
    await conn.execute(
        f"INSERT INTO marks (id, at, what, destination, detail) SELECT id, {NOW}, what, "
        "destination, detail FROM unnest($1::text[], $2::text[], $3::text[], $4::text[]) "
        "AS m(id, what, destination, detail)",
        [m.id for m in marks],
        [str(m.what) for m in marks],
        [m.destination for m in marks],
        [m.detail for m in marks],
    )


async def rows_of(conn: asyncpg.Connection, ids: list[str]) -> list[int]:
    """The seqs of the rows these events still have (their bodies' partitions must exist
    before they are queued again in place)."""
    rows = await conn.fetch("SELECT seq FROM events WHERE id = ANY($1::text[])", ids)
    return [int(r["seq"]) for r in rows]


async def requeue(
    conn: asyncpg.Connection, letters: Sequence[Mapping[str, Any]], again: bool = False
) -> None:
    """Queue events again, each letter (id, destination, body, received_at, sensor, sender)
    for its destination only, id unchanged: dead letters, or events replayed from an
    archive. An event whose row is gone is stored anew for that queue alone (`_store_gone`);
    one whose row is still there goes back in place, its body stored again if it was dropped
    (its partition must exist). A queue that will not come to the row through its head
    (passed it, or the row is another queue's alone) gets a lease given back on it, which
    lowers its position; [upstream] takes a row stored for a destination alone for its own
    (the destination then gets a lease if it still needs it), and counts it as waiting
    again. With `again`, an event [upstream] delivered goes back to it too (out of its sent
    row, no longer counted delivered); one still on its way to a queue is left as it is."""
    await hold_positions(conn, exclusive=True)
    rows = {
        r["id"]: dict(r)
        for r in await conn.fetch(
            "SELECT e.id, e.seq, e.upstream_dead, e.only_for, "
            "EXISTS (SELECT 1 FROM bodies b WHERE b.seq = e.seq) AS has_body, "
            f"EXISTS (SELECT 1 FROM sent s WHERE {IN_SENT}) AS delivered "
            "FROM events e WHERE e.id = ANY($1::text[]) FOR UPDATE",
            [r["id"] for r in letters],
        )
    }
    places = await _Places.of(conn, [r["seq"] for r in rows.values()])
    stored = await _store_gone(conn, letters, rows, len(places.heads) > 1)
    leases: dict[str, set[int]] = {}
    upstream: list[int] = []
    #: of those, the ones [upstream] had delivered (counted delivered until now)
    delivered: list[int] = []
    restored: list[tuple[int, bytes]] = []
    for letter in letters:
        row, queue = rows.get(letter["id"]), letter["destination"]
        if row is None or stored.get(letter["id"]) == queue:
            continue  # stored anew for it (or gone, stored by another meanwhile: not ours)
        if queue == UPSTREAM:
            if not row["upstream_dead"] and row["only_for"] in (None, UPSTREAM):
                if not (again and row["delivered"]):
                    continue  # on its way to [upstream] already (or, a dead letter's, sent)
                delivered.append(row["seq"])
            if row["only_for"] not in (None, UPSTREAM):
                theirs = row["only_for"]
                if places.comes(theirs, row):
                    leases.setdefault(theirs, set()).add(row["seq"])
                row["only_for"] = UPSTREAM
            upstream.append(row["seq"])
        if not places.comes(queue, row):
            leases.setdefault(queue, set()).add(row["seq"])
        if not row["has_body"]:
            restored.append((row["seq"], letter["body"]))
    if restored:
        await conn.execute(
            "INSERT INTO bodies (seq, body) SELECT * FROM unnest($1::bigint[], $2::bytea[]) "
            "ON CONFLICT (seq) DO NOTHING",
            [seq for seq, _ in restored],
            [body for _, body in restored],
        )
    if upstream:
        await _again_for_upstream(conn, sorted(upstream), delivered)
    for queue, seqs in leases.items():
        await _lease_again(conn, queue, sorted(seqs))
    if upstream or leases:
        await conn.execute("SELECT pg_notify($1, '')", CHANNEL)


class _Places:
    """Where each queue is, for the rows of some seqs: its head, and which of those seqs
    its leases hold."""

    def __init__(self, heads: dict[str, int], held: set[tuple[str, int]]) -> None:
        self.heads = heads
        self.held = held

    @classmethod
    async def of(cls, conn: asyncpg.Connection, seqs: list[int]) -> _Places:
        heads = {
            r["name"]: r["next"]
            for r in await conn.fetch(
                "SELECT 'upstream' AS name, next FROM head "
                "UNION ALL SELECT name, next FROM destinations"
            )
        }
        held = {
            (r["queue"], r["seq"])
            for r in await conn.fetch(
                """
                SELECT 'upstream' AS queue, s AS seq FROM batches, unnest(seqs) s
                WHERE s = ANY($1::bigint[])
                UNION ALL SELECT destination, s FROM destination_batches, unnest(seqs) s
                WHERE s = ANY($1::bigint[])
                """,
                seqs,
            )
        }
        return cls(heads, held)

    def comes(self, queue: str, row: dict[str, Any]) -> bool:
        """Whether the queue will still claim this row: ahead of its head and meant for it,
        or in one of its leases."""
        ahead = row["seq"] >= self.heads.get(queue, row["seq"] + 1)
        return (ahead and row["only_for"] in (None, queue)) or (queue, row["seq"]) in self.held


async def _lease_again(conn: asyncpg.Connection, queue: str, seqs: list[int]) -> None:
    """A lease given back on these seqs, for the queue to claim again, from its first
    attempt."""
    if queue == UPSTREAM:
        await conn.execute("INSERT INTO batches (lo, seqs) VALUES (($1::bigint[])[1], $1)", seqs)
        return
    await conn.execute(
        """
        WITH back AS (
            INSERT INTO destination_batches (destination, lo, seqs)
            VALUES ($1, ($2::bigint[])[1], $2)
        )
        DELETE FROM destination_attempts WHERE destination = $1 AND seq = ANY($2)
        """,
        queue,
        seqs,
    )


async def _store_gone(
    conn: asyncpg.Connection,
    letters: Sequence[Mapping[str, Any]],
    rows: dict[str, dict[str, Any]],
    destinations: bool,
) -> dict[str, str]:
    """Store anew the dead letters whose rows are gone, one row per event for one queue
    alone (every other passes it over), [upstream]'s first: another destination's dead
    letter of the same event then goes to it as a lease on that row. One stored for a
    destination is marked delivered for [upstream], which had it long ago (its row was
    pruned); without destinations, [upstream]'s is stored as before, for every queue.
    `rows` gains the rows stored; which queue each event was stored for."""
    gone: dict[str, Mapping[str, Any]] = {}
    for letter in sorted(letters, key=lambda r: r["destination"] != UPSTREAM):
        if letter["id"] not in rows:
            gone.setdefault(letter["id"], letter)
    if not gone:
        return {}
    only = [
        r["destination"] if r["destination"] != UPSTREAM or destinations else None
        for r in gone.values()
    ]
    stored = await store_events(
        conn,
        list(gone),
        [r["body"] for r in gone.values()],
        [r["sensor"] for r in gone.values()],
        [r["sender"] for r in gone.values()],
        [r["received_at"] for r in gone.values()],
        only,
    )
    delivered = sorted(r["seq"] for r in stored if gone[r["id"]]["destination"] != UPSTREAM)
    if delivered:
        await conn.execute(
            # never sent upstream: nothing for reconciliation to check
            f"INSERT INTO sent (span, seqs, delivered_at, checked_at) "
            f"VALUES (int8range(($1::bigint[])[1], $2, '[]'), $1, {NOW}, {NOW})",
            delivered,
            delivered[-1],
        )
    only_by_id = dict(zip(gone, only, strict=True))
    for r in stored:
        rows[r["id"]] = {
            "seq": r["seq"],
            "upstream_dead": None,
            "only_for": only_by_id[r["id"]],
            "has_body": True,
            "delivered": False,
        }
    return {r["id"]: gone[r["id"]]["destination"] for r in stored}


async def _again_for_upstream(
    conn: asyncpg.Connection, seqs: list[int], delivered: Sequence[int] = ()
) -> None:
    """Rows [upstream] is done with (dead-lettered and kept for the destinations, stored
    for a destination alone, or delivered: those are `delivered`) waiting for it again, from
    the first attempt: out of any sent row (a platform job's failing event, or one marked
    delivered), counted as waiting, and the delivered ones no longer as delivered."""
    await conn.execute(
        """
        WITH unsent AS (
            UPDATE sent SET seqs = ARRAY(
                SELECT q FROM unnest(seqs) q WHERE q <> ALL($1) ORDER BY q)
            WHERE span && int8range(($1::bigint[])[1], $2, '[]') AND seqs && $1
        ), again AS (
            UPDATE events SET upstream_dead = NULL, attempts = 0, first_attempt_at = NULL,
                last_attempt_at = NULL, last_error = NULL,
                only_for = CASE WHEN only_for IS NULL THEN NULL ELSE 'upstream' END
            WHERE seq = ANY($1) RETURNING size
        )
        SELECT count_change(count(*), sum(size), 0, -$3::integer, 0) FROM again
        HAVING count(*) > 0
        """,
        seqs,
        seqs[-1],
        len(delivered),
    )


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
