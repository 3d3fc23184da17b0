"""The SQLite outbox's write transactions, as they run in the writer's thread on its
connection (writer.py), each inside the one `immediate` transaction that
`SqliteStorage._write` opens around it. storage.py decides when they run; this says what they
change.
"""

from __future__ import annotations

import contextlib
import json
import sqlite3
from collections.abc import Iterator, Sequence, Set
from typing import Any, Final

from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox.records import (
    PRUNE_CHUNK,
    Append,
    AppendResult,
    Mark,
    PlatformJobOutcome,
    Replay,
    new_per_append,
)
from caliper_sidecar.outbox.sqlite import destinations
from caliper_sidecar.outbox.sqlite.event_ids import in_tail
from caliper_sidecar.states import DeadLetterReason

#: an acknowledgement: the events of one envelope, the platform's job for them, and why they
#: cannot be confirmed (the answer named no job although jobs are followed)
Ack = tuple[list[int], str | None, str | None]


def insert_appends(
    conn: sqlite3.Connection,
    group: list[Append],
    now: float,
    dedupe_window_s: float,
    max_events: int,
    max_bytes: int,
    claimed: dict[str, set[int]] | None = None,
    unindexed: Set[str] = frozenset(),
    inserted: list[str] | None = None,
) -> list[AppendResult | OutboxUnavailable]:
    """A group commit's appends: known ids skipped, capacity checked per append (all of it or
    none), one packed insert. `claimed`: what each destination has in flight (left alone
    when a lagging one is shed); `unindexed`: the ids this writer inserted that `event_ids`
    does not hold yet (event_ids.py); `inserted` gets the ids of the rows inserted."""
    all_ids = [e.id for events, _ in group for e in events]
    # A row of a known id delivered longer ago than the dedupe window is replaced by the new
    # one (without a UNIQUE index, nothing else would take it out of the way).
    known: set[str] = set()
    stale: dict[str, int] = {}
    since = now - dedupe_window_s
    candidates = {id_ for id_ in all_ids if id_ in unindexed}
    for id_, seq, live in [
        *in_tail(conn, candidates, since),
        *conn.execute(_KNOWN_IDS, (json.dumps(all_ids), since)),
    ]:
        if live:
            known.add(id_)
        else:
            stale[id_] = seq
    row = conn.execute("SELECT events, bytes FROM totals").fetchone()
    depth, size = (int(row[0]), int(row[1])) if row else (0, 0)
    if claimed is not None:
        incoming = len(set(all_ids) - known)
        destinations.shed_lagging(conn, incoming, max_events, claimed, now)
        # A destination that blocks holds events the way [upstream] does (by count: their
        # bytes are [upstream]'s or already delivered there).
        depth = max([depth, *(waiting for _, waiting in destinations.lags(conn, True))])
    plan = new_per_append(
        [events for events, _ in group], known, depth, size, max_events, max_bytes
    )
    # Packed: the group's bodies as one blob and [id, offset, length, sensor] per event, so
    # that SQLite inserts every row in one statement (no per-row binding in Python).
    entries: list[tuple[str, int, int, str | None, str | None]] = []
    bodies: list[bytes] = []
    offset = 1  # substr counts from 1
    jobs: list[tuple[str, float, str]] = []
    results: list[AppendResult | OutboxUnavailable] = []
    for (events, job), fresh in zip(group, plan, strict=True):
        if isinstance(fresh, OutboxUnavailable):
            results.append(fresh)
            continue
        for e in fresh:
            entries.append((e.id, offset, len(e.body), e.sensor, e.sender))
            bodies.append(e.body)
            offset += len(e.body)
        if job is not None:
            jobs.append((job, now, json.dumps([e.id for e in events])))
        results.append(AppendResult(len(fresh), len(events) - len(fresh)))
    if entries:
        gone = [stale[entry[0]] for entry in entries if entry[0] in stale]
        if gone:
            conn.execute(
                "DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?))",
                (json.dumps(gone),),
            )
        conn.execute(_PACKED_INSERT, (json.dumps(entries), b"".join(bodies), now))
        if inserted is not None:
            inserted.extend(entry[0] for entry in entries)
    if jobs:
        conn.executemany(
            "INSERT OR IGNORE INTO jobs (id, created_at, event_ids) VALUES (?, ?, ?)", jobs
        )
    return results


