"""Reconciliation's reads and writes in the SQLite file: the events delivered upstream that a
check may take, and what a check found, as marks (schema 6) on the events' rows.

While reconciliation is on, a delivered event's body stays (writes.AWAITING_CHECK) until a
check verified it or gave up on it; then it is emptied, as an acknowledgement empties it
without reconciliation, unless a destination still needs it.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any, Final

from caliper_sidecar.outbox.sqlite.event_ids import IN_JSON, seqs_of
from caliper_sidecar.outbox.sqlite.writes import _EMPTIED, AWAITING_CHECK
from caliper_sidecar.states import JourneyMark

#: events delivered upstream (and confirmed, or given up on being confirmed, where the
#: platform confirms) at or before ?2, after seq ?3, awaiting their check unless ?4 is 0;
#: with how long ago (on ?1, now) a check first found each missing
DELIVERED: Final = f"""
    SELECT seq, id, body, sensor,
        ?1 - (SELECT min(m.at) FROM marks m WHERE m.id = events.id
              AND m.destination = 'upstream' AND m.what = 'missing')
    FROM events
    WHERE delivered_at IS NOT NULL AND delivered_at <= ?2 AND seq > ?3
        AND (platform_job IS NULL OR confirmed_at IS NOT NULL OR unconfirmed IS NOT NULL)
        AND length(body) > 0 AND upstream_dead IS NULL
        AND (only_for IS NULL OR only_for = 'upstream')
        AND (?4 = 0 OR ({AWAITING_CHECK}))
    ORDER BY seq LIMIT ?5
"""


def checked(
    conn: sqlite3.Connection,
    held: Sequence[str],
    missing: Sequence[str],
    given_up: Sequence[str],
    now: float,
) -> None:
    """Mark what a check found; the bodies of the events it is done with (held, given up)
    go, unless a destination still needs them."""
    found = (
        (JourneyMark.VERIFIED, held),
        (JourneyMark.MISSING, missing),
        (JourneyMark.GIVEN_UP, given_up),
    )
    conn.executemany(
        "INSERT INTO marks (id, at, what, destination) VALUES (?, ?, ?, 'upstream')",
        [(id_, now, str(what)) for what, ids in found for id_ in ids],
    )
    done = [*held, *given_up]
    if done:
        conn.execute(
            f"UPDATE events SET body = {_EMPTIED} WHERE seq IN {seqs_of(IN_JSON)}",
            (json.dumps(done),),
        )


def delivered_rows(
    conn: sqlite3.Connection,
    now: float,
    delivered_before: float,
    after_seq: int,
    unchecked_only: bool,
    limit: int,
) -> list[tuple[Any, ...]]:
    return conn.execute(
        DELIVERED, (now, delivered_before, after_seq, int(unchecked_only), limit)
    ).fetchall()
