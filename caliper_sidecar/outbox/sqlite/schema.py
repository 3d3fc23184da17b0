"""The outbox schema and its migrations, tracked with `PRAGMA user_version`.

Each entry of MIGRATIONS moves the file one version up and is never edited once released: an
upgrade runs the missing ones in order, each in its own transaction, so a file written by any
earlier release opens in this one.
"""

from __future__ import annotations

import re
import sqlite3
from collections.abc import Callable
from pathlib import Path
from typing import Final

from caliper_sidecar.exceptions import SchemaTooNew


def _ids_indexed_late(conn: sqlite3.Connection) -> None:
    """7: `events.id` loses its UNIQUE index, which cost every ingest commit a random leaf per
    event (bench/wal_frames.py: 40 % of a single-event commit's pages; forwarding +28 to +39 %
    without it, bench/forward.py); `event_ids` (event_ids.py) maps ids to seqs instead, filled
    with each checkpoint from the rows above `ids_indexed.upto`.

    SQLite cannot drop a UNIQUE constraint, so the table is built again (its own procedure:
    a new table, the rows copied, the old one dropped, the new one renamed)."""
    (table,) = conn.execute("SELECT sql FROM sqlite_schema WHERE name = 'events'").fetchone()
    rebuilt = table.replace("id TEXT NOT NULL UNIQUE", "id TEXT NOT NULL", 1)
    if rebuilt == table:
        raise sqlite3.DatabaseError("the events table is not as migration 6 left it")
    # Its indexes and triggers, and the triggers of other tables that read it, dropped before
    # the rows move (deleting them then fires nothing and updates no index), made again after.
    tied = [
        (kind, name, sql)
        for kind, name, table, sql in conn.execute(
            "SELECT type, name, tbl_name, sql FROM sqlite_schema WHERE sql IS NOT NULL "
            "AND type IN ('index', 'trigger') ORDER BY rowid"
        )
        if table == "events" or re.search(r"\bevents\b", sql)
    ]
    for kind, name, _ in tied:
        conn.execute(f"DROP {kind.upper()} {name}")
    conn.execute(rebuilt.replace("CREATE TABLE events", "CREATE TABLE events_7", 1))
    # A chunk at a time, each deleted once copied: the new table reuses the old one's freed
    # pages, so the file does not end up twice its size (bench/migration.py).
    moved = 0
    while True:
        conn.execute(
            "INSERT INTO events_7 SELECT * FROM events WHERE seq > ? ORDER BY seq LIMIT 10000",
            (moved,),
        )
        last = conn.execute("SELECT max(seq) FROM events_7").fetchone()[0]
        if last is None or last == moved:
            break
        conn.execute("DELETE FROM events WHERE seq <= ?", (last,))
        moved = last
    if conn.execute("SELECT 1 FROM events LIMIT 1").fetchone():  # a seq the copy did not reach
        raise sqlite3.DatabaseError("the events table held rows the migration could not move")
    conn.execute("DROP TABLE events")
    conn.execute("ALTER TABLE events_7 RENAME TO events")
    for _, _, sql in tied:
        conn.execute(
            sql.replace(
                "AND NOT EXISTS (SELECT 1 FROM events WHERE id = OLD.id)",
                f"AND NOT ({EVENT_ID_KNOWN.format(id='OLD.id')})",
            )
        )
    for statement in _statements(_ID_INDEX):
        conn.execute(statement)


#: an SQL condition: some row of `events` has the id {id} (indexed, or in the tail not yet
#: indexed; event_ids.py)
EVENT_ID_KNOWN: Final = (
    "EXISTS (SELECT 1 FROM event_ids WHERE id = {id}) OR EXISTS (SELECT 1 FROM events "
    "WHERE seq > (SELECT upto FROM ids_indexed) AND id = {id})"
)

