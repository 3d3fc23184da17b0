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
    PlatformJobOutcome,
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
        DEAD_LETTER_COLUMNS, sensor, sender among the dead letters."""

    async def dead_letters(self, limit: int, after: str | None) -> list[DeadLetter]:
        """Dead letters in the order they died, after the given id."""

    async def take_dead_letters(self, ids: list[str] | None, limit: int, replay: bool) -> int:
        """Delete up to `limit` of the selected dead letters (all when `ids` is None) in one
        transaction, stored again as waiting events first when `replay`; how many."""

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
