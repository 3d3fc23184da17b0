"""[[destinations]] in the SQLite file: each destination's place in the queue, and what moves
it. Functions taking a connection run in the writer's thread inside its one transaction
(storage.py's `_write`), as writes.py's do.

A destination's state is small: `position` (every seq at or below it is done there: delivered
or dead-lettered), `destination_done` ranges acknowledged above it (batches finish out of
order), `done` (how many seqs those ranges hold), and `destination_attempts` rows only for
events that failed there. An event's row stays while any position is below it (writes.py's
`_KEPT`), so a destination finds its events, bodies included, however far it
lags.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable, Sequence
from typing import Any, Final

from caliper_sidecar.config import UPSTREAM
from caliper_sidecar.outbox.records import DestinationPlan, Replay, StoredEvent
from caliper_sidecar.outbox.sqlite.event_ids import IN_JSON, index_now, seqs_of
from caliper_sidecar.states import DeadLetterReason

#: the seqs a destination still needs, oldest first (?1 its name): above its position, not
#: in a range done above it, and not stored for another destination alone
NEEDED: Final = """
    e.seq > (SELECT position FROM destinations WHERE name = ?1)
    AND (e.only_for IS NULL OR e.only_for = ?1)
    AND coalesce((SELECT d.hi FROM destination_done d WHERE d.destination = ?1
        AND d.lo <= e.seq ORDER BY d.lo DESC LIMIT 1), -1) < e.seq
"""

#: a claim's candidates: ?1 name, ?2 the steady time now, ?3 claimed seqs (JSON), ?4 limit
CLAIM: Final = f"""
    SELECT e.seq, e.id, e.body, e.received_at, coalesce(a.attempts, 0), a.first_attempt_at,
        e.sensor, max(?2 - e.received_at, 0.0)
    FROM events e LEFT JOIN destination_attempts a ON a.destination = ?1 AND a.seq = e.seq
    WHERE {NEEDED} AND e.seq NOT IN (SELECT value FROM json_each(?3))
    ORDER BY e.seq LIMIT ?4
