"""The PostgreSQL storage of the outbox: one database shared by any number of `run` replicas.

- Ingest uses the same group commit as SQLite: one transaction per group, the ids of known
  events (waiting, dead-lettered, or delivered within the dedupe window) skipped, a new id
  inserted with `ON CONFLICT DO NOTHING` so that two replicas receiving the same event store it
  once. Groups commit one at a time across replicas, so events become visible in seq order.
- Events are written once (schema version 4 explains more). Claims are leases: `head` says
  where the events never claimed begin, and a claim takes the next ones from it (or, first,
  what was given back or whose lease expired) in one statement, writing one `batches` row with
  the claim's id and an expiry; nothing is held open while sending. Every outcome is fenced by
  the claim id: an outcome for events another replica took over after the lease expired
  changes nothing. An acknowledgement group is one statement too: one `sent` row per batch.
- So the drain leaves almost no dead row versions, and gives space back as it goes (the
  bodies' partitions, bodies.py): a database whose disk filled keeps draining.
- Every time it stores (received, tried, delivered, confirmed, dead-lettered, leases) and an
  event's age at a claim are the database server's clock, one clock for every replica,
  whatever the replicas' own clocks say.
- Appends and replays NOTIFY; every replica LISTENs, and polls once a second besides.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Concatenate, Final, ParamSpec, TypeVar

import asyncpg
import structlog

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import (
    OutboxUnavailable,
    OutboxUnusable,
    ReplicasDisagree,
    SchemaTooNew,
    storage_error,
)
from caliper_sidecar.outbox.batching import fill_batch
from caliper_sidecar.outbox.postgres import erasing, reconciling, writes
from caliper_sidecar.outbox.postgres.bodies import Partitions, bodies_of
from caliper_sidecar.outbox.postgres.listen import Listener
from caliper_sidecar.outbox.postgres.replicas import join
from caliper_sidecar.outbox.postgres.room import (
    ROOM_EVERY_S,
    Footprint,
    release_reserve,
    win_back_room,
)
from caliper_sidecar.outbox.postgres.schema import (
    MIGRATION_LOCK,
    MIGRATIONS,
    RECONCILING_SETTING,
    SCHEMA,
    VERSION,
)
from caliper_sidecar.outbox.postgres.sessions import LONG_WORK, session_settings
from caliper_sidecar.outbox.postgres.writes import NOW
from caliper_sidecar.outbox.records import (
    DEAD_LETTER_COLUMNS,
    MARK_COLUMNS,
    Ack,
    Append,
    AppendResult,
    Batch,
    Claim,
    DeadLetter,
    DeliveredUpstream,
    DestinationAck,
    DestinationPlan,
    DestinationStats,
    ErasedRow,
    Mark,
    PlatformJobOutcome,
    Replay,
    StoredEvent,
)
from caliper_sidecar.outbox.storage import TOTALS

log = structlog.get_logger("sidecar.outbox")

POOL_SIZE: Final = 8
#: how long `compact` waits for the sessions that may still see erased rows (theirs are short
#: statements; the caller tries again after that)
SETTLE_S: Final = 5.0
_DISK_FULL: Final = "53100"
#: lock_timeout and statement_timeout (see postgres_sessions)
_TIMED_OUT: Final = frozenset({"55P03", "57014"})
#: "no partition of relation found for row"
_NO_PARTITION: Final = "23514"
#: base.JOURNEY_COLUMNS from an event and the sent row holding it, if any
_JOURNEYS: Final = f"""
    SELECT e.id, e.received_at, e.attempts + (s.id IS NOT NULL)::integer,
        coalesce(e.first_attempt_at, s.delivered_at), coalesce(s.delivered_at, e.last_attempt_at),
        e.last_error, s.delivered_at, s.platform_job, s.platform_ids ->> e.seq::text,
        s.confirmed_at, p.state, p.last_error, s.unconfirmed, e.sensor, e.sender
    FROM events e
    LEFT JOIN LATERAL (
        SELECT * FROM sent s WHERE {writes.IN_SENT} ORDER BY s.id DESC LIMIT 1
    ) s ON true
    LEFT JOIN platform_jobs p ON p.id = s.platform_job
    WHERE e.id = ANY($1::text[])
