"""Platform answers read as meant (docs/guarantees.md, Outcomes and Processing confirmation): a 2xx
that is a refusal, a 404 that is an outage, a refusal every event gets, a 2xx without a job, a job
store that lags; and what the journey, the status, the metrics and the logs then say."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from structlog.testing import capture_logs

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.delivery.refusals import REFUSING_AFTER
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import eventually, make_event, make_events, settings_for

Start = Callable[..., Any]


@pytest.fixture
async def run(platform: RunningFake, tmp_path: Path) -> AsyncIterator[Start]:
    """Start a sidecar with changed settings; returns it and a client for it."""
    started: list[tuple[Sidecar, aiohttp.ClientSession]] = []

    async def make(**sections: dict[str, Any]) -> tuple[Sidecar, aiohttp.ClientSession]:
        sidecar = await start(settings_for(platform, tmp_path, **sections))
        session = aiohttp.ClientSession(base_url=sidecar.url)
        started.append((sidecar, session))
        return sidecar, session

    yield make
    for sidecar, session in started:
        await session.close()
        await sidecar.stop()


async def post(client: aiohttp.ClientSession, body: Any, path: str = "/v1/events") -> Any:
    async with client.post(path, json=body) as resp:
        assert resp.status in (200, 202), await resp.text()
        return await resp.json()


async def get(client: aiohttp.ClientSession, path: str) -> Any:
    async with client.get(path) as resp:
        assert resp.status == 200, await resp.text()
        return await resp.json()


async def metric(client: aiohttp.ClientSession, line_start: str) -> float:
    async with client.get("/metrics") as resp:
        text = await resp.text()
    values = [float(line.split()[-1]) for line in text.splitlines() if line.startswith(line_start)]
    assert values, f"no {line_start} in /metrics"
    return values[0]


class TestATwoHundredIsNotAlwaysAnAcceptance:
    async def test_status_error_in_a_2xx_is_a_refusal(
        self, run: Start, platform: RunningFake
    ) -> None:
        """`200 {"status": "error"}` (TimeBack's refusal) dead-letters the event with that
        answer; it is never marked delivered and its body is kept."""
        sidecar, client = await run()
        event = make_event()
        platform.fake.fail_next(200, body={"status": "error", "message": "unknown edApp"})
        await post(client, event)
        await eventually(lambda: _dead(sidecar, 1))
        (dead,) = await sidecar.outbox.dead_letters(10)
        assert (dead.id, dead.status, dead.reason) == (event["id"], 200, "refused")
        assert "unknown edApp" in dead.response
        assert dead.body
        assert b"unknown edApp" not in dead.body
        journey = await get(client, f"/v1/events/{event['id']}")
        assert journey["state"] == "dead_lettered"
        assert (await sidecar.outbox.stats()).delivered_total == 0

    async def test_status_success_and_plain_2xx_are_deliveries(
        self, run: Start, platform: RunningFake
    ) -> None:
        """A 2xx whose `status` is `success`, or that has no status at all (an IMS endpoint's
        empty 200), is a delivery."""
        sidecar, client = await run()
        platform.fake.fail_next(200, body={"status": "success"})
        platform.fake.fail_next(204, body={})
        first, second = make_event(), make_event()
        await post(client, first)
        await eventually(lambda: _delivered(sidecar, 1))
        await post(client, second)
        await eventually(lambda: _delivered(sidecar, 2))
        assert (await sidecar.outbox.stats()).dead_letters == 0


class TestOnlyThePlatformsAnswerIsDelivery:
    @pytest.mark.parametrize("platform_name", ["caliper", "learnwith-ai", "beyond-ai"])
    async def test_a_web_filter_page_is_not_delivery(
        self, run: Start, platform: RunningFake, platform_name: str
    ) -> None:
        """A `200 text/html` page answering for the platform (a school's web filter, a captive
        portal) is `unexpected_answer` (status, metric, a log line with the start of the page):
        nothing is marked delivered or dead-lettered, and every event goes once the platform
        answers again."""
        fake = platform.fake
        endpoint = {
            "caliper": platform.events_url,
            "learnwith-ai": platform.learnwith_url,
            "beyond-ai": platform.beyond_url,
        }[platform_name]
        fake.faults.web_filter = True
        sidecar, client = await run(
            upstream={"endpoint": endpoint, "platform": platform_name},
            retry={"max_attempts": 2, "max_age_s": 0.01},
        )
        events = make_events(30)
        with capture_logs() as logs:
            await post(client, events)
            await eventually(lambda: sidecar.dispatcher.state == "unexpected_answer")
            await eventually(lambda: fake.statuses[200] >= 3)
            status_doc = await get(client, "/v1/status")
            assert status_doc["upstream"]["state"] == "unexpected_answer"
            assert "<!DOCTYPE html>" in status_doc["upstream"]["last_error"]
            assert (
                await metric(
                    client,
                    'caliper_sidecar_upstream_state{destination="upstream",state="unexpected_answer"}',
                )
                == 1
            )
            stats = await sidecar.outbox.stats()
            assert (stats.delivered_total, stats.dead_letters, stats.events) == (0, 0, 30)
            fake.faults.web_filter = False
            await fake.wait_for({e["id"] for e in events})
            await eventually(lambda: _delivered(sidecar, 30))
        assert (await sidecar.outbox.stats()).dead_letters == 0
        failing = [e for e in logs if e["event"] == "upstream_unexpected_answer"]
        assert failing
        assert failing[0]["log_level"] == "error"
        assert "blocked by your school" in failing[0]["error"]

    @pytest.mark.parametrize("platform_name", ["learnwith-ai", "beyond-ai"])
    @pytest.mark.parametrize("answer", ["", "[]", '{"ok": true}', "null"])
    async def test_timeback_platforms_answer_a_json_object_with_success(
        self, run: Start, platform: RunningFake, platform_name: str, answer: str
    ) -> None:
        """Toward TimeBack's platforms a 2xx is delivery only as a JSON object that says
        `success` (or, as Beyond AI's answer, names its job): an empty body or other JSON is
        `unexpected_answer`, and the event stays queued."""
        beyond = platform_name == "beyond-ai"
        endpoint = platform.beyond_url if beyond else platform.learnwith_url
        platform.fake.fail_next(200, text=answer, content_type="application/json", times=1000)
        sidecar, client = await run(upstream={"endpoint": endpoint, "platform": platform_name})
        await post(client, make_event())
        await eventually(lambda: sidecar.dispatcher.state == "unexpected_answer")
        stats = await sidecar.outbox.stats()
        assert (stats.delivered_total, stats.dead_letters, stats.events) == (0, 0, 1)

    @pytest.mark.parametrize("answer", ["", "  ", '{"ok": true}', "[]"])
    async def test_a_caliper_endpoint_answers_empty_or_json(
        self, run: Start, platform: RunningFake, answer: str
    ) -> None:
        """Toward any Caliper endpoint, a 2xx with an empty body or JSON is delivery (IMS
        recommends an empty 200)."""
        platform.fake.fail_next(200, text=answer, content_type="application/json")
        sidecar, client = await run()
        await post(client, make_event())
        await eventually(lambda: _delivered(sidecar, 1))
        assert (await sidecar.outbox.stats()).dead_letters == 0

    @pytest.mark.parametrize("status", [207, 200])
    async def test_a_partial_refusal_is_a_refusal_of_the_batch(
        self, run: Start, platform: RunningFake, status: int
    ) -> None:
        """A `207`, or a 2xx whose JSON lists `errors`, refuses the batch: it is split, the
        events the platform takes are delivered, the ones it refuses are dead-lettered alone."""
        fake = platform.fake
        events = make_events(20)
        bad = {events[3]["id"], events[11]["id"]}
        fake.faults.refuse_ids = set(bad)
        fake.faults.refusal_status = status
        sidecar, client = await run()
        await post(client, events)
        await eventually(lambda: _dead(sidecar, 2))
        await eventually(lambda: _delivered(sidecar, 18))
        dead = await sidecar.outbox.dead_letters(10)
        assert {d.id for d in dead} == bad
        assert {d.status for d in dead} == {status}
        assert set(fake.received) == {e["id"] for e in events} - bad

    async def test_a_409_for_one_event_is_delivery(self, run: Start, platform: RunningFake) -> None:
        """A `409` for a single event (the platform already holds that id) is delivery; for a
        batch it is split until each event is alone."""
        platform.fake.fail_next(409, body={"error": "duplicate event id"}, times=7)
        sidecar, client = await run()
        await post(client, make_events(4))
        await eventually(lambda: _delivered(sidecar, 4))
        assert (await sidecar.outbox.stats()).dead_letters == 0


class TestAFailingEndpointIsNotBadEvents:
    @pytest.mark.parametrize("status", [404, 405, 410])
    async def test_endpoint_failures_back_off_and_lose_nothing(
        self, run: Start, platform: RunningFake, status: int
    ) -> None:
        """A 404, 405 or 410 for every envelope is `endpoint_failed` (status, metric, log): the
        events stay queued, none is dead-lettered, and all go once the endpoint answers."""
        fake = platform.fake
        fake.faults.refuse_all = (status, {"error": "Not Found"})
        sidecar, client = await run()
        events = make_events(30)
        with capture_logs() as logs:
            await post(client, events)
            await eventually(lambda: sidecar.dispatcher.state == "endpoint_failed")
            status_doc = await get(client, "/v1/status")
            assert status_doc["upstream"]["state"] == "endpoint_failed"
            assert f"HTTP {status}" in status_doc["upstream"]["last_error"]
            assert (
                await metric(
                    client,
                    'caliper_sidecar_upstream_state{destination="upstream",state="endpoint_failed"}',
                )
                == 1
            )
            fake.faults.refuse_all = None
            await fake.wait_for({e["id"] for e in events})
        assert (await sidecar.outbox.stats()).dead_letters == 0
        assert "upstream_endpoint_failed" in [e["event"] for e in logs]
        await eventually(lambda: sidecar.dispatcher.state == "ok")

    async def test_endpoint_failure_never_expires_events(
        self, run: Start, platform: RunningFake
    ) -> None:
        """`max_attempts` counts the events' failures, not the endpoint's: a mistyped endpoint
        costs no event its place."""
        platform.fake.faults.refuse_all = (404, {"error": "Not Found"})
        sidecar, client = await run(retry={"max_attempts": 2})
        await post(client, make_events(3))
        await eventually(lambda: platform.fake.statuses[404] >= 4)
        assert (await sidecar.outbox.stats()).dead_letters == 0


class TestARefusalEveryEventGets:
    async def test_identical_refusals_stop_delivery_as_refusing(
        self, run: Start, platform: RunningFake
    ) -> None:
        """When the first REFUSING_AFTER single events split out of a batch are refused with the
        same status and answer, delivery stops as `refusing`: nothing is dead-lettered, and
        every event goes once the platform takes them again."""
        fake = platform.fake
        fake.faults.refuse_all = (422, {"status": "error", "message": "unknown edApp"})
        sidecar, client = await run()
        events = make_events(40)
        with capture_logs() as logs:
            await post(client, events)
            await eventually(lambda: sidecar.dispatcher.state == "refusing")
            assert (await get(client, "/v1/status"))["upstream"]["state"] == "refusing"
            assert (
                await metric(
                    client,
                    'caliper_sidecar_upstream_state{destination="upstream",state="refusing"}',
                )
                == 1
            )
            stats = await sidecar.outbox.stats()
            assert (stats.dead_letters, stats.events) == (0, 40)
            fake.faults.refuse_all = None
            await fake.wait_for({e["id"] for e in events})
        assert (await sidecar.outbox.stats()).dead_letters == 0
        assert "upstream_refusing" in [e["event"] for e in logs]

    async def test_refusals_that_differ_are_the_events_own(
        self, run: Start, platform: RunningFake
    ) -> None:
        """Refusals naming different events are the events' own: those are dead-lettered and
        their batch-mates delivered, however many there are."""
        fake = platform.fake
        events = make_events(40)
        bad = {e["id"] for e in events[::4]}  # 10 bad events, each refused by name
        fake.faults.refuse_ids = set(bad)
        sidecar, client = await run()
        await post(client, events)
        await fake.wait_for({e["id"] for e in events} - bad)
        await eventually(lambda: _dead(sidecar, len(bad)))
        assert {d.id for d in await sidecar.outbox.dead_letters(100)} == bad
        assert sidecar.dispatcher.state == "ok"

    async def test_a_few_refused_alike_are_still_dead_lettered(
        self, run: Start, platform: RunningFake
    ) -> None:
        """Fewer than REFUSING_AFTER events refused alike, and nothing else to tell them apart
        by: the platform's word is taken, as before."""
        platform.fake.faults.refuse_all = (400, {"error": "bad event"})
        sidecar, client = await run()
        await post(client, make_events(3))
        await eventually(lambda: _dead(sidecar, 3))
        assert REFUSING_AFTER > 3

    async def test_the_same_refusal_past_the_grace_is_dead_lettered(
        self, run: Start, platform: RunningFake
    ) -> None:
        """Once the same refusal has lasted `retry.refusing_grace_s`, the events it refuses are
        dead-lettered with it: a truly bad backlog never stalls delivery for good."""
        platform.fake.faults.refuse_all = (422, {"status": "error", "message": "bad"})
        sidecar, client = await run(retry={"refusing_grace_s": 0.3})
        await post(client, make_events(20))
        await eventually(lambda: _dead(sidecar, 20))
        (first, *_) = await sidecar.outbox.dead_letters(1)
        assert (first.reason, first.status) == ("refused", 422)
        assert (await sidecar.outbox.stats()).events == 0


class TestProcessingConfirmation:
    async def test_a_2xx_without_job_id_is_unconfirmed(
        self, run: Start, platform: RunningFake
    ) -> None:
        """With `jobs_url` set, a 2xx naming no job is delivered but `unconfirmed`, with the
        reason, in the journey and a metric; one warning for the whole episode."""
        platform.fake.faults.omit_job_id = True
        sidecar, client = await run(
            upstream={"endpoint": platform.beyond_url, "jobs_url": platform.jobs_url}
        )
        first, second = make_event(), make_event()
        with capture_logs() as logs:
            await post(client, first)
            await eventually(lambda: _delivered(sidecar, 1))
            await post(client, second)
            await eventually(lambda: _delivered(sidecar, 2))
        journey = await get(client, f"/v1/events/{first['id']}")
        assert journey["state"] == "unconfirmed"
        assert "without a jobId" in journey["unconfirmed_reason"]
        assert (
            await metric(client, 'caliper_sidecar_events_unconfirmed_total{destination="upstream"}')
            == 2
        )
        warnings = [e for e in logs if e["event"] == "platform_answered_without_job"]
        assert len(warnings) == 1

    async def test_a_lagging_job_store_is_asked_again(
        self, run: Start, platform: RunningFake
    ) -> None:
        """A jobs route that answers 404 to the first polls (its store lags behind) is asked
        again with backoff, and the events are confirmed."""
        platform.fake.faults.job_lag_polls = 2
        _, client = await run(
            upstream={"endpoint": platform.beyond_url, "jobs_url": platform.jobs_url}
        )
        event = make_event()
        await post(client, event)

        async def confirmed() -> bool:
            journey = await get(client, f"/v1/events/{event['id']}")
            return bool(journey["state"] == "confirmed")

        await eventually(confirmed, timeout=20)

    async def test_a_completed_job_confirms_only_the_events_it_names(
        self, run: Start, platform: RunningFake
    ) -> None:
        """A `completed` job whose `results` leave events out confirms only those it names;
        the others are sent again, and confirmed by a later job."""
        fake = platform.fake
        events = make_events(6)
        left_out = {events[1]["id"], events[4]["id"]}
        fake.faults.job_omit_ids = set(left_out)
        sidecar, client = await run(
            upstream={"endpoint": platform.beyond_url, "jobs_url": platform.jobs_url}
        )
        await post(client, events)

        async def all_confirmed() -> bool:
            for event in events:
                journey = await get(client, f"/v1/events/{event['id']}")
                if journey["state"] != "confirmed":
                    return False
            return True

        await eventually(all_confirmed, timeout=20)
        assert fake.duplicates == len(left_out)
        assert (await sidecar.outbox.stats()).dead_letters == 0


class TestJourneys:
    async def test_the_successful_attempt_counts(self, run: Start, platform: RunningFake) -> None:
        """An event delivered on its first try says `attempts: 1` and when that was."""
        sidecar, client = await run()
        event = make_event()
        await post(client, event)
        await eventually(lambda: _delivered(sidecar, 1))
        journey = await get(client, f"/v1/events/{event['id']}")
        assert journey["state"] == "delivered"
        assert journey["attempts"] == 1
        assert journey["first_attempt_at"] == journey["last_attempt_at"] is not None

    async def test_a_retried_event_counts_every_attempt(
        self, run: Start, platform: RunningFake
    ) -> None:
        """Two failed sends and the one that succeeded: three attempts."""
        platform.fake.fail_next(503, times=2)
        sidecar, client = await run()
        event = make_event()
        await post(client, event)
        await eventually(lambda: _delivered(sidecar, 1))
        assert (await get(client, f"/v1/events/{event['id']}"))["attempts"] == 3


class TestSensors:
    async def test_envelopes_carry_the_apps_sensor_and_never_mix(
        self, run: Start, platform: RunningFake
    ) -> None:
        """Events sent in an app's envelope leave under that envelope's sensor; bare events
        under `upstream.sensor`; no envelope mixes two sensors."""
        _, client = await run(
            upstream={"sensor": "urn:sidecar:relay", "linger_ms": 300, "batch_max_events": 100}
        )
        a, b, bare = make_events(3), make_events(3), make_events(3)
        for sensor, events in (("https://a.example/sensor", a), ("urn:app:b", b)):
            envelope = {
                "sensor": sensor,
                "sendTime": "2024-01-15T10:00:00.000Z",
                "dataVersion": "http://purl.imsglobal.org/ctx/caliper/v1p2",
                "data": events,
            }
            await post(client, envelope)
        await post(client, bare)
        fake = platform.fake
        await fake.wait_for({e["id"] for e in a + b + bare})
        assert {fake.sensors[e["id"]] for e in a} == {"https://a.example/sensor"}
        assert {fake.sensors[e["id"]] for e in b} == {"urn:app:b"}
        assert {fake.sensors[e["id"]] for e in bare} == {"urn:sidecar:relay"}
        assert fake.envelopes == 3
        journey = await get(client, f"/v1/events/{b[0]['id']}")
        assert journey["sensor"] == "urn:app:b"

    async def test_a_replayed_dead_letter_keeps_its_sensor(
        self, run: Start, platform: RunningFake
    ) -> None:
        """A dead letter sent again goes out under the sensor its app sent it with."""
        event = make_event()
        platform.fake.faults.refuse_ids = {event["id"]}
        sidecar, client = await run()
        envelope = {
            "sensor": "urn:app:replayed",
            "sendTime": "2024-01-15T10:00:00.000Z",
            "dataVersion": "http://purl.imsglobal.org/ctx/caliper/v1p2",
            "data": [event],
        }
        await post(client, envelope)
        await eventually(lambda: _dead(sidecar, 1))
        platform.fake.faults.refuse_ids = set()
        assert await sidecar.outbox.replay_dead_letters([event["id"]]) == 1
        await platform.fake.wait_for({event["id"]})
        assert platform.fake.sensors[event["id"]] == "urn:app:replayed"


async def _dead(sidecar: Sidecar, count: int) -> bool:
    return (await sidecar.outbox.stats()).dead_letters >= count


async def _delivered(sidecar: Sidecar, count: int) -> bool:
    return (await sidecar.outbox.stats()).delivered_total >= count
