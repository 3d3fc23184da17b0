"""The dispatcher and the envelope: batching limits, linger, order, and the exact format."""

from __future__ import annotations

import json
import re
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.envelope import (
    DATA_VERSION,
    MAX_SENSOR_BYTES,
    build_envelope,
    caliper_datetime,
    envelope_overhead,
)
from caliper_sidecar.tools.fake_timeback import FakeTimeBack, RunningFake

from .conftest import eventually, make_event, make_events, settings_for

Post = Callable[[Any], Awaitable[dict[str, Any]]]


@pytest.fixture
async def run(platform: RunningFake, tmp_path: Path) -> AsyncIterator[Callable[..., Any]]:
    """Start a sidecar with changed settings; returns (sidecar, post)."""
    started: list[tuple[Sidecar, aiohttp.ClientSession]] = []

    async def make(**sections: dict[str, Any]) -> tuple[Sidecar, Post]:
        sidecar = await start(settings_for(platform, tmp_path, **sections))
        session = aiohttp.ClientSession(base_url=sidecar.url)
        started.append((sidecar, session))

        async def post(body: Any) -> dict[str, Any]:
            async with session.post("/v1/events", json=body) as resp:
                assert resp.status == 202, await resp.text()
                result: dict[str, Any] = await resp.json()
                return result

        return sidecar, post

    yield make
    for sidecar, session in started:
        await session.close()
        await sidecar.stop()


class TestEnvelope:
    def test_caliper_datetime(self) -> None:
        """sendTime is UTC with milliseconds."""
        moment = datetime(2024, 1, 15, 10, 7, 30, 123456, tzinfo=UTC)
        assert caliper_datetime(moment) == "2024-01-15T10:07:30.123Z"
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", caliper_datetime())

    def test_exact_shape_and_events_unchanged(self) -> None:
        """Exactly the four keys; data holds the stored bytes, in order, unchanged."""
        bodies = [b'{"id":"a","x":"\xc3\xa9"}', b'{"id":"b"}']
        raw = build_envelope("https://s.test", bodies, "2024-01-15T10:07:30.000Z")
        assert raw.endswith(b'"data":[' + b",".join(bodies) + b"]}")
        envelope = json.loads(raw)
        assert envelope == {
            "sensor": "https://s.test",
            "sendTime": "2024-01-15T10:07:30.000Z",
            "dataVersion": DATA_VERSION,
            "data": [{"id": "a", "x": "é"}, {"id": "b"}],
        }

    def test_overhead_is_exact_for_the_longest_sensor(self) -> None:
        """Batches are sized for an app's sensor of up to MAX_SENSOR_BYTES: exact for that
        one, and room to spare for any shorter."""
        bodies = [b"{}", b"{}"]
        longest = "s" * (MAX_SENSOR_BYTES - 2)  # serialized with its two quotes
        assert len(build_envelope(longest, bodies)) == envelope_overhead("s") + 5
        assert len(build_envelope("s", bodies)) < envelope_overhead("s") + 5
        configured = "c" * 5000  # a configured sensor longer still is sized for itself
        assert len(build_envelope(configured, bodies)) == envelope_overhead(configured) + 5

    async def test_platform_accepts_what_is_sent(
        self, run: Callable[..., Any], fake: FakeTimeBack
    ) -> None:
        """The fake platform's strict check passes, and the sensor is the configured one."""
        _, post = await run(upstream={"sensor": "https://app.test/sensor"})
        events = make_events(3)
        await post(events)
        await fake.wait_for({e["id"] for e in events})
        assert fake.last_envelope["sensor"] == "https://app.test/sensor"
        assert fake.last_envelope["dataVersion"] == DATA_VERSION
        assert fake.statuses == {200: fake.envelopes}


class TestBatching:
    async def test_batch_max_events(self, run: Callable[..., Any], fake: FakeTimeBack) -> None:
        _, post = await run(upstream={"batch_max_events": 7, "linger_ms": 300})
        events = make_events(50)
        await post(events)
        await fake.wait_for(50)
        assert fake.max_events_seen == 7
        assert fake.envelopes == 8  # 7 full envelopes and the rest

    async def test_batch_max_bytes(self, run: Callable[..., Any], fake: FakeTimeBack) -> None:
        """No envelope is larger than batch_max_bytes, serialized."""
        limit = 6000
        _, post = await run(upstream={"batch_max_bytes": limit, "linger_ms": 300})
        events = [make_event(extensions={"pad": "x" * 900}) for _ in range(20)]
        await post(events)
        await fake.wait_for(20)
        assert 0 < fake.max_envelope_bytes_seen <= limit
        assert fake.envelopes >= 20 * 1500 // limit

    async def test_linger_gathers_a_batch(
        self, run: Callable[..., Any], fake: FakeTimeBack
    ) -> None:
        """Events arriving within linger_ms of each other leave in one envelope."""
        _, post = await run(upstream={"linger_ms": 500})
        ids = set()
        for _ in range(5):
            event = make_event()
            ids.add(event["id"])
            await post(event)
        await fake.wait_for(ids)
        assert fake.envelopes == 1

    async def test_receive_order_kept(self, run: Callable[..., Any], fake: FakeTimeBack) -> None:
        """With one sender, events arrive in the order they were received."""
        _, post = await run(upstream={"concurrency": 1, "batch_max_events": 4, "linger_ms": 0})
        sent = []
        for _ in range(10):
            events = make_events(3)
            sent += [e["id"] for e in events]
            await post(events)
        await fake.wait_for(set(sent))
        assert fake.order == sent

    async def test_no_event_in_two_envelopes(
        self, run: Callable[..., Any], fake: FakeTimeBack
    ) -> None:
        """With several envelopes in flight, each event is sent once."""
        fake.faults.latency_s = 0.05
        _, post = await run(upstream={"concurrency": 4, "batch_max_events": 10, "linger_ms": 0})
        for _ in range(20):
            await post(make_events(10))
        await fake.wait_for(200)
        assert fake.duplicates == 0

    async def test_acknowledged_events_leave_the_outbox(
        self, run: Callable[..., Any], fake: FakeTimeBack
    ) -> None:
        sidecar, post = await run()
        await post(make_events(10))
        await fake.wait_for(10)

        async def drained() -> bool:
            stats = await sidecar.outbox.stats()
            return (stats.events, stats.delivered_total) == (0, 10)

        await eventually(drained)


