"""What the outbox keeps for reconciliation, on both backends: a delivered event's body stays
until a check verified it or gave up on it (its row too, past the dedupe window; on
PostgreSQL, its whole sent row's), the checks are marked in its journey, and a missing one goes
back in [upstream]'s queue, id unchanged."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import asyncpg
import pytest

from caliper_sidecar import codec
from caliper_sidecar.config import OutboxSettings, ReconcileSettings
from caliper_sidecar.delivery import reconciling
from caliper_sidecar.delivery.reads import PlatformReader
from caliper_sidecar.delivery.reconciling import ReconcileLoop
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import NewEvent, Outbox, open_outbox
from caliper_sidecar.outbox.postgres.schema import BODIES_SPAN, SCHEMA

from .conftest import eventually, make_events, new_id
from .outboxes import BACKENDS, fresh_database, open_test_outbox


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
def backend(request: pytest.FixtureRequest) -> str:
    return str(request.param)


def _open(backend: str, tmp_path: Path, request: pytest.FixtureRequest, **settings: Any) -> Any:
    url = request.getfixturevalue("database") if backend == "postgres" else None
    return open_test_outbox(backend, tmp_path, url, **settings)


async def deliver(box: Outbox, n: int) -> list[NewEvent]:
    events = [NewEvent(new_id(), b'{"n": %d}' % i) for i in range(n)]
    await box.append(events)
    while (batch := await box.claim_batch(100, 1_000_000)).events:
        await box.acknowledge(batch.claim, batch.seqs)
    return events


async def test_bodies_wait_for_their_check_only_while_reconciling(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with _open(backend, tmp_path, request, reconciling=True) as box:
        sent = await deliver(box, 5)
        rows = await box.delivered_upstream(older_than_s=0, unchecked_only=True, limit=100)
        assert [r.id for r in rows] == [e.id for e in sent]
        assert [r.body for r in rows] == [e.body for e in sent]
        assert all(r.missing_for_s is None for r in rows)
        # not yet due: delivered less than an hour ago
        assert await box.delivered_upstream(older_than_s=3600, unchecked_only=True, limit=9) == []
    # without reconciliation nothing waits for a check (SQLite empties the bodies at once;
    # PostgreSQL lets them go with their partition)
    async with _open(backend, tmp_path / "off", request) as box:
        await deliver(box, 3)
        assert await box.delivered_upstream(older_than_s=0, unchecked_only=True, limit=9) == []


async def test_a_check_marks_the_journey_and_lets_the_bodies_go(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with _open(backend, tmp_path, request, reconciling=True) as box:
        held, lost, gone = await deliver(box, 3)
        await box.storage.reconciled([held.id], [lost.id], [gone.id])
        left = await box.delivered_upstream(older_than_s=0, unchecked_only=True, limit=9)
        # held and given up: done with, never checked again
        assert not {held.id, gone.id} & {r.id for r in left}
        journeys = await box.journeys([held.id, lost.id, gone.id])
        marks = {i: [m.what for m in j.marks] for i, j in journeys.items()}
        assert marks == {held.id: ["verified"], lost.id: ["missing"], gone.id: ["given_up"]}


async def test_a_missing_event_goes_back_to_upstream_alone(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with _open(backend, tmp_path, request, reconciling=True) as box:
        held, lost = await deliver(box, 2)
        (row,) = [
            r
            for r in await box.delivered_upstream(older_than_s=0, unchecked_only=True, limit=9)
            if r.id == lost.id
        ]
        assert await box.record_reconciled([held.id], [row], []) == 1
        batch = await box.claim_batch(100, 1_000_000)
        assert [(e.id, e.body) for e in batch.events] == [(lost.id, lost.body)]
        await box.acknowledge(batch.claim, batch.seqs)
        # delivered again, it waits for a check again, which knows since when it was missing
        again = await box.delivered_upstream(older_than_s=0, unchecked_only=True, limit=9)
        assert [r.id for r in again] == [lost.id]
        assert again[0].missing_for_s is not None
        assert again[0].missing_for_s >= 0
        journey = (await box.journeys([lost.id]))[lost.id]
        assert [m.what for m in journey.marks] == ["missing", "resent"]


async def test_rows_awaiting_their_check_outlive_the_dedupe_window(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with _open(backend, tmp_path, request, reconciling=True, dedupe_window_s=0.001) as box:
        box.prune_every_s = 0
        first = await deliver(box, 4)
        await asyncio.sleep(0.05)
        await box.storage.reconciled([first[0].id], [], [first[1].id])
        await deliver(box, 1)  # an acknowledgement prunes
        await asyncio.sleep(0.05)
        await deliver(box, 1)
        left = await box.delivered_upstream(older_than_s=0, unchecked_only=True, limit=99)
        assert {e.id for e in first[2:]} <= {r.id for r in left}
        assert set(await box.journeys([e.id for e in first[2:]])) == {e.id for e in first[2:]}
        # once every one is checked, they go as delivered events do
        await box.storage.reconciled([e.id for e in first[2:]], [], [])
        await asyncio.sleep(0.05)
        await deliver(box, 1)
        await asyncio.sleep(0.05)
        await deliver(box, 1)
        assert await box.journeys([e.id for e in first]) == {}


async def test_bodies_partitions_wait_for_the_checks_on_postgres(database: str) -> None:
    """[upstream] has delivered a whole partition of bodies: while reconciliation has not
    checked it, it stays (the bodies are what is sent again); checked, it is dropped."""
    async with (
        open_test_outbox(
            "postgres", Path("/nonexistent"), database, reconciling=True, max_events=10**6
        ) as box,
        contextlib.AsyncExitStack() as stack,
    ):
        conn = await asyncpg.connect(database, server_settings={"search_path": SCHEMA})
        stack.push_async_callback(conn.close)
        sent = [NewEvent(new_id(), b"{}") for _ in range(BODIES_SPAN + 10)]
        for i in range(0, len(sent), 5000):
            await box.append(sent[i : i + 5000])
        while (batch := await box.claim_batch(2000, 10**8)).events:
            await box.acknowledge(batch.claim, batch.seqs)
        await asyncio.sleep(1.1)  # bodies.DROP_EVERY_S
        await box.claim_batch(10, 10**8)  # nothing: looks for finished partitions
        assert "bodies_0" in await partitions(conn)
        after = 0
        while rows := await box.delivered_upstream(0, True, 5000, after):
            await box.storage.reconciled([r.id for r in rows], [], [])
            after = rows[-1].seq

        async def dropped() -> bool:
            await box.claim_batch(10, 10**8)
            return "bodies_0" not in await partitions(conn)

        await eventually(dropped, timeout=10)


async def partitions(conn: asyncpg.Connection) -> set[str]:
    rows = await conn.fetch(
        "SELECT relid::regclass::text AS name FROM pg_partition_tree('bodies') WHERE isleaf"
    )
    return {r["name"].rsplit(".", 1)[-1] for r in rows}


class LostEverything:
    """A platform that holds none of what it took, whose listing answers once two rounds are
    asking at the same time (or after a second: one round alone)."""

    def __init__(self) -> None:
        self.asking = 0
        self.together = asyncio.Event()

    async def page(self, query: dict[str, str]) -> tuple[int, float | None, str]:
        self.asking += 1
        if self.asking == 2:
            self.together.set()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self.together.wait(), 1.0)
        return 200, None, codec.dumps({"events": [], "pagination": {"total": 0}}).decode()


async def test_replicas_send_a_lost_event_again_once(database: str, tmp_path: Path) -> None:
    """Every replica runs reconciliation's rounds, but one round checks at a time: an event the
    platform lost is sent again once, not once by each replica that found it missing."""
    events = [NewEvent(e["id"], codec.dumps(e)) for e in make_events(5)]
    async with (
        open_test_outbox("postgres", tmp_path, database, reconciling=True) as one,
        open_outbox(OutboxSettings(url=database), exclusive=False, reconciling=True) as other,
    ):
        await one.append(events)
        while (batch := await one.claim_batch(100, 1_000_000)).events:
            await one.acknowledge(batch.claim, batch.seqs)
        platform = LostEverything()
        rounds = [
            ReconcileLoop(
                box, cast(PlatformReader, platform), ReconcileSettings(), "urn:sensor", Metrics()
            )
            for box in (one, other)
        ]
        await asyncio.gather(*(r.round() for r in rounds))
        assert sum(r.totals.resent for r in rounds) == len(events)
        queued = await one.claim_batch(100, 1_000_000)
        assert sorted(e.id for e in queued.events) == sorted(e.id for e in events)


class FrozenFirst:
    """A platform that holds nothing; the first listing hangs until `thaw` is set (the replica
    asking froze meanwhile), every later one answers at once."""

    def __init__(self) -> None:
        self.asked = 0
        self.thaw = asyncio.Event()

    async def page(self, query: dict[str, str]) -> tuple[int, float | None, str]:
        self.asked += 1
        if self.asked == 1:
            await self.thaw.wait()
        return 200, None, codec.dumps({"events": [], "pagination": {"total": 0}}).decode()


async def test_a_replica_frozen_while_it_listed_records_nothing(
    database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Its turn ran out while it waited for the platform and another replica checked the same
    events: what the frozen one found when it thaws is not recorded, nor sent again."""
    monkeypatch.setattr(reconciling, "TURN_S", 0.3)
    events = [NewEvent(e["id"], codec.dumps(e)) for e in make_events(5)]
    async with (
        open_test_outbox("postgres", tmp_path, database, reconciling=True) as one,
        open_outbox(OutboxSettings(url=database), exclusive=False, reconciling=True) as other,
    ):
        await one.append(events)
        while (batch := await one.claim_batch(100, 1_000_000)).events:
            await one.acknowledge(batch.claim, batch.seqs)
        platform = FrozenFirst()
        frozen, awake = (
            ReconcileLoop(
                box, cast(PlatformReader, platform), ReconcileSettings(), "urn:sensor", Metrics()
            )
            for box in (one, other)
        )
        listing = asyncio.ensure_future(frozen.round())
        await eventually(lambda: platform.asked == 1)
        await asyncio.sleep(0.4)  # the frozen replica's turn runs out
        assert await awake.round() == len(events)
        platform.thaw.set()
        assert await listing == 0
        assert (frozen.totals.resent, awake.totals.resent) == (0, len(events))
        queued = await one.claim_batch(100, 1_000_000)
        assert sorted(e.id for e in queued.events) == sorted(e.id for e in events)


async def test_the_turn_to_reconcile_is_one_replica_s_until_it_stops_or_runs_out(
    database: str, tmp_path: Path
) -> None:
    """One replica's at a time, renewed by its holder; another's once the holder's ran out,
    and at once when the holder stops (a replica that died holding it delays the checks by
    reconciling.TURN_S at most)."""
    async with open_test_outbox("postgres", tmp_path, database):
        pass  # the database emptied
    settings, agreed = OutboxSettings(url=database), {"upstream.endpoint": "e"}
    async with contextlib.AsyncExitStack() as stack:
        one = await stack.enter_async_context(open_outbox(settings, agreement=agreed))
        async with open_outbox(settings, agreement=agreed) as other:
            assert await one.reconcile_turn(0.5)
            assert not await other.reconcile_turn(0.5)
            assert await one.reconcile_turn(0.5)  # renewed by its holder
            assert not await other.reconcile_turn(0.5)
            await asyncio.sleep(0.7)
            assert await other.reconcile_turn(600)  # the holder's ran out
            assert not await one.reconcile_turn(600)
        assert await one.reconcile_turn(600)  # given back as `other` stopped
