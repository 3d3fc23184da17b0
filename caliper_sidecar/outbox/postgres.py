"""The PostgreSQL outbox: one database shared by any number of `run` replicas.

- Ingest uses the same group commit as SQLite: one transaction per group, the ids of known
  events (waiting, dead-lettered, or delivered within the dedupe window) skipped, a new id
  inserted with `ON CONFLICT DO NOTHING`-like semantics so that two replicas receiving the same
  event store it once.
- Waiting events are rows of a small `queue` table beside the events. Claims are leases: a
  short transaction marks the oldest unclaimed queue rows (`FOR UPDATE SKIP LOCKED`, so
  replicas never wait for each other) with the claim's id and an expiry, and commits; nothing
  is held open while sending. Every outcome is fenced by the claim id: an outcome for rows
  another replica took over after the lease expired changes nothing.
- The drain writes no new row versions outside the pages it reads: claims update the queue's
  small rows in place, an acknowledgement deletes the queue row and updates the event in place
  (no index covers what either changes, and fillfactor leaves room on every page), and pruning
  deletes. So a database whose disk filled keeps draining (schema version 3 explains more).
- Times that order events (receive time, leases) are the database server's clock, one clock
  for every replica.
- Appends and replays NOTIFY; every replica LISTENs, and polls once a second besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Callable, Coroutine, Mapping, Sequence
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import asyncpg
import structlog

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import (
    OutboxUnavailable,
    OutboxUnusable,
    ReplicasDisagree,
    storage_error,
)
from caliper_sidecar.ids import canonical_id
from caliper_sidecar.outbox.base import (
    DEAD_CHUNK,
    DEAD_LETTER_COLUMNS,
    JOURNEY_COLUMNS,
    PRUNE_CHUNK,
    PRUNE_EVERY_S,
    AppendResult,
    Batch,
    Claim,
    DeadLetter,
    Journey,
    NewEvent,
    OutboxStats,
    PlatformJobOutcome,
    StoredEvent,
    WriteHealth,
    dead_journey,
    journey_of,
    new_per_append,
)
from caliper_sidecar.outbox.batching import fill_batch
from caliper_sidecar.outbox.grouping import GroupCommit
from caliper_sidecar.outbox.postgres_replicas import join
from caliper_sidecar.outbox.postgres_room import (
    ROOM_EVERY_S,
    Footprint,
    keep_reserve,
    release_reserve,
    win_back_room,
)
from caliper_sidecar.outbox.postgres_schema import (
    MIGRATION_LOCK,
    MIGRATIONS,
    SCHEMA,
    VERSION,
)
from caliper_sidecar.outbox.schema import SchemaTooNew
from caliper_sidecar.states import DeadLetterReason
from caliper_sidecar.waits import wait_set

log = structlog.get_logger("sidecar.outbox")

CHANNEL: Final = "caliper_sidecar_appended"
NOW: Final = "extract(epoch from clock_timestamp())::double precision"
POOL_SIZE: Final = 8
#: the application_name of the LISTEN connection (pg_stat_activity shows it)
LISTENER_NAME: Final = "caliper-sidecar-listen"
_DISK_FULL: Final = "53100"
#: the events a platform job was sent with
_JOB_SEQS: Final = "(SELECT seqs FROM platform_jobs WHERE id = $1)::bigint[]"
#: an event stored anew: a delivered one older than the dedupe window, received again
_STORED_ANEW: Final = """body = excluded.body, size = excluded.size,
    received_at = excluded.received_at, attempts = 0, first_attempt_at = NULL,
    last_attempt_at = NULL, last_error = NULL, delivered_at = NULL, platform_job = NULL,
    platform_id = NULL, confirmed_at = NULL, unconfirmed = NULL, sensor = excluded.sensor,
    sender = excluded.sender"""

#: an append: the events of one request, and the job id an app is answered with
_Append = tuple[Sequence[NewEvent], str | None]
#: an acknowledgement: the claim, its events, the platform job and why it cannot be confirmed
_Ack = tuple[Claim, list[int], str | None, str | None]

_P = ParamSpec("_P")
_T = TypeVar("_T")


def _drain_write(
    write: Callable[Concatenate[PostgresOutbox, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[PostgresOutbox, _P], Coroutine[Any, Any, _T]]:
    """A write of the drain (claims, outcomes, jobs): when the disk is full, it runs again in
    the room the reserve kept for it."""

    @functools.wraps(write)
    async def in_reserve(outbox: PostgresOutbox, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
        try:
            return await write(outbox, *args, **kwargs)
        except OutboxUnavailable as e:
            if e.reason != "disk_full":
                raise
            # Once, whether this write empties the reserve or a concurrent one just did (the
            # acknowledgements of one group all meet the full disk together).
            await outbox._release_reserve()
        return await write(outbox, *args, **kwargs)

    return in_reserve


class PostgresOutbox:
    """The outbox in a PostgreSQL database, shared by replicas (see the module)."""

    def __init__(
        self,
        settings: OutboxSettings,
        lease_s: float = 65.0,
        agreement: Mapping[str, str] | None = None,
    ) -> None:
        self._dsn = str(settings.url)
        #: what every live replica must have alike (None: not a replica, the CLI)
        self._agreement = dict(agreement) if agreement is not None else None
        self.replica_id = uuid.uuid4().hex
        self._heartbeat: asyncio.Task[None] | None = None
        self.max_events = settings.max_events
        self.max_bytes = settings.max_bytes
        self.dedupe_window_s = settings.dedupe_window_s
        self.lease_s = lease_s
        #: "full" waits for the WAL flush of every commit; "normal" lets PostgreSQL flush a
        #: moment later (synchronous_commit off: a database crash may lose the last commits)
        self._synchronous_commit = "on" if settings.synchronous == "full" else "off"
        self.commits = 0
        self._pool: asyncpg.Pool | None = None
        self._listener: asyncpg.Connection | None = None
        self._appended = asyncio.Event()
        self._appends: GroupCommit[_Append, AppendResult] = GroupCommit(
            self._commit_appends, "outbox-appends"
        )
        self._acks: GroupCommit[_Ack, None] = GroupCommit(self._commit_acks, "outbox-acks")
        self._last_prune = float("-inf")
        #: the last claim was full: more is waiting
        self._backlog = False
        self.writes = WriteHealth(outbox="postgresql")
        self._closing = False
        self._footprint = Footprint()
        #: winning back room after ingest found the disk full (ingest refuses meanwhile)
        self._recovering: asyncio.Task[None] | None = None
        #: where the next prune looks (a seq): pruning walks the events in chunks
        self._prune_after = 0
        self._relisten: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> PostgresOutbox:
        """Connect, create or migrate the schema, listen; raises OutboxUnusable or
        SchemaTooNew with nothing left open."""
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=POOL_SIZE,
                server_settings={
                    "search_path": SCHEMA,
                    "synchronous_commit": self._synchronous_commit,
                    "application_name": "caliper-sidecar",
                },
            )
            await self._migrate()
            if self._agreement is not None:
                await self._join()
            await self._listen()
        except (SchemaTooNew, ReplicasDisagree):
            await self.close()
            raise
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            await self.close()
            raise OutboxUnusable(f"outbox.url (PostgreSQL) cannot be used: {e}") from None
        self._appends.start()
        self._acks.start()
        if self._agreement is not None:
            self._heartbeat = asyncio.create_task(self._beat(), name="outbox-heartbeat")
        return self

    async def _join(self) -> None:
        assert self._agreement is not None
        async with self._transaction() as conn:
            await join(conn, self.replica_id, self._agreement, self.lease_s)

    async def _beat(self) -> None:
        """Say every lease_s / 4 that this replica lives (its row and its platform jobs)."""
        while True:
            await asyncio.sleep(self.lease_s / 4)
            try:
                async with self._connection() as conn:
                    await conn.execute(
                        f"UPDATE replicas SET seen_until = {NOW} + $2 WHERE id = $1",
                        self.replica_id,
                        self.lease_s,
                    )
            except (OSError, OutboxUnavailable, asyncpg.PostgresError) as e:
                log.warning("replica_heartbeat_failed", error=str(e))

    async def _listen(self) -> None:
        """A connection of its own that LISTENs for appends by any replica (or the CLI)."""
        listener = await asyncpg.connect(
            self._dsn,
            server_settings={"search_path": SCHEMA, "application_name": LISTENER_NAME},
        )
        await listener.add_listener(CHANNEL, self._notified)
        listener.add_termination_listener(self._listener_lost)
        self._listener = listener

    def _listener_lost(self, _: object) -> None:
        """The LISTEN connection died (a PostgreSQL restart, a terminated backend): get it back,
        or every replica would notice the others' appends only at the idle poll."""
        if self._closing or (self._relisten is not None and not self._relisten.done()):
            return
        log.warning("outbox_listen_lost")
        self._relisten = asyncio.create_task(self._listen_again(), name="outbox-relisten")

    async def _listen_again(self) -> None:
        delay = 0.5
        while not self._closing:
            try:
                await self._listen()
            except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
                log.warning("outbox_listen_retry", error=str(e), retry_in_s=delay)
                await asyncio.sleep(delay)
                delay = min(delay * 2, 30.0)
                continue
            log.info("outbox_listen_restored")
            self._appended.set()  # what was appended meanwhile is looked at now
            return

    async def close(self) -> None:
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        if self._pool is not None and self._agreement is not None:
            # Leave: the jobs this replica followed go to the others at once, and a replica
            # with new settings may start once every one has left.
            with contextlib.suppress(OSError, OutboxUnavailable, asyncpg.PostgresError):
                async with self._connection() as conn:
                    await conn.execute(
                        "UPDATE platform_jobs SET followed_by = NULL, follow_until = NULL "
                        "WHERE followed_by = $1",
                        self.replica_id,
                    )
                    await conn.execute("DELETE FROM replicas WHERE id = $1", self.replica_id)
        if self._recovering is not None:
            self._recovering.cancel()
            await asyncio.gather(self._recovering, return_exceptions=True)
        if self._relisten is not None:
            self._relisten.cancel()
            await asyncio.gather(self._relisten, return_exceptions=True)
        await self._appends.close()
        await self._acks.close()
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.close()
            self._listener = None
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _migrate(self) -> None:
        async with self._connection() as conn, conn.transaction():
            # Replicas starting at once: one migrates, the others wait, then find it done.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", MIGRATION_LOCK)
            await conn.execute(f"CREATE SCHEMA IF NOT EXISTS {SCHEMA}")
            await conn.execute(
                f"CREATE TABLE IF NOT EXISTS {SCHEMA}.schema_version (version integer NOT NULL)"
            )
            found = await conn.fetchval(f"SELECT max(version) FROM {SCHEMA}.schema_version") or 0
            if found > VERSION:
                raise SchemaTooNew(
                    f"the PostgreSQL outbox has schema version {found}, but this caliper-sidecar "
                    f"knows only up to {VERSION}: run the newer release on every replica"
                )
            for version in range(found + 1, VERSION + 1):
                await conn.execute(MIGRATIONS[version - 1])
                await conn.execute(
                    f"INSERT INTO {SCHEMA}.schema_version (version) VALUES ($1)", version
                )

    def _notified(self, *_: Any) -> None:
        self._appended.set()

    @contextlib.asynccontextmanager
    async def _connection(self) -> AsyncIterator[asyncpg.Connection]:
        if self._pool is None:
            raise OutboxUnavailable("closed", "the outbox is not open")
        try:
            async with self._pool.acquire() as conn:
                yield conn
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            raise _unavailable(e) from e

    @contextlib.asynccontextmanager
    async def _transaction(self) -> AsyncIterator[asyncpg.Connection]:
        async with self._connection() as conn, conn.transaction():
            yield conn

    # -- ingest ----------------------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent], job: str | None = None) -> AppendResult:
        return await self._appends.submit((events, job))

    async def _commit_appends(self, group: list[_Append]) -> list[AppendResult | OutboxUnavailable]:
        try:
            if self._recovering is not None:
                # Nothing is written while the room is being won back: a refused write would
                # still extend a file, and take the very pages the drain frees.
                raise _disk_full()
            results = await self._insert_new(group)
        except OutboxUnavailable as e:
            self.writes.failed(e)
            if e.reason == "disk_full" and self._recovering is None and not self._closing:
                self._recovering = asyncio.create_task(self._recover_room(), name="outbox-room")
            raise
        self.writes.succeeded()
        if any(isinstance(r, AppendResult) and r.accepted for r in results):
            self._appended.set()
        return results

    async def _insert_new(self, group: list[_Append]) -> list[AppendResult | OutboxUnavailable]:
        all_ids = [e.id for events, _ in group for e in events]
        async with self._transaction() as conn:
            # One round trip for the clock, the reserve and the totals.
            now, reserve_whole, depth, size = await conn.fetchrow(
                f"SELECT {NOW}, EXISTS (SELECT 1 FROM reserve), "
                "(SELECT sum(events) FROM totals), (SELECT sum(bytes) FROM totals)"
            )
            if not reserve_whole:
                await keep_reserve(conn)
            known = {
                r["id"]
                for r in await conn.fetch(
                    "SELECT id FROM events WHERE id = ANY($1::text[]) AND "
                    "(delivered_at IS NULL OR delivered_at >= $2) "
                    "UNION ALL SELECT id FROM dead_letters WHERE id = ANY($1::text[])",
                    all_ids,
                    now - self.dedupe_window_s,
                )
            }
            depth, size = int(depth or 0), max(int(size or 0), await self._footprint.read(conn))
            fresh_by_append = new_per_append(
                [events for events, _ in group],
                known,
                depth,
                size,
                self.max_events,
                self.max_bytes,
            )
            rows = [e for f in fresh_by_append if isinstance(f, list) for e in f]
            stored: set[str] = set()
            if rows:
                # A delivered event older than the dedupe window, not yet pruned, is stored
                # anew; a row another replica committed meanwhile stays as it is (not RETURNING).
                stored = {
                    r["id"]
                    for r in await conn.fetch(
                        f"""
                        WITH stored AS (
                            INSERT INTO events (id, body, size, received_at, sensor, sender)
                            SELECT id, body, length(body), {NOW}, sensor, sender
                            FROM unnest($1::text[], $2::bytea[], $4::text[], $5::text[])
                                AS t(id, body, sensor, sender)
                            ON CONFLICT (id) DO UPDATE SET {_STORED_ANEW}
                            WHERE events.delivered_at IS NOT NULL AND events.delivered_at < $3
                            RETURNING seq, id
                        ), queued AS (
                            INSERT INTO queue (seq) SELECT seq FROM stored ON CONFLICT DO NOTHING
                        )
                        SELECT id FROM stored
                        """,
                        [e.id for e in rows],
                        [e.body for e in rows],
                        now - self.dedupe_window_s,
                        [e.sensor for e in rows],
                        [e.sender for e in rows],
                    )
                }
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
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
        self.commits += 1
        results: list[AppendResult | OutboxUnavailable] = []
        for (events, _), outcome in zip(group, fresh_by_append, strict=True):
            if isinstance(outcome, OutboxUnavailable):
                results.append(outcome)
            else:
                accepted = sum(1 for e in outcome if e.id in stored)
                results.append(AppendResult(accepted, len(events) - accepted))
        return results

    async def _recover_room(self) -> None:
        """After ingest found the disk full: try every ROOM_EVERY_S to win back the room;
        once the reserve is whole again, ingest accepts."""
        while True:
            await asyncio.sleep(ROOM_EVERY_S)
            try:
                async with self._connection() as conn:
                    if not await win_back_room(conn):
                        continue
            except OutboxUnavailable as e:
                log.warning("outbox_room_not_back", error=str(e), detail=e.detail)
                continue
            log.info("outbox_room_back")
            self._recovering = None
            return

    async def _release_reserve(self) -> None:
        async with self._connection() as conn:
            await release_reserve(conn)

    def unwritable_reason(self) -> str | None:
        return self.writes.current()

    # -- dispatch --------------------------------------------------------------------------

    async def wait_appended(self, timeout: float | None) -> None:
        await wait_set(self._appended, timeout)

    @_drain_write
    async def claim_batch(self, max_events: int, max_bytes: int, linger_s: float = 0) -> Batch:
        self._appended.clear()
        async with self._connection() as conn:
            if not self._backlog:
                ready_in = await self._look(conn, max_events, max_bytes, linger_s)
                if ready_in is not None:
                    return Batch([], False, ready_in=ready_in or None)
            claim_id = uuid.uuid4().hex
            # A claim lost in a database crash costs nothing (the events are simply
            # unclaimed): its one-statement transaction need not wait for its WAL flush.
            rows = await conn.fetch(
                f"""
                WITH unflushed AS (
                    SELECT set_config('synchronous_commit', 'off', true)
                ), picked AS (
                    SELECT seq FROM queue, unflushed
                    WHERE claim_until IS NULL OR claim_until < {NOW}
                    ORDER BY seq LIMIT $1 FOR UPDATE OF queue SKIP LOCKED
                ), claimed AS (
                    UPDATE queue q SET claimed_by = $2, claim_until = {NOW} + $3
                    FROM picked WHERE q.seq = picked.seq
                    RETURNING q.seq, q.claim_until
                )
                SELECT e.seq, e.id, e.body, e.received_at, e.attempts, e.first_attempt_at,
                    e.sensor, (SELECT max(claim_until) FROM claimed) AS claim_until
                FROM events e WHERE e.seq = ANY(ARRAY(SELECT seq FROM claimed))
                """,
                max_events,
                claim_id,
                self.lease_s,
            )
        # A full claim means a backlog: the next claim needs no look first.
        self._backlog = len(rows) >= max_events
        if not rows:
            return Batch([], False)
        rows = sorted(rows, key=lambda r: r["seq"])
        claim = Claim(claim_id, float(rows[0]["claim_until"]))
        stored = [StoredEvent(*tuple(r)[:7]) for r in rows]
        events, full = fill_batch(stored, max_events, max_bytes)
        if len(events) < len(stored):
            kept = {e.seq for e in events}
            await self.release(claim, [e.seq for e in stored if e.seq not in kept])
        return Batch(events, full, claim)

    async def _look(
        self, conn: asyncpg.Connection, max_events: int, max_bytes: int, linger_s: float
    ) -> float | None:
        """A look first, without locks: is a batch worth claiming yet? Claiming and giving back
        what is not would write (and bloat) the same rows again and again. None: claim now;
        0: nothing waits; otherwise the seconds until the oldest has lingered enough."""
        head = await conn.fetch(
            f"""
                SELECT size, received_at, {NOW} AS now FROM events WHERE seq = ANY(ARRAY(
                    SELECT seq FROM queue WHERE claim_until IS NULL OR claim_until < {NOW}
                    ORDER BY seq LIMIT $1))
                ORDER BY seq
                """,
            max_events,
        )
        if not head:
            return 0.0
        full = len(head) >= max_events or sum(r["size"] + 1 for r in head) - 1 > max_bytes
        wait = float(linger_s - (head[0]["now"] - head[0]["received_at"]))
        return wait if not full and wait > 0 else None

    @_drain_write
    async def extend(self, claim: Claim) -> None:
        async with self._connection() as conn:
            await conn.execute(
                f"UPDATE queue SET claim_until = {NOW} + $2 WHERE claimed_by = $1",
                claim.id,
                self.lease_s,
            )

    @_drain_write
    async def release(self, claim: Claim, seqs: Sequence[int]) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE queue SET claimed_by = NULL, claim_until = NULL "
                "WHERE seq = ANY($1::bigint[]) AND claimed_by = $2",
                list(seqs),
                claim.id,
            )

    @_drain_write
    async def acknowledge(
        self,
        claim: Claim,
        seqs: Sequence[int],
        platform_job: str | None = None,
        unconfirmed: str | None = None,
    ) -> None:
        await self._acks.submit((claim, list(seqs), platform_job, unconfirmed))

    async def _commit_acks(self, group: list[_Ack]) -> list[OutboxUnavailable | None]:
        """Acknowledgements of concurrent deliveries, in one transaction: one WAL flush for
        the group (as on SQLite), not one per envelope."""
        async with self._transaction() as conn:
            for claim, seqs, platform_job, unconfirmed in group:
                await self._record_ack(conn, claim, seqs, platform_job, unconfirmed)
            if time.monotonic() - self._last_prune > PRUNE_EVERY_S:
                await self._prune(conn)
        return [None] * len(group)

    async def _record_ack(
        self,
        conn: asyncpg.Connection,
        claim: Claim,
        seqs: list[int],
        platform_job: str | None,
        unconfirmed: str | None,
    ) -> None:
        done = [
            r["seq"]
            for r in await conn.fetch(
                f"""
                WITH dequeued AS (
                    DELETE FROM queue WHERE seq = ANY($1::bigint[]) AND claimed_by = $2
                    RETURNING seq
                )
                UPDATE events e SET delivered_at = {NOW}, platform_job = $3,
                    unconfirmed = $4,
                    body = CASE WHEN $3::text IS NULL THEN ''::bytea ELSE body END,
                    attempts = attempts + 1,
                    first_attempt_at = coalesce(first_attempt_at, {NOW}),
                    last_attempt_at = {NOW}
                WHERE e.seq = ANY(ARRAY(SELECT seq FROM dequeued))
                RETURNING e.seq
                """,
                seqs,
                claim.id,
                platform_job,
                unconfirmed,
            )
        ]
        _fenced(claim, seqs, len(done))
        if platform_job is not None and done:
            await conn.execute(
                "INSERT INTO platform_jobs (id, sent_at, state, followed_by, follow_until, "
                f"seqs) VALUES ($1, {NOW}, 'waiting', $2, {NOW} + $3, $4) "
                "ON CONFLICT (id) DO UPDATE SET seqs = platform_jobs.seqs || excluded.seqs",
                platform_job,
                self.replica_id,
                self.lease_s,
                done,
            )

    async def _prune(self, conn: asyncpg.Connection) -> None:
        """Forget delivered events older than the dedupe window: a walk through the events in
        seq order (roughly the order they were received and delivered in), a chunk per call,
        until it reaches events too young to be forgotten; then again after PRUNE_EVERY_S.
        (An index on delivered_at would find them at once, but would make every
        acknowledgement write a new row version elsewhere: see schema version 3.)"""
        cutoff = await conn.fetchval(f"SELECT {NOW} - $1::double precision", self.dedupe_window_s)
        last, scanned, youngest = await conn.fetchrow(
            """
            WITH chunk AS (
                SELECT seq, received_at, delivered_at, platform_job FROM events
                WHERE seq > $1 ORDER BY seq LIMIT $2
            ), gone AS (
                DELETE FROM events WHERE seq IN (
                    SELECT seq FROM chunk WHERE delivered_at < $3 AND NOT EXISTS (
                        SELECT 1 FROM platform_jobs p
                        WHERE p.id = chunk.platform_job AND p.state != 'unconfirmed'))
            )
            SELECT max(seq), count(*), max(received_at) FROM chunk
            """,
            self._prune_after,
            PRUNE_CHUNK,
            cutoff,
        )
        await conn.execute("DELETE FROM jobs WHERE created_at < $1", cutoff)
        await conn.execute(
            "DELETE FROM platform_jobs WHERE state = 'unconfirmed' AND sent_at < $1", cutoff
        )
        if scanned < PRUNE_CHUNK or youngest >= cutoff:
            self._prune_after = 0
            self._last_prune = time.monotonic()
        else:
            self._prune_after = last

    @_drain_write
    async def record_failure(self, claim: Claim, seqs: Sequence[int], error: str) -> None:
        async with self._connection() as conn:
            status = await conn.execute(
                f"""
                WITH released AS (
                    UPDATE queue SET claimed_by = NULL, claim_until = NULL
                    WHERE seq = ANY($1::bigint[]) AND claimed_by = $2
                    RETURNING seq
                )
                UPDATE events e SET attempts = attempts + 1,
                    first_attempt_at = coalesce(first_attempt_at, {NOW}),
                    last_attempt_at = {NOW}, last_error = $3
                WHERE e.seq = ANY(ARRAY(SELECT seq FROM released))
                """,
                list(seqs),
                claim.id,
                error[:1024],
            )
        _fenced(claim, seqs, _count(status))

    @_drain_write
    async def dead_letter(
        self, claim: Claim, seqs: Sequence[int], reason: str, status: int | None, response: str
    ) -> None:
        async with self._transaction() as conn:
            moved = await self._move_to_dead_letters(conn, seqs, reason, status, response, claim.id)
        _fenced(claim, seqs, moved)

    @staticmethod
    async def _move_to_dead_letters(
        conn: asyncpg.Connection,
        seqs: Sequence[int],
        reason: str,
        status: int | None,
        response: str,
        claim: str | None,
    ) -> int:
        """Move these events (held by `claim`, when given) to the dead letters; the count."""
        moved = await conn.fetchval(
            """
            WITH dequeued AS (
                DELETE FROM queue WHERE seq = ANY($1::bigint[])
                    AND ($6::text IS NULL OR claimed_by = $6)
                RETURNING seq
            ), gone AS (
                DELETE FROM events WHERE seq = ANY($1::bigint[])
                    AND ($6::text IS NULL OR seq IN (SELECT seq FROM dequeued))
                RETURNING seq, id, body, received_at, attempts, first_attempt_at, sensor, sender
            ), dead AS (
                INSERT INTO dead_letters (id, body, received_at, reason, status, response,
                    attempts, first_attempt_at, last_attempt_at, dead_lettered_at, sensor,
                    sender)
                SELECT id, body, received_at, $2, $3, $4, attempts + 1,
                    coalesce(first_attempt_at, $5), $5, $5, sensor, sender
                FROM gone ORDER BY seq
                ON CONFLICT (id) DO UPDATE SET body = excluded.body, reason = excluded.reason,
                    sensor = excluded.sensor, sender = excluded.sender,
                    status = excluded.status, response = excluded.response,
                    attempts = excluded.attempts, last_attempt_at = excluded.last_attempt_at,
                    dead_lettered_at = excluded.dead_lettered_at
                RETURNING 1
            )
            SELECT count(*) FROM dead
            """,
            list(seqs),
            reason,
            status,
            response[:1024],
            time.time(),
            claim,
        )
        return int(moved)

    # -- inspection and operations ---------------------------------------------------------

    async def stats(self) -> OutboxStats:
        async with self._connection() as conn:
            totals = await conn.fetchrow(
                "SELECT sum(events), sum(bytes), sum(dead_letters), sum(delivered_total), "
                "sum(dead_lettered_total) FROM totals"
            )
            oldest = await conn.fetchval(
                "SELECT received_at FROM events WHERE seq = (SELECT min(seq) FROM queue)"
            )
            jobs = await conn.fetch("SELECT state, count(*) FROM platform_jobs GROUP BY state")
        values = [int(v or 0) for v in totals]
        return OutboxStats(
            events=values[0],
            bytes=values[1],
            oldest_received_at=oldest,
            dead_letters=values[2],
            delivered_total=values[3],
            dead_lettered_total=values[4],
            platform_jobs={str(r[0]): int(r[1]) for r in jobs},
        )

    async def dead_letters(self, limit: int, after: str | None = None) -> list[DeadLetter]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters "
                "WHERE $1::text IS NULL OR seq > (SELECT seq FROM dead_letters WHERE id = $1) "
                "ORDER BY seq LIMIT $2",
                after,
                limit,
            )
        return [DeadLetter(*tuple(r)) for r in rows]

    async def replay_dead_letters(
        self, ids: Sequence[str] | None, progress: Callable[[int], None] | None = None
    ) -> int:
        return await self._dead_letters_in_chunks(ids, progress, replay=True)

    async def purge_dead_letters(
        self, ids: Sequence[str] | None, progress: Callable[[int], None] | None = None
    ) -> int:
        return await self._dead_letters_in_chunks(ids, progress, replay=False)

    async def _dead_letters_in_chunks(
        self, ids: Sequence[str] | None, progress: Callable[[int], None] | None, replay: bool
    ) -> int:
        """DEAD_CHUNK dead letters per transaction (see the SQLite outbox for why)."""
        wanted = None if ids is None else [canonical_id(i) for i in ids]
        done = 0
        while True:
            async with self._transaction() as conn:
                chunk = [
                    r["seq"]
                    for r in await conn.fetch(
                        "SELECT seq FROM dead_letters WHERE $1::text[] IS NULL OR id = ANY($1) "
                        "ORDER BY seq LIMIT $2 FOR UPDATE SKIP LOCKED",
                        wanted,
                        DEAD_CHUNK,
                    )
                ]
                if not chunk:
                    return done
                if replay:
                    await conn.execute(
                        f"""
                        WITH stored AS (
                            INSERT INTO events (id, body, size, received_at, sensor, sender)
                            SELECT id, body, length(body), received_at, sensor, sender
                            FROM dead_letters
                            WHERE seq = ANY($1::bigint[]) ORDER BY seq
                            ON CONFLICT (id) DO UPDATE SET {_STORED_ANEW}
                            RETURNING seq
                        )
                        INSERT INTO queue (seq) SELECT seq FROM stored ON CONFLICT DO NOTHING
                        """,
                        chunk,
                    )
                    await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
                await conn.execute("DELETE FROM dead_letters WHERE seq = ANY($1::bigint[])", chunk)
            done += len(chunk)
            if progress is not None:
                progress(done)

    # -- processing confirmation -----------------------------------------------------------

    async def job_ids_sent_in(self, platform_job: str) -> list[str]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT id FROM events WHERE seq = ANY({_JOB_SEQS}) AND platform_job = $1 "
                "AND confirmed_at IS NULL ORDER BY seq",
                platform_job,
            )
        return [str(r["id"]) for r in rows]

    @_drain_write
    async def pending_platform_jobs(self) -> list[str]:
        """The open jobs this replica follows: its own (their leases renewed), and those no
        live replica follows (never leased, released at a stop, or a dead replica's whose
        lease ran out), leased to it now."""
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"""
                UPDATE platform_jobs SET followed_by = $1, follow_until = {NOW} + $2
                WHERE state != 'unconfirmed' AND (followed_by = $1 OR followed_by IS NULL
                    OR follow_until IS NULL OR follow_until < {NOW})
                RETURNING id, sent_at
                """,
                self.replica_id,
                self.lease_s,
            )
        return [str(r["id"]) for r in sorted(rows, key=lambda r: r["sent_at"])]

    @_drain_write
    async def platform_job_polled(self, job: str, state: str, error: str | None) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE platform_jobs SET state = $2, polls = polls + 1, last_error = $3 "
                "WHERE id = $1 AND state != 'unconfirmed'",
                job,
                state,
                error and error[:1024],
            )

    @_drain_write
    async def finish_platform_job(self, job: str, outcome: PlatformJobOutcome) -> int:
        now = time.time()
        async with self._transaction() as conn:
            rows = await conn.fetch(
                f"SELECT seq, id FROM events WHERE seq = ANY({_JOB_SEQS}) AND platform_job = $1 "
                "AND confirmed_at IS NULL FOR UPDATE",
                job,
            )
            split = outcome.split([(r["seq"], r["id"]) for r in rows])
            failing, again = split.failing, split.again
            if split.confirmed:
                await conn.executemany(
                    "UPDATE events SET platform_id = $2, confirmed_at = $3, body = ''::bytea "
                    "WHERE seq = $1",
                    [(seq, platform_id, now) for seq, platform_id in split.confirmed],
                )
            if failing:
                await self._move_to_dead_letters(
                    conn, failing, DeadLetterReason.PLATFORM_FAILED, None, outcome.reason, None
                )
            if again:
                await conn.execute(
                    """
                    WITH again AS (
                        UPDATE events SET delivered_at = NULL, platform_job = NULL
                        WHERE seq = ANY($1::bigint[]) RETURNING seq
                    )
                    INSERT INTO queue (seq) SELECT seq FROM again ON CONFLICT DO NOTHING
                    """,
                    again,
                )
                await conn.execute("SELECT pg_notify($1, '')", CHANNEL)
            await conn.execute("DELETE FROM platform_jobs WHERE id = $1", job)
        return len(failing)

    @_drain_write
    async def give_up_platform_job(self, job: str, reason: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE platform_jobs SET state = 'unconfirmed', last_error = $2 WHERE id = $1",
                job,
                reason[:1024],
            )

    async def journeys(self, ids: Sequence[str]) -> dict[str, Journey]:
        wanted = [canonical_id(i) for i in ids]
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"""
                SELECT {JOURNEY_COLUMNS}
                FROM events e LEFT JOIN platform_jobs p ON p.id = e.platform_job
                WHERE e.id = ANY($1::text[])
                """,
                wanted,
            )
            dead = await conn.fetch(
                f"SELECT {DEAD_LETTER_COLUMNS}, sensor, sender FROM dead_letters "
                "WHERE id = ANY($1::text[])",
                wanted,
            )
        found = {r["id"]: journey_of(*tuple(r)) for r in rows}
        for r in dead:
            letter = DeadLetter(*tuple(r)[:-2])
            found[letter.id] = dead_journey(letter, r["sensor"], r["sender"])
        return found

    async def job_event_ids(self, job: str) -> list[str] | None:
        async with self._connection() as conn:
            found = await conn.fetchval("SELECT event_ids FROM jobs WHERE id = $1", job)
        return None if found is None else [str(i) for i in json.loads(found)]


def _fenced(claim: Claim, seqs: Sequence[int], applied: int) -> None:
    if applied < len(seqs):
        log.warning("claim_lost", claim=claim.id, events=len(seqs) - applied)


def _count(status: str) -> int:
    """The row count of a command status such as 'UPDATE 3'."""
    return int(status.rsplit(" ", 1)[-1]) if status and status[-1].isdigit() else 0


def _disk_full() -> OutboxUnavailable:
    return OutboxUnavailable("disk_full", "the database holding the outbox is out of disk", 30)


def _unavailable(e: BaseException) -> OutboxUnavailable:
    if getattr(e, "sqlstate", None) == _DISK_FULL:
        return _disk_full()
    return storage_error(e)
