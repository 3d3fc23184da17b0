"""The outbox: what an event goes through between its acknowledgement and the platform's word,
written once over a `Storage` (as procrastinate's manager over its connector).

It owns the domain both backends share: group-committed appends and the write health they
report, group-committed acknowledgements and the prune cadence, waking the dispatcher, readiness,
journeys from rows, stats from totals, dead letters replayed or purged in chunks. The storage
(`sqlite/`, `postgres/`) holds only SQL, connections and the file or pool.
"""

from __future__ import annotations

import asyncio
import dataclasses
import time
from collections.abc import Callable, Sequence
from types import TracebackType
from typing import Final

from caliper_sidecar.config import UPSTREAM, OutboxSettings
from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.ids import canonical_id
from caliper_sidecar.outbox.grouping import GroupCommit
from caliper_sidecar.outbox.queues import DestinationQueue
from caliper_sidecar.outbox.records import (
    DEAD_CHUNK,
    PRUNE_EVERY_S,
    Ack,
    Append,
    AppendResult,
    Batch,
    Claim,
    DeadLetter,
    DeliveredUpstream,
    DestinationPart,
    DestinationPlan,
    DestinationStats,
    Erasure,
    Journey,
    Mark,
    NewEvent,
    OutboxStats,
    PlatformJobOutcome,
    Replay,
    WriteHealth,
    dead_journey,
    journey_of,
)
from caliper_sidecar.outbox.storage import Storage
from caliper_sidecar.states import JourneyMark
from caliper_sidecar.waits import wait_set

#: told the running count of a long operation
Progress = Callable[[int], None]
#: how many times `forget_erased` tries, and how long it waits between tries: `run` reads in
#: short statements, so a truncating checkpoint (or a rewrite) finds a moment within seconds
ERASE_TRIES: Final = 20
ERASE_PAUSE_S: Final = 0.5


