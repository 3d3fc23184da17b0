"""Delivery guarantees (docs/guarantees.md): outcomes, backoff, Retry-After, the circuit, poison
isolation, limits, authentication failures, and a chaos run."""

from __future__ import annotations

import math
import sqlite3
import time
from collections.abc import AsyncIterator, Callable
from email.utils import formatdate
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from structlog.testing import capture_logs

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.delivery.backoff import (
    Circuit,
    backoff_delay,
    parse_retry_after,
    transient_status,
)
from caliper_sidecar.tools.fake_timeback import FakeTimeBack, RunningFake, ScriptedFault

from .conftest import eventually, make_event, make_events, settings_for

Run = Callable[..., Any]


@pytest.fixture
async def run(platform: RunningFake, tmp_path: Path) -> AsyncIterator[Run]:
    """Start a sidecar with changed settings; returns (sidecar, post)."""
    started: list[tuple[Sidecar, aiohttp.ClientSession]] = []

    async def make(**sections: dict[str, Any]) -> tuple[Sidecar, Callable[..., Any]]:
        sidecar = await start(settings_for(platform, tmp_path, **sections))
        session = aiohttp.ClientSession(base_url=sidecar.url)
        started.append((sidecar, session))

        async def post(body: Any) -> None:
            async with session.post("/v1/events", json=body) as resp:
                assert resp.status == 202, await resp.text()

        return sidecar, post

    yield make
    for sidecar, session in started:
        await session.close()
        await sidecar.stop()


def overlap(intervals: list[tuple[float, float, int]]) -> int:
    """The largest number of these requests that were open at the same instant."""
    edges = sorted([(s, 1) for s, _, _ in intervals] + [(e, -1) for _, e, _ in intervals])
    peak = current = 0
    for _, step in edges:
        current += step
        peak = max(peak, current)
    return peak


async def dead_letters(sidecar: Sidecar) -> int:
    return (await sidecar.outbox.stats()).dead_letters


class TestBackoffRules:
    @pytest.mark.parametrize("status", [408, 425, 429, 500, 502, 503, 504])
    def test_transient(self, status: int) -> None:
        assert transient_status(status)

    @pytest.mark.parametrize("status", [400, 401, 403, 404, 413, 422])
    def test_not_transient(self, status: int) -> None:
        assert not transient_status(status)

    def test_retry_after_forms(self) -> None:
        """Retry-After as delta-seconds or as an HTTP date; garbage is ignored."""
        now = 1_700_000_000.0
        assert parse_retry_after("120", now) == 120
        assert parse_retry_after(formatdate(now + 30, usegmt=True), now) == pytest.approx(30)
        assert parse_retry_after(formatdate(now - 30, usegmt=True), now) == 0
        assert parse_retry_after("soon", now) is None
        assert parse_retry_after(None, now) is None

    @pytest.mark.parametrize(
        "value", ["²", "١٢", "１２", "9" * 400, "1.5", "-1", "Mon, 01 Jan 0001"]
    )
    def test_retry_after_is_ascii_digits_or_a_date(self, value: str) -> None:
        """Digits other than ASCII ones (`"²".isdigit()` is True), numbers too large to be
        finite and everything that is not an HTTP date are ignored."""
        assert parse_retry_after(value, 1_700_000_000.0) is None

    @settings(max_examples=500, deadline=None)
    @given(
        st.one_of(
            st.text(),
            # what str.isdigit() calls digits without float() taking them all: ², ①, ١
            st.text(st.characters(categories=("Nd", "No")), min_size=1),
            st.binary().map(lambda raw: raw.decode("latin-1")),
            st.binary().map(lambda raw: raw.decode("utf-8", "surrogateescape")),
            st.from_regex(r"\A[0-9]{1,400}\Z"),
            # every HTTP date of years 1 to 9999
            st.integers(-62_135_510_400, 253_402_214_400).map(
                lambda when: formatdate(when, usegmt=True)
            ),
        )
    )
    def test_no_retry_after_raises(self, value: str) -> None:
        """Whatever a peer sends as Retry-After (any text, any bytes), it reads as None or a
        finite number of seconds, never as an exception."""
        seconds = parse_retry_after(value, 1_700_000_000.0)
        assert seconds is None or (math.isfinite(seconds) and seconds >= 0)

    def test_full_jitter_capped(self) -> None:
        """Delays are spread between 0 and the capped exponential step."""
        delays = [backoff_delay(n, 1.0, 8.0) for n in range(1, 12) for _ in range(50)]
        assert max(delays) <= 8.0
        assert min(delays) >= 0
        late = [backoff_delay(10, 1.0, 8.0) for _ in range(200)]
        assert max(late) > 4.0  # capped, not stuck small
        assert min(late) < 4.0  # jittered, not synchronized

    async def test_circuit_lets_one_probe_through(self) -> None:
        """Open: no sends; then one probe; its success closes the circuit."""
        circuit = Circuit(0.01, 0.02)
        circuit.failed()
        assert circuit.state == "open"
        assert await circuit.admit() is True  # the probe, once the delay passed
        assert circuit.state == "half_open"
        circuit.succeeded()
        assert await circuit.admit() is False
        assert circuit.state == "closed"

    def test_in_flight_failures_count_once(self) -> None:
        """Batches failing together after the circuit opened do not lengthen the delay."""
        circuit = Circuit(1, 100)
        for _ in range(4):
            circuit.failed()
        assert circuit.failures == 1
        circuit.failed(probe=True)
        assert circuit.failures == 2


