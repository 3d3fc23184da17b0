"""A wall-clock step (NTP, a laptop waking up) never stops delivery, and never ages an event:
`retry.max_age_s` counts time the sidecar observed, and PostgreSQL stores its own clock's
times (docs/guarantees.md)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from caliper_sidecar.app import Sidecar
from caliper_sidecar.outbox import NewEvent, PlatformJobOutcome

from .conftest import StartSidecar, eventually, make_event, make_events
from .outboxes import BACKENDS, empty, fresh_database, open_test_outbox

TWO_DAYS: float = 2 * 86_400


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
async def outbox(request: pytest.FixtureRequest) -> dict[str, Any]:
    """The [outbox] settings of a sidecar on this backend (PostgreSQL: the module's database,
    emptied; asked for only here, so that the SQLite tests run without a server)."""
    if request.param == "sqlite":
        return {}
    url: str = request.getfixturevalue("database")
    await empty(url)
    return {"url": url}


def step_the_clock(monkeypatch: pytest.MonkeyPatch, by_s: float) -> None:
    real = time.time
    monkeypatch.setattr(time, "time", lambda: real() + by_s)


async def events_waiting(
    custom: StartSidecar, fake: Any, outbox: dict[str, Any], **retry: float
) -> tuple[Sidecar, aiohttp.ClientSession]:
    """A sidecar on this outbox with these retry settings, 5 events acknowledged, and a
    platform that fails every envelope (503) from now on."""
    fake.fail_next(503, times=1_000_000)
    sidecar, client = await custom(outbox=outbox, retry=retry)
    async with client.post("/v1/events", json=make_events(5)) as resp:
        assert resp.status == 202
    return sidecar, client


class TestClockSteps:
    """#3: a wall-clock step (NTP, a laptop waking up) never stops delivery."""

    async def test_backward_step_does_not_stop_delivery(
        self, custom: StartSidecar, fake: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """Events stored, then the clock steps back an hour: they are still delivered (the
        linger wait used to compare the stepped clock with the stored receive time)."""
        _, client = await custom(upstream={"linger_ms": 200})
        fake.outage(0.5)
        events = [make_event() for _ in range(5)]
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 202
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() - 3600)
        await fake.wait_for({e["id"] for e in events}, timeout=10)

    async def test_forward_step_does_not_resend_or_drop(
        self, custom: StartSidecar, fake: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        _, client = await custom()
        real = time.time
        monkeypatch.setattr(time, "time", lambda: real() + 86_400 * 3)
        events = [make_event() for _ in range(5)]
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 202
        await fake.wait_for({e["id"] for e in events}, timeout=10)
        assert fake.duplicates == 0


class TestMaxAge:
    """retry.max_age_s counts time the sidecar observed, whatever the wall clock says."""

    async def test_a_wall_clock_step_never_ages_an_event(
        self,
        custom: StartSidecar,
        fake: Any,
        monkeypatch: pytest.MonkeyPatch,
        outbox: dict[str, Any],
    ) -> None:
        """Events wait while the platform fails, and the wall clock steps two days forward:
        with `max_age_s` an hour, they are tried again and again, never dead-lettered."""
        sidecar, _ = await events_waiting(custom, fake, outbox, max_age_s=3600)
        await eventually(lambda: fake.requests_arrived > 0)
        step_the_clock(monkeypatch, TWO_DAYS)
        tried = fake.requests_arrived

        async def tried_again_or_dead() -> bool:
            dead = (await sidecar.outbox.stats()).dead_letters
            return dead > 0 or fake.requests_arrived >= tried + 3

        await eventually(tried_again_or_dead, timeout=20)
        assert (await sidecar.outbox.stats()).dead_letters == 0

    async def test_a_wall_clock_step_back_never_keeps_an_event_past_its_max_age(
        self,
        custom: StartSidecar,
        fake: Any,
        monkeypatch: pytest.MonkeyPatch,
        outbox: dict[str, Any],
    ) -> None:
        """Events wait while the platform fails, and the wall clock steps two days back: they
        are dead-lettered as `max_age` once that much time has passed all the same."""
        sidecar, _ = await events_waiting(custom, fake, outbox, max_age_s=0.5)
        step_the_clock(monkeypatch, -TWO_DAYS)

        async def all_dead() -> bool:
            return (await sidecar.outbox.stats()).dead_letters == 5

        await eventually(all_dead, timeout=20)
        assert {d.reason for d in await sidecar.outbox.dead_letters(10)} == {"max_age"}


class TestOldestAge:
    async def test_a_wall_clock_step_never_ages_what_waits(
        self,
        custom: StartSidecar,
        fake: Any,
        monkeypatch: pytest.MonkeyPatch,
        outbox: dict[str, Any],
    ) -> None:
        """Events wait while the platform fails, and the wall clock steps two days forward:
        `/v1/status` and `caliper_sidecar_outbox_oldest_age_seconds` still say seconds, not
        two days (an alert on the oldest age would page someone for nothing)."""
        _, client = await events_waiting(custom, fake, outbox)
        step_the_clock(monkeypatch, TWO_DAYS)
        async with client.get("/v1/status") as resp:
            age = (await resp.json())["outbox"]["oldest_age_s"]
        assert 0 <= age < 3600
        async with client.get("/metrics") as resp:
            text = await resp.text()
        (line,) = [
            x
            for x in text.splitlines()
            if x.startswith("caliper_sidecar_outbox_oldest_age_seconds ")
        ]
        assert 0 <= float(line.split()[-1]) < 3600


class TestDatabaseClock:
    async def test_every_time_postgresql_stores_is_the_database_s(
        self, database: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """With this process's clock two days ahead, every time a PostgreSQL outbox stores
        (received, tried, delivered, confirmed, dead-lettered), and an event's age at a claim,
        is on the database's clock."""
        admin = await asyncpg.connect(database)

        async def database_now() -> float:
            now: float = await admin.fetchval("SELECT extract(epoch from clock_timestamp())")
            return now

        try:
            async with open_test_outbox("postgres", tmp_path, database) as box:
                step_the_clock(monkeypatch, TWO_DAYS)
                before = await database_now()
                ids = [f"urn:uuid:{uuid.uuid4()}" for _ in range(3)]
                await box.append([NewEvent(i, b"{}") for i in ids])
                first = await box.claim_batch(10, 100_000)
                await box.record_failure(first.claim, first.seqs, "HTTP 503")
                again = await box.claim_batch(10, 100_000)
                claimed_at = await database_now()
                assert all(0 <= e.age_s <= claimed_at - before for e in again.events)
                dead, confirmed, delivered = again.events
                await box.dead_letter(again.claim, [dead.seq], "refused", 400, "no")
                await box.acknowledge(again.claim, [confirmed.seq], "job-1")
                await box.acknowledge(again.claim, [delivered.seq])
                await box.finish_platform_job("job-1", PlatformJobOutcome(False))
                after = await database_now()
                (letter,) = await box.dead_letters(10)
                journeys = await box.journeys(ids)
        finally:
            await admin.close()
        stored = [
            letter.received_at,
            letter.first_attempt_at,
            letter.last_attempt_at,
            letter.dead_lettered_at,
        ]
        for journey in (journeys[confirmed.id], journeys[delivered.id]):
            stored += [
                journey.received_at,
                journey.first_attempt_at,
                journey.last_attempt_at,
                journey.delivered_at,
            ]
        stored.append(journeys[confirmed.id].confirmed_at)
        assert all(t is not None and before <= t <= after for t in stored), stored