"""
#: (id, destination, state, attempts, last_error) of these events ($1) for each destination
#: they are meant for (a row stored for one queue alone is not the others')
_DESTINATION_JOURNEYS: Final = """
    SELECT e.id, d.name,
        CASE WHEN e.seq >= d.next OR EXISTS (
            SELECT 1 FROM destination_batches b
            WHERE b.destination = d.name AND e.seq = ANY(b.seqs)
        ) THEN 'waiting' ELSE 'delivered' END,
        coalesce(a.attempts, 0), a.last_error
    FROM events e CROSS JOIN destinations d
    LEFT JOIN destination_attempts a ON a.destination = d.name AND a.seq = e.seq
    WHERE e.id = ANY($1::text[]) AND (e.only_for IS NULL OR e.only_for = d.name)
    ORDER BY e.seq, d.name
"""
_P = ParamSpec("_P")
_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class _Queue:
    """One queue's place in the tables, for SQL that runs on [upstream]'s (`destination`
    None: `head`, `batches`, attempts on the events) or on a destination's (its row of
    `destinations`, its rows of `destination_batches` and `destination_attempts`), as schema
    version 5's lease functions do. Its name, when a destination, is parameter `$n` where a
    fragment takes `n`."""

    destination: str | None = None

    @property
    def leases(self) -> str:
        return "batches" if self.destination is None else "destination_batches"

    @property
    def args(self) -> tuple[str, ...]:
        """The name's parameter, if any (last, after a statement's own)."""
        return () if self.destination is None else (self.destination,)

    def mine(self, n: int) -> str:
        """A condition on its rows of `leases`."""
        return "true" if self.destination is None else f"destination = ${n}"

    def key(self, n: int) -> tuple[str, str]:
        """The destination column of an INSERT into `leases`, and its value."""
        return ("", "") if self.destination is None else ("destination, ", f"${n}::text, ")

    def oldest(self) -> str:
        """(t, age): the receive time of its oldest waiting event and its age."""
        head, queue = "SELECT next FROM head", "'upstream'"
        if self.destination is not None:
            head, queue = "SELECT next FROM destinations WHERE name = $1", "$1"
        return f"""
            SELECT t, {NOW} - t AS age FROM (SELECT least(
                (SELECT received_at FROM events WHERE seq >= ({head})
                    AND (only_for IS NULL OR only_for = {queue}) ORDER BY seq LIMIT 1),
                (SELECT received_at FROM events WHERE seq = (
                    SELECT min(lo) FROM {self.leases} WHERE {self.mine(1)}))
            ) AS t) oldest
        """

    def stored(self, seqs: Sequence[int]) -> str:
        """Its waiting events of these seqs ($1; its name $2), as StoredEvent's fields."""
        tries, tried = "e.attempts, e.first_attempt_at", ""
        if self.destination is not None:
            tries = "coalesce(a.attempts, 0), a.first_attempt_at"
            tried = "LEFT JOIN destination_attempts a ON a.destination = $2 AND a.seq = e.seq"
        return f"""
            SELECT e.seq, e.id, b.body, e.received_at, {tries}, e.sensor,
                greatest({NOW} - e.received_at, 0)
            FROM events e JOIN ({bodies_of(seqs)}) b ON b.seq = e.seq {tried}
            WHERE e.seq = ANY($1::bigint[]) ORDER BY e.seq
        """


_UPSTREAM: Final = _Queue()


def _drain_write(
    write: Callable[Concatenate[PostgresStorage, _P], Coroutine[Any, Any, _T]],
) -> Callable[Concatenate[PostgresStorage, _P], Coroutine[Any, Any, _T]]:
    """A write of the drain (claims, outcomes, jobs): when the disk is full, it runs again in
    the room the reserve kept for it."""

    @functools.wraps(write)
    async def in_reserve(outbox: PostgresStorage, /, *args: _P.args, **kwargs: _P.kwargs) -> _T:
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