class TestTransientFailures:
    async def test_retry_after_seconds_honoured(self, run: Run, fake: FakeTimeBack) -> None:
        """429 with Retry-After: 1: the next request waits at least that long."""
        fake.request_log = []
        fake.fail_next(429, retry_after="1")
        _, post = await run(retry={"initial_backoff_s": 0.01, "max_backoff_s": 5})
        event = make_event()
        await post(event)
        await fake.wait_for({event["id"]})
        (_, refused_at, status), (retried_at, _, _) = fake.request_log[:2]
        assert status == 429
        assert retried_at - refused_at >= 0.95

    async def test_retry_after_http_date_honoured(self, run: Run, fake: FakeTimeBack) -> None:
        fake.request_log = []
        fake.fail_next(503, retry_after=formatdate(time.time() + 2, usegmt=True))
        _, post = await run(retry={"initial_backoff_s": 0.01, "max_backoff_s": 5})
        event = make_event()
        await post(event)
        await fake.wait_for({event["id"]}, timeout=10)
        (_, refused_at, _), (retried_at, _, _) = fake.request_log[:2]
        assert retried_at - refused_at >= 0.9  # the date has one-second resolution

    async def test_a_retry_after_that_is_no_number_is_ignored(
        self, run: Run, fake: FakeTimeBack
    ) -> None:
        """503s with `Retry-After: ²` (a digit to Python, no number to HTTP) from the token
        endpoint and the Caliper endpoint are backed off like any 503, without a traceback, and
        the event is delivered when they end."""
        fake.faults.token_script.append(ScriptedFault(503, retry_after="²"))
        fake.fail_next(503, times=2, retry_after="²")
        _, post = await run()
        with capture_logs() as logs:
            event = make_event()
            await post(event)
            await fake.wait_for({event["id"]}, timeout=15)
        assert fake.statuses[503] == 2
        assert fake.token_requests == 2
        assert [e["event"] for e in logs if "exc_info" in e] == []

    async def test_outage_sends_one_probe_at_a_time(self, run: Run, fake: FakeTimeBack) -> None:
        """While the platform fails, one probe batch at a time; several at once after (the
        adaptive limit climbs again)."""
        fake.request_log = []
        fake.faults.latency_s = 0.05
        fake.fail_next(503, times=8)
        sidecar, post = await run(
            upstream={"concurrency": 4, "batch_max_events": 5, "linger_ms": 0},
            retry={"initial_backoff_s": 0.02, "max_backoff_s": 0.05},
        )
        events = make_events(200)
        await post(events)
        await fake.wait_for(200, timeout=20)
        log = fake.request_log
        first_failure_end = min(end for _, end, status in log if status == 503)
        probes = [r for r in log if r[0] > first_failure_end and r[2] == 503]
        assert probes, "the outage outlasted the first wave"
        assert overlap(probes) == 1
        last_failure_end = max(end for _, end, status in log if status == 503)
        recovered = [r for r in log if r[0] >= last_failure_end]
        assert overlap(recovered) > 1
        assert await dead_letters(sidecar) == 0

    async def test_nothing_transient_is_dead_lettered_by_default(
        self, run: Run, fake: FakeTimeBack
    ) -> None:
        """Without max_attempts or max_age_s, transient failures never lose an event."""
        fake.fail_next(500, times=30)
        sidecar, post = await run(retry={"initial_backoff_s": 0.001, "max_backoff_s": 0.01})
        events = make_events(3)
        await post(events)
        await fake.wait_for({e["id"] for e in events}, timeout=20)
        assert await dead_letters(sidecar) == 0