class Outbox:
    """The storage operations an event goes through, in the order it meets them."""

    def __init__(
        self,
        storage: Storage,
        settings: OutboxSettings,
        destinations: Sequence[DestinationPlan] | None = None,
    ) -> None:
        self.storage = storage
        #: None: the stored destinations' state is left as it is (inspection commands)
        self._plans = None if destinations is None else list(destinations)
        #: each [[destinations]] entry's queue, by name
        self.queues = {
            plan.name: DestinationQueue(storage, plan.name) for plan in destinations or ()
        }
        self.max_events = settings.max_events
        self.max_bytes = settings.max_bytes
        #: how often delivered events older than the dedupe window are forgotten
        self.prune_every_s = PRUNE_EVERY_S
        #: group commits of appends done by this process (a metric; how tests see grouping)
        self.commits = 0
        self.writes = WriteHealth(**storage.where)
        self._appended = asyncio.Event()
        self._appends: GroupCommit[Append, AppendResult] = GroupCommit(
            self._commit_appends, "outbox-appends"
        )
        self._acks: GroupCommit[Ack, None] = GroupCommit(self._commit_acks, "outbox-acks")
        self._last_prune = float("-inf")  # monotonic; the first acknowledgement prunes

    # -- lifecycle -------------------------------------------------------------------------

    async def open(self) -> Outbox:
        """Open the storage; raises OutboxUnusable or SchemaTooNew with nothing left open."""
        await self.storage.open(self.wake)
        if self._plans is not None:
            try:
                await self.storage.set_destinations(self._plans)
            except BaseException:
                await self.storage.close()
                raise
        self._appends.start()
        self._acks.start()
        for queue in self.queues.values():
            queue.start()
        return self

    async def close(self) -> None:
        """Commit what is queued, then let go of every resource; later appends raise
        OutboxUnavailable."""
        await self._appends.close()
        await self._acks.close()
        for queue in self.queues.values():
            await queue.close()
        await self.storage.close()

    async def __aenter__(self) -> Outbox:
        return await self.open()

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.close()

    # -- ingest ----------------------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent], job: str | None = None) -> AppendResult:
        """Commit the events durably, skipping known ids; raises OutboxUnavailable. With `job`,
        the ids of all these events are recorded under that job id in the same commit."""
        return await self._appends.submit((events, job))

    async def _commit_appends(self, group: list[Append]) -> list[AppendResult | OutboxUnavailable]:
        """One transaction for every append queued, its success or failure recorded for
        readiness."""
        try:
            results = await self.storage.insert_appends(group)
        except OutboxUnavailable as e:
            self.writes.failed(e)
            self.storage.append_failed(e)
            raise
        self.writes.succeeded()
        self.commits += 1
        if any(isinstance(r, AppendResult) and r.accepted for r in results):
            self.wake()
        return results

    def unwritable_reason(self) -> str | None:
        """Why appends are failing now (e.g. "disk_full"), or None when they are not."""
        return self.storage.ping() or self.writes.current()

    async def ping(self) -> str | None:
        """Why the outbox should not be sent events now (failing writes, full), or None: its
        part of readiness."""
        failing = self.unwritable_reason()
        if failing is not None:
            return failing
        try:
            stats = await self.stats()
        except OutboxUnavailable as e:
            return e.reason
        if stats.events >= self.max_events or stats.bytes >= self.max_bytes:
            return "outbox_full"
        for plan in self._plans or ():
            # A destination that blocks holds events as [upstream] does (by count).
            if plan.blocks and (await self.destination_stats(plan.name)).waiting >= (
                self.max_events
            ):
                return "outbox_full"
        return None

    # -- waking the dispatcher -------------------------------------------------------------

    def wake(self) -> None:
        """Something may be waiting to be sent: a dispatcher in wait_appended looks now."""
        self._appended.set()
        for queue in self.queues.values():
            queue.wake()

    async def wait_appended(self, timeout: float | None) -> None:
        """Return when events were appended since the last claim, or after the timeout."""
        await wait_set(self._appended, timeout)

    # -- dispatch --------------------------------------------------------------------------

    async def claim_batch(self, max_events: int, max_bytes: int, linger_s: float = 0) -> Batch:
        """Claim the oldest unclaimed events within both limits (at least one event), when
        they are worth sending: a full batch, or an oldest event that has waited `linger_s`.
        Otherwise claim nothing and say when to ask again."""
        self._appended.clear()
        return await self.storage.claim_batch(max_events, max_bytes, linger_s)

    async def extend(self, claim: Claim) -> None:
        """Renew a claim's lease (a batch being split can take several sends)."""
        await self.storage.extend(claim)

    async def release(self, claim: Claim, seqs: Sequence[int]) -> None:
        """Return claimed events untouched (shutdown, or a circuit that opened)."""
        await self.storage.release(claim, seqs)

    async def acknowledge(
        self,
        claim: Claim,
        seqs: Sequence[int],
        platform_job: str | None = None,
        unconfirmed: str | None = None,
    ) -> None:
        """The platform accepted these: mark them delivered (the attempt counted), their ids
        kept for deduplication. With `platform_job`, they wait for that job to be confirmed,
        bodies kept; with `unconfirmed`, the reason they never can be."""
        await self._acks.submit((claim, list(seqs), platform_job, unconfirmed))

    async def _commit_acks(self, group: list[Ack]) -> list[OutboxUnavailable | None]:
        """Acknowledgements of concurrent deliveries in one commit (one fsync for the group, not
        one per envelope), with a chunk of pruning every `prune_every_s`."""
        # Monotonic: a wall clock stepped back must not stop pruning for the step's length.
        prune = time.monotonic() - self._last_prune > self.prune_every_s
        if await self.storage.record_acks(group, prune) and prune:
            self._last_prune = time.monotonic()
        return [None] * len(group)

    async def record_failure(self, claim: Claim, seqs: Sequence[int], error: str) -> None:
        """A send failed transiently: count the attempt and release the claim."""
        await self.storage.record_failure(claim, seqs, error)

    async def dead_letter(
        self, claim: Claim, seqs: Sequence[int], reason: str, status: int | None, response: str
    ) -> None:
        """Move claimed events to the dead-letter table with the reason."""
        await self.storage.dead_letter(claim, seqs, reason, status, response)

    # -- destinations ----------------------------------------------------------------------

    def queue(self, name: str) -> DestinationQueue:
        """A [[destinations]] entry's queue, for its dispatcher; KeyError for an unknown
        name."""
        return self.queues[name]

    async def destination_stats(self, name: str) -> DestinationStats:
        """One destination's waiting events, oldest age and totals."""
        return await self.storage.destination_stats(name)

    # -- inspection ------------------------------------------------------------------------

    async def stats(self) -> OutboxStats:
        """Current counts."""
        totals, oldest, age, jobs = await self.storage.stats_rows()
        values = [int(v or 0) for v in totals]
        return OutboxStats(
            events=values[0],
            bytes=values[1],
            oldest_received_at=oldest,
            dead_letters=values[2],
            delivered_total=values[3],
            dead_lettered_total=values[4],
            platform_jobs={str(state): int(n) for state, n in jobs},
            oldest_age_s=None if age is None else round(max(0.0, float(age)), 3),
        )

    async def journeys(self, ids: Sequence[str]) -> dict[str, Journey]:
        """Where each of these events is (ids the outbox does not know are left out)."""
        wanted = [canonical_id(i) for i in ids]
        rows, dead = await self.storage.journey_rows(wanted)
        found = {row[0]: journey_of(*row) for row in rows}
        parts: dict[str, dict[str, DestinationPart]] = {}
        for row in dead:
            letter = DeadLetter(*row[:-2])
            if letter.destination == UPSTREAM:
                found[letter.id] = dead_journey(letter, row[-2], row[-1])
            else:
                parts.setdefault(letter.id, {})[letter.destination] = DestinationPart(
                    "dead_lettered",
                    letter.attempts,
                    letter.response or None,
                    letter.reason,
                )
        if self.queues:
            for id_, name, state, attempts, error in await self.storage.destination_journey_rows(
                wanted
            ):
                parts.setdefault(id_, {}).setdefault(
                    name, DestinationPart(state, int(attempts or 0), error)
                )
        marks: dict[str, list[Mark]] = {}
        for row in await self.storage.mark_rows(list(found)) if found else ():
            mark = Mark(*row)
            marks.setdefault(mark.id, []).append(mark)
        for id_, journey in found.items():
            if id_ in parts or id_ in marks:
                found[id_] = dataclasses.replace(
                    journey,
                    destinations=parts.get(id_, journey.destinations),
                    marks=tuple(marks.get(id_, ())),
                )
        return found

    # -- replays from an archive, and marks ----------------------------------------------------

    async def replay(
        self, events: Sequence[Replay], mark: JourneyMark = JourneyMark.REPLAYED
    ) -> None:
        """Queue these events again, each for its queues alone (see `Storage.replay`), each
        marked so there (`replayed` from an archive; reconciliation's `resent`), in one
        transaction, and wake the dispatchers (a `run` beside this process notices within
        its dispatchers' idle poll, a second; on PostgreSQL at once, by NOTIFY)."""
        await self.storage.replay(events, mark)
        self.wake()

    async def add_marks(self, marks: Sequence[Mark]) -> None:
        """Record what happened to events at their destinations beside delivery (their
        journeys show it, until the events leave the outbox)."""
        await self.storage.add_marks(marks)

    # -- dead letters ----------------------------------------------------------------------

    async def dead_letters(
        self, limit: int, after: str | None = None, destination: str | None = None
    ) -> list[DeadLetter]:
        """Dead letters in the order they died, after the given id; of one destination
        ("upstream" or a [[destinations]] name), or of all (None)."""
        return await self.storage.dead_letters(limit, after, destination)

    async def replay_dead_letters(
        self,
        ids: Sequence[str] | None,
        progress: Progress | None = None,
        destination: str | None = None,
    ) -> int:
        """Put dead letters (these ids, or all when None; of one destination, or of all)
        back in their own destination's queue, a chunk at a time, telling `progress` the
        running count; returns the count."""
        return await self._dead_letters_in_chunks(ids, progress, True, destination)

    async def purge_dead_letters(
        self,
        ids: Sequence[str] | None,
        progress: Progress | None = None,
        destination: str | None = None,
    ) -> int:
        """Delete dead letters (these ids, or all when None; of one destination, or of
        all), a chunk at a time; returns the count."""
        return await self._dead_letters_in_chunks(ids, progress, False, destination)

    async def _dead_letters_in_chunks(
        self,
        ids: Sequence[str] | None,
        progress: Progress | None,
        replay: bool,
        destination: str | None,
    ) -> int:
        """DEAD_CHUNK per transaction: one transaction over 100,000 rows held SQLite's write
        lock for seconds, and a running sidecar's ingest waited behind it until it answered
        503."""
        wanted = None if ids is None else [canonical_id(i) for i in ids]
        done = 0
        while True:
            count = await self.storage.take_dead_letters(wanted, DEAD_CHUNK, replay, destination)
            if count <= 0:
                return done
            done += count
            if replay:
                self.wake()
            if progress is not None:
                progress(done)

    # -- erasing a learner -------------------------------------------------------------------

    async def erase(
        self, actor: str | None, ids: Sequence[str] = (), dry_run: bool = False
    ) -> Erasure:
        """Remove the events whose actor is `actor` (the `actor` string, or `actor.id`; None:
        by id alone) or whose id is in `ids`, from the queue (waiting and kept) and the dead
        letters of every destination, in one transaction; with `dry_run`, only count them.
        No queue sends a removed event afterwards, except a batch a sender had already
        claimed at that instant (it holds the bodies in memory). Their bytes may still be in
        the storage's free space and log until `forget_erased`."""
        if actor is not None and not actor:
            raise ValueError("an empty actor matches no event")
        rows = await self.storage.erase_events(actor, [canonical_id(i) for i in ids], dry_run)
        return Erasure.of(rows)

    async def forget_erased(
        self, compact: bool = True, tries: int = ERASE_TRIES, pause_s: float = ERASE_PAUSE_S
    ) -> bool:
        """Make what `erase` removed unreadable in the storage's files: rewrite the tables
        (unless `compact` is False), then empty the write-ahead log. A running `run` (or a
        replica) may keep the log in use, or a snapshot the rewrite must wait for, for a
        moment: tried `tries` times, `pause_s` apart; False when it still could not be done
        (the erased events' bytes may be in those files until it is)."""
        for _ in range(tries):
            try:
                if compact:
                    await self.storage.compact()
                    compact = False
                if await self.storage.truncate_log():
                    return True
            except OutboxUnavailable as e:
                if e.reason not in ("busy", "storage_busy"):
                    raise
            await asyncio.sleep(pause_s)
        return False

    # -- processing confirmation -----------------------------------------------------------

    # -- reconciliation -------------------------------------------------------------------

    async def delivered_upstream(
        self, older_than_s: float, unchecked_only: bool, limit: int, after_seq: int = 0
    ) -> list[DeliveredUpstream]:
        """See `Storage.delivered_upstream`."""
        return await self.storage.delivered_upstream(older_than_s, unchecked_only, limit, after_seq)

    async def reconcile_turn(self, turn_s: float) -> bool:
        """See `Storage.reconcile_turn`."""
        return await self.storage.reconcile_turn(turn_s)

    async def record_reconciled(
        self,
        held: Sequence[str],
        missing: Sequence[DeliveredUpstream],
        given_up: Sequence[str],
    ) -> int:
        """Record what a check found, and queue the missing events again for [upstream]
        (marked `resent`); returns how many were queued again."""
        await self.storage.reconciled(held, [e.id for e in missing], given_up)
        if missing:
            await self.replay(
                [Replay(e.id, e.body, (UPSTREAM,), sensor=e.sensor) for e in missing],
                JourneyMark.RESENT,
            )
        return len(missing)

    async def job_ids_sent_in(self, platform_job: str) -> list[str]:
        """The ids of the events still waiting for this platform job's word."""
        return await self.storage.job_ids_sent_in(platform_job)

    async def pending_platform_jobs(self) -> list[str]:
        """Ids of the platform jobs still to be followed, oldest first."""
        return await self.storage.pending_platform_jobs()

    async def platform_job_polled(self, job: str, state: str, error: str | None) -> None:
        """Record one look at a platform job that is not finished (or could not be read)."""
        await self.storage.platform_job_polled(job, state, error)

    async def finish_platform_job(self, job: str, outcome: PlatformJobOutcome) -> int:
        """Apply a finished job: processed events confirmed; on failure the failing ones (all
        unprocessed ones, when it does not say which) dead-lettered with the reason, and the
        others queued again. Returns how many were dead-lettered."""
        return await self.storage.finish_platform_job(job, outcome)

    async def give_up_platform_job(self, job: str, reason: str) -> None:
        """Stop following a job that never finished; its events stay `unconfirmed`."""
        await self.storage.give_up_platform_job(job, reason)

    async def job_event_ids(self, job: str) -> list[str] | None:
        """The ids of the events an app sent under this job id, or None for an unknown job."""
        return await self.storage.job_event_ids(job)