def record_acks(
    conn: sqlite3.Connection,
    group: list[Ack],
    now: float,
    prune_before: float | None,
    keep: bool = False,
) -> bool:
    """The acknowledgements, and a chunk of pruning when `prune_before` is given; True
    when pruning is done for now. `keep`: delivered bodies stay until reconciliation has
    checked them (reconciling.py)."""
    emptied = _emptied(keep)
    done = [seq for acked, job, why in group if job is None and why is None for seq in acked]
    if done:
        conn.execute(
            f"UPDATE events SET delivered_at = ?1, body = {emptied}, {_ATTEMPT} "
            "WHERE seq IN (SELECT value FROM json_each(?2)) AND delivered_at IS NULL",
            (now, json.dumps(done)),
        )
    for acked, job, why in group:
        if job is None and why is None:
            continue
        # The body stays until the platform's job says the event was processed; an event
        # that can never be confirmed keeps only the reason.
        conn.execute(
            f"UPDATE events SET delivered_at = ?1, platform_job = ?2, unconfirmed = ?3, "
            f"{_ATTEMPT}, body = CASE WHEN ?2 IS NULL THEN {emptied} ELSE body END "
            "WHERE seq IN (SELECT value FROM json_each(?4)) AND delivered_at IS NULL",
            (now, job, why, json.dumps(list(acked))),
        )
        if job is None:
            continue
        conn.execute(
            "INSERT OR IGNORE INTO platform_jobs (id, sent_at, state) VALUES (?, ?, 'waiting')",
            (job, now),
        )
    return prune_before is not None and prune_delivered(conn, prune_before, keep)


def record_failure(conn: sqlite3.Connection, seqs: Sequence[int], error: str, now: float) -> None:
    conn.execute(
        """
        UPDATE events SET attempts = attempts + 1,
            first_attempt_at = coalesce(first_attempt_at, ?1),
            last_attempt_at = ?1, last_error = ?2
        WHERE seq IN (SELECT value FROM json_each(?3))
        """,
        (now, error[:1024], json.dumps(list(seqs))),
    )


def take_dead_letters(
    conn: sqlite3.Connection,
    ids: list[str] | None,
    limit: int,
    replay: bool,
    destination: str | None,
    now: float,
) -> int:
    """Delete up to `limit` of the selected dead letters (all when `ids` is None; of one
    destination or all), each queued again for its own destination first when `replay`;
    how many."""
    where, params = "1", []
    if ids is not None:
        where, params = _IN_JSON, [json.dumps(ids)]
    if destination is not None:
        where += " AND destination = ?"
        params.append(destination)
    if replay:
        # A destination no longer configured has no queue to go back to: its letters stay.
        where += " AND (destination = 'upstream' OR destination IN (SELECT name FROM destinations))"
    rows = conn.execute(
        "SELECT seq, id, destination, body, received_at, sensor, sender FROM dead_letters "
        f"WHERE {where} ORDER BY seq LIMIT {limit}",
        params,
    ).fetchall()
    seqs = json.dumps([r[0] for r in rows])
    if replay:
        fanned = destinations.has_destinations(conn)
        for _, id_, name, body, received_at, sensor, sender in rows:
            letter = Replay(id_, body, (name,), received_at, sensor, sender)
            destinations.reopen(conn, letter, now, fanned)
    cur = conn.execute(
        "DELETE FROM dead_letters WHERE seq IN (SELECT value FROM json_each(?))", (seqs,)
    )
    return cur.rowcount


def replay(conn: sqlite3.Connection, events: Sequence[Replay], mark: str, now: float) -> None:
    """Events queued again, each for its queues (`destinations.reopen`): a dead letter of it
    there is taken (it is on its way again), and it is marked `mark` there."""
    fanned = destinations.has_destinations(conn)
    for event in events:
        destinations.reopen(conn, event, now, fanned)
    pairs = [(event.id, queue) for event in events for queue in event.queues]
    conn.executemany("DELETE FROM dead_letters WHERE id = ? AND destination = ?", pairs)
    add_marks(conn, [Mark(id_, mark, queue) for id_, queue in pairs], now)