class TestPoisonIsolation:
    async def test_refused_event_alone_is_dead_lettered(self, run: Run, fake: FakeTimeBack) -> None:
        """A 422 splits the batch until the refused event is alone; its batch-mates arrive;
        it is dead-lettered with the status, the response, attempts and attempt times."""
        events = make_events(40)
        poison = events[23]["id"]
        fake.faults.refuse_ids = {poison}
        sidecar, post = await run(upstream={"batch_max_events": 40, "linger_ms": 100})
        await post(events)
        await fake.wait_for({e["id"] for e in events} - {poison})
        await eventually(lambda: dead_letters(sidecar))
        (dead,) = await sidecar.outbox.dead_letters(10)
        assert dead.id == poison
        assert (dead.reason, dead.status) == ("refused", 422)
        assert poison in dead.response
        assert dead.attempts == 1
        assert dead.first_attempt_at is not None
        assert dead.last_attempt_at is not None
        assert poison not in fake.received
        assert fake.duplicates == 0

    async def test_413_splits_without_dead_lettering(self, run: Run, fake: FakeTimeBack) -> None:
        """A platform smaller than our batches: halves are sent until they fit; none lost."""
        fake.faults.max_envelope_bytes = 6000
        sidecar, post = await run(upstream={"batch_max_events": 64, "linger_ms": 100})
        events = make_events(64)
        await post(events)
        await fake.wait_for({e["id"] for e in events})
        assert fake.statuses[413] > 0
        assert await dead_letters(sidecar) == 0

    async def test_single_event_413_is_dead_lettered(self, run: Run, fake: FakeTimeBack) -> None:
        fake.faults.max_envelope_bytes = 1500
        sidecar, post = await run()
        event = make_event(extensions={"pad": "x" * 2000})
        await post(event)
        await eventually(lambda: dead_letters(sidecar))
        (dead,) = await sidecar.outbox.dead_letters(1)
        assert dead.status == 413


class TestLimits:
    async def test_max_attempts(self, run: Run, fake: FakeTimeBack) -> None:
        """With max_attempts, an event failing that many times is dead-lettered, saying so."""
        fake.fail_next(503, times=1000)
        sidecar, post = await run(
            retry={"max_attempts": 3, "initial_backoff_s": 0.001, "max_backoff_s": 0.01}
        )
        await post(make_event())
        await eventually(lambda: dead_letters(sidecar))
        (dead,) = await sidecar.outbox.dead_letters(1)
        assert (dead.reason, dead.attempts) == ("max_attempts", 3)
        assert "503" in dead.response

    async def test_max_age(self, run: Run, fake: FakeTimeBack) -> None:
        fake.fail_next(503, times=1000)
        sidecar, post = await run(
            retry={"max_age_s": 0.3, "initial_backoff_s": 0.05, "max_backoff_s": 0.1}
        )
        await post(make_event())
        await eventually(lambda: dead_letters(sidecar))
        (dead,) = await sidecar.outbox.dead_letters(1)
        assert dead.reason == "max_age"


