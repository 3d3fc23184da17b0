"""The `archive` destination as the dispatcher sees it: a Sender whose `send` appends the claimed
events to the archive's hour files (archive.py) and returns once they are fsynced, so that the
dispatcher acknowledges only what is on disk (docs/destinations.md).

It batches as no `caliper` destination does (ARCHIVE_BATCHING, not configurable): one append at
a time, so that a file's lines follow the queue's order (retries aside), and large appends, so
that each fsync and each gzip member carries many events. It also prunes the archive: at open,
then every PRUNE_EVERY_S.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

import structlog

from caliper_sidecar.delivery.archive import Archive, ArchivedEvent
from caliper_sidecar.delivery.upstream import Sent

log = structlog.get_logger("sidecar.delivery.archive")

#: how often files older than `keep_days` are removed (their age is counted in whole hours)
PRUNE_EVERY_S: Final = 3600.0


@dataclass(frozen=True, slots=True)
class ArchiveBatching:
    """The batching keys of an archive (the dispatcher's `Batching`)."""

    batch_max_events: int = 1000
    batch_max_bytes: int = 4_000_000
    #: an archive is read later, not now: a second of linger makes fewer, larger members
    linger_ms: int = 1000
    #: appends take the archive's lock one at a time anyway; one in flight keeps files in
    #: the order events were received
    concurrency: int = 1


ARCHIVE_BATCHING: Final = ArchiveBatching()


class ArchiveSender:
    """Appends what the dispatcher sends to an Archive; `open` before use, `close` after."""

    #: an archive line is the event itself: nothing is added around a batch
    overhead = 0

    def __init__(self, archive: Archive) -> None:
        self.archive = archive
        self._pruning: asyncio.Task[None] | None = None

    async def open(self) -> ArchiveSender:
        """Open the archive (repairing what a crash tore; ArchiveUnusable when its dir cannot
        be used) and start pruning it."""
        await self.archive.open()
        self._pruning = asyncio.create_task(self._prune_hourly(), name="archive-prune")
        return self

    async def close(self) -> None:
        """Stop pruning, then close the archive (after the append under way, if any)."""
        if self._pruning is not None:
            self._pruning.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._pruning
            self._pruning = None
        await self.archive.close()

    async def send(
        self,
        bodies: Sequence[bytes],
        sensor: str | None = None,
        received_at: Sequence[float] = (),
    ) -> Sent:
        """Append these events, each in the hour file of when the sidecar received it; returns
        once they are fsynced. ArchiveUnavailable (a RetryLater) when the disk fails: nothing
        of them was kept, the dispatcher backs off and sends them again."""
        del sensor  # an archive line is the event as received, without an envelope
        if len(received_at) != len(bodies):
            raise ValueError("an archive needs each event's receive time")
        await self.archive.append(
            [ArchivedEvent(at, body) for at, body in zip(received_at, bodies, strict=True)]
        )
        return Sent(status=None)

    async def _prune_hourly(self) -> None:
        while True:
            try:
                await self.archive.prune()
            except Exception:
                # A file that cannot go is logged by prune itself; anything else must not end
                # pruning for the life of the process.
                log.exception("archive_prune_failed", dir=str(self.archive.dir))
            await asyncio.sleep(PRUNE_EVERY_S)
