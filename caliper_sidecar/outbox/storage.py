"""What a backend supplies to the outbox: SQL, connections and the file or pool, nothing of the
domain (as procrastinate's connector under its manager).

`Outbox` (outbox.py) owns the domain and calls these; `sqlite/` and `postgres/` implement
them. Every method raises OutboxUnavailable when the storage cannot do it now.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Protocol

from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox.records import (
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
)

#: the totals a backend keeps, in this order (see `Storage.stats_rows`)
TOTALS = ("events", "bytes", "dead_letters", "delivered_total", "dead_lettered_total")


class Storage(Protocol):
    """One backend's storage of the outbox."""

    #: names the storage in log lines about its write health (a path, or "postgresql")
    where: dict[str, str]

    async def open(self, wake: Callable[[], None]) -> None:
        """Create or migrate the schema and connect; `wake` is called when another process
        appended events (PostgreSQL's LISTEN). Raises OutboxUnusable or SchemaTooNew with
        nothing left open."""

    async def close(self) -> None:
        """Let go of every connection, thread and task."""

    def ping(self) -> str | None:
        """Why appends cannot be taken now for a reason of the storage's own (the file was
        replaced under the process; room being won back), or None."""

    async def insert_appends(self, group: list[Append]) -> list[AppendResult | OutboxUnavailable]:
        """Store a group of appends in one transaction (known ids skipped, the limits checked
        per append: all of it or none); a result, or why not, per append."""

    def append_failed(self, error: OutboxUnavailable) -> None:
        """A group of appends could not be stored (a backend may start recovering room)."""

    async def claim_batch(self, max_events: int, max_bytes: int, linger_s: float) -> Batch:
        """See `Outbox.claim_batch`."""

    async def extend(self, claim: Claim) -> None:
        """Renew a claim's lease."""

    async def release(self, claim: Claim, seqs: Sequence[int]) -> None:
        """Give claimed events back untouched."""

    async def record_acks(self, group: list[Ack], prune: bool) -> bool:
        """Acknowledgements of concurrent deliveries in one transaction (outcomes for events
        a claim no longer holds are not applied), then, with `prune`, a chunk of the events
        delivered before the dedupe window forgotten; True when pruning is done for now."""

    async def record_failure(self, claim: Claim, seqs: Sequence[int], error: str) -> None:
        """Count a failed attempt and give the events back."""

    async def dead_letter(
        self, claim: Claim, seqs: Sequence[int], reason: str, status: int | None, response: str
    ) -> None:
        """Move claimed events to the dead letters."""

    async def stats_rows(
        self,
    ) -> tuple[Sequence[Any], float | None, float | None, Sequence[Sequence[Any]]]:
        """The TOTALS, the receive time of the oldest waiting event and its age on the clock
        the storage keeps times on, and (state, count) of the platform jobs."""

    async def journey_rows(
        self, ids: list[str]
    ) -> tuple[Sequence[Sequence[Any]], Sequence[Sequence[Any]]]:
        """Rows of JOURNEY_COLUMNS for these ids among the events, and rows of
        DEAD_LETTER_COLUMNS, sensor, sender among the dead letters (every destination's)."""

    async def dead_letters(
        self, limit: int, after: str | None, destination: str | None
    ) -> list[DeadLetter]:
        """Dead letters in the order they died, after the given id (of that destination, or
        of all), of one destination or of all (None)."""

    async def take_dead_letters(
        self, ids: list[str] | None, limit: int, replay: bool, destination: str | None
    ) -> int:
        """Delete up to `limit` of the selected dead letters (all when `ids` is None; of one
        destination, or of all when None) in one transaction; how many. With `replay`, each
        is first queued again for its own destination only, id unchanged (never refused as a
        duplicate): for [upstream] as before; for a destination, its place reopened for that
        event. Dead letters of a destination no longer configured are not replayed (left)."""

    async def replay(self, events: Sequence[Replay], mark: str) -> None:
        """Queue these events again in one transaction, each for its queues alone, id
        unchanged, never refused as a duplicate (as a dead letter replayed is): where its row
        is still there, back in place for each queue that had it (delivered, or
        dead-lettered: that dead letter is taken) and left alone for one that has it still
        to send; where its row is gone, stored again for those queues alone. Each is marked
        `mark` (a JourneyMark) for each of its queues, which must be known to the outbox."""

    async def add_marks(self, marks: Sequence[Mark]) -> None:
        """Store these marks, `at` now on the storage's clock."""

    async def mark_rows(self, ids: list[str]) -> Sequence[Sequence[Any]]:
        """Rows of MARK_COLUMNS for these ids, in the order they were added."""

    # -- [[destinations]]: each its own place in the queue ---------------------------------
    # Every accepted event goes to [upstream] and to each destination. A destination's state
    # is a position (every event at or below it is delivered or dead-lettered there), the
    # ranges done above it (acknowledgements out of order), attempts only for events that
    # failed there, and dead letters with its name: little written per event. An event's body
    # is kept while any destination still needs it, and its row until the lowest position
    # has passed it (and the dedupe window, as before).

    async def set_destinations(self, plans: Sequence[DestinationPlan]) -> None:
        """At open: a destination not known yet starts after the newest event (it gets no
        history); a known one keeps its place; the state of one no longer configured is
        dropped (its dead letters stay). With none, everything behaves as before."""

    async def destination_claim(
        self, name: str, max_events: int, max_bytes: int, linger_s: float
    ) -> Batch:
        """`claim_batch` for one destination: the oldest events it still needs, unclaimed
        by its other senders (replicas: leases per destination, as for [upstream])."""

    async def destination_extend(self, name: str, claim: Claim) -> None:
        """Renew a destination's claim."""

    async def destination_release(self, name: str, claim: Claim, seqs: Sequence[int]) -> None:
        """Give a destination's claimed events back untouched."""

    async def destination_acks(self, name: str, group: list[DestinationAck]) -> None:
        """These events reached the destination: done there (outcomes for events a claim no
        longer holds are not applied), its position moved on, in one transaction."""

    async def destination_failure(
        self, name: str, claim: Claim, seqs: Sequence[int], error: str
    ) -> None:
        """Count a failed attempt at the destination and give the events back."""

    async def destination_dead_letter(
        self,
        name: str,
        claim: Claim,
        seqs: Sequence[int],
        reason: str,
        status: int | None,
        response: str,
    ) -> None:
        """Dead-letter claimed events for this destination only (done there)."""

    async def destination_stats(self, name: str) -> DestinationStats:
        """One destination's waiting events, oldest age and totals."""

    async def destination_journey_rows(self, ids: list[str]) -> Sequence[Sequence[Any]]:
        """(id, destination, state "waiting" or "delivered", attempts, last_error) for these
        ids and every configured destination, for events still in the queue table (a
        destination's dead letters come with `journey_rows`)."""

    # -- erasing a learner ---------------------------------------------------------------

    async def erase_events(
        self, actor: str | None, ids: Sequence[str], dry_run: bool
    ) -> list[ErasedRow]:
        """In one transaction: find the events whose `actor` (the string, or `actor.id`) is
        `actor`, or whose id is in `ids`, in the queue table and the dead letters (every
        destination's), and unless `dry_run` delete them, with what journeys are built from
        (attempts, the ids an app's job lists), so that no queue sends them afterwards. Deleted
        content is overwritten where the backend can (SQLite's secure_delete). Rows of
        ErasedRow, with each event's state in each queue as the transaction found it."""

    async def compact(self) -> None:
        """Rewrite the outbox's tables so that no free space in their files still holds
        deleted content (SQLite: VACUUM; PostgreSQL: VACUUM FULL of the tables erase deletes
        from). OutboxUnavailable("busy"/"storage_busy") when it cannot now."""

    async def truncate_log(self) -> bool:
        """Empty the write-ahead log the sidecar's own files keep (SQLite's -wal, by a
        truncating checkpoint); False when a reader's snapshot prevents it now. PostgreSQL's
        WAL is the server's: nothing to do."""

    async def job_ids_sent_in(self, platform_job: str) -> list[str]:
        """See `Outbox.job_ids_sent_in`."""

    async def pending_platform_jobs(self) -> list[str]:
        """See `Outbox.pending_platform_jobs`."""

    async def platform_job_polled(self, job: str, state: str, error: str | None) -> None:
        """See `Outbox.platform_job_polled`."""

    async def finish_platform_job(self, job: str, outcome: PlatformJobOutcome) -> int:
        """See `Outbox.finish_platform_job` (events queued again wake the dispatcher)."""

    async def give_up_platform_job(self, job: str, reason: str) -> None:
        """See `Outbox.give_up_platform_job`."""

    async def job_event_ids(self, job: str) -> list[str] | None:
        """See `Outbox.job_event_ids`."""

    # -- reconciliation ---------------------------------------------------------------------

    async def delivered_upstream(
        self, older_than_s: float, unchecked_only: bool, limit: int, after_seq: int = 0
    ) -> list[DeliveredUpstream]:
        """Events delivered upstream at least `older_than_s` ago (and confirmed, or given up on
        being confirmed, where the platform confirms), whose bodies are kept, in seq order
        after `after_seq`; with `unchecked_only`, only those reconciliation has neither
        verified nor given up on."""

    async def reconcile_turn(self, turn_s: float) -> bool:
        """Whether this process runs reconciliation's next round. SQLite: always (one `run` a
        file). PostgreSQL: only the replica whose turn it is, taken when no replica holds it
        or its holder's ran out, held `turn_s` from now (each call of the holder renews it),
        given back when the replica stops: two replicas checking at once each sent a lost
        event again."""

    async def reconciled(
        self, held: Sequence[str], missing: Sequence[str], given_up: Sequence[str]
    ) -> None:
        """Mark what a check found (`verified`, `missing`, `given_up`, for [upstream]); the
        bodies of the held and given-up events go unless a destination still needs them."""