_ID_INDEX: Final = """
    CREATE TABLE event_ids (id TEXT PRIMARY KEY, seq INTEGER NOT NULL) WITHOUT ROWID;
    INSERT INTO event_ids SELECT id, seq FROM events;
    CREATE TABLE ids_indexed (one INTEGER PRIMARY KEY CHECK (one = 1), upto INTEGER NOT NULL);
    INSERT INTO ids_indexed SELECT 1, coalesce(max(seq), 0) FROM events;
    -- An id leaves the index with its row, and follows it when erase renames it.
    CREATE TRIGGER event_ids_out AFTER DELETE ON events BEGIN
        DELETE FROM event_ids WHERE id = OLD.id AND seq = OLD.seq;
    END;
    CREATE TRIGGER event_ids_renamed AFTER UPDATE OF id ON events BEGIN
        DELETE FROM event_ids WHERE id = OLD.id AND seq = OLD.seq;
        INSERT OR REPLACE INTO event_ids VALUES (NEW.id, NEW.seq);
    END;
    -- SQLite gives a new row the newest row's seq plus one: once the newest rows are deleted,
    -- `upto` comes down to the newest left (nothing lies between), or the next row would take
    -- a seq at or below it and never be indexed.
    CREATE TRIGGER ids_indexed_down AFTER DELETE ON events
    WHEN OLD.seq >= (SELECT upto FROM ids_indexed) BEGIN
        UPDATE ids_indexed SET upto = (SELECT coalesce(max(seq), 0) FROM events)
        WHERE upto > (SELECT coalesce(max(seq), 0) FROM events);
    END;
"""

