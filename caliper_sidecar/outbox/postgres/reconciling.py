"""Reconciliation's reads and writes in the PostgreSQL outbox: the events of sent rows a check
may take, and what a check found, as marks (schema 6), closing the sent rows it is done with
(`checked_at`, schema 7).

A sent row born while reconciliation is on waits for its check: it, its events and their
bodies stay (bodies.horizon, writes.prune) until every one of its events was verified, given
up on, or found missing (and so sent again: in a sent row of its own, which waits in turn).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Final

import asyncpg

from caliper_sidecar.outbox.postgres.writes import NOW, add_marks
from caliper_sidecar.outbox.records import Mark
from caliper_sidecar.states import JourneyMark

#: a mark of [upstream] for event e, set by a check of sent row s (made after its delivery)
_CHECK_OF_ROW: Final = """
    SELECT 1 FROM marks m WHERE m.id = e.id AND m.destination = 'upstream'
        AND m.what IN ('verified', 'given_up', 'missing') AND m.at >= s.delivered_at
"""

#: events of sent rows delivered upstream $1 s ago or more (and confirmed, or given up on being
#: confirmed, where the platform confirms), seq after $3, whose bodies are kept; with $2 only
#: those still awaiting their check; each once (its latest delivery), with how long ago a check
#: first found it missing
_DELIVERED: Final = f"""
    SELECT DISTINCT ON (u.seq) u.seq, e.id, b.body, e.sensor,
        {NOW} - (SELECT min(m.at) FROM marks m WHERE m.id = e.id
                 AND m.destination = 'upstream' AND m.what = 'missing') AS missing_for
    FROM sent s CROSS JOIN LATERAL unnest(s.seqs) AS u(seq)
        JOIN events e ON e.seq = u.seq
        JOIN bodies b ON b.seq = u.seq
    WHERE s.delivered_at <= {NOW} - $1::double precision
        AND (s.platform_job IS NULL OR s.confirmed_at IS NOT NULL OR s.unconfirmed IS NOT NULL)
        AND u.seq > $3
        AND (NOT $2 OR (s.checked_at IS NULL AND NOT EXISTS ({_CHECK_OF_ROW})))
    ORDER BY u.seq, s.delivered_at DESC
    LIMIT $4
"""

#: sent rows holding any of these events ($1) whose every event a check has now done with
_CLOSE: Final = f"""
    UPDATE sent s SET checked_at = {NOW}
    WHERE s.checked_at IS NULL
        AND s.seqs && (SELECT array_agg(seq) FROM events WHERE id = ANY($1::text[]))
        AND NOT EXISTS (
            SELECT 1 FROM unnest(s.seqs) AS u(seq) JOIN events e ON e.seq = u.seq
            WHERE NOT EXISTS ({_CHECK_OF_ROW}))
"""


async def delivered_rows(
    conn: asyncpg.Connection,
    older_than_s: float,
    unchecked_only: bool,
    limit: int,
    after_seq: int,
) -> list[Any]:
    return list(await conn.fetch(_DELIVERED, older_than_s, unchecked_only, after_seq, limit))


async def checked(
    conn: asyncpg.Connection,
    held: Sequence[str],
    missing: Sequence[str],
    given_up: Sequence[str],
) -> None:
    """Mark what a check found and close the sent rows it is done with (in the caller's
    transaction)."""
    found = (
        (JourneyMark.VERIFIED, held),
        (JourneyMark.MISSING, missing),
        (JourneyMark.GIVEN_UP, given_up),
    )
    await add_marks(conn, [Mark(i, what, "upstream") for what, ids in found for i in ids])
    await conn.execute(_CLOSE, [*held, *missing, *given_up])


#: the turn to reconcile ($1 the replica, $2 how long): taken when no replica holds it or its
#: holder's ran out, renewed by its holder; a row when it is $1's now
_TAKE_TURN: Final = f"""
    INSERT INTO reconcile_turn AS t (one, replica, until) VALUES (1, $1, {NOW} + $2)
    ON CONFLICT (one) DO UPDATE SET replica = $1, until = {NOW} + $2
        WHERE t.replica = $1 OR t.until < {NOW}
    RETURNING replica
"""


async def take_turn(conn: asyncpg.Connection, replica: str, turn_s: float) -> bool:
    """Whether reconciliation's next round is this replica's (Storage.reconcile_turn)."""
    return await conn.fetchval(_TAKE_TURN, replica, turn_s) is not None


async def give_back_turn(conn: asyncpg.Connection, replica: str) -> None:
    """A replica that stops lets another take its turn at once."""
    await conn.execute("DELETE FROM reconcile_turn WHERE replica = $1", replica)