class PostgresStorage:
    """The outbox in a PostgreSQL database, shared by replicas (see the module)."""

    def __init__(
        self,
        settings: OutboxSettings,
        lease_s: float = 65.0,
        agreement: Mapping[str, str] | None = None,
        keep_delivered_bodies: bool = False,
    ) -> None:
        self.where = {"outbox": "postgresql"}
        #: reconciliation is on: sent rows (and their bodies) wait for their check; the
        #: sessions say so to the SQL (schema.RECONCILING)
        self.keep_delivered_bodies = keep_delivered_bodies
        self.dedupe_window_s = settings.dedupe_window_s
        self.max_events = settings.max_events
        self.max_bytes = settings.max_bytes
        self._dsn = str(settings.url)
        #: what every live replica must have alike (None: not a replica, the CLI)
        self._agreement = dict(agreement) if agreement is not None else None
        self.replica_id = uuid.uuid4().hex
        #: what every claim id of this process begins with (its leases are given back at close)
        self._claims_prefix = f"{self.replica_id}:"
        self._heartbeat: asyncio.Task[None] | None = None
        self.lease_s = lease_s
        #: "full" waits for the WAL flush of every commit; "normal" lets PostgreSQL flush a
        #: moment later (synchronous_commit off: a database crash may lose the last commits)
        self._synchronous_commit = "on" if settings.synchronous == "full" else "off"
        self._pool: asyncpg.Pool | None = None
        self._listener: Listener | None = None
        self._closing = False
        self._partitions = Partitions()
        self._footprint = Footprint()
        #: winning back room after ingest found the disk full (ingest refuses meanwhile)
        self._recovering: asyncio.Task[None] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, wake: Callable[[], None]) -> None:
        """Connect, create or migrate the schema, listen; raises OutboxUnusable or
        SchemaTooNew with nothing left open."""
        self._listener = Listener(self._dsn, wake)
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=1,
                max_size=POOL_SIZE,
                reset=_nothing_to_reset,
                server_settings=session_settings(
                    self._dsn,
                    search_path=SCHEMA,
                    synchronous_commit=self._synchronous_commit,
                    application_name="caliper-sidecar",
                    **{RECONCILING_SETTING: "on" if self.keep_delivered_bodies else "off"},
                ),
            )
            await self._migrate()
            if self._agreement is not None:
                await self._join()
            await self._listener.open()
        except (SchemaTooNew, ReplicasDisagree):
            await self.close()
            raise
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as e:
            await self.close()
            raise OutboxUnusable(f"outbox.url (PostgreSQL) cannot be used: {e}") from None
        if self._agreement is not None:
            self._heartbeat = asyncio.create_task(self._beat(), name="outbox-heartbeat")

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

    async def close(self) -> None:
        self._closing = True
        if self._heartbeat is not None:
            self._heartbeat.cancel()
            await asyncio.gather(self._heartbeat, return_exceptions=True)
            self._heartbeat = None
        if self._pool is not None and self._agreement is not None:
            # Leave: the jobs this replica followed (and its turn to reconcile) go to the
            # others at once, and a replica with new settings may start once every one has left.
            with contextlib.suppress(OSError, OutboxUnavailable, asyncpg.PostgresError):
                async with self._connection() as conn:
                    await conn.execute(
                        "UPDATE platform_jobs SET followed_by = NULL, follow_until = NULL "
                        "WHERE followed_by = $1",
                        self.replica_id,
                    )
                    await reconciling.give_back_turn(conn, self.replica_id)
                    await conn.execute("DELETE FROM replicas WHERE id = $1", self.replica_id)
        if self._pool is not None:
            with contextlib.suppress(OSError, OutboxUnavailable, asyncpg.PostgresError):
                await self._give_back_leases()
        if self._recovering is not None:
            self._recovering.cancel()
            await asyncio.gather(self._recovering, return_exceptions=True)
        if self._listener is not None:
            await self._listener.close()
        if self._pool is not None:
            await self._pool.close()
            self._pool = None

    async def _give_back_leases(self) -> None:
        """At close, what this process still holds for the destinations goes back to be
        claimed at once, as a destination's queue promises across a restart (and as the
        dispatchers give back what a stop cut short): a lease is for a process that stopped
        without a word. ([upstream]'s are left to expire, as they always were.)"""
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE destination_batches SET claimed_by = NULL, claim_until = NULL "
                "WHERE starts_with(claimed_by, $1)",
                self._claims_prefix,
            )

    async def _migrate(self) -> None:
        async with self._connection() as conn, conn.transaction():
            # Replicas starting at once: one migrates (which may take minutes), the others
            # wait, then find it done.
            await conn.execute(LONG_WORK)
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

    async def insert_appends(self, group: list[Append]) -> list[AppendResult | OutboxUnavailable]:
        if self._recovering is not None:
            # Nothing is written while the room is being won back: a refused write would
            # still extend a file, and take the very pages the drain frees.
            raise _disk_full()
        return await self._insert(group)

    def ping(self) -> str | None:
        return None  # a failed append says why (outbox.py's write health) while room is won back

    def append_failed(self, error: OutboxUnavailable) -> None:
        if error.reason == "disk_full" and self._recovering is None and not self._closing:
            self._recovering = asyncio.create_task(self._recover_room(), name="outbox-room")

    async def _insert(self, group: list[Append]) -> list[AppendResult | OutboxUnavailable]:
        count = sum(len(events) for events, _ in group)
        try:
            return await self._insert_once(group, count)
        except OutboxUnavailable as e:
            if getattr(e.__cause__, "sqlstate", None) != _NO_PARTITION:
                raise
        # Other replicas drew more seqs than the partitions made ahead hold.
        self._partitions.forget()
        return await self._insert_once(group, count)

    async def _insert_once(
        self, group: list[Append], count: int
    ) -> list[AppendResult | OutboxUnavailable]:
        # One connection: the partitions (rarely: their own transaction) then the group's.
        async with self._connection() as conn:
            await self._partitions.make_room(conn, count)
            async with conn.transaction():
                return await writes.insert_appends(
                    conn,
                    group,
                    self.dedupe_window_s,
                    self.max_events,
                    self.max_bytes,
                    self._footprint,
                    self._partitions,
                )

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

    # -- dispatch --------------------------------------------------------------------------

    @_drain_write
    async def claim_batch(self, max_events: int, max_bytes: int, linger_s: float) -> Batch:
        return await self._claim(_UPSTREAM, max_events, max_bytes, linger_s)

    async def _claim(
        self, queue: _Queue, max_events: int, max_bytes: int, linger_s: float
    ) -> Batch:
        """The next events from the queue's head (schema version 5's claim_head), or first,
        when there are any, events given back (released, failed, or another replica's
        expired lease). Either way one lease row is written, whatever the batch's size: the
        lease on its seqs."""
        claim_id = self._claims_prefix + uuid.uuid4().hex
        async with self._connection() as conn:
            given_back_first = True
            while True:
                seqs, full, expires, ready_in, given_back = await conn.fetchrow(
                    "SELECT * FROM claim_head($1, $2, $3, $4, $5, $6, $7)",
                    claim_id,
                    max_events,
                    max_bytes,
                    linger_s,
                    self.lease_s,
                    given_back_first,
                    queue.destination,
                )
                if not given_back:
                    break
                async with conn.transaction():
                    batch = await self._claim_given_back(
                        conn, queue, claim_id, max_events, max_bytes
                    )
                if batch.events:
                    return batch
                given_back_first = False  # another replica is taking them: on from the head
            if seqs:
                stored = await _stored_events(conn, seqs, queue)
                batch = Batch(stored, full, Claim(claim_id, float(expires)))
            else:
                batch = Batch([], False, ready_in=ready_in)
        if not batch.events:
            await self._drop_finished_bodies()  # no backlog: acknowledgements may be done
        return batch

    async def _claim_given_back(
        self,
        conn: asyncpg.Connection,
        queue: _Queue,
        claim_id: str,
        max_events: int,
        max_bytes: int,
    ) -> Batch:
        given_back = await conn.fetch(
            f"""
            WITH unflushed AS (SELECT set_config('synchronous_commit', 'off', true))
            SELECT id, seqs FROM {queue.leases}, unflushed
            WHERE {queue.mine(1)} AND (claimed_by IS NULL OR claim_until < {NOW})
            ORDER BY lo LIMIT 16 FOR UPDATE OF {queue.leases} SKIP LOCKED
            """,
            *queue.args,
        )
        seqs = sorted(seq for r in given_back for seq in r["seqs"])
        stored = await _stored_events(conn, seqs[:max_events], queue)
        events, _ = fill_batch(stored, max_events, max_bytes)
        taken = [e.seq for e in events]
        # What was not taken is given back again, but for seqs whose events are gone.
        left_out = set(seqs) - set(taken) - (set(seqs[:max_events]) - {e.seq for e in stored})
        rest = sorted(left_out)
        key, value = queue.key(6)
        expires = await conn.fetchval(
            f"""
            WITH gone AS (DELETE FROM {queue.leases} WHERE id = ANY($1::bigint[])),
            back AS (
                INSERT INTO {queue.leases} ({key}lo, seqs)
                SELECT {value}($4::bigint[])[1], $4 WHERE cardinality($4::bigint[]) > 0
            )
            INSERT INTO {queue.leases} ({key}lo, seqs, claimed_by, claim_until)
            SELECT {value}($2::bigint[])[1], $2, $3, {NOW} + $5
            WHERE cardinality($2::bigint[]) > 0
            RETURNING claim_until
            """,
            [r["id"] for r in given_back],
            taken,
            claim_id,
            rest,
            self.lease_s,
            *queue.args,
        )
        if not events:  # none (all taken by another replica), or only seqs whose events are gone
            return Batch([], True)
        # More may wait behind what was given back: claim again at once.
        return Batch(events, True, Claim(claim_id, float(expires)))

    @_drain_write
    async def extend(self, claim: Claim) -> None:
        await self._extend(_UPSTREAM, claim)

    async def _extend(self, queue: _Queue, claim: Claim) -> None:
        async with self._connection() as conn:
            await conn.execute(
                f"UPDATE {queue.leases} SET claim_until = {NOW} + $2 WHERE claimed_by = $1",
                claim.id,
                self.lease_s,
            )

    @_drain_write
    async def release(self, claim: Claim, seqs: Sequence[int]) -> None:
        async with self._connection() as conn:
            await writes.release(conn, claim.id, list(seqs))

    @_drain_write
    async def record_acks(self, group: list[Ack], prune: bool) -> bool:
        """In one statement: one round trip and one WAL flush for the group, not one per
        envelope."""
        done = True
        async with self._connection() as conn:
            recorded = await writes.record_acks(
                conn,
                [(claim.id, seqs, job, why) for claim, seqs, job, why in group],
                self.replica_id,
                self.lease_s,
            )
            for (claim, seqs, _, _), applied in zip(group, recorded, strict=True):
                _fenced(claim, seqs, applied)
            if prune:
                async with conn.transaction():
                    await conn.execute(LONG_WORK)  # a chunk of a big backlog's deliveries
                    done = not await writes.prune(conn, self.dedupe_window_s)
        await self._drop_finished_bodies()
        return done

    async def _drop_finished_bodies(self) -> None:
        try:
            async with self._connection() as conn:
                await self._partitions.drop_finished(conn)
        except OutboxUnavailable as e:  # tried again after the next acknowledgements
            log.warning("outbox_bodies_not_dropped", error=str(e))

    @_drain_write
    async def record_failure(self, claim: Claim, seqs: Sequence[int], error: str) -> None:
        async with self._connection() as conn:
            failed = await writes.record_failure(conn, claim.id, list(seqs), error)
        _fenced(claim, seqs, failed)

    @_drain_write
    async def dead_letter(
        self, claim: Claim, seqs: Sequence[int], reason: str, status: int | None, response: str
    ) -> None:
        async with self._transaction() as conn:
            moved = await writes.move_to_dead_letters(
                conn, seqs, reason, status, response, claim.id
            )
        _fenced(claim, seqs, moved)

    # -- [[destinations]] ------------------------------------------------------------------

    async def set_destinations(self, plans: Sequence[DestinationPlan]) -> None:
        async with self._transaction() as conn:
            # Waited for as long as it takes (a replica stopped while it ingests is cut off
            # by the database, which lets the lock go), as joining is.
            await conn.execute("SET LOCAL lock_timeout = 0")
            await writes.set_destinations(conn, plans)

    @_drain_write
    async def destination_claim(
        self, name: str, max_events: int, max_bytes: int, linger_s: float
    ) -> Batch:
        return await self._claim(_Queue(name), max_events, max_bytes, linger_s)

    @_drain_write
    async def destination_extend(self, name: str, claim: Claim) -> None:
        await self._extend(_Queue(name), claim)

    @_drain_write
    async def destination_release(self, name: str, claim: Claim, seqs: Sequence[int]) -> None:
        async with self._connection() as conn:
            await writes.release(conn, claim.id, list(seqs), name)

    @_drain_write
    async def destination_acks(self, name: str, group: list[DestinationAck]) -> None:
        async with self._connection() as conn:
            recorded = await writes.record_destination_acks(
                conn, name, [(claim.id, seqs) for claim, seqs in group]
            )
        for (claim, seqs), applied in zip(group, recorded, strict=True):
            _fenced(claim, seqs, applied)
        await self._drop_finished_bodies()  # its position moved: bodies may be done

    @_drain_write
    async def destination_failure(
        self, name: str, claim: Claim, seqs: Sequence[int], error: str
    ) -> None:
        async with self._connection() as conn:
            failed = await writes.record_failure(conn, claim.id, list(seqs), error, name)
        _fenced(claim, seqs, failed)

    @_drain_write
    async def destination_dead_letter(
        self,
        name: str,
        claim: Claim,
        seqs: Sequence[int],
        reason: str,
        status: int | None,
        response: str,
    ) -> None:
        async with self._transaction() as conn:
            moved = await writes.destination_dead_letters(
                conn, name, seqs, reason, status, response, claim.id
            )
        _fenced(claim, seqs, moved)

    async def destination_stats(self, name: str) -> DestinationStats:
        queue = _Queue(name)
        async with self._connection() as conn:
            row = await conn.fetchrow(
                f"""
                SELECT p.waiting, o.t, o.age, d.delivered_total, d.dead_lettered_total,
                    d.dead_letters
                FROM destinations d JOIN destination_waiting p USING (name),
                    LATERAL ({queue.oldest()}) o
                WHERE d.name = $1
                """,
                name,
            )
        if row is None:
            raise OutboxUnavailable("unknown_destination", f"no destination named {name}")
        waiting, oldest, age, delivered, dead_total, dead = row
        return DestinationStats(
            waiting=int(waiting),
            oldest_received_at=oldest,
            oldest_age_s=None if age is None else round(max(0.0, float(age)), 3),
            delivered_total=int(delivered),
            dead_lettered_total=int(dead_total),
            dead_letters=int(dead),
        )

    async def destination_journey_rows(self, ids: list[str]) -> Sequence[Sequence[Any]]:
        async with self._connection() as conn:
            return [tuple(r) for r in await conn.fetch(_DESTINATION_JOURNEYS, ids)]

    # -- inspection and operations ---------------------------------------------------------

    async def stats_rows(
        self,
    ) -> tuple[Sequence[Any], float | None, float | None, Sequence[Sequence[Any]]]:
        async with self._connection() as conn:
            totals = await conn.fetchrow(
                f"SELECT {', '.join(f'sum({total})' for total in TOTALS)} FROM totals"  # shards
            )
            oldest = await conn.fetchrow(_UPSTREAM.oldest())
            jobs = await conn.fetch("SELECT state, count(*) FROM platform_jobs GROUP BY state")
        return tuple(totals), oldest["t"], oldest["age"], [tuple(r) for r in jobs]

    async def dead_letters(
        self, limit: int, after: str | None, destination: str | None
    ) -> list[DeadLetter]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters "
                "WHERE ($3::text IS NULL OR destination = $3) AND ($1::text IS NULL OR seq > ("
                "SELECT max(seq) FROM dead_letters WHERE id = $1 "
                "AND ($3::text IS NULL OR destination = $3))) "
                "ORDER BY seq LIMIT $2",
                after,
                limit,
                destination,
            )
        return [DeadLetter(*tuple(r)) for r in rows]

    async def take_dead_letters(
        self, ids: list[str] | None, limit: int, replay: bool, destination: str | None
    ) -> int:
        async with self._connection() as conn:
            if not replay:
                async with conn.transaction():
                    return await writes.take_dead_letters(conn, ids, limit, False, destination)
            return await self._requeueing(
                conn,
                limit,
                lambda: writes.rows_to_replay(conn, ids, limit, destination),
                lambda: writes.take_dead_letters(conn, ids, limit, True, destination),
            )

    async def replay(self, events: Sequence[Replay], mark: str) -> None:
        ids = list(dict.fromkeys(e.id for e in events))
        async with self._connection() as conn:
            await self._requeueing(
                conn,
                len(ids),
                lambda: writes.rows_of(conn, ids),
                lambda: writes.replay(conn, events, mark),
            )

    async def _requeueing(
        self,
        conn: asyncpg.Connection,
        new_rows: int,
        in_place: Callable[[], Awaitable[list[int]]],
        work: Callable[[], Awaitable[_T]],
    ) -> _T:
        """`work`, which queues events again, in a transaction, once the bodies' partitions
        exist: for up to `new_rows` rows stored anew, and for the rows (seqs) `in_place`
        names, whose bodies go back. Another replica may drop one again before they are
        stored: tried anew."""
        await self._partitions.make_room(conn, new_rows)
        for _ in range(3):
            await self._partitions.restore(conn, await in_place())
            try:
                async with conn.transaction():
                    return await work()
            except asyncpg.CheckViolationError as e:
                if e.sqlstate != _NO_PARTITION:
                    raise
        raise OutboxUnavailable(
            "storage_busy", "the partitions of replayed bodies kept being dropped; try again"
        )

    # -- marks -------------------------------------------------------------------------------

    async def add_marks(self, marks: Sequence[Mark]) -> None:
        async with self._connection() as conn:
            await writes.add_marks(conn, marks)

    async def mark_rows(self, ids: list[str]) -> Sequence[Sequence[Any]]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                f"SELECT {MARK_COLUMNS} FROM marks WHERE id = ANY($1::text[]) ORDER BY seq", ids
            )
        return [tuple(r) for r in rows]

    # -- reconciliation ---------------------------------------------------------------------

    async def delivered_upstream(
        self, older_than_s: float, unchecked_only: bool, limit: int, after_seq: int = 0
    ) -> list[DeliveredUpstream]:
        async with self._connection() as conn:
            rows = await reconciling.delivered_rows(
                conn, older_than_s, unchecked_only, limit, after_seq
            )
        return [
            DeliveredUpstream(r["seq"], r["id"], bytes(r["body"]), r["sensor"], r["missing_for"])
            for r in rows
        ]

    async def reconcile_turn(self, turn_s: float) -> bool:
        async with self._connection() as conn:
            return await reconciling.take_turn(conn, self.replica_id, turn_s)

    async def reconciled(
        self, held: Sequence[str], missing: Sequence[str], given_up: Sequence[str]
    ) -> None:
        async with self._transaction() as conn:
            await reconciling.checked(conn, held, missing, given_up)

    # -- processing confirmation -----------------------------------------------------------

    async def job_ids_sent_in(self, platform_job: str) -> list[str]:
        async with self._connection() as conn:
            return await writes.job_ids_sent_in(conn, platform_job)

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
        async with self._transaction() as conn:
            return await writes.finish_platform_job(conn, job, outcome)

    @_drain_write
    async def give_up_platform_job(self, job: str, reason: str) -> None:
        async with self._connection() as conn:
            await conn.execute(
                "UPDATE platform_jobs SET state = 'unconfirmed', last_error = $2 WHERE id = $1",
                job,
                reason[:1024],
            )

    # -- erasing a learner (erasing.py) -----------------------------------------------------

    async def erase_events(
        self, actor: str | None, ids: Sequence[str], dry_run: bool
    ) -> list[ErasedRow]:
        async with self._transaction() as conn:
            # Every body is read (a backlog's, at most): longer than a statement may take.
            await conn.execute(LONG_WORK)
            return await erasing.find_and_delete(conn, actor, ids, dry_run, _DESTINATION_JOURNEYS)

    async def compact(self) -> None:
        deadline = time.monotonic() + SETTLE_S
        async with self._connection() as conn:
            since = await erasing.horizon(conn)
            while not await erasing.settled(conn, since):
                if time.monotonic() > deadline:
                    raise OutboxUnavailable(
                        "storage_busy",
                        "a session of the database still holds a snapshot from before the erase",
                    )
                await asyncio.sleep(0.05)
            # As long as copying the tables takes; a lock still waits at most lock_timeout
            # (the replicas' statements go on; the caller tries again).
            await conn.execute("SET statement_timeout = 0")
            try:
                await erasing.compact(conn)
            finally:
                await conn.execute("RESET statement_timeout")

    async def truncate_log(self) -> bool:
        """PostgreSQL's WAL is the server's: it recycles its segments at checkpoints."""
        return True

    async def journey_rows(
        self, ids: list[str]
    ) -> tuple[Sequence[Sequence[Any]], Sequence[Sequence[Any]]]:
        async with self._connection() as conn:
            rows = await conn.fetch(_JOURNEYS, ids)
            dead = await conn.fetch(
                f"SELECT {DEAD_LETTER_COLUMNS}, sensor, sender FROM dead_letters "
                "WHERE id = ANY($1::text[])",
                ids,
            )
        return [tuple(r) for r in rows], [tuple(r) for r in dead]

    async def job_event_ids(self, job: str) -> list[str] | None:
        async with self._connection() as conn:
            found = await conn.fetchval("SELECT event_ids FROM jobs WHERE id = $1", job)
        return None if found is None else [str(i) for i in json.loads(found)]


