"""What both outbox backends do alike, written once (as procrastinate's manager over its
connectors): group-committed appends and the write health they report, waking the dispatcher,
journeys from rows, stats from totals, dead letters replayed or purged in chunks.

A backend subclasses OutboxManager and supplies only its storage: how a group of appends is
inserted, the rows a journey or the stats are read from, and one chunk of dead letters taken.
"""

from __future__ import annotations

import abc
import asyncio
from collections.abc import Callable, Sequence
from typing import Any, Final

from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.ids import canonical_id
from caliper_sidecar.outbox.base import (
    DEAD_CHUNK,
    PRUNE_EVERY_S,
    Append,
    AppendResult,
    DeadLetter,
    Journey,
    NewEvent,
    OutboxStats,
    WriteHealth,
    dead_journey,
    journey_of,
)
from caliper_sidecar.outbox.grouping import GroupCommit
from caliper_sidecar.waits import wait_set

#: told the running count of a long operation
Progress = Callable[[int], None]
#: the totals a backend keeps, in this order (see `OutboxManager._stats_rows`)
TOTALS: Final = ("events", "bytes", "dead_letters", "delivered_total", "dead_lettered_total")


class OutboxManager(abc.ABC):
    """The backends' shared half; one constructor shape: the outbox's settings first."""

    def __init__(self, settings: OutboxSettings, **where: str) -> None:
        self.max_events = settings.max_events
        self.max_bytes = settings.max_bytes
        self.dedupe_window_s = settings.dedupe_window_s
        #: how often delivered events older than the dedupe window are forgotten
        self.prune_every_s = PRUNE_EVERY_S
        #: group commits of appends done by this process (a metric; how tests see grouping)
        self.commits = 0
        self.writes = WriteHealth(**where)
        self._appended = asyncio.Event()
        self._appends: GroupCommit[Append, AppendResult] = GroupCommit(
            self._commit_appends, "outbox-appends"
        )

    # -- ingest ----------------------------------------------------------------------------

    async def append(self, events: Sequence[NewEvent], job: str | None = None) -> AppendResult:
        return await self._appends.submit((events, job))

    async def _commit_appends(self, group: list[Append]) -> list[AppendResult | OutboxUnavailable]:
        """One transaction for every append queued (known ids skipped, capacity checked per
        append: all of it or none), its success or failure recorded for readiness."""
        try:
            results = await self._insert_new(group)
        except OutboxUnavailable as e:
            self.writes.failed(e)
            self._append_failed(e)
            raise
        self.writes.succeeded()
        self.commits += 1
        if any(isinstance(r, AppendResult) and r.accepted for r in results):
            self.wake()
        return results

    @abc.abstractmethod
    async def _insert_new(self, group: list[Append]) -> list[AppendResult | OutboxUnavailable]:
        """Store a group of appends in one transaction; a result (or why not) per append."""

    def _append_failed(self, error: OutboxUnavailable) -> None:
        """Called when a group of appends could not be stored (a backend may start recovery)."""
        del error  # the SQLite outbox needs nothing: it measures its room before every write

    def unwritable_reason(self) -> str | None:
        """Why appends are failing now (for readiness), or None."""
        return self.writes.current()

    # -- waking the dispatcher -------------------------------------------------------------

    def wake(self) -> None:
        """Something may be waiting to be sent: a dispatcher in wait_appended looks now."""
        self._appended.set()

    async def wait_appended(self, timeout: float | None) -> None:
        await wait_set(self._appended, timeout)

    # -- inspection ------------------------------------------------------------------------

    async def stats(self) -> OutboxStats:
        totals, oldest, age, jobs = await self._stats_rows()
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

    @abc.abstractmethod
    async def _stats_rows(
        self,
    ) -> tuple[Sequence[Any], float | None, float | None, Sequence[Sequence[Any]]]:
        """The TOTALS, the receive time of the oldest waiting event and its age on the clock
        the outbox stores times on, and (state, count) of the platform jobs."""

    async def journeys(self, ids: Sequence[str]) -> dict[str, Journey]:
        rows, dead = await self._journey_rows([canonical_id(i) for i in ids])
        found = {row[0]: journey_of(*row) for row in rows}
        for row in dead:
            letter = DeadLetter(*row[:-2])
            found[letter.id] = dead_journey(letter, row[-2], row[-1])
        return found

    @abc.abstractmethod
    async def _journey_rows(
        self, ids: list[str]
    ) -> tuple[Sequence[Sequence[Any]], Sequence[Sequence[Any]]]:
        """Rows of JOURNEY_COLUMNS for these ids among the events, and rows of
        DEAD_LETTER_COLUMNS, sensor, sender among the dead letters."""

    # -- dead letters ----------------------------------------------------------------------

    async def replay_dead_letters(
        self, ids: Sequence[str] | None, progress: Progress | None = None
    ) -> int:
        return await self._dead_letters_in_chunks(ids, progress, replay=True)

    async def purge_dead_letters(
        self, ids: Sequence[str] | None, progress: Progress | None = None
    ) -> int:
        return await self._dead_letters_in_chunks(ids, progress, replay=False)

    async def _dead_letters_in_chunks(
        self, ids: Sequence[str] | None, progress: Progress | None, replay: bool
    ) -> int:
        """Delete the selected dead letters (stored again as waiting events first, for a
        replay), DEAD_CHUNK per transaction: one transaction over 100,000 rows held SQLite's
        write lock for seconds, and a running sidecar's ingest waited behind it until it
        answered 503."""
        wanted = None if ids is None else [canonical_id(i) for i in ids]
        done = 0
        while True:
            count = await self._take_dead_letters(wanted, DEAD_CHUNK, replay)
            if count <= 0:
                return done
            done += count
            if replay:
                self.wake()
            if progress is not None:
                progress(done)

    @abc.abstractmethod
    async def _take_dead_letters(self, ids: list[str] | None, limit: int, replay: bool) -> int:
        """Delete up to `limit` of the selected dead letters (all when `ids` is None) in one
        transaction, stored again as waiting events first when `replay`; how many."""
