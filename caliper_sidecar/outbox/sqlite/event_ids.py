"""Event ids in the SQLite outbox: the index that ingest fills late, and lookups by id.

`events.id` has no index of its own (schema version 7): a UNIQUE index cost every ingest
commit a random leaf of a large b-tree per event, written to the WAL and again by the
checkpoint. `event_ids` maps ids to seqs instead, filled from the rows above
`ids_indexed.upto` just before each checkpoint (`index_tail`, in one transaction whose
inserts, sorted, share leaves): within a second of a thousand rows changed or 4 MB of
events written, at least every 30 s (SqliteStorage._checkpoint_often). Until then:

- the writer remembers the ids it inserted (`SqliteStorage._unindexed`), and ingest's
  dedupe lookup reads them beside the index, checked against the rows (`in_tail`: one erased
  meanwhile is gone, one delivered before the dedupe window no longer counts), so a retry
  meanwhile is still a duplicate;
- every other lookup by id reads the index and the rows above `upto` (`seqs_of`): at most
  about 500 events (or 30 s of a quiet outbox), found by seq;
- after a crash, opening the file indexes the tail before anything else runs.

Every other insert into `events` (a replay, a dead letter queued again, from `run` or from
a command beside it) indexes its row at once (`index_now`).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterable
from typing import Final


def seqs_of(ids: str) -> str:
    """An SQL subquery: the seqs of the events whose id is one `ids` selects (such as
    IN_JSON), evaluated once."""
    return (
        f"(WITH wanted(id) AS ({ids}) "
        "SELECT seq FROM event_ids WHERE id IN wanted "
        f"UNION ALL SELECT seq FROM events WHERE {_IN_TAIL} AND id IN wanted)"
    )


#: ids given as a JSON array, bound to the next parameter
IN_JSON: Final = "SELECT value FROM json_each(?)"

#: rows of `events` not indexed yet
_IN_TAIL: Final = "seq > (SELECT upto FROM ids_indexed)"
#: a row if any is not indexed yet
TAIL_EXISTS: Final = f"SELECT 1 FROM events WHERE {_IN_TAIL} LIMIT 1"


def index_tail(conn: sqlite3.Connection) -> int:
    """Index every row above `upto`; how many. In the caller's transaction."""
    (upto,) = conn.execute("SELECT upto FROM ids_indexed").fetchone()
    # Sorted by id: neighbouring inserts land in the same leaf. The newest row of an id wins
    # (a re-sent id whose delivered row outlived the dedupe window, until it is pruned).
    cur = conn.execute(
        "INSERT OR REPLACE INTO event_ids (id, seq) "
        "SELECT id, seq FROM events WHERE seq > ? ORDER BY id, seq",
        (upto,),
    )
    conn.execute(
        "UPDATE ids_indexed SET upto = (SELECT max(?1, coalesce(max(seq), 0)) FROM events)",
        (upto,),
    )
    return cur.rowcount


def in_tail(
    conn: sqlite3.Connection, ids: Iterable[str], delivered_since: float
) -> list[tuple[str, int, bool]]:
    """(id, seq, whether it still counts) of the rows not indexed yet that have one of these
    ids: the writer's memory of its unindexed ids, checked (a row erased or purged meanwhile
    is gone, and one delivered before `delivered_since`, the dedupe window, no longer
    counts), as `writes._KNOWN_IDS` answers for the indexed ones."""
    wanted = list(ids)
    if not wanted:
        return []
    return [
        (str(id_), int(seq), bool(live))
        for id_, seq, live in conn.execute(
            f"SELECT id, seq, delivered_at IS NULL OR delivered_at >= ? FROM events "
            f"WHERE {_IN_TAIL} AND id IN ({IN_JSON})",
            (delivered_since, json.dumps(wanted)),
        )
    ]


def index_now(conn: sqlite3.Connection, id_: str, seq: int) -> None:
    """Index a row inserted outside ingest's packed insert."""
    conn.execute("INSERT OR REPLACE INTO event_ids (id, seq) VALUES (?, ?)", (id_, seq))