MIGRATIONS: Final[tuple[str | Callable[[sqlite3.Connection], None], ...]] = (
    # 1: the queue, the dead letters, recent deliveries (for deduplication) and running totals.
    """
    CREATE TABLE events (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        body BLOB NOT NULL,
        size INTEGER NOT NULL,
        received_at REAL NOT NULL,
        attempts INTEGER NOT NULL DEFAULT 0,
        first_attempt_at REAL,
        last_attempt_at REAL,
        last_error TEXT
    );
    CREATE TABLE dead_letters (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL UNIQUE,
        body BLOB NOT NULL,
        received_at REAL NOT NULL,
        reason TEXT NOT NULL,
        status INTEGER,
        response TEXT NOT NULL DEFAULT '',
        attempts INTEGER NOT NULL,
        first_attempt_at REAL,
        last_attempt_at REAL,
        dead_lettered_at REAL NOT NULL
    );
    CREATE TABLE delivered (
        id TEXT PRIMARY KEY,
        delivered_at REAL NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX delivered_by_time ON delivered (delivered_at);
    -- Totals kept by triggers, so that every process reading the file (the CLI while `run`
    -- is running) sees exact counts without scanning a large backlog.
    CREATE TABLE totals (
        one INTEGER PRIMARY KEY CHECK (one = 1),
        events INTEGER NOT NULL,
        bytes INTEGER NOT NULL,
        dead_letters INTEGER NOT NULL,
        delivered_total INTEGER NOT NULL,
        dead_lettered_total INTEGER NOT NULL
    );
    INSERT INTO totals VALUES (1, 0, 0, 0, 0, 0);
    CREATE TRIGGER events_in AFTER INSERT ON events BEGIN
        UPDATE totals SET events = events + 1, bytes = bytes + NEW.size;
    END;
    CREATE TRIGGER events_out AFTER DELETE ON events BEGIN
        UPDATE totals SET events = events - 1, bytes = bytes - OLD.size;
    END;
    CREATE TRIGGER dead_in AFTER INSERT ON dead_letters BEGIN
        UPDATE totals SET dead_letters = dead_letters + 1,
                          dead_lettered_total = dead_lettered_total + 1;
    END;
    CREATE TRIGGER dead_out AFTER DELETE ON dead_letters BEGIN
        UPDATE totals SET dead_letters = dead_letters - 1;
    END;
    """,
    # 2: a delivered event is marked, its body emptied, instead of deleted. Deleting scattered
    # rows and recording their ids elsewhere dirtied two random index pages per event on every
    # acknowledgement; marking rewrites a few contiguous pages, the id index keeps serving
    # deduplication, and rows older than the dedupe window are pruned in bulk. The `delivered`
    # table of version 1 is still consulted until its entries age out.
    """
    ALTER TABLE events ADD COLUMN delivered_at REAL;
    CREATE INDEX events_waiting ON events (seq) WHERE delivered_at IS NULL;
    CREATE INDEX events_delivered ON events (delivered_at) WHERE delivered_at IS NOT NULL;
    DROP TRIGGER events_out;
    CREATE TRIGGER events_out AFTER DELETE ON events WHEN OLD.delivered_at IS NULL BEGIN
        UPDATE totals SET events = events - 1, bytes = bytes - OLD.size;
    END;
    CREATE TRIGGER events_delivered AFTER UPDATE OF delivered_at ON events
    WHEN OLD.delivered_at IS NULL AND NEW.delivered_at IS NOT NULL BEGIN
        UPDATE totals SET events = events - 1, bytes = bytes - OLD.size,
                          delivered_total = delivered_total + 1;
    END;
    """,
    # 3: processing confirmation and TimeBack's drop-in API. An event the platform accepted into
    # one of its processing jobs keeps its body until the job completes (a failed job dead-
    # letters it, and a dead letter can be replayed); `jobs` are the jobs this sidecar answers
    # apps with, so that their job-status calls work offline.
    """
    ALTER TABLE events ADD COLUMN platform_job TEXT;
    ALTER TABLE events ADD COLUMN platform_id TEXT;
    ALTER TABLE events ADD COLUMN confirmed_at REAL;
    CREATE INDEX events_by_platform_job ON events (platform_job) WHERE platform_job IS NOT NULL;
    CREATE TABLE platform_jobs (
        id TEXT PRIMARY KEY,
        sent_at REAL NOT NULL,
        state TEXT NOT NULL,
        polls INTEGER NOT NULL DEFAULT 0,
        last_error TEXT
    ) WITHOUT ROWID;
    CREATE TABLE jobs (
        id TEXT PRIMARY KEY,
        created_at REAL NOT NULL,
        event_ids TEXT NOT NULL
    ) WITHOUT ROWID;
    CREATE INDEX jobs_by_time ON jobs (created_at);
    CREATE TRIGGER events_requeued AFTER UPDATE OF delivered_at ON events
    WHEN OLD.delivered_at IS NOT NULL AND NEW.delivered_at IS NULL BEGIN
        UPDATE totals SET events = events + 1, bytes = bytes + OLD.size,
                          delivered_total = delivered_total - 1;
    END;
    """,
    # 4: what the platform's answers and the apps' envelopes say. `unconfirmed` is why an event
    # accepted while jobs are followed can never be confirmed (the answer named no job);
    # `sensor` is the sensor of the envelope the app sent the event in (NULL: sent bare), kept
    # with a dead letter so that a replayed event leaves under its app's sensor again; `sender`
    # the label of the token it came with.
    """
    ALTER TABLE events ADD COLUMN unconfirmed TEXT;
    ALTER TABLE events ADD COLUMN sensor TEXT;
    ALTER TABLE dead_letters ADD COLUMN sensor TEXT;
    ALTER TABLE events ADD COLUMN sender TEXT;
    ALTER TABLE dead_letters ADD COLUMN sender TEXT;
    """,
    # 5: [[destinations]], each with its own place in the queue, written little per event: a
    # position (every seq at or below it is done there), the ranges acknowledged above it,
    # attempts only for events that failed there, and dead letters naming their destination
    # (the table is rebuilt: an id may now be dead-lettered once per destination). An event
    # [upstream] dead-letters stays, marked, while a destination needs it; `only_for` marks an
    # event queued again for one destination alone (a replayed dead letter whose row was
    # gone), which every other one skips.
    """
    ALTER TABLE events ADD COLUMN only_for TEXT;
    ALTER TABLE events ADD COLUMN upstream_dead INTEGER;
    CREATE TABLE destinations (
        name TEXT PRIMARY KEY,
        position INTEGER NOT NULL,
        done INTEGER NOT NULL DEFAULT 0,
        blocks INTEGER NOT NULL DEFAULT 1,
        delivered_total INTEGER NOT NULL DEFAULT 0,
        dead_lettered_total INTEGER NOT NULL DEFAULT 0,
        dead_letters INTEGER NOT NULL DEFAULT 0
    ) WITHOUT ROWID;
    CREATE TABLE destination_done (
        destination TEXT NOT NULL,
        lo INTEGER NOT NULL,
        hi INTEGER NOT NULL,
        PRIMARY KEY (destination, lo)
    ) WITHOUT ROWID;
    CREATE TABLE destination_attempts (
        destination TEXT NOT NULL,
        seq INTEGER NOT NULL,
        attempts INTEGER NOT NULL,
        first_attempt_at REAL,
        last_attempt_at REAL,
        last_error TEXT,
        PRIMARY KEY (destination, seq)
    ) WITHOUT ROWID;
    CREATE TABLE dead_letters_5 (
        seq INTEGER PRIMARY KEY,
        id TEXT NOT NULL,
        body BLOB NOT NULL,
        received_at REAL NOT NULL,
        reason TEXT NOT NULL,
        status INTEGER,
        response TEXT NOT NULL DEFAULT '',
        attempts INTEGER NOT NULL,
        first_attempt_at REAL,
        last_attempt_at REAL,
        dead_lettered_at REAL NOT NULL,
        sensor TEXT,
        sender TEXT,
        destination TEXT NOT NULL DEFAULT 'upstream',
        UNIQUE (id, destination)
    );
    INSERT INTO dead_letters_5 (seq, id, body, received_at, reason, status, response,
        attempts, first_attempt_at, last_attempt_at, dead_lettered_at, sensor, sender)
    SELECT seq, id, body, received_at, reason, status, response, attempts, first_attempt_at,
        last_attempt_at, dead_lettered_at, sensor, sender FROM dead_letters;
    DROP TABLE dead_letters;
    ALTER TABLE dead_letters_5 RENAME TO dead_letters;
    CREATE TRIGGER dead_in AFTER INSERT ON dead_letters WHEN NEW.destination = 'upstream' BEGIN
        UPDATE totals SET dead_letters = dead_letters + 1,
                          dead_lettered_total = dead_lettered_total + 1;
    END;
    CREATE TRIGGER dead_out AFTER DELETE ON dead_letters WHEN OLD.destination = 'upstream' BEGIN
        UPDATE totals SET dead_letters = dead_letters - 1;
    END;
    CREATE TRIGGER destination_dead_in AFTER INSERT ON dead_letters
    WHEN NEW.destination != 'upstream' BEGIN
        UPDATE destinations SET dead_letters = dead_letters + 1,
            dead_lettered_total = dead_lettered_total + 1 WHERE name = NEW.destination;
    END;
    CREATE TRIGGER destination_dead_out AFTER DELETE ON dead_letters
    WHEN OLD.destination != 'upstream' BEGIN
        UPDATE destinations SET dead_letters = dead_letters - 1 WHERE name = OLD.destination;
    END;
    -- A row stored for one destination alone was never waiting for [upstream], and one
    -- [upstream] dead-lettered was never delivered there.
    DROP TRIGGER events_in;
    CREATE TRIGGER events_in AFTER INSERT ON events WHEN NEW.delivered_at IS NULL BEGIN
        UPDATE totals SET events = events + 1, bytes = bytes + NEW.size;
    END;
    DROP TRIGGER events_delivered;
    CREATE TRIGGER events_delivered AFTER UPDATE OF delivered_at ON events
    WHEN OLD.delivered_at IS NULL AND NEW.delivered_at IS NOT NULL BEGIN
        UPDATE totals SET events = events - 1, bytes = bytes - OLD.size,
                          delivered_total = delivered_total + (NEW.upstream_dead IS NULL);
    END;
    DROP TRIGGER events_requeued;
    CREATE TRIGGER events_requeued AFTER UPDATE OF delivered_at ON events
    WHEN OLD.delivered_at IS NOT NULL AND NEW.delivered_at IS NULL BEGIN
        UPDATE totals SET events = events + 1, bytes = bytes + OLD.size,
                          delivered_total = delivered_total - (OLD.upstream_dead IS NULL);
    END;
    """,
    # 6: marks, what happened to an event at a destination beside its delivery (replayed
    # from an archive; verified, missing, resent or given up by reconciliation), one row
    # each, shown in its journey. They go with the event: when neither its row nor a dead
    # letter of it is left (pruned, purged), nor is its journey, so its marks are deleted
    # too, by whatever deleted the last of it.
    """
    CREATE TABLE marks (
        id TEXT NOT NULL,
        at REAL NOT NULL,
        what TEXT NOT NULL,
        destination TEXT NOT NULL,
        detail TEXT
    );
    CREATE INDEX marks_by_id ON marks (id);
    CREATE TRIGGER marks_of_events_out AFTER DELETE ON events
    WHEN EXISTS (SELECT 1 FROM marks WHERE id = OLD.id) BEGIN
        DELETE FROM marks WHERE id = OLD.id
            AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE id = OLD.id);
    END;
    CREATE TRIGGER marks_of_dead_out AFTER DELETE ON dead_letters
    WHEN EXISTS (SELECT 1 FROM marks WHERE id = OLD.id) BEGIN
        DELETE FROM marks WHERE id = OLD.id
            AND NOT EXISTS (SELECT 1 FROM events WHERE id = OLD.id)
            AND NOT EXISTS (SELECT 1 FROM dead_letters WHERE id = OLD.id);
    END;
    """,
    _ids_indexed_late,
)