def add_marks(conn: sqlite3.Connection, marks: Sequence[Mark], now: float) -> None:
    conn.executemany(
        "INSERT INTO marks (id, at, what, destination, detail) VALUES (?, ?, ?, ?, ?)",
        [(m.id, now, str(m.what), m.destination, m.detail) for m in marks],
    )


#: a selection by id, the ids as a JSON array
_IN_JSON: Final = "id IN (SELECT value FROM json_each(?))"


def move_to_dead_letters(
    conn: sqlite3.Connection,
    seqs: Sequence[int],
    reason: str,
    status: int | None,
    response: str,
    now: float,
) -> None:
    wanted = json.dumps(list(seqs))
    conn.execute(
        """
        INSERT OR REPLACE INTO dead_letters (id, body, received_at, reason, status,
            response, attempts, first_attempt_at, last_attempt_at, dead_lettered_at, sensor,
            sender)
        SELECT id, body, received_at, ?1, ?2, ?3, attempts + 1,
            coalesce(first_attempt_at, ?4), ?4, ?4, sensor, sender
        FROM events WHERE seq IN (SELECT value FROM json_each(?5)) ORDER BY seq
        """,
        (reason, status, response[:1024], now, wanted),
    )
    if destinations.has_destinations(conn):
        # Still on its way to the destinations: out of [upstream]'s queue, not out of the
        # table (pruned once every destination has it, as a delivered event is).
        conn.execute(
            "UPDATE events SET delivered_at = ?, upstream_dead = 1 "
            "WHERE seq IN (SELECT value FROM json_each(?))",
            (now, wanted),
        )
        return
    conn.execute("DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?))", (wanted,))


def finish_platform_job(
    conn: sqlite3.Connection, job: str, outcome: PlatformJobOutcome, now: float, keep: bool = False
) -> tuple[int, bool]:
    """The platform's verdict on a job: processed events confirmed, the failing ones
    dead-lettered, the others queued again; (how many failed, whether any were queued)."""
    rows = conn.execute(
        "SELECT seq, id FROM events WHERE platform_job = ? AND confirmed_at IS NULL", (job,)
    ).fetchall()
    split = outcome.split([(int(seq), str(id_)) for seq, id_ in rows])
    failing, again = split.failing, split.again
    conn.executemany(
        f"UPDATE events SET platform_id = ?2, confirmed_at = ?3, body = {_emptied(keep)} "
        "WHERE seq = ?1",
        [(seq, platform_id, now) for seq, platform_id in split.confirmed],
    )
    if failing:
        move_to_dead_letters(
            conn, failing, DeadLetterReason.PLATFORM_FAILED, None, outcome.reason, now
        )
    if again:
        # Not the failing event, not processed either: sent again in a new envelope.
        conn.execute(
            "UPDATE events SET delivered_at = NULL, platform_job = NULL "
            "WHERE seq IN (SELECT value FROM json_each(?))",
            (json.dumps(again),),
        )
    conn.execute("DELETE FROM platform_jobs WHERE id = ?", (job,))
    return len(failing), bool(again)


def execute(conn: sqlite3.Connection, sql: str, params: tuple[Any, ...]) -> None:
    conn.execute(sql, params)


@contextlib.contextmanager
def immediate(conn: sqlite3.Connection) -> Iterator[None]:
    """A write transaction on the writer's connection: committed, or rolled back whatever
    broke it."""
    conn.execute("BEGIN IMMEDIATE")
    try:
        yield
        conn.execute("COMMIT")
    except BaseException:
        with contextlib.suppress(sqlite3.Error):
            conn.execute("ROLLBACK")
        raise