class TestRetries:
    async def test_transient_failures_are_retried(
        self, run: Callable[..., Any], fake: FakeTimeBack
    ) -> None:
        """5xx answers keep the events; they are delivered once the platform recovers."""
        fake.fail_next(503, times=2)
        fake.fail_next(500, times=1)
        sidecar, post = await run()
        events = make_events(5)
        await post(events)
        await fake.wait_for({e["id"] for e in events}, timeout=10)
        assert fake.statuses[503] == 2
        assert fake.statuses[500] == 1
        assert (await sidecar.outbox.stats()).dead_letters == 0

    async def test_unreachable_platform_then_back(
        self, run: Callable[..., Any], fake: FakeTimeBack
    ) -> None:
        """Dropped connections are retried until the platform answers."""
        fake.outage(0.5)
        sidecar, post = await run()
        events = make_events(3)
        await post(events)
        await fake.wait_for({e["id"] for e in events}, timeout=10)
        await eventually(lambda: sidecar.dispatcher.state == "ok")


class TestAdaptiveConcurrency:
    """`concurrency` is the ceiling of a limit that follows the platform's answers
    (delivery/concurrency.py): against a real fake platform over HTTP, counted, never timed."""

    async def test_a_platform_of_limited_capacity_is_not_flooded(
        self, run: Callable[..., Any], fake: FakeTimeBack
    ) -> None:
        """The platform serves 2 envelopes at once, queues 2 more and answers 429 past that;
        the ceiling is 16. Every event is delivered once, no envelope meets a 429, and over
        the second half of the drain no more than 2 + 1 envelopes are at the platform at once
        (one waiting its turn: the probe the limit makes upward)."""
        capacity = 2
        fake.faults.capacity = fake.faults.capacity_queue = capacity
        fake.faults.latency_s = 0.05
        sidecar, post = await run(
            upstream={"concurrency": 16, "batch_max_events": 5, "linger_ms": 0}
        )
        events = make_events(500)
        for first in range(0, len(events), 100):
            await post(events[first : first + 100])
        await fake.wait_for(250)
        fake.most_at_once = 0
        await fake.wait_for({e["id"] for e in events})
        assert fake.duplicates == 0
        assert fake.statuses[429] == 0
        assert fake.most_at_once <= capacity + 1
        assert sidecar.dispatcher.concurrency.limit <= capacity + 1
        assert (await sidecar.outbox.stats()).dead_letters == 0

    async def test_the_limit_rises_to_the_ceiling_and_shows(
        self, run: Callable[..., Any], fake: FakeTimeBack
    ) -> None:
        """A platform that takes everything: from 1, the limit rises to the ceiling of 4,
        envelopes in flight follow it and never pass it; the status and the metrics show the
        limit and the ceiling."""
        fake.faults.latency_s = 0.1
        sidecar, post = await run(
            upstream={"concurrency": 4, "batch_max_events": 5, "linger_ms": 0}
        )
        assert sidecar.dispatcher.concurrency.limit == 1
        events = make_events(600)
        for first in range(0, len(events), 100):
            await post(events[first : first + 100])
        await fake.wait_for({e["id"] for e in events})
        assert fake.most_at_once == 4
        limit = sidecar.dispatcher.concurrency.limit
        async with aiohttp.ClientSession(base_url=sidecar.url) as http:
            async with http.get("/v1/status") as resp:
                status = await resp.json()
            async with http.get("/metrics") as resp:
                metrics = await resp.text()
        (upstream,) = status["destinations"]
        assert upstream["concurrency_limit"] == limit
        assert upstream["concurrency_ceiling"] == 4
        # and in the `upstream` block, which dashboards written before destinations read
        assert status["upstream"]["concurrency_limit"] == limit
        assert status["upstream"]["concurrency_ceiling"] == 4
        assert f'caliper_sidecar_concurrency_limit{{destination="upstream"}} {limit}.0' in metrics
