"""Processing confirmation: the platform's jobs followed until they complete or fail
(docs/guarantees.md)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.delivery import confirmations
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import eventually, make_event, make_events, sdk_events, settings_for

Start = Callable[[], Awaitable[Sidecar]]


@pytest.fixture
async def beyond(platform: RunningFake, tmp_path: Path) -> AsyncIterator[Start]:
    """Start sidecars forwarding to the fake as Beyond AI, following its jobs."""
    started: list[Sidecar] = []

    async def make() -> Sidecar:
        settings = settings_for(
            platform,
            tmp_path,
            upstream={"endpoint": platform.beyond_url, "jobs_url": platform.jobs_url},
        )
        sidecar = await start(settings)
        started.append(sidecar)
        return sidecar

    yield make
    for sidecar in started:
        if sidecar.runtime.accepting:
            await sidecar.stop()


async def send(sidecar: Sidecar, events: list[dict[str, Any]]) -> None:
    async with (
        aiohttp.ClientSession(base_url=sidecar.url) as client,
        client.post("/v1/events", json=events) as resp,
    ):
        assert resp.status == 202, await resp.text()


async def states(sidecar: Sidecar, events: list[dict[str, Any]]) -> dict[str, str]:
    found = await sidecar.outbox.journeys([e["id"] for e in events])
    return {i: j.state for i, j in found.items()}


class TestProcessingConfirmation:
    async def test_completed_job_confirms_its_events(self, beyond: Start, fake: Any) -> None:
        """Events the platform took into a job wait for it; `completed` confirms them, with the
        platform's own ids."""
        sidecar = await beyond()
        events = sdk_events() + make_events(3)
        await send(sidecar, events)
        await fake.wait_for({e["id"] for e in events})

        async def confirmed() -> bool:
            return set((await states(sidecar, events)).values()) == {"confirmed"}

        await eventually(confirmed)
        journeys = await sidecar.outbox.journeys([events[0]["id"]])
        assert journeys[events[0]["id"]].platform_id
        assert journeys[events[0]["id"]].platform_job in fake.jobs
        metrics = sidecar.runtime.metrics.render()[0].decode()
        assert 'caliper_sidecar_platform_jobs_total{outcome="completed"}' in metrics

    async def test_stop_while_a_job_is_followed_returns(self, beyond: Start, fake: Any) -> None:
        """Stopping a sidecar right after its events arrived, while their job is followed,
        returns: on Python 3.11 `asyncio.wait_for` on an Event swallowed the follower's
        cancellation and the stop hung for good."""
        sidecar = await beyond()
        events = sdk_events()
        await send(sidecar, events)
        await fake.wait_for({e["id"] for e in events})
        async with asyncio.timeout(20):
            await sidecar.stop()

    async def test_failed_job_dead_letters_the_event_it_names(
        self, beyond: Start, fake: Any
    ) -> None:
        """A failed job dead-letters the event it names, with the platform's reason; the
        events it processed are confirmed."""
        sidecar = await beyond()
        events = make_events(4)
        fake.faults.fail_job_ids.add(events[1]["id"])
        await send(sidecar, events)

        async def settled() -> bool:
            return set((await states(sidecar, events)).values()) == {"confirmed", "dead_lettered"}

        await eventually(settled)
        found = await states(sidecar, events)
        assert found[events[1]["id"]] == "dead_lettered"
        assert [found[e["id"]] for e in events if e is not events[1]] == ["confirmed"] * 3
        (dead,) = await sidecar.outbox.dead_letters(10)
        assert dead.id == events[1]["id"]
        assert dead.reason == "platform_failed"
        assert "extension not allowed" in dead.response
        assert dead.body  # kept, so that it can be replayed
        metrics = sidecar.runtime.metrics.render()[0].decode()
        dead_lettered = 'caliper_sidecar_events_dead_lettered_total{destination="upstream",'
        assert dead_lettered + 'reason="platform_failed"} 1.0' in metrics
        assert 'caliper_sidecar_platform_jobs_total{outcome="failed"} 1.0' in metrics

    async def test_job_that_never_finishes_is_reported(
        self, beyond: Start, fake: Any, monkeypatch: pytest.MonkeyPatch
    ) -> None:
        """A job that stays unfinished is followed for a bounded time, then reported in the
        status and the metrics; its events are `unconfirmed`, never silently dropped."""
        monkeypatch.setattr(confirmations, "GIVE_UP_AFTER_S", 1.0)
        monkeypatch.setattr(confirmations, "FIRST_POLL_S", 0.1)
        fake.faults.stuck_jobs = True
        sidecar = await beyond()
        events = make_events(2)
        await send(sidecar, events)

        async def unconfirmed() -> bool:
            return set((await states(sidecar, events)).values()) == {"unconfirmed"}

        await eventually(unconfirmed)
        async with aiohttp.ClientSession(base_url=sidecar.url) as client:
            async with client.get("/v1/status") as resp:
                status = await resp.json()
            async with client.get("/metrics") as resp:
                metrics = await resp.text()
        assert status["upstream"]["platform_jobs"] == {"following": 0, "unconfirmed": 1}
        assert 'caliper_sidecar_platform_jobs_total{outcome="unconfirmed"} 1.0' in metrics
        assert 'caliper_sidecar_platform_jobs_open{state="unconfirmed"} 1.0' in metrics
        job = next(iter(fake.jobs.values()))
        assert 2 <= job.polls < 20  # bounded polling

    async def test_open_jobs_are_followed_after_a_restart(self, beyond: Start, fake: Any) -> None:
        """Jobs still open when the sidecar stops are followed again after it starts."""
        fake.faults.stuck_jobs = True
        sidecar = await beyond()
        events = make_events(3)
        await send(sidecar, events)
        await eventually(lambda: _all(sidecar, events, "awaiting_confirmation"))
        await sidecar.stop()
        for job in fake.jobs.values():
            job.stuck = False
        again = await beyond()
        await eventually(lambda: _all(again, events, "confirmed"))

    async def test_without_jobs_url_events_are_delivered_not_followed(
        self, sidecar: Sidecar, fake: Any
    ) -> None:
        """With no jobs URL, a 2xx is the end of the story: `delivered`."""
        event = make_event()
        await send(sidecar, [event])
        await eventually(lambda: _all(sidecar, [event], "delivered"))


async def _all(sidecar: Sidecar, events: list[dict[str, Any]], state: str) -> bool:
    return set((await states(sidecar, events)).values()) == {state}