class TestAuthentication:
    async def test_token_endpoint_refusing_is_auth_failed(
        self, run: Run, fake: FakeTimeBack
    ) -> None:
        """Refused credentials: state auth_failed, one error log, nothing dead-lettered,
        and delivery as soon as the credentials work again."""
        real_secret = fake.client_secret
        with capture_logs() as logs:
            sidecar, post = await run(retry={"initial_backoff_s": 0.02, "max_backoff_s": 0.05})
            fake.client_secret = "rotated"  # the platform no longer knows our credentials
            events = make_events(5)
            await post(events)
            await eventually(lambda: fake.token_requests >= 5)
            async with (
                aiohttp.ClientSession() as http,
                http.get(f"{sidecar.url}/v1/status") as resp,
            ):
                status = await resp.json()
            assert status["upstream"]["state"] == "auth_failed"
            assert "invalid_client" in status["upstream"]["last_error"]
            assert await dead_letters(sidecar) == 0
            assert (await sidecar.outbox.stats()).events == 5
            fake.client_secret = real_secret
            await fake.wait_for({e["id"] for e in events})
            await eventually(lambda: sidecar.dispatcher.state == "ok")
        changes = [entry["event"] for entry in logs if entry["event"].startswith("upstream_")]
        assert changes == ["upstream_auth_failed", "upstream_recovered"]

    async def test_persistent_403_is_auth_failed(self, run: Run, fake: FakeTimeBack) -> None:
        fake.fail_next(403, times=5)
        sidecar, post = await run(retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.02})
        event = make_event()
        await post(event)
        await eventually(lambda: sidecar.dispatcher.state == "auth_failed")
        await fake.wait_for({event["id"]})
        assert await dead_letters(sidecar) == 0

    async def test_persistent_401_after_refresh_is_auth_failed(
        self, run: Run, fake: FakeTimeBack
    ) -> None:
        """401, a new token, 401 again: auth_failed, not dead-lettered, retried later."""
        # Refused until the test has seen auth_failed: a retry may come within milliseconds
        # (the backoff is jittered from 0), quicker than the state can be polled.
        fake.fail_next(401, times=1000)
        sidecar, post = await run(retry={"initial_backoff_s": 0.01, "max_backoff_s": 0.02})
        event = make_event()
        await post(event)
        await eventually(lambda: sidecar.dispatcher.state == "auth_failed")
        fake.faults.script.clear()
        await fake.wait_for({event["id"]})
        assert fake.token_requests >= 3
        assert await dead_letters(sidecar) == 0


class TestChaos:
    async def test_thousands_of_events_through_random_faults(
        self, run: Run, fake: FakeTimeBack
    ) -> None:
        """Random 500/502/503/429, slow answers past the timeout, dropped connections and a
        short full outage: every event delivered, none dead-lettered, requests bounded."""
        fake.faults.chaos_rate = 0.3
        fake.faults.chaos_slow_s = 1.5
        sidecar, post = await run(
            upstream={"timeout_s": 0.5, "batch_max_events": 50, "linger_ms": 10},
            retry={"initial_backoff_s": 0.02, "max_backoff_s": 0.2},
        )
        sent: set[str] = set()
        for round_ in range(40):
            events = make_events(50)
            sent |= {e["id"] for e in events}
            await post(events)
            if round_ == 20:
                fake.outage(0.5)
        await fake.wait_for(sent, timeout=90)
        assert await dead_letters(sidecar) == 0
        requests = sum(fake.statuses.values())
        # At most a few attempts per envelope: no retry storm.
        assert requests < 4 * len(sent) / 50 + 100, fake.statuses


class TestUnexpectedErrors:
    async def test_a_failing_claim_does_not_stop_delivery(
        self, run: Run, fake: FakeTimeBack
    ) -> None:
        """If reading the next batch fails (a transient storage error), the dispatcher logs
        it, waits, and goes on: it never stops delivering while the process lives."""
        sidecar, post = await run()
        outbox = sidecar.outbox
        real_claim = outbox.claim_batch
        failures = 0

        async def flaky_claim(max_events: int, max_bytes: int, linger_s: float = 0) -> Any:
            nonlocal failures
            if failures < 2:
                failures += 1
                raise sqlite3.OperationalError("disk I/O error")
            return await real_claim(max_events, max_bytes, linger_s)

        outbox.claim_batch = flaky_claim
        with capture_logs() as logs:
            event = make_event()
            await post(event)
            await fake.wait_for({event["id"]}, timeout=15)
        assert failures == 2
        assert [e["event"] for e in logs].count("claim_failed") == 2
