"""Erasing a learner's events from the SQLite file: found by the event's actor (or by id),
deleted with everything a journey is built from, in the writer's thread, in one transaction
on a connection that overwrites what it deletes (`PRAGMA secure_delete`).

Deleting rows is not enough for "no file holds the learner's bytes": a body emptied on
delivery, or a row deleted earlier without secure_delete, leaves its bytes in free space of
the file's pages, and every page written since the last truncation may still be in the -wal
file. So after the deletion the storage rewrites the file (`VACUUM`: every page written anew,
the free pages cut off) and truncates the WAL (`wal_checkpoint(TRUNCATE)`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Final

from caliper_sidecar.outbox.records import ErasedRow
from caliper_sidecar.outbox.sqlite import destinations, writes
from caliper_sidecar.outbox.sqlite.event_ids import seqs_of

#: the actor of a stored body (?1): the `actor` string, or `actor.id`; NULL for anything else
#: (an emptied body, a tombstone). Bodies are BLOBs: read as text, else SQLite 3.45+ would
#: take them for its binary JSONB.
_ACTOR_IS: Final = """
    CASE WHEN length({body}) > 0 AND json_valid(CAST({body} AS TEXT)) THEN
        CASE json_type(CAST({body} AS TEXT), '$.actor')
            WHEN 'text' THEN json_extract(CAST({body} AS TEXT), '$.actor')
            WHEN 'object' THEN json_extract(CAST({body} AS TEXT), '$.actor.id')
        END
    END = ?1
"""
#: what a selection by id gets: the ids as a JSON array (?2)
_ID_IN: Final = "{id} IN (SELECT value FROM json_each(?2))"
#: how long one truncating checkpoint waits for `run`'s readers to leave the WAL
TRUNCATE_WAIT_MS: Final = 500
#: `only_for` of a tombstone: no queue has that name, so every queue passes over it
TOMBSTONE: Final = ""


def erase(
    conn: sqlite3.Connection, actor: str | None, ids: Sequence[str], dry_run: bool, now: float
) -> list[ErasedRow]:
    """See `Storage.erase_events`; runs inside the writer's transaction."""
    wanted = json.dumps(list(ids))
    # Dead letters by their id index; events by event_ids (events.id has none of its own).
    match = _ID_IN.format(id="id")
    by_id = f"seq IN {seqs_of('SELECT value FROM json_each(?2)')}"
    if actor is not None:  # every body is read
        actor_is = _ACTOR_IS.format(body="body")
        match, by_id = f"({actor_is} OR {match})", f"({actor_is} OR {by_id})"
    events = conn.execute(
        f"SELECT seq, id, delivered_at, upstream_dead, only_for FROM events WHERE {by_id} "
        "ORDER BY seq",
        (actor, wanted),
    ).fetchall()
    found_ids = json.dumps([row[1] for row in events])
    dead = conn.execute(
        f"SELECT seq, id, destination FROM dead_letters WHERE {match} "
        "OR id IN (SELECT value FROM json_each(?3)) ORDER BY seq",
        (actor, wanted, found_ids),
    ).fetchall()
    rows: list[ErasedRow] = [(str(i), "dead_letter", str(d), "dead_lettered") for _, i, d in dead]
    dead_at = {(str(i), str(d)) for _, i, d in dead}
    for _, id_, delivered_at, upstream_dead, only_for in events:
        if only_for is not None and only_for != "upstream":
            continue  # stored again for one destination alone: never [upstream]'s
        if delivered_at is None:
            state = "waiting"
        else:
            state = "dead_lettered" if upstream_dead else "delivered"
        rows.append((str(id_), "event", "upstream", state))
    for id_, name, state, _, _ in destinations.journey_rows(conn, [r[1] for r in events]):
        # A destination's dead letter is "done" there, as a delivery is: told apart here.
        done = "dead_lettered" if (id_, name) in dead_at else "delivered"
        rows.append((str(id_), "event", str(name), state if state == "waiting" else done))
    if dry_run:
        return rows
    conn.execute(
        "DELETE FROM dead_letters WHERE seq IN (SELECT value FROM json_each(?))",
        (json.dumps([r[0] for r in dead]),),
    )
    _delete_events(conn, [int(r[0]) for r in events], now)
    erased = sorted({r[0] for r in rows})
    conn.execute(
        "DELETE FROM delivered WHERE id IN (SELECT value FROM json_each(?))", (json.dumps(erased),)
    )
    _drop_from_jobs(conn, erased)
    return rows