def prune_delivered(conn: sqlite3.Connection, cutoff: float, keep: bool = False) -> bool:
    """Forget delivered events older than the dedupe window, a chunk per acknowledgement so
    that no single commit grows large; True (done for now) when a chunk comes back short.
    `keep`: not those whose check by reconciliation is still to come."""
    # Events whose platform job is still followed stay, however old; so do those a
    # destination still needs, and (with destinations) the newest row: SQLite gives a new row
    # the highest seq plus one, which must never be a seq a position has already passed.
    cur = conn.execute(
        "DELETE FROM events WHERE seq IN (SELECT seq FROM events "
        "WHERE delivered_at < ?1 AND NOT EXISTS (SELECT 1 FROM platform_jobs p "
        f"WHERE p.id = events.platform_job AND p.state != 'unconfirmed') AND NOT {_KEPT} "
        + (f"AND NOT ({AWAITING_CHECK}) " if keep else "")
        + "AND (NOT EXISTS (SELECT 1 FROM destinations) "
        "OR seq < (SELECT max(seq) FROM events)) "
        "ORDER BY delivered_at LIMIT ?2)",
        (cutoff, PRUNE_CHUNK),
    )
    conn.execute("DELETE FROM delivered WHERE delivered_at < ?", (cutoff,))
    conn.execute("DELETE FROM jobs WHERE created_at < ?", (cutoff,))
    conn.execute("DELETE FROM platform_jobs WHERE state = 'unconfirmed' AND sent_at < ?", (cutoff,))
    return cur.rowcount < PRUNE_CHUNK


def free_page_bytes(conn: sqlite3.Connection) -> int:
    """Bytes of the database's free pages, which new rows reuse without growing the file."""
    pages = conn.execute("PRAGMA freelist_count").fetchone()
    size = conn.execute("PRAGMA page_size").fetchone()
    return int(pages[0]) * int(size[0]) if pages and size else 0


#: (id, seq, whether it still counts) of the ids (?1) the outbox knows: an indexed row
#: (one delivered before the window (?2) no longer counts), a dead letter, an old delivery
_KNOWN_IDS: Final = """
    WITH wanted(id) AS (SELECT value FROM json_each(?1))
    SELECT i.id, e.seq, e.delivered_at IS NULL OR e.delivered_at >= ?2
        FROM event_ids i JOIN events e ON e.seq = i.seq WHERE i.id IN wanted
    UNION ALL SELECT id, NULL, 1 FROM dead_letters WHERE id IN wanted
    UNION ALL SELECT id, NULL, 1 FROM delivered WHERE id IN wanted AND delivered_at >= ?2
"""
# json_each keeps the array's order, so seq does too.
_PACKED_INSERT: Final = """
    INSERT INTO events (id, body, size, received_at, sensor, sender)
    SELECT value ->> 0, substr(?2, value ->> 1, value ->> 2), value ->> 2, ?3, value ->> 3,
        value ->> 4
    FROM json_each(?1)
"""
#: an event some destination has not passed yet (its body and row are kept for it)
_KEPT: Final = "seq > (SELECT coalesce(min(position), 9223372036854775807) FROM destinations)"
#: a body once [upstream] is done with it: emptied, unless a destination still needs it
_EMPTIED: Final = f"CASE WHEN {_KEPT} THEN body ELSE x'' END"
#: a delivered event reconciliation has still to check: sent upstream (not stored again for
#: a destination alone, not dead there), its body kept, neither verified nor given up
AWAITING_CHECK: Final = (
    "length(events.body) > 0 AND events.upstream_dead IS NULL "
    "AND (events.only_for IS NULL OR events.only_for = 'upstream') "
    "AND NOT EXISTS (SELECT 1 FROM marks m WHERE m.id = events.id "
    "AND m.destination = 'upstream' AND m.what IN ('verified', 'given_up'))"
)


def _emptied(keep: bool) -> str:
    """The body once [upstream] took the event: kept for reconciliation's check (`keep`),
    else emptied unless a destination still needs it."""
    return "body" if keep else _EMPTIED


#: the send that succeeded counts as an attempt (?1 is the time)
_ATTEMPT: Final = (
    "attempts = attempts + 1, first_attempt_at = coalesce(first_attempt_at, ?1), "
    "last_attempt_at = ?1"
)
