"""The storage interface and the values that cross it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol


@dataclass(frozen=True, slots=True)
class NewEvent:
    """An event to append: its Caliper id and its serialized JSON."""

    id: str
    body: bytes


@dataclass(frozen=True, slots=True)
class AppendResult:
    """How many events of one append were new, and how many were already known."""

    accepted: int
    duplicates: int


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """A waiting event as the dispatcher sees it."""

    seq: int
    id: str
    body: bytes
    received_at: float
    attempts: int
    first_attempt_at: float | None


@dataclass(frozen=True, slots=True)
class Batch:
    """Events claimed together; `full` when a limit, not the backlog, ended the batch."""

    events: list[StoredEvent]
    full: bool

    @property
    def seqs(self) -> list[int]:
        return [e.seq for e in self.events]


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event the platform will never accept, or that ran out of attempts, with the reason."""

    id: str
    body: bytes
    reason: str
    status: int | None
    response: str
    attempts: int
    received_at: float
    first_attempt_at: float | None
    last_attempt_at: float | None
    dead_lettered_at: float


@dataclass(frozen=True, slots=True)
class OutboxStats:
    """Counts for status pages and `outbox stats`."""

    events: int
    bytes: int
    oldest_received_at: float | None
    dead_letters: int
    delivered_total: int
    dead_lettered_total: int


class Outbox(Protocol):
    """The storage operations an event goes through, in the order it meets them."""

    async def append(self, events: Sequence[NewEvent]) -> AppendResult:
        """Commit the events durably, skipping known ids; raises OutboxUnavailable."""

    async def wait_appended(self, timeout: float | None) -> None:
        """Return when events were appended since the last claim, or after the timeout."""

    async def claim_batch(self, max_events: int, max_bytes: int) -> Batch:
        """Claim the oldest unclaimed events, within both limits (at least one event)."""

    async def release(self, seqs: Sequence[int]) -> None:
        """Return claimed events untouched (shutdown, or a batch not worth sending yet)."""

    async def acknowledge(self, seqs: Sequence[int]) -> None:
        """The platform accepted these: remove them, remember their ids for deduplication."""

    async def record_failure(self, seqs: Sequence[int], error: str) -> None:
        """A send failed transiently: count the attempt and release the claim."""

    async def dead_letter(
        self, seqs: Sequence[int], reason: str, status: int | None, response: str
    ) -> None:
        """Move claimed events to the dead-letter table with the reason."""

    async def stats(self) -> OutboxStats:
        """Current counts."""

    def unwritable_reason(self) -> str | None:
        """Why appends are failing now (e.g. "disk_full"), or None when they are not."""

    async def dead_letters(self, limit: int, after: str | None) -> list[DeadLetter]:
        """Dead letters in the order they died, after the given id."""

    async def replay_dead_letters(self, ids: Sequence[str] | None) -> int:
        """Put dead letters (these ids, or all when None) back in the queue; returns the count."""

    async def purge_dead_letters(self, ids: Sequence[str] | None) -> int:
        """Delete dead letters (these ids, or all when None); returns the count."""