def _delete_events(conn: sqlite3.Connection, seqs: list[int], now: float) -> None:
    """Delete these rows and their attempts at destinations. With destinations, the newest
    row is not deleted but emptied into a tombstone that no queue takes: SQLite gives a new
    row the highest seq plus one, and a seq a destination's position has passed must never
    name a new event (writes.prune_delivered keeps that row for the same reason)."""
    conn.execute(
        "DELETE FROM destination_attempts WHERE seq IN (SELECT value FROM json_each(?))",
        (json.dumps(seqs),),
    )
    keep = None
    if seqs and destinations.has_destinations(conn):
        (newest,) = conn.execute("SELECT max(seq) FROM events").fetchone()
        keep = newest if newest in seqs else None
    if keep is not None:
        # delivered_at set with upstream_dead: out of [upstream]'s queue and its totals
        # (the triggers), never counted as delivered.
        conn.execute(
            "UPDATE events SET id = 'erased:' || seq, body = x'', size = 0, sensor = NULL, "
            "sender = NULL, last_error = NULL, platform_job = NULL, platform_id = NULL, "
            "unconfirmed = NULL, delivered_at = coalesce(delivered_at, ?1), upstream_dead = 1, "
            "only_for = ?2 WHERE seq = ?3",
            (now, TOMBSTONE, keep),
        )
    conn.execute(
        "DELETE FROM events WHERE seq IN (SELECT value FROM json_each(?))",
        (json.dumps([s for s in seqs if s != keep]),),
    )


def _drop_from_jobs(conn: sqlite3.Connection, ids: list[str]) -> None:
    """Take these ids out of the lists of event ids kept for an app's job ids."""
    gone = set(ids)
    jobs = conn.execute(
        "SELECT id, event_ids FROM jobs j WHERE EXISTS (SELECT 1 FROM json_each(j.event_ids) v "
        "WHERE v.value IN (SELECT value FROM json_each(?)))",
        (json.dumps(ids),),
    ).fetchall()
    for job, listed in jobs:
        kept = [i for i in json.loads(listed) if i not in gone]
        conn.execute("UPDATE jobs SET event_ids = ? WHERE id = ?", (json.dumps(kept), job))


def erase_securely(
    conn: sqlite3.Connection, actor: str | None, ids: Sequence[str], dry_run: bool, now: float
) -> list[ErasedRow]:
    """`erase` in one write transaction, with SQLite overwriting with zeros what it deletes
    (in the pages it writes to the WAL and, at the checkpoint, the file); the connection
    is left as it was, for the writes after it (FAST, writer.PRAGMAS: the writes of `run`
    leave what they delete or empty in free pages).
    """
    (before,) = conn.execute("PRAGMA secure_delete").fetchone()
    conn.execute("PRAGMA secure_delete = ON")
    try:
        with writes.immediate(conn):
            return erase(conn, actor, ids, dry_run, now)
    finally:
        # Read back as 0, 1 or 2, but set as a word: "2" would be read as true, not as FAST.
        conn.execute(f"PRAGMA secure_delete = {('OFF', 'ON', 'FAST')[int(before)]}")


def compact(conn: sqlite3.Connection) -> None:
    """Rewrite every page of the file, free pages cut off (VACUUM keeps every rowid the
    tables use: theirs are INTEGER PRIMARY KEYs, or they have none)."""
    conn.execute("VACUUM")


def truncate_wal(conn: sqlite3.Connection) -> bool:
    """Checkpoint the WAL into the file and truncate it to nothing; False when a reader
    (a running `run`) kept part of it in use for TRUNCATE_WAIT_MS. The caller tries again:
    the connection's usual busy timeout (5 s) in each try made a refusal take minutes."""
    (before,) = conn.execute("PRAGMA busy_timeout").fetchone()
    conn.execute(f"PRAGMA busy_timeout = {TRUNCATE_WAIT_MS}")
    try:
        busy, _, _ = conn.execute("PRAGMA wal_checkpoint(TRUNCATE)").fetchone()
    finally:
        conn.execute(f"PRAGMA busy_timeout = {int(before)}")
    return not busy