VERSION: Final = len(MIGRATIONS)


def file_version(path: Path) -> int | None:
    """The schema version of an outbox file, read without writing; None when there is no
    such file or it cannot be read."""
    if not path.is_file():
        return None
    try:
        conn = sqlite3.connect(f"{path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            return int(conn.execute("PRAGMA user_version").fetchone()[0])
        finally:
            conn.close()
    except sqlite3.Error:
        return None


def migrate(conn: sqlite3.Connection, upto: int = VERSION) -> int:
    """Bring the file up to VERSION (`upto`: an earlier one, as an earlier release left a
    file, for tests); returns the version it had before."""
    (found,) = conn.execute("PRAGMA user_version").fetchone()
    if found > VERSION:
        raise SchemaTooNew(
            f"the outbox has schema version {found}, but this caliper-sidecar knows only up to "
            f"{VERSION}: run the newer release, or restore a backup"
        )
    for version in range(found + 1, upto + 1):
        conn.execute("BEGIN IMMEDIATE")
        try:
            migration = MIGRATIONS[version - 1]
            if callable(migration):
                migration(conn)
            else:
                for statement in _statements(migration):
                    conn.execute(statement)
            conn.execute(f"PRAGMA user_version = {version}")
            conn.execute("COMMIT")
        except BaseException:
            # SQLite has rolled back already after some errors (a full disk): a ROLLBACK then
            # fails, and its error would hide the real one.
            if conn.in_transaction:
                conn.execute("ROLLBACK")
            raise
    return int(found)


def _statements(script: str) -> list[str]:
    """Split a script on complete statements (triggers contain semicolons)."""
    out: list[str] = []
    current = ""
    for line in script.splitlines(keepends=True):
        if line.strip().startswith("--"):
            continue
        current += line
        if sqlite3.complete_statement(current):
            out.append(current.strip())
            current = ""
    if current.strip():
        out.append(current.strip())
    return out
