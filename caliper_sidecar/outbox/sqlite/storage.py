"""The SQLite storage of the outbox: one file in WAL mode, every write in one writer thread,
in-memory claims for the dispatcher."""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import math
import os
import shutil
import sqlite3
import time
import uuid
from collections.abc import Callable, Coroutine, Iterable, Sequence
from pathlib import Path
from typing import Any, Final, ParamSpec, TypeVar

import aiosqlite
import structlog

from caliper_sidecar import codec
from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import OutboxUnavailable, OutboxUnusable, storage_error
from caliper_sidecar.outbox.batching import fill_batch
from caliper_sidecar.outbox.records import (
    DEAD_LETTER_COLUMNS,
    JOURNEY_COLUMNS,
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
from caliper_sidecar.outbox.sqlite import destinations, erasing, reconciling, writes
from caliper_sidecar.outbox.sqlite.event_ids import IN_JSON, TAIL_EXISTS, index_tail, seqs_of
from caliper_sidecar.outbox.sqlite.schema import migrate
from caliper_sidecar.outbox.sqlite.writer import PRAGMAS, Writer
from caliper_sidecar.outbox.storage import TOTALS

log = structlog.get_logger("sidecar.outbox")

#: this process's steady clock (steady_time): the wall clock, read once at start
_WALL_AT_START: Final = time.time()
_MONOTONIC_AT_START: Final = time.monotonic()
_SQLITE_FULL: Final = 13
_SQLITE_HEADER: Final = 100
_SQLITE_BUSY: Final = 5
#: how often the checkpointer looks at the WAL
CHECKPOINT_EVERY_S: Final = 1.0
#: rows the writer changed (its triggers' included: an event ingested is about two) since the
#: last checkpoint that make it due at the next look: about a second of a busy outbox
CHECKPOINT_AFTER_CHANGES: Final = 1000
#: or bytes of events ingested: large events fill the WAL with few rows
CHECKPOINT_AFTER_BYTES: Final = 4 * 1_048_576
#: and at least this often. A checkpoint copies every page the WAL holds, and each commit of a
#: quiet outbox touches the same few pages (the table's last leaf, the queue's, the totals,
#: the header): checkpointed every second, a relay taking 5 single events a second wrote
#: 18.2 KB a 1.1 KB event at ingest; every 30 s, 11.1 KB (BENCHMARKS.md, "A quiet outbox").
#: With `synchronous = "normal"` the WAL is synced only by checkpoints, so that outbox keeps
#: checkpointing every second: what a power cut may take from it stays about a second.
CHECKPOINT_AT_LEAST_EVERY_S: Final = 30.0
#: the page size of a new outbox file. Every commit writes each page it touches to the WAL
#: and the checkpoint writes it again; with ~1.1 KB events a 4 KB page held three rows, so
#: each commit and each acknowledgement rewrote whole pages of bodies. At 1 KB a body sits
#: in an overflow page of its own, written once and later freed without being rewritten, and
#: the row, the id's index entry and the totals each cost a quarter of the bytes
#: (bench/writes.py, 5,000 events: 23,061 -> 9,174 bytes written per event with single-
#: event requests, 11,637 -> 4,121 with batches of 100, with secure_delete FAST; 2 KB pages
#: were worse than either: 18,262 and 10,586).
PAGE_SIZE: Final = 1024
#: free space kept on the outbox's disk for delivery bookkeeping and checkpoints
RESERVE_BYTES: Final = 32 * 1_048_576


def checkpoint_due(changes: int, ingested: int, seconds: float, at_least_every_s: float) -> bool:
    """Whether to checkpoint now, `changes` rows and `ingested` bytes of events written and
    `seconds` after the last checkpoint. Commands beside `run` (erase, replay) write to the WAL
    too: the time bound checkpoints theirs even when this process wrote nothing. Fewer changes
    than none: the writer's count started again."""
    return (
        not 0 <= changes < CHECKPOINT_AFTER_CHANGES
        or ingested >= CHECKPOINT_AFTER_BYTES
        or seconds >= at_least_every_s
    )


def steady_time() -> float:
    """Seconds since the epoch on this process's steady clock: the wall clock as read at start,
    moved on by the monotonic clock. Every time the SQLite outbox stores (received, tried,
    delivered, dead-lettered) is on it, and an event's age is measured on it, so a wall-clock
    step while the process runs (NTP correcting a classroom box by days) ages no event and
    shortens no dedupe window. Across a restart the wall clock is all there is."""
    return _WALL_AT_START + (time.monotonic() - _MONOTONIC_AT_START)


def _identity(path: Path) -> tuple[int, int] | None:
    """Which file the path names now (device, inode); None when there is none, or when it is
    shorter than SQLite's header (truncated: a WAL-mode database always has its first page)."""
    try:
        st = path.stat()
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if st.st_size >= _SQLITE_HEADER else None


def unusable(path: Path, e: BaseException) -> OutboxUnusable:
    """The start-up error for an outbox file that cannot be used, in one line."""
    cause = e.strerror if isinstance(e, OSError) and e.strerror else str(e)
    return OutboxUnusable(f"outbox.path {path} cannot be used as an outbox: {cause}")


_P = ParamSpec("_P")
_R = TypeVar("_R")


def _read_errors_unavailable(
    method: Callable[_P, Coroutine[Any, Any, _R]],
) -> Callable[_P, Coroutine[Any, Any, _R]]:
    """A read that meets a broken file (truncated under us, I/O errors) raises
    OutboxUnavailable, which every route answers as 503, instead of a raw sqlite3 error."""

    @functools.wraps(method)
    async def read(*args: _P.args, **kwargs: _P.kwargs) -> _R:
        try:
            return await method(*args, **kwargs)
        except sqlite3.Error as e:
            raise _unavailable(e) from e

    return read


class SqliteStorage:
    """The outbox in one SQLite file, owned by one process at a time.

    A group of appends (outbox.py) is inserted by the writer (writer.py) with one statement and
    committed once, so ingest is bounded by the disk's fsync rate divided by the group, not
    per request. Every write runs in the writer's thread (`_write`; what each changes is in
    writes.py). Claims are kept in memory: after a crash nothing is claimed, so whatever was
    in flight is sent again.
    """

    def __init__(
        self,
        settings: OutboxSettings,
        reserve_bytes: int = RESERVE_BYTES,
        keep_delivered_bodies: bool = False,
        index_leftovers: bool = True,
    ) -> None:
        self.where = {"path": settings.path}
        #: `run`'s: index at open what a process that stopped left unindexed (event_ids.py)
        self.index_leftovers = index_leftovers
        #: reconciliation is on: a delivered event's body stays until it is checked
        self.keep_delivered_bodies = keep_delivered_bodies
        self.path = Path(settings.path)
        self.reserve_bytes = reserve_bytes
        self.synchronous = settings.synchronous
        self.dedupe_window_s = settings.dedupe_window_s
        self.max_events = settings.max_events
        self.max_bytes = settings.max_bytes
        self._wake: Callable[[], None] = lambda: None
        #: seq -> the claim holding it; in memory: after a crash nothing is claimed
        self._claimed: dict[int, str] = {}
        #: each destination's claims, as `_claimed` is [upstream]'s (None: none configured)
        self._destination_claims: dict[str, dict[int, str]] | None = None
        #: per queue ("" for [upstream]), the event at its head and when (monotonic) it was
        #: first seen there
        self._heads: dict[str, tuple[int, float]] = {}
        # Three connections, each with its own thread: every write (the writer: ingest,
        # delivery outcomes, dead letters, platform jobs; see `_write`), reads (claims and
        # stats, which never wait behind a write), and checkpoints.
        self._writer = Writer(self.path, settings.synchronous)
        self._reader: aiosqlite.Connection | None = None
        self._checkpointer: aiosqlite.Connection | None = None
        self._checkpoints: asyncio.Task[None] | None = None
        self._last_reclaim = 0.0
        #: ids ingest inserted that `event_ids` does not hold yet (event_ids.py); the writer's
        #: thread alone changes it, after its commits
        self._unindexed: set[str] = set()
        #: the writer connection's total_changes after its last commit, and at the last
        #: checkpoint; bytes of events ingested (the writer's thread sets the first and adds
        #: to the last, the checkpointer reads them and sets the second)
        self._changes = 0
        self._changes_checkpointed = 0
        self._ingested = 0
        #: set for good when the file was deleted or replaced under a running process
        self.lost: str | None = None
        self._identity: tuple[int, int] | None = None

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self, wake: Callable[[], None]) -> None:
        """Open (creating or migrating) the file; raises OutboxUnusable naming the path and
        the cause when it cannot be an outbox, with nothing left open."""
        self._wake = wake
        try:
            await asyncio.to_thread(self._prepare_file)
            await self._writer.open()
            self._reader = await self._connect("normal")
            self._checkpointer = await self._connect("normal")
        except (sqlite3.Error, OSError) as e:
            await self.close()
            raise unusable(self.path, e) from None
        self._identity = _identity(self.path)
        self._checkpoints = asyncio.create_task(self._checkpoint_often(), name="checkpoints")

    async def close(self) -> None:
        if self._checkpoints is not None:
            self._checkpoints.cancel()
            await asyncio.gather(self._checkpoints, return_exceptions=True)
        await self._writer.close()
        for conn in (self._reader, self._checkpointer):
            if conn is not None:
                await conn.close()
        self._reader = self._checkpointer = None

    def _check_identity(self) -> None:
        """Refuse to write once the file was deleted, replaced or truncated under us: SQLite
        would go on writing to the unlinked file (or into a WAL over a file that is gone), and
        every event acknowledged then would be lost."""
        if self.lost is None and _identity(self.path) != self._identity:
            self.lost = "outbox_lost"
            log.error(
                "outbox_lost",
                path=str(self.path),
                error="the outbox file was deleted, replaced or truncated while running; "
                "restart the sidecar",
            )
        if self.lost is not None:
            raise OutboxUnavailable(
                self.lost,
                f"the outbox file {self.path} was deleted, replaced or truncated while running; "
                "new events are refused until the sidecar is restarted",
                30,
            )

    def _prepare_file(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True, mode=0o700)
        # Created here, before SQLite, so that it is born owner-only; SQLite gives the -wal
        # and -shm files the same mode as the database.
        os.close(os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600))
        conn = sqlite3.connect(self.path, isolation_level=None)
        try:
            conn.execute("PRAGMA busy_timeout = 10000")
            # Only a new, empty file takes it (an existing one keeps its page size: changing
            # it means rewriting the file, see docs/operators.md).
            conn.execute(f"PRAGMA page_size = {PAGE_SIZE}")
            conn.execute("PRAGMA journal_mode = WAL")
            migrate(conn)
            # What a process that stopped (or was killed) left unindexed, for `run`'s dedupe,
            # which knows only its own; nothing written when nothing is. A command leaves the
            # tail to the `run` that may be beside it (lookups read the tail): indexing it would
            # write to the disk, and wait for run's write lock, at every look.
            if self.index_leftovers and conn.execute(TAIL_EXISTS).fetchone():
                with writes.immediate(conn):
                    index_tail(conn)
        finally:
            conn.close()

    async def _connect(self, synchronous: str) -> aiosqlite.Connection:
        conn = await aiosqlite.connect(self.path, isolation_level=None)
        await conn.execute(f"PRAGMA synchronous = {synchronous.upper()}")
        for pragma in PRAGMAS:
            await conn.execute(pragma)
        return conn

    # -- ingest ----------------------------------------------------------------------------

    async def insert_appends(self, group: list[Append]) -> list[AppendResult | OutboxUnavailable]:
        self._check_identity()
        free = await self._room()
        if free < self.reserve_bytes:
            # The last of the disk is kept for what empties the outbox: recording deliveries
            # and checkpointing the WAL. Filled to the last byte, neither could happen.
            raise OutboxUnavailable(
                "disk_full",
                f"only {free // 1_048_576} MiB free on the outbox's disk; new events wait "
                f"until {self.reserve_bytes // 1_048_576} MiB are",
                30,
            )
        inserted: list[str] = []

        def committed() -> None:  # in the writer's thread, off the event loop
            self._unindexed.update(inserted)
            self._ingested += sum(len(e.body) for events, _ in group for e in events)

        return await self._write(
            functools.partial(
                writes.insert_appends,
                group=group,
                now=steady_time(),
                dedupe_window_s=self.dedupe_window_s,
                max_events=self.max_events,
                max_bytes=self.max_bytes,
                claimed=None
                if self._destination_claims is None
                else {name: set(c) for name, c in self._destination_claims.items()},
                unindexed=self._unindexed,
                inserted=inserted,
            ),
            # Only once they are committed: ids of a rolled-back insert must not count as
            # duplicates when the app sends them again.
            committed=committed,
        )

    def append_failed(self, error: OutboxUnavailable) -> None:
        del error  # nothing to recover: the room is measured before every write

    def ping(self) -> str | None:
        return self.lost

    # -- dispatch --------------------------------------------------------------------------

    @_read_errors_unavailable
    async def claim_batch(self, max_events: int, max_bytes: int, linger_s: float) -> Batch:
        found = await self._read(
            """
            SELECT seq, id, body, received_at, attempts, first_attempt_at, sensor,
                max(?1 - received_at, 0.0)
            FROM events
            WHERE delivered_at IS NULL AND seq NOT IN (SELECT value FROM json_each(?2))
            ORDER BY seq LIMIT ?3
            """,
            (steady_time(), _seqs_json(self._claimed), max_events),
        )
        rows = [StoredEvent(*row) for row in found]
        return self._claim_from(rows, self._claimed, "", max_events, max_bytes, linger_s)

    def _claim_from(
        self,
        rows: list[StoredEvent],
        claimed: dict[int, str],
        queue: str,
        max_events: int,
        max_bytes: int,
        linger_s: float,
    ) -> Batch:
        """A batch of these candidates, claimed in `claimed`, when it is worth sending."""
        events, full = fill_batch(rows, max_events, max_bytes)
        if not events:
            return Batch([], False)
        wait = self._lingering(queue, events[0], linger_s)
        if not full and wait > 0:
            return Batch([], False, ready_in=wait)
        claim = Claim(uuid.uuid4().hex, math.inf)  # one process: a claim never expires
        claimed.update((e.seq, claim.id) for e in events)
        return Batch(events, full, claim)

    def _lingering(self, queue: str, head: StoredEvent, linger_s: float) -> float:
        """How much longer the oldest waiting event should wait for company.

        Measured on the monotonic clock from when this process first saw it at the head of the
        queue: a receive time stored by an earlier process may be ahead of this one's clock
        (the wall clock stepped back an hour between them), and would otherwise hold every
        batch for an hour. An event that has waited long already (its age) goes at once.
        """
        seen = self._heads.get(queue)
        if seen is None or seen[0] != head.seq:
            seen = self._heads[queue] = (head.seq, time.monotonic())
        lingered = time.monotonic() - seen[1]
        return min(linger_s - lingered, linger_s - head.age_s)

    async def extend(self, claim: Claim) -> None:
        """Nothing to renew: claims of one process live as long as it does."""

    def _owned(
        self, claim: Claim, seqs: Sequence[int], claimed: dict[int, str] | None = None
    ) -> list[int]:
        """The seqs this claim still holds; an outcome for the others is not applied."""
        held = self._claimed if claimed is None else claimed
        owned = [seq for seq in seqs if held.get(seq) == claim.id]
        if len(owned) < len(seqs):
            log.warning("claim_lost", claim=claim.id, events=len(seqs) - len(owned))
        return owned

    async def release(self, claim: Claim, seqs: Sequence[int]) -> None:
        for seq in self._owned(claim, seqs):
            del self._claimed[seq]

    # -- [[destinations]] -------------------------------------------------------------------

    async def set_destinations(self, plans: Sequence[DestinationPlan]) -> None:
        await self._write(functools.partial(destinations.set_destinations, plans=plans))
        self._destination_claims = {plan.name: {} for plan in plans} if plans else None

    def _claims_of(self, name: str) -> dict[int, str]:
        if self._destination_claims is None or name not in self._destination_claims:
            raise OutboxUnavailable("unknown_destination", f"no destination named {name}")
        return self._destination_claims[name]

    @_read_errors_unavailable
    async def destination_claim(
        self, name: str, max_events: int, max_bytes: int, linger_s: float
    ) -> Batch:
        claimed = self._claims_of(name)
        found = await self._read(
            destinations.CLAIM,
            (name, steady_time(), _seqs_json(claimed), max_events),
        )
        rows = [StoredEvent(*row) for row in found]
        return self._claim_from(rows, claimed, name, max_events, max_bytes, linger_s)

    async def destination_extend(self, name: str, claim: Claim) -> None:
        """Nothing to renew, as for [upstream]."""

    async def destination_release(self, name: str, claim: Claim, seqs: Sequence[int]) -> None:
        claimed = self._claims_of(name)
        for seq in self._owned(claim, seqs, claimed):
            del claimed[seq]

    async def destination_acks(self, name: str, group: list[DestinationAck]) -> None:
        claimed = self._claims_of(name)
        owned = [seq for claim, seqs in group for seq in self._owned(claim, seqs, claimed)]
        record = functools.partial(destinations.acknowledge, name=name, seqs=owned)
        await self._write(record, releasing=owned, claimed=claimed)

    async def destination_failure(
        self, name: str, claim: Claim, seqs: Sequence[int], error: str
    ) -> None:
        claimed = self._claims_of(name)
        owned = self._owned(claim, seqs, claimed)
        record = functools.partial(
            destinations.record_failure, name=name, seqs=owned, error=error, now=steady_time()
        )
        await self._write(record, releasing=owned, claimed=claimed)

    async def destination_dead_letter(
        self,
        name: str,
        claim: Claim,
        seqs: Sequence[int],
        reason: str,
        status: int | None,
        response: str,
    ) -> None:
        claimed = self._claims_of(name)
        owned = self._owned(claim, seqs, claimed)
        move = functools.partial(
            destinations.dead_letter,
            name=name,
            seqs=owned,
            reason=reason,
            status=status,
            response=response,
            now=steady_time(),
        )
        await self._write(move, releasing=owned, claimed=claimed)

    @_read_errors_unavailable
    async def destination_stats(self, name: str) -> DestinationStats:
        found = await self._read(
            "SELECT delivered_total, dead_lettered_total, dead_letters FROM destinations "
            "WHERE name = ?",
            (name,),
        )
        totals = _first(found)
        if totals is None:
            raise OutboxUnavailable("unknown_destination", f"no destination named {name}")
        waiting = dict(await self._writer.run(destinations.lags)).get(name, 0)
        row = _first(await self._read(destinations.OLDEST, (name,)))
        oldest = float(row[0]) if row else None
        return DestinationStats(
            waiting=waiting,
            oldest_received_at=oldest,
            oldest_age_s=None if oldest is None else round(max(0.0, steady_time() - oldest), 3),
            delivered_total=int(totals[0]),
            dead_lettered_total=int(totals[1]),
            dead_letters=int(totals[2]),
        )

    @_read_errors_unavailable
    async def destination_journey_rows(self, ids: list[str]) -> Sequence[Sequence[Any]]:
        # On the writer's connection: the functions that read positions and ranges are the
        # ones the writes use (a journey is not a hot path).
        return await self._writer.run(functools.partial(destinations.journey_rows, ids=ids))

    async def record_acks(self, group: list[Ack], prune: bool) -> bool:
        owned = [(self._owned(claim, seqs), job, why) for claim, seqs, job, why in group]
        now = steady_time()
        record = functools.partial(
            writes.record_acks,
            group=owned,
            now=now,
            prune_before=now - self.dedupe_window_s if prune else None,
            keep=self.keep_delivered_bodies,
        )
        return await self._write(record, releasing=[seq for acked, _, _ in owned for seq in acked])

    # -- reconciliation ---------------------------------------------------------------------

    @_read_errors_unavailable
    async def delivered_upstream(
        self, older_than_s: float, unchecked_only: bool, limit: int, after_seq: int = 0
    ) -> list[DeliveredUpstream]:
        now = steady_time()
        read = functools.partial(
            reconciling.delivered_rows,
            now=now,
            delivered_before=now - older_than_s,
            after_seq=after_seq,
            unchecked_only=unchecked_only,
            limit=limit,
        )
        rows = await self._writer.run(read)
        return [
            DeliveredUpstream(int(seq), str(id_), bytes(body), sensor, missing_for)
            for seq, id_, body, sensor, missing_for in rows
        ]

    async def reconcile_turn(self, turn_s: float) -> bool:
        return True  # the one `run` of this file (lock.py)

    async def reconciled(
        self, held: Sequence[str], missing: Sequence[str], given_up: Sequence[str]
    ) -> None:
        record = functools.partial(
            reconciling.checked, held=held, missing=missing, given_up=given_up, now=steady_time()
        )
        await self._write(record)

    async def record_failure(self, claim: Claim, seqs: Sequence[int], error: str) -> None:
        seqs = self._owned(claim, seqs)
        record = functools.partial(writes.record_failure, seqs=seqs, error=error, now=steady_time())
        await self._write(record, releasing=seqs)

    async def dead_letter(
        self, claim: Claim, seqs: Sequence[int], reason: str, status: int | None, response: str
    ) -> None:
        # Called right after the attempt that decided it, so that attempt is counted here.
        seqs = self._owned(claim, seqs)
        move = functools.partial(
            writes.move_to_dead_letters,
            seqs=seqs,
            reason=reason,
            status=status,
            response=response,
            now=steady_time(),
        )
        await self._write(move, releasing=seqs)

    # -- inspection and operations ---------------------------------------------------------

    @_read_errors_unavailable
    async def stats_rows(
        self,
    ) -> tuple[Sequence[Any], float | None, float | None, Sequence[Sequence[Any]]]:
        totals = _first(await self._read(f"SELECT {', '.join(TOTALS)} FROM totals"))
        row = _first(
            await self._read(
                "SELECT received_at FROM events WHERE delivered_at IS NULL ORDER BY seq LIMIT 1"
            )
        )
        oldest = float(row[0]) if row else None
        age = None if oldest is None else steady_time() - oldest
        jobs = await self._read("SELECT state, count(*) FROM platform_jobs GROUP BY state")
        return totals or (), oldest, age, jobs

    @_read_errors_unavailable
    async def dead_letters(
        self, limit: int, after: str | None, destination: str | None
    ) -> list[DeadLetter]:
        found = await self._read(
            f"SELECT {DEAD_LETTER_COLUMNS} FROM dead_letters "
            "WHERE (?3 IS NULL OR destination = ?3) AND (?1 IS NULL OR seq > "
            "(SELECT max(seq) FROM dead_letters WHERE id = ?1 "
            "AND (?3 IS NULL OR destination = ?3))) ORDER BY seq LIMIT ?2",
            (after, limit, destination),
        )
        return [DeadLetter(*row) for row in found]

    async def take_dead_letters(
        self, ids: list[str] | None, limit: int, replay: bool, destination: str | None
    ) -> int:
        take = functools.partial(
            writes.take_dead_letters,
            ids=ids,
            limit=limit,
            replay=replay,
            destination=destination,
            now=steady_time(),
        )
        return await self._write(take)

    async def replay(self, events: Sequence[Replay], mark: str) -> None:
        await self._write(
            functools.partial(writes.replay, events=events, mark=mark, now=steady_time())
        )

    # -- marks -------------------------------------------------------------------------------

    async def add_marks(self, marks: Sequence[Mark]) -> None:
        await self._write(functools.partial(writes.add_marks, marks=marks, now=steady_time()))

    @_read_errors_unavailable
    async def mark_rows(self, ids: list[str]) -> Sequence[Sequence[Any]]:
        return await self._read(
            f"SELECT {MARK_COLUMNS} FROM marks WHERE id IN (SELECT value FROM json_each(?)) "
            "ORDER BY rowid",
            (json.dumps(ids),),
        )

    # -- erasing a learner (erasing.py) -----------------------------------------------------

    async def erase_events(
        self, actor: str | None, ids: Sequence[str], dry_run: bool
    ) -> list[ErasedRow]:
        erase = functools.partial(
            erasing.erase_securely, actor=actor, ids=ids, dry_run=dry_run, now=steady_time()
        )
        return await self._outside_write(erase)

    async def compact(self) -> None:
        await self._outside_write(erasing.compact)

    async def truncate_log(self) -> bool:
        return await self._outside_write(erasing.truncate_wal)

    async def _outside_write(self, work: Callable[[sqlite3.Connection], _R]) -> _R:
        """`work` on the writer's connection, outside `_write`'s transaction (it opens its
        own, or cannot run in one: VACUUM, a checkpoint)."""
        try:
            return await self._writer.run(work)
        except sqlite3.Error as e:
            raise await self._storage_failure(e) from e

    # -- processing confirmation -----------------------------------------------------------

    @_read_errors_unavailable
    async def pending_platform_jobs(self) -> list[str]:
        found = await self._read(
            "SELECT id FROM platform_jobs WHERE state != 'unconfirmed' ORDER BY sent_at"
        )
        return [str(r[0]) for r in found]

    @_read_errors_unavailable
    async def job_ids_sent_in(self, platform_job: str) -> list[str]:
        found = await self._read(
            "SELECT id FROM events WHERE platform_job = ? AND confirmed_at IS NULL ORDER BY seq",
            (platform_job,),
        )
        return [str(r[0]) for r in found]

    async def platform_job_polled(self, job: str, state: str, error: str | None) -> None:
        await self._write(
            functools.partial(
                writes.execute,
                sql="UPDATE platform_jobs SET state = ?, polls = polls + 1, last_error = ? "
                "WHERE id = ? AND state != 'unconfirmed'",
                params=(state, error and error[:1024], job),
            )
        )

    async def finish_platform_job(self, job: str, outcome: PlatformJobOutcome) -> int:
        failing, again = await self._write(
            functools.partial(
                writes.finish_platform_job,
                job=job,
                outcome=outcome,
                now=steady_time(),
                keep=self.keep_delivered_bodies,
            )
        )
        if again:
            self._wake()
        return failing

    async def give_up_platform_job(self, job: str, reason: str) -> None:
        await self._write(
            functools.partial(
                writes.execute,
                sql="UPDATE platform_jobs SET state = 'unconfirmed', last_error = ? WHERE id = ?",
                params=(reason[:1024], job),
            )
        )

    @_read_errors_unavailable
    async def journey_rows(
        self, ids: list[str]
    ) -> tuple[Sequence[Sequence[Any]], Sequence[Sequence[Any]]]:
        wanted = json.dumps(ids)
        found = await self._read(
            f"""
            SELECT {JOURNEY_COLUMNS}
            FROM events e LEFT JOIN platform_jobs p ON p.id = e.platform_job
            WHERE e.seq IN {seqs_of(IN_JSON)}
            """,
            (wanted,),
        )
        letters = await self._read(
            f"SELECT {DEAD_LETTER_COLUMNS}, sensor, sender FROM dead_letters "
            "WHERE id IN (SELECT value FROM json_each(?))",
            (wanted,),
        )
        return found, letters

    @_read_errors_unavailable
    async def job_event_ids(self, job: str) -> list[str] | None:
        row = _first(await self._read("SELECT event_ids FROM jobs WHERE id = ?", (job,)))
        return None if row is None else [str(i) for i in json.loads(row[0])]

    # -- plumbing --------------------------------------------------------------------------

    async def _read(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        """Every row of one query, in one hop to the reader's thread. Between two hops
        (`execute`, then a fetch) the statement holds the reader's read transaction open, and
        any read aiosqlite runs meanwhile sees that old snapshot: a claim made so saw events
        acknowledged since as waiting, their claims released, and sent them again."""
        return list(await self._require(self._reader).execute_fetchall(sql, parameters))

    @staticmethod
    def _require(conn: aiosqlite.Connection | None) -> aiosqlite.Connection:
        if conn is None:
            raise OutboxUnavailable("closed", "the outbox is not open")
        return conn

    async def _write(
        self,
        work: Callable[[sqlite3.Connection], _R],
        releasing: Sequence[int] = (),
        claimed: dict[int, str] | None = None,
        committed: Callable[[], None] | None = None,
    ) -> _R:
        """`work` in one transaction on the writer's connection, in its thread, in one
        hand-off; a write that fails raises OutboxUnavailable. Claims in `releasing` are
        released whatever happens: if the outcome cannot be written (a full disk), the events
        stay queued and are sent again rather than stuck claimed until a restart.

        Every write of the outbox goes this way. Through aiosqlite, each statement was a
        round trip through the busy event loop while the transaction held SQLite's one write
        lock, and other writers slept in SQLite's busy handler meanwhile (forwarding 100,000
        events, ingest waited 0.75 s of 6.7, up to 129 ms at once); in one thread they take
        turns.
        """

        def transaction(conn: sqlite3.Connection) -> _R:
            with writes.immediate(conn):
                done = work(conn)
            self._changes = conn.total_changes
            if committed is not None:
                committed()  # still in the writer's thread, before any other write
            return done

        try:
            return await self._writer.run(transaction)
        except sqlite3.Error as e:
            raise await self._storage_failure(e) from e
        finally:
            held = self._claimed if claimed is None else claimed
            for seq in releasing:
                held.pop(seq, None)

    async def _checkpoint_often(self) -> None:
        """Copy the WAL into the database off the write paths: within a second of
        CHECKPOINT_AFTER_CHANGES rows or CHECKPOINT_AFTER_BYTES of events written, and at
        least every CHECKPOINT_AT_LEAST_EVERY_S (every second with `synchronous = "normal"`).

        A checkpoint in the committing thread held acknowledgements up (measured: 14k ->
        19k events/s once it moved out), and a WAL checkpointed seldom holds most of the
        data: on a full disk it could then never be moved into the database, since that file
        would have to grow. Bounded so, the WAL stays a few MB (RESERVE_BYTES covers it) and
        can be truncated when space runs out; a quiet outbox is not checkpointed every
        second, which copied the same pages again each time. Ingest's ids are indexed first
        (event_ids.py), so that the checkpoint copies their pages.
        """
        last = time.monotonic()
        ingested_then = 0
        while True:
            await asyncio.sleep(CHECKPOINT_EVERY_S)
            normal = self.synchronous == "normal"
            if not checkpoint_due(
                self._changes - self._changes_checkpointed,
                self._ingested - ingested_then,
                time.monotonic() - last,
                CHECKPOINT_EVERY_S if normal else CHECKPOINT_AT_LEAST_EVERY_S,
            ):
                continue
            indexed = True
            if self._unindexed:
                try:
                    await self._write(index_tail, committed=self._unindexed.clear)
                except OutboxUnavailable:
                    indexed = False  # again at the next look, not after the time bound
            if indexed:
                # After the index's own rows, so that they do not count toward the next one.
                self._changes_checkpointed, ingested_then = self._changes, self._ingested
                last = time.monotonic()
            with contextlib.suppress(sqlite3.Error):
                await self._require(self._checkpointer).execute("PRAGMA wal_checkpoint(PASSIVE)")

    async def _storage_failure(self, error: sqlite3.Error) -> OutboxUnavailable:
        """Name a failed write; on a full disk, also give the WAL's space back.

        SQLite checkpoints the WAL only after a commit succeeds, so once the WAL has filled
        the disk every commit fails and nothing would ever shrink it: copying it into the
        database and truncating it is what lets the outbox recover when space returns.
        """
        failure = _unavailable(error)
        if failure.reason == "disk_full":
            await self._truncate_wal()
        return failure

    async def _truncate_wal(self) -> None:
        """Copy the WAL into the database and truncate it, at most once a second."""
        now = time.monotonic()
        if now - self._last_reclaim >= 1.0:
            self._last_reclaim = now
            with contextlib.suppress(sqlite3.Error):
                await self._require(self._checkpointer).execute("PRAGMA wal_checkpoint(TRUNCATE)")

    async def _room(self) -> int:
        """Bytes new events can use: free space on the disk, after giving the WAL's space back
        when that is short, plus the free pages inside the database, which new rows reuse
        without growing the file.

        Counting only the disk, a disk filled by the outbox itself stayed 'full' after the
        backlog drained: the drained events' pages are free inside the file, and the WAL that
        held the rest was truncated only after a failed write, which the check prevented.
        """
        free = shutil.disk_usage(self.path.parent).free
        if free >= self.reserve_bytes:
            return free
        await self._truncate_wal()
        free = shutil.disk_usage(self.path.parent).free
        reuse = await self._writer.run(writes.free_page_bytes)
        return free + reuse


def _unavailable(e: sqlite3.Error) -> OutboxUnavailable:
    """Name a storage failure the way the HTTP API reports it."""
    code = getattr(e, "sqlite_errorcode", 0) & 0xFF
    if code == _SQLITE_FULL:
        return OutboxUnavailable("disk_full", "the disk holding the outbox is full", 30)
    if code == _SQLITE_BUSY:
        return OutboxUnavailable("busy", "the outbox is busy; try again", 1)
    return storage_error(e)


def _seqs_json(seqs: Iterable[int]) -> str:
    """Claimed seqs as the JSON text `json_each` reads (text: a BLOB would be taken for
    JSONB): made on the event loop for every claim, where the standard library's json took
    47 us for 400 seqs (codec's orjson: 8)."""
    return codec.dumps(sorted(seqs)).decode()


def _first(rows: list[Any]) -> Any:
    """The first row of a query's rows, or None."""
    return rows[0] if rows else None
