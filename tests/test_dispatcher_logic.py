"""The dispatcher's decisions, against a scripted platform (the `Sender` seam) and a real SQLite
outbox: a refused batch is split until the refused event is alone, only that one is
dead-lettered; a transient failure is retried and loses nothing. No HTTP, no clock: each test
waits for the outcome it expects."""

from __future__ import annotations

import asyncio
import dataclasses
import json
from collections.abc import AsyncIterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from structlog.testing import capture_logs

from caliper_sidecar.config import (
    DestinationSettings,
    OutboxSettings,
    RetrySettings,
    Settings,
    UpstreamSettings,
)
from caliper_sidecar.delivery.dispatcher import Dispatcher, back_pressure
from caliper_sidecar.delivery.upstream import Sent
from caliper_sidecar.exceptions import (
    ArchiveUnavailable,
    AuthFailed,
    EndpointFailed,
    Refused,
    RetryLater,
    UnexpectedAnswer,
)
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.outbox import NewEvent, Outbox, sqlite_outbox

from .conftest import new_id


class ScriptedPlatform:
    """Refuses (422) any envelope holding an event whose id it was told to refuse, fails the
    first `outages` envelopes as unreachable, and takes everything else."""

    overhead = 200

    def __init__(
        self, refuse: set[str], outages: int = 0, bugs: int = 0, latency_s: float = 0
    ) -> None:
        self.refuse = refuse
        self.latency_s = latency_s
        self.outages = outages
        #: envelopes that meet an error of ours rather than the platform's answer
        self.bugs = bugs
        self.envelopes: list[list[str]] = []
        self.accepted: list[str] = []

    async def send(
        self,
        bodies: Sequence[bytes],
        sensor: str | None = None,
        received_at: Sequence[float] = (),
    ) -> Sent:
        ids = [json.loads(body)["id"] for body in bodies]
        self.envelopes.append(ids)
        if self.latency_s:
            await asyncio.sleep(self.latency_s)
        if self.outages:
            self.outages -= 1
            raise RetryLater("the platform is down (scripted)")
        if self.bugs:
            self.bugs -= 1
            raise ValueError("something unforeseen")
        if self.refuse & set(ids):
            raise Refused(422, '{"status": "error", "message": "scripted refusal"}')
        self.accepted += ids
        return Sent(200)

    async def job_status(self, job_id: str) -> dict[str, Any]:
        raise AssertionError("no jobs are followed here")


@pytest.fixture
async def outbox(tmp_path: Path) -> AsyncIterator[Outbox]:
    async with sqlite_outbox(
        OutboxSettings(path=str(tmp_path / "o.db"), synchronous="normal")
    ) as box:
        yield box


def upstream_dispatcher(
    outbox: Outbox, platform: ScriptedPlatform, settings: Settings
) -> Dispatcher:
    return Dispatcher(
        outbox,
        platform,
        name="upstream",
        batching=settings.upstream,
        retry=settings.retry,
        metrics=Metrics(),
    )


async def deliver(outbox: Outbox, platform: ScriptedPlatform, ids: list[str]) -> None:
    """Store these events, run a dispatcher until none is waiting, stop it."""
    settings = Settings(
        upstream=UpstreamSettings(batch_max_events=16, linger_ms=0, concurrency=1),
        retry=RetrySettings(initial_backoff_s=0.01, max_backoff_s=0.02),
    )
    await outbox.append([NewEvent(i, json.dumps({"id": i}).encode()) for i in ids])
    dispatcher = upstream_dispatcher(outbox, platform, settings)
    dispatcher.start()
    try:
        await dispatcher.drained(timeout=30)
    finally:
        await dispatcher.stop(grace_s=1)


async def test_a_refused_batch_is_split_until_the_refused_event_is_alone(
    outbox: Outbox,
) -> None:
    ids = [new_id() for _ in range(16)]
    bad = ids[11]
    platform = ScriptedPlatform(refuse={bad})
    await deliver(outbox, platform, ids)
    assert sorted(platform.accepted) == sorted(set(ids) - {bad})
    assert [d.id for d in await outbox.dead_letters(10)] == [bad]
    # halves of 16, 8, 4, 2 down to the event alone: the refused event was sent 5 times
    assert sum(bad in envelope for envelope in platform.envelopes) == 5
    assert [len(e) for e in platform.envelopes if bad in e] == [16, 8, 4, 2, 1]


async def test_a_transient_failure_is_retried_and_loses_nothing(outbox: Outbox) -> None:
    ids = [new_id() for _ in range(40)]
    platform = ScriptedPlatform(refuse=set(), outages=3)
    await deliver(outbox, platform, ids)
    assert sorted(platform.accepted) == sorted(ids)
    assert await outbox.dead_letters(10) == []
    journeys = await outbox.journeys(ids[:1])
    assert dataclasses.asdict(journeys[ids[0]])["state"] == "delivered"


async def test_a_failure_of_ours_backs_off_and_delivers(outbox: Outbox) -> None:
    """An error that is not the platform's answer (a bug, an odd exception) is treated as
    transient: logged, backed off, retried; the events are delivered, none dead-lettered."""
    ids = [new_id() for _ in range(5)]
    platform = ScriptedPlatform(refuse=set(), bugs=3)
    with capture_logs() as logs:
        await deliver(outbox, platform, ids)
    assert sorted(platform.accepted) == sorted(ids)
    assert [e["event"] for e in logs].count("send_failed_unexpectedly") == 3
    assert await outbox.dead_letters(10) == []


