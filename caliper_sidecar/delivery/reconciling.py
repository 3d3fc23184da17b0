"""Reconciliation as `run` does it (`reconcile.after_s` set): a round now and then, each
checking the events delivered upstream at least `after_s` ago that no check has verified or
given up on (docs/guarantees.md, "Proof at the destination").

A round checks ROUND_EVENTS at most, one listing request at a time; another follows at once
while more are due, else after INTERVAL_S. A platform that cannot list ends the round and
is tried again after UNAVAILABLE_WAIT_S: nothing is decided without its word. The outbox keeps
the bodies of the events waiting for their check (they are what is sent again).
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final, Literal

import structlog

from caliper_sidecar.config import UPSTREAM, ReconcileSettings
from caliper_sidecar.delivery.reads import PlatformReader
from caliper_sidecar.delivery.reconcile import (
    Delivered,
    ListingUnavailable,
    Reconciler,
    Sorted,
    event_time,
)
from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import Outbox
from caliper_sidecar.outbox.records import DeliveredUpstream
from caliper_sidecar.states import ReconcileResult

log = structlog.get_logger("sidecar.reconcile")

#: events one round checks at most
ROUND_EVENTS: Final = 2000
#: the longest wait between rounds (a shorter after_s waits that long instead)
INTERVAL_S: Final = 60.0
#: how long a platform that cannot list is left alone before the next round
UNAVAILABLE_WAIT_S: Final = 300.0
#: how long a replica's turn to reconcile lasts from its last round (PostgreSQL; renewed by
#: every round, given back when it stops): the longest the others wait for a replica that
#: died holding it, and longer than a round and the wait after a platform that cannot list
TURN_S: Final = 600.0

ReconcileState = Literal["ok", "unavailable"]


@dataclass
class Totals:
    """What the checks of this process found (the status page's figures)."""

    held: int = 0
    missing: int = 0
    resent: int = 0
    given_up: int = 0
    rounds: int = 0
    last_round_at: float | None = None
    state: ReconcileState = "ok"
    last_error: str | None = None

    @property
    def checked(self) -> int:
        return self.held + self.missing

    def add(self, found: Sorted, resent: int) -> None:
        self.held += len(found.held)
        self.missing += len(found.missing) + len(found.given_up)
        self.resent += resent
        self.given_up += len(found.given_up)


def delivered(rows: Sequence[DeliveredUpstream], default_sensor: str) -> list[Delivered]:
    """The outbox's delivered events as the reconciler checks them: under the sensor their
    envelope carried (the app's own, else upstream.sensor)."""
    return [
        Delivered(r.id, r.sensor or default_sensor, event_time(r.body), r.missing_for_s)
        for r in rows
    ]


async def check(
    outbox: Outbox,
    reconciler: Reconciler,
    rows: Sequence[DeliveredUpstream],
    default_sensor: str,
    metrics: Metrics,
    *,
    resend: bool = True,
) -> tuple[Sorted, int]:
    """Check these delivered events and record what was found (unless `resend` is False, as
    with `reconcile --dry-run`: nothing recorded, nothing sent). Returns what was found and
    how many were queued again. Raises ListingUnavailable."""
    found = await reconciler.sort(delivered(rows, default_sensor))
    return found, await record(outbox, found, rows, metrics, resend=resend)


async def record(
    outbox: Outbox,
    found: Sorted,
    rows: Sequence[DeliveredUpstream],
    metrics: Metrics,
    *,
    resend: bool = True,
) -> int:
    """Record what a check of these rows found and queue the missing ones again (nothing
    with `resend` False); returns how many were queued again."""
    resent = 0
    if resend:
        by_id = {r.id: r for r in rows}
        missing = [by_id[i] for i in found.missing]
        # One without a time cannot be looked up (only where validation let it in): given up
        # on, rather than kept for a check that can never come.
        found.given_up += found.unreadable
        resent = await outbox.record_reconciled(found.held, missing, found.given_up)
    counts = {
        ReconcileResult.HELD: len(found.held),
        ReconcileResult.MISSING: len(found.missing) + len(found.given_up),
        ReconcileResult.RESENT: resent,
        ReconcileResult.GIVEN_UP: len(found.given_up),
    }
    for result, n in counts.items():
        if n:
            metrics.reconcile_events.labels(result=result).inc(n)
    for what, ids in (("resent", found.missing), ("given_up", found.given_up)):
        if resend and ids:
            metrics.tap.publish(what, ids, destination=UPSTREAM)
    return resent


class ReconcileLoop:
    """The rounds of `run`; one task, started and stopped by the app."""

    def __init__(
        self,
        outbox: Outbox,
        reader: PlatformReader,
        settings: ReconcileSettings,
        default_sensor: str,
        metrics: Metrics,
    ) -> None:
        self._outbox = outbox
        self._reconciler = Reconciler(reader.page, settings.give_up_s)
        self._after_s = settings.after_s
        self._default_sensor = default_sensor
        self._metrics = metrics
        self.totals = Totals()
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._run(), name="reconcile")

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    async def round(self) -> int:
        """Check what is due, when it is this process's turn; returns how many were due
        (ROUND_EVENTS: maybe more)."""
        if not await self._outbox.reconcile_turn(TURN_S):
            return 0  # another replica's turn (PostgreSQL): its rounds check for every one
        rows = await self._outbox.delivered_upstream(
            older_than_s=self._after_s, unchecked_only=True, limit=ROUND_EVENTS
        )
        if rows:
            found = await self._reconciler.sort(delivered(rows, self._default_sensor))
            # Taken again before anything is recorded: a replica frozen while it listed (or a
            # round longer than the turn) finds the turn gone, and leaves what it found to the
            # replica whose turn it is now, rather than send the lost events a second time.
            if not await self._outbox.reconcile_turn(TURN_S):
                return 0
            resent = await record(self._outbox, found, rows, self._metrics)
            self.totals.add(found, resent)
            if found.missing or found.given_up:
                log.warning(
                    "reconcile_missing",
                    checked=found.checked,
                    missing=len(found.missing) + len(found.given_up),
                    resent=resent,
                    given_up=len(found.given_up),
                )
            if found.given_up:
                log.error(
                    "reconcile_given_up",
                    count=len(found.given_up),
                    ids=found.given_up[:20],
                    reason="never seen at the platform after re-sends for reconcile.give_up_s",
                )
        self.totals.rounds += 1
        self.totals.last_round_at = time.time()
        return len(rows)

    async def _run(self) -> None:
        interval = min(self._after_s, INTERVAL_S)
        while True:
            try:
                due = await self.round()
            except ListingUnavailable as e:
                if self.totals.state != "unavailable":
                    log.warning("reconcile_unavailable", reason=str(e))
                self.totals.state, self.totals.last_error = "unavailable", str(e)
                await asyncio.sleep(UNAVAILABLE_WAIT_S)
                continue
            except OutboxUnavailable as e:
                self.totals.last_error = f"outbox: {e}"
                await asyncio.sleep(interval)
                continue
            if self.totals.state != "ok":
                log.info("reconcile_available")
            self.totals.state, self.totals.last_error = "ok", None
            if due < ROUND_EVENTS:
                await asyncio.sleep(interval)