"""

OLDEST: Final = f"SELECT e.received_at FROM events e WHERE {NEEDED} ORDER BY e.seq LIMIT 1"


def set_destinations(conn: sqlite3.Connection, plans: Sequence[DestinationPlan]) -> None:
    """A new destination starts after the newest event; one no longer configured is
    forgotten (its dead letters stay, listed under its name)."""
    names = [p.name for p in plans]
    gone = json.dumps(names)
    for table, column in (
        ("destination_done", "destination"),
        ("destination_attempts", "destination"),
        ("destinations", "name"),
    ):
        conn.execute(
            f"DELETE FROM {table} WHERE {column} NOT IN (SELECT value FROM json_each(?))",
            (gone,),
        )
    # The newest row is never pruned while destinations exist (writes.prune_delivered): a
    # seq below a position is never given to a new event.
    top = _newest(conn)
    for plan in plans:
        conn.execute(
            "INSERT INTO destinations (name, position, blocks, dead_letters) "
            "VALUES (?1, ?2, ?3, (SELECT count(*) FROM dead_letters WHERE destination = ?1)) "
            "ON CONFLICT (name) DO UPDATE SET blocks = excluded.blocks",
            (plan.name, top, int(plan.blocks)),
        )


def claim_rows(
    conn: sqlite3.Connection, name: str, now: float, claimed: Iterable[int], limit: int
) -> list[StoredEvent]:
    rows = conn.execute(CLAIM, (name, now, json.dumps(sorted(claimed)), limit)).fetchall()
    return [StoredEvent(*row) for row in rows]


def acknowledge(conn: sqlite3.Connection, name: str, seqs: Sequence[int]) -> None:
    """These seqs reached the destination: ranges recorded, the position moved on."""
    fresh = not_done(conn, name, seqs)
    if not fresh:
        return
    _mark_done(conn, name, fresh)
    conn.execute(
        "UPDATE destinations SET delivered_total = delivered_total + ? WHERE name = ?",
        (len(fresh), name),
    )


def record_failure(
    conn: sqlite3.Connection, name: str, seqs: Sequence[int], error: str, now: float
) -> None:
    conn.executemany(
        """
        INSERT INTO destination_attempts (destination, seq, attempts, first_attempt_at,
            last_attempt_at, last_error) VALUES (?1, ?2, 1, ?3, ?3, ?4)
        ON CONFLICT (destination, seq) DO UPDATE SET attempts = attempts + 1,
            last_attempt_at = ?3, last_error = ?4
        """,
        [(name, seq, now, error[:1024]) for seq in not_done(conn, name, seqs)],
    )


def dead_letter(
    conn: sqlite3.Connection,
    name: str,
    seqs: Sequence[int],
    reason: str,
    status: int | None,
    response: str,
    now: float,
    attempted: bool = True,
) -> int:
    """Dead-letter these events for this destination alone (done there); how many. The
    attempt that decided it is counted unless `attempted` is False (shed for lagging)."""
    fresh = not_done(conn, name, seqs)
    if not fresh:
        return 0
    conn.execute(
        """
        INSERT OR REPLACE INTO dead_letters (id, body, received_at, reason, status, response,
            attempts, first_attempt_at, last_attempt_at, dead_lettered_at, sensor, sender,
            destination)
        SELECT e.id, e.body, e.received_at, ?2, ?3, ?4, coalesce(a.attempts, 0) + ?6,
            coalesce(a.first_attempt_at, ?5), CASE WHEN ?6 THEN ?5 ELSE a.last_attempt_at END,
            ?5, e.sensor, e.sender, ?1
        FROM events e LEFT JOIN destination_attempts a ON a.destination = ?1 AND a.seq = e.seq
        WHERE e.seq IN (SELECT value FROM json_each(?7)) ORDER BY e.seq
        """,
        (name, reason, status, response[:1024], now, int(attempted), json.dumps(fresh)),
    )
    _mark_done(conn, name, fresh)
    return len(fresh)


def shed_lagging(
    conn: sqlite3.Connection,
    incoming: int,
    max_events: int,
    claimed: dict[str, set[int]],
    now: float,
) -> None:
    """Destinations that do not block (when_full = "dead_letter") never fill the outbox:
    before `incoming` events are stored, each one's oldest waiting events beyond the limit
    are dead-lettered for it (destination_lagging). Events it has in flight are left."""
    for name, waiting in lags(conn, blocking=False):
        excess = waiting + incoming - max_events
        if excess <= 0:
            continue
        rows = claim_rows(conn, name, now, claimed.get(name, ()), excess)
        dead_letter(
            conn,
            name,
            [r.seq for r in rows],
            DeadLetterReason.DESTINATION_LAGGING,
            None,
            f"more than {max_events} events waited for this destination",
            now,
            attempted=False,
        )


def lags(conn: sqlite3.Connection, blocking: bool | None = None) -> list[tuple[str, int]]:
    """(name, waiting) of each destination (only those that block, or do not, when asked).

    Counted from seqs: every seq above the position not in a done range. A seq that names
    no row for it (a row stored for one other destination alone) makes it an overcount,
    gone once the position passes it; never an undercount, so a limit is never overrun."""
    top = _newest(conn)
    where, params = ("", ()) if blocking is None else (" WHERE blocks = ?", (int(blocking),))
    rows = conn.execute(f"SELECT name, position, done FROM destinations{where}", params)
    return [(str(name), max(0, top - int(pos) - int(done))) for name, pos, done in rows]


def reopen(
    conn: sqlite3.Connection,
    event: Replay,
    now: float,
    has_destinations: bool,
) -> None:
    """Queue an event again for these queues only ([upstream] and destinations by name, each
    known to the outbox), id unchanged, never refused as a duplicate: a dead letter replayed
    for its own destination, or an event replayed from an archive. Its row, when still
    there, goes back in place for each queue that is done with it (one still on its way
    keeps it); when gone, it is stored again for those queues alone."""
    row = conn.execute(
        f"SELECT seq, delivered_at, only_for FROM events WHERE seq IN {seqs_of(IN_JSON)} "
        "ORDER BY seq DESC",
        (json.dumps([event.id]),),
    ).fetchone()
    if row is None:
        _store_again(conn, event, now, has_destinations)
        return
    seq, delivered_at, only_for = int(row[0]), row[1], row[2]
    conn.execute("UPDATE events SET body = ? WHERE seq = ? AND length(body) = 0", (event.body, seq))
    for name in event.queues:
        if name == UPSTREAM:
            if delivered_at is not None:
                conn.execute(
                    "UPDATE events SET delivered_at = NULL, upstream_dead = NULL, "
                    "attempts = 0, first_attempt_at = NULL, last_attempt_at = NULL, "
                    "last_error = NULL, platform_job = NULL, confirmed_at = NULL, "
                    "unconfirmed = NULL WHERE seq = ?",
                    (seq,),
                )
            continue
        if only_for not in (None, name):
            # Stored for one other queue alone, which every other passed over: now for
            # this one too, and done for the rest.
            _widen(conn, seq, {only_for, name})
            only_for = None
        conn.execute(
            "DELETE FROM destination_attempts WHERE destination = ? AND seq = ?", (name, seq)
        )
        _undo(conn, name, seq)


def _store_again(
    conn: sqlite3.Connection, event: Replay, now: float, has_destinations: bool
) -> None:
    """An event whose row is gone (pruned), stored again for its queues alone: for one,
    marked `only_for` it (every other passes it over); for several, done at once for every
    other destination. [upstream] takes it only when named (it had it long ago, else)."""
    queues = list(dict.fromkeys(event.queues))
    # Without destinations, [upstream]'s alone is every queue: stored as a new event is.
    only_for = queues[0] if has_destinations and len(queues) == 1 else None
    cur = conn.execute(
        "INSERT INTO events (id, body, size, received_at, sensor, sender, only_for, "
        "delivered_at) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
        (
            event.id,
            event.body,
            len(event.body),
            now if event.received_at is None else event.received_at,
            event.sensor,
            event.sender,
            only_for,
            None if UPSTREAM in queues else now,
        ),
    )
    seq = int(cur.lastrowid or 0)
    index_now(conn, event.id, seq)
    if only_for is None and has_destinations:
        _widen(conn, seq, set(queues))


def _widen(conn: sqlite3.Connection, seq: int, queues: set[str | None]) -> None:
    """A row for every queue (`only_for` cleared), done already for each destination not
    among `queues` (not counted as delivered there: it was never sent)."""
    conn.execute("UPDATE events SET only_for = NULL WHERE seq = ?", (seq,))
    for (name,) in conn.execute("SELECT name FROM destinations").fetchall():
        if name not in queues and not_done(conn, name, [seq]):
            _mark_done(conn, name, [seq])


def journey_rows(conn: sqlite3.Connection, ids: list[str]) -> list[tuple[Any, ...]]:
    """(id, destination, state, attempts, last_error) for each destination and each of these
    events still in the queue table that it is meant for."""
    out: list[tuple[Any, ...]] = []
    events = conn.execute(
        f"SELECT seq, id, only_for FROM events WHERE seq IN {seqs_of(IN_JSON)}",
        (json.dumps(ids),),
    ).fetchall()
    for (name,) in conn.execute("SELECT name FROM destinations").fetchall():
        for seq, id_, only_for in events:
            if only_for is not None and only_for != name:
                continue
            state = "waiting" if not_done(conn, name, [seq]) else "delivered"
            tried = conn.execute(
                "SELECT attempts, last_error FROM destination_attempts "
                "WHERE destination = ? AND seq = ?",
                (name, seq),
            ).fetchone()
            attempts, error = tried if tried else (0, None)
            out.append((id_, name, state, attempts, error))
    return out


def not_done(conn: sqlite3.Connection, name: str, seqs: Sequence[int]) -> list[int]:
    """Those of `seqs` the destination has not yet done (an outcome for a seq already done,
    e.g. shed while in flight, is not applied twice)."""
    row = conn.execute("SELECT position FROM destinations WHERE name = ?", (name,)).fetchone()
    if row is None:
        return []
    position = int(row[0])
    out = []
    for seq in sorted(set(seqs)):
        if seq <= position:
            continue
        hit = conn.execute(
            "SELECT hi FROM destination_done WHERE destination = ? AND lo <= ? "
            "ORDER BY lo DESC LIMIT 1",
            (name, seq),
        ).fetchone()
        if hit is None or int(hit[0]) < seq:
            out.append(seq)
    return out


def has_destinations(conn: sqlite3.Connection) -> bool:
    return conn.execute("SELECT 1 FROM destinations LIMIT 1").fetchone() is not None


def _newest(conn: sqlite3.Connection) -> int:
    row = conn.execute("SELECT max(seq) FROM events").fetchone()
    return int(row[0]) if row and row[0] is not None else 0


def _runs(seqs: Sequence[int]) -> list[tuple[int, int]]:
    """Sorted seqs as runs of consecutive numbers: one range row per run, not per event."""
    runs: list[tuple[int, int]] = []
    for seq in sorted(seqs):
        if runs and runs[-1][1] == seq - 1:
            runs[-1] = (runs[-1][0], seq)
        else:
            runs.append((seq, seq))
    return runs


def _mark_done(conn: sqlite3.Connection, name: str, seqs: Sequence[int]) -> None:
    """Record seqs (none of them done yet) as done, then move the position past every done
    or absent seq above it, dropping the ranges it passes."""
    runs = _runs(seqs)
    conn.executemany(
        "INSERT INTO destination_done (destination, lo, hi) VALUES (?, ?, ?)",
        [(name, lo, hi) for lo, hi in runs],
    )
    conn.execute(
        "DELETE FROM destination_attempts WHERE destination = ? "
        "AND seq IN (SELECT value FROM json_each(?))",
        (name, json.dumps(list(seqs))),
    )
    conn.execute(
        "UPDATE destinations SET done = done + ? WHERE name = ?",
        (sum(hi - lo + 1 for lo, hi in runs), name),
    )
    _advance(conn, name)


def _advance(conn: sqlite3.Connection, name: str) -> None:
    """Move the position over what is done: up to just below the next event the destination
    still needs, or to the newest seq when it needs none."""
    (position,) = conn.execute(
        "SELECT position FROM destinations WHERE name = ?", (name,)
    ).fetchone()
    moved = int(position)
    passed = 0
    while True:
        row = conn.execute(
            "SELECT min(seq) FROM events WHERE seq > ?1 AND (only_for IS NULL OR only_for = ?2)",
            (moved, name),
        ).fetchone()
        following = None if row is None or row[0] is None else int(row[0])
        if following is None:
            moved = max(moved, _newest(conn))
            break
        done = conn.execute(
            "SELECT lo, hi FROM destination_done WHERE destination = ? AND lo <= ? "
            "ORDER BY lo DESC LIMIT 1",
            (name, following),
        ).fetchone()
        if done is None or int(done[1]) < following:
            moved = following - 1
            break
        moved = int(done[1])
    if moved != position:
        gone = conn.execute(
            "SELECT coalesce(sum(hi - lo + 1), 0) FROM destination_done "
            "WHERE destination = ? AND hi <= ?",
            (name, moved),
        ).fetchone()
        passed = int(gone[0])
        conn.execute(
            "DELETE FROM destination_done WHERE destination = ? AND hi <= ?", (name, moved)
        )
        conn.execute(
            "UPDATE destinations SET position = ?, done = done - ? WHERE name = ?",
            (moved, passed, name),
        )


def _undo(conn: sqlite3.Connection, name: str, seq: int) -> None:
    """Make one seq not done for the destination again (a dead letter replayed there)."""
    (position,) = conn.execute(
        "SELECT position FROM destinations WHERE name = ?", (name,)
    ).fetchone()
    position = int(position)
    if seq <= position:
        # Lower the position to just below it; what lay between stays done, as a range.
        if seq < position:
            conn.execute(
                "INSERT INTO destination_done (destination, lo, hi) VALUES (?, ?, ?)",
                (name, seq + 1, position),
            )
        conn.execute(
            "UPDATE destinations SET position = ?, done = done + ? WHERE name = ?",
            (seq - 1, position - seq, name),
        )
        return
    hit = conn.execute(
        "SELECT lo, hi FROM destination_done WHERE destination = ? AND lo <= ? "
        "ORDER BY lo DESC LIMIT 1",
        (name, seq),
    ).fetchone()
    if hit is None or int(hit[1]) < seq:
        return  # not done: nothing to reopen
    lo, hi = int(hit[0]), int(hit[1])
    conn.execute("DELETE FROM destination_done WHERE destination = ? AND lo = ?", (name, lo))
    conn.executemany(
        "INSERT INTO destination_done (destination, lo, hi) VALUES (?, ?, ?)",
        [(name, a, b) for a, b in ((lo, seq - 1), (seq + 1, hi)) if a <= b],
    )
    conn.execute("UPDATE destinations SET done = done - 1 WHERE name = ?", (name,))
