"""One [[destinations]] entry's place in the outbox, as its dispatcher sees it: the calls the
Outbox answers for [upstream], bound to the destination's name, with its own group commit of
acknowledgements and its own wake-up."""

from __future__ import annotations

import asyncio
from collections.abc import Sequence

from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox.grouping import GroupCommit
from caliper_sidecar.outbox.records import Batch, Claim, DestinationAck, OutboxStats
from caliper_sidecar.outbox.storage import Storage
from caliper_sidecar.waits import wait_set


class DestinationQueue:
    """A destination's queue: what its dispatcher claims, acknowledges, fails and
    dead-letters. Built and woken by the Outbox (`Outbox.queue`)."""

    def __init__(self, storage: Storage, name: str) -> None:
        self.name = name
        self._storage = storage
        self._appended = asyncio.Event()
        self._acks: GroupCommit[DestinationAck, None] = GroupCommit(
            self._commit_acks, f"outbox-acks-{name}"
        )

    def start(self) -> None:
        self._acks.start()

    async def close(self) -> None:
        await self._acks.close()

    def wake(self) -> None:
        self._appended.set()

    async def wait_appended(self, timeout: float | None) -> None:
        await wait_set(self._appended, timeout)

    async def claim_batch(self, max_events: int, max_bytes: int, linger_s: float = 0) -> Batch:
        self._appended.clear()
        return await self._storage.destination_claim(self.name, max_events, max_bytes, linger_s)

    async def extend(self, claim: Claim) -> None:
        await self._storage.destination_extend(self.name, claim)

    async def release(self, claim: Claim, seqs: Sequence[int]) -> None:
        await self._storage.destination_release(self.name, claim, seqs)

    async def acknowledge(
        self,
        claim: Claim,
        seqs: Sequence[int],
        platform_job: str | None = None,
        unconfirmed: str | None = None,
    ) -> None:
        """The destination took these. A destination has no platform jobs to follow:
        `platform_job` and `unconfirmed` are accepted for the dispatcher's sake and unused."""
        del platform_job, unconfirmed
        await self._acks.submit((claim, list(seqs)))

    async def _commit_acks(self, group: list[DestinationAck]) -> list[OutboxUnavailable | None]:
        await self._storage.destination_acks(self.name, group)
        return [None] * len(group)

    async def record_failure(self, claim: Claim, seqs: Sequence[int], error: str) -> None:
        await self._storage.destination_failure(self.name, claim, seqs, error)

    async def dead_letter(
        self, claim: Claim, seqs: Sequence[int], reason: str, status: int | None, response: str
    ) -> None:
        await self._storage.destination_dead_letter(
            self.name, claim, seqs, reason, status, response
        )

    async def stats(self) -> OutboxStats:
        """The destination's waiting events as the dispatcher reads them (`events`)."""
        s = await self._storage.destination_stats(self.name)
        return OutboxStats(
            events=s.waiting,
            bytes=0,
            oldest_received_at=s.oldest_received_at,
            dead_letters=s.dead_letters,
            delivered_total=s.delivered_total,
            dead_lettered_total=s.dead_lettered_total,
            oldest_age_s=s.oldest_age_s,
        )
