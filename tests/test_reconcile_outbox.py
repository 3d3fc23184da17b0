"""What the outbox keeps for reconciliation, on both backends: a delivered event's body stays
until a check verified it or gave up on it (its row too, past the dedupe window), the checks
are marked in its journey, and a missing one goes back in [upstream]'s queue, id unchanged."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from caliper_sidecar.outbox import NewEvent, Outbox

from .conftest import new_id
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
    async with _open(backend, tmp_path / "off", request) as box:
        await deliver(box, 3)
        assert await box.delivered_upstream(older_than_s=0, unchecked_only=False, limit=9) == []


async def test_a_check_marks_the_journey_and_lets_the_bodies_go(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    async with _open(backend, tmp_path, request, reconciling=True) as box:
        held, lost, gone = await deliver(box, 3)
        await box.storage.reconciled([held.id], [lost.id], [gone.id])
        left = await box.delivered_upstream(older_than_s=0, unchecked_only=False, limit=9)
        # held and given up: done with, their bodies gone; missing: kept, to be sent again
        assert [r.id for r in left] == [lost.id]
        assert left[0].missing_for_s is not None
        assert left[0].missing_for_s >= 0
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
        again = await box.delivered_upstream(older_than_s=0, unchecked_only=True, limit=9)
        assert [r.id for r in again] == [lost.id]
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
        journeys = await box.journeys([e.id for e in first])
        assert set(journeys) == {e.id for e in first[2:]}