async def _stored_events(
    conn: asyncpg.Connection, seqs: list[int], queue: _Queue
) -> list[StoredEvent]:
    """These waiting events with their bodies and their attempts in this queue, as the
    dispatcher sees them (their age on the database's clock, which stamped their receive
    time), in seq order."""
    if not seqs:
        return []
    rows = await conn.fetch(queue.stored(seqs), seqs, *queue.args)
    return [StoredEvent(*tuple(r)) for r in rows]


async def _nothing_to_reset(conn: asyncpg.Connection) -> None:
    """A connection going back to the pool keeps its session: the outbox leaves nothing in it
    (every lock and setting it takes lasts its transaction, and asyncpg ends an open one).
    The default reset was a round trip of its own (`RESET ALL`, …) after every use: 0.16 ms a
    claim, a tenth of it."""


def _fenced(claim: Claim, seqs: Sequence[int], applied: int) -> None:
    if applied < len(seqs):
        log.warning("claim_lost", claim=claim.id, events=len(seqs) - applied)


def _disk_full() -> OutboxUnavailable:
    return OutboxUnavailable("disk_full", "the database holding the outbox is out of disk", 30)


def _unavailable(e: BaseException) -> OutboxUnavailable:
    sqlstate = getattr(e, "sqlstate", None)
    if sqlstate == _DISK_FULL:
        return _disk_full()
    if sqlstate in _TIMED_OUT:
        return OutboxUnavailable(
            "storage_busy",
            "the outbox is busy: what this write needs is held by another session (a replica "
            "that stopped mid-commit is cut off by the database within seconds); try again",
            detail=f"{type(e).__name__}: {e}",
        )
    return storage_error(e)