async def test_drained_waits_while_events_wait(outbox: Outbox) -> None:
    """`drained` returns only once nothing waits: with the platform down it times out, and
    the events are still in the outbox."""
    settings = Settings(
        upstream=UpstreamSettings(linger_ms=0, concurrency=1),
        retry=RetrySettings(initial_backoff_s=0.01, max_backoff_s=0.02),
    )
    await outbox.append([NewEvent(i, json.dumps({"id": i}).encode()) for i in ("a", "b")])
    dispatcher = upstream_dispatcher(outbox, ScriptedPlatform(set(), outages=10**9), settings)
    dispatcher.start()
    try:
        with pytest.raises(TimeoutError):
            await dispatcher.drained(timeout=0.5)
        assert (await outbox.stats()).events == 2
    finally:
        await dispatcher.stop(grace_s=1)


async def test_a_destination_batches_by_its_keys_and_counts_under_its_name(
    outbox: Outbox,
) -> None:
    """A dispatcher for one of [[destinations]] batches by that destination's keys, logs and
    counts under its name; the upstream's series stay untouched."""
    ids = [new_id() for _ in range(10)]
    await outbox.append([NewEvent(i, json.dumps({"id": i}).encode()) for i in ids])
    platform = ScriptedPlatform(refuse={ids[3]})
    metrics = Metrics()
    dispatcher = Dispatcher(
        outbox,
        platform,
        name="district-lrs",
        batching=DestinationSettings(
            name="district-lrs", kind="caliper", batch_max_events=5, linger_ms=0, concurrency=1
        ),
        retry=RetrySettings(initial_backoff_s=0.01, max_backoff_s=0.02),
        metrics=metrics,
    )
    with capture_logs() as logs:
        dispatcher.start()
        try:
            await dispatcher.drained(timeout=30)
        finally:
            await dispatcher.stop(grace_s=1)
    assert max(len(e) for e in platform.envelopes) == 5
    value = metrics.registry.get_sample_value
    delivered = "caliper_sidecar_events_delivered_total"
    assert value(delivered, {"destination": "district-lrs"}) == 9
    assert value(delivered, {"destination": "upstream"}) == 0
    refused = {"destination": "district-lrs", "reason": "refused"}
    assert value("caliper_sidecar_events_dead_lettered_total", refused) == 1
    lines = [e for e in logs if e["event"] in ("batch_delivered", "event_dead_lettered")]
    assert lines
    assert {e["destination"] for e in lines} == {"district-lrs"}


@pytest.mark.parametrize(
    ("outcome", "pushed_back"),
    [
        (RetryLater("Caliper endpoint answered HTTP 429", 1.0), True),
        (RetryLater("Caliper endpoint answered HTTP 503"), True),
        (RetryLater("Caliper endpoint timed out"), True),
        (RetryLater("Caliper endpoint unreachable: ClientConnectorError: refused"), True),
        (EndpointFailed("Caliper endpoint answered HTTP 404"), False),
        (UnexpectedAnswer("HTTP 200 that is not the platform's answer"), False),
        (ArchiveUnavailable("disk full", Path("/srv/archive")), False),
        (AuthFailed("Caliper endpoint answered HTTP 401"), False),
    ],
)
def test_what_is_back_pressure(outcome: RetryLater | AuthFailed, pushed_back: bool) -> None:
    """The transient answers, timeouts and failed connections say "too much" and lower the
    adaptive concurrency; a missing endpoint, something else answering, an archive's disk and
    refused credentials do not (fewer requests would not help them)."""
    assert back_pressure(outcome) is pushed_back


async def test_the_dispatcher_lowers_its_limit_on_back_pressure(outbox: Outbox) -> None:
    """Through the dispatcher: a platform that takes everything, then answers "try later" to
    every envelope for a while: the limit, risen first, is lowered; everything is delivered."""
    ids = [new_id() for _ in range(400)]
    await outbox.append([NewEvent(i, json.dumps({"id": i}).encode()) for i in ids])
    # a round trip long enough that the loop's jitter is small beside it
    platform = ScriptedPlatform(refuse=set(), latency_s=0.05)
    dispatcher = Dispatcher(
        outbox,
        platform,
        name="upstream",
        batching=UpstreamSettings(batch_max_events=1, linger_ms=0, concurrency=8),
        retry=RetrySettings(initial_backoff_s=0.001, max_backoff_s=0.002),
        metrics=Metrics(),
    )
    dispatcher.start()
    try:
        async with asyncio.timeout(30):
            while dispatcher.concurrency.limit < 3:
                await asyncio.sleep(0.01)
            risen = dispatcher.concurrency.limit
            platform.outages = 10**9
            while dispatcher.concurrency.limit >= risen:
                await asyncio.sleep(0.01)
        platform.outages = 0
        await dispatcher.drained(timeout=30)
    finally:
        await dispatcher.stop(grace_s=1)
    assert sorted(set(platform.accepted)) == sorted(ids)
