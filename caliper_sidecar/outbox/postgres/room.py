"""Room for the drain on a PostgreSQL outbox whose disk may fill (docs/operators.md: a database
whose disk filled keeps draining once the platform is back, and ingest refuses early enough to leave
the room the drain needs).

The drain writes little (schema version 4: a row per batch, its lease and then its sent row)
and frees as it goes (the bodies' partitions, dropped once delivered), but what it writes needs
room first. So each database keeps a reserve, a table of RESERVE_ROWS bigint rows (no TOAST,
no index: TRUNCATE gives its space back to the file system without writing a page). Ingest
refills it before it stores events, so it is ingest that finds the disk full first; a drain
write that finds the disk full empties it and runs again. While the disk is full ingest writes
nothing, and `win_back_room` tries every ROOM_EVERY_S to make room again.
"""

from __future__ import annotations

import time
from typing import Final

import asyncpg
import structlog

from caliper_sidecar.outbox.postgres.bodies import horizon
from caliper_sidecar.outbox.postgres.schema import BODIES_SPAN, RESERVE_ROWS

log = structlog.get_logger("sidecar.outbox")

ROOM_EVERY_S: Final = 5.0
#: what the outbox's tables take when (nearly) empty, not counted against outbox.max_bytes
EMPTY_TABLES_ALLOWANCE: Final = 1 << 20


async def keep_reserve(conn: asyncpg.Connection) -> None:
    """Refill the drain's reserve before storing events: on a disk that cannot hold it,
    ingest refuses (disk_full) while the drain still has its room. (It is emptied whole, so a
    row in it means it is whole.)"""
    if await conn.fetchval("SELECT EXISTS (SELECT 1 FROM reserve)"):
        return
    await conn.execute("LOCK TABLE reserve IN SHARE ROW EXCLUSIVE MODE")
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM reserve)"):
        await conn.execute(
            "INSERT INTO reserve (filler) SELECT generate_series(1, $1)", RESERVE_ROWS
        )


async def release_reserve(conn: asyncpg.Connection) -> bool:
    """Give the reserve's space to the drain; False when there was none left."""
    if not await conn.fetchval("SELECT EXISTS (SELECT 1 FROM reserve)"):
        return False
    await conn.execute("TRUNCATE reserve")
    log.warning(
        "outbox_reserve_released",
        detail="the database's disk is full: the drain goes on in the room kept for it; "
        "ingest refuses until the room is back",
    )
    return True


async def win_back_room(conn: asyncpg.Connection) -> bool:
    """One try at making room after ingest found the disk full: give back what refused writes
    took (the pages of a failed refill of the reserve), have the server give back what the
    drain emptied (the tail of a table, TOAST included, returns to the file system only when
    vacuumed, and autovacuum may be a minute away or unable to start), and refill the reserve.
    True once it is whole again."""
    whole = await conn.fetchval("SELECT EXISTS (SELECT 1 FROM reserve)")
    if not whole:
        await conn.execute("TRUNCATE reserve")
    # VACUUM runs in no transaction, so no SET LOCAL: the session's statement_timeout is
    # lifted around it (a big table's vacuum may take longer) and given back.
    await conn.execute("SET statement_timeout = 0")
    try:
        await conn.execute(
            "VACUUM (SKIP_LOCKED) events, batches, sent, dead_letters, destination_batches, "
            "destination_attempts"
        )
    finally:
        await conn.execute("RESET statement_timeout")
    if whole:
        return True
    try:
        async with conn.transaction():
            await keep_reserve(conn)
    except asyncpg.DiskFullError:
        await conn.execute("TRUNCATE reserve")
        return False
    return True


#: the tables' size on disk; of the bodies, the partitions that hold something any queue but
#: a destination that does not block waits for (and, as ever, those waiting to be dropped)
_FOOTPRINT: Final = f"""
    WITH h AS (SELECT ({horizon("blocks")}) AS blocking, ({horizon()}) AS every),
    parts AS (
        SELECT relid, (substring(relid::regclass::text FROM '_([0-9]+)$')::bigint + 1) * $1
            AS upto
        FROM pg_partition_tree('bodies') WHERE isleaf
    )
    SELECT pg_total_relation_size('events') + pg_total_relation_size('batches')
        + pg_total_relation_size('sent') + pg_total_relation_size('dead_letters')
        + pg_total_relation_size('destination_batches')
        + pg_total_relation_size('destination_attempts')
        + (SELECT coalesce(sum(pg_total_relation_size(relid)), 0) FROM parts, h
            WHERE NOT (upto <= h.blocking AND upto > h.every))
"""


class Footprint:
    """What the queue really takes on disk beyond EMPTY_TABLES_ALLOWANCE: its pages, dead
    versions and indexes, which the sum of event sizes does not see (read at most once a
    second: it asks the file system). Not the bodies' partitions that only destinations that
    do not block still hold: those never make ingest refuse (their backlog is shed by count
    instead)."""

    def __init__(self) -> None:
        self._at = float("-inf")
        self._bytes = 0

    async def read(self, conn: asyncpg.Connection) -> int:
        now = time.monotonic()
        if now - self._at >= 1.0:
            self._at = now
            real = await conn.fetchval(_FOOTPRINT, BODIES_SPAN)
            self._bytes = max(0, int(real) - EMPTY_TABLES_ALLOWANCE)
        return self._bytes
