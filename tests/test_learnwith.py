"""The LearnWith.AI form: TimebackProfile events rewritten as the official SDK does, and only
those."""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from sidecar.app import Sidecar, start
from sidecar.learnwith import rewrite_body, rewrite_event, wants_learnwith_form
from sidecar.mock_upstream import RunningFake
from sidecar.outbox import SqliteOutbox

from .conftest import eventually, sdk_envelopes, sdk_events, settings_for


def masked(event: dict[str, Any]) -> dict[str, Any]:
    """The event without the values the SDK draws at random (ids, and times it took itself)."""
    event = copy.deepcopy(event)
    event["id"] = event["eventTime"] = "*"
    generated = event.get("generated")
    if isinstance(generated, dict) and str(generated.get("type")).endswith("MetricsCollection"):
        generated["id"] = "*"
        for item in generated.get("items", []):
            item["id"] = "*"
    return event


def sent_pairs() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(event as built, the same send as the SDK posted it to LearnWith.AI), per send."""
    built, rewritten = sdk_envelopes("beyond-ai"), sdk_envelopes("learnwith-ai")
    return [(b["data"][0], r["data"][0]) for b, r in zip(built, rewritten, strict=True)]


class TestRewrite:
    @pytest.mark.parametrize("index", range(4))
    def test_timeback_profile_is_rewritten_as_the_sdk_does(self, index: int) -> None:
        """Each TimebackProfile event comes out as the SDK's own LearnWith.AI transformer wrote
        it (timeback-caliper 0.4.0), key order included, but for the ids it draws at random."""
        built, expected = sent_pairs()[index]
        assert built["profile"] == "TimebackProfile"
        ours = rewrite_event(built)
        assert masked(ours) == masked(expected)
        assert list(ours) == list(expected)

    def test_times_become_milliseconds(self) -> None:
        """The SDK's microsecond times reach LearnWith.AI with exactly three decimals."""
        built, expected = sent_pairs()[1]
        assert built["eventTime"] == "2024-01-15T10:30:00.123456Z"
        assert rewrite_event(built)["eventTime"] == expected["eventTime"]
        assert expected["eventTime"] == "2024-01-15T10:30:00.123Z"

    def test_metric_ids_are_stable(self) -> None:
        """The ids the SDK draws at random are derived from the event id here, so a resend
        after a crash is byte for byte the same envelope content."""
        built, _ = sent_pairs()[0]
        body = json.dumps(built).encode()
        assert rewrite_body(body) == rewrite_body(body)
        other = dict(built, id="urn:uuid:8d6f6ad2-6d6f-4bb0-8f7e-111111111111")
        first = rewrite_event(built)["generated"]["items"][0]["id"]
        assert first != rewrite_event(other)["generated"]["items"][0]["id"]

    @pytest.mark.parametrize("index", [4, 5, 6])
    def test_other_events_are_forwarded_unchanged(self, index: int) -> None:
        """Events outside TimeBack's profile (the SDK's question events) keep their bytes, even
        though the SDK itself would add a session and cut their times."""
        built, _ = sent_pairs()[index]
        assert built["profile"] != "TimebackProfile"
        body = json.dumps(built).encode()
        assert rewrite_body(body) is body

    def test_the_stored_event_is_not_touched(self) -> None:
        """Rewriting builds a new event; the one it was given is left as it was."""
        built, _ = sent_pairs()[0]
        before = copy.deepcopy(built)
        rewrite_event(built)
        assert built == before


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("https://platform.timeback.com/caliper/v1p2", True),
        ("https://platform.dev.timeback.com/caliper/v1p2/", True),
        ("https://caliper.alpha-1edtech.ai/caliper/event", False),
        ("https://platform.timeback.com/events/1.0/", False),
    ],
)
def test_learnwith_is_recognised_by_its_caliper_path(endpoint: str, expected: bool) -> None:
    """LearnWith.AI's Caliper API is where the rewrite applies, as the SDK's paths name it."""
    assert wants_learnwith_form(endpoint) is expected


class TestThroughTheSidecar:
    async def test_learnwith_gets_its_form_and_the_outbox_keeps_the_original(
        self, platform: RunningFake, tmp_path: Path
    ) -> None:
        """SDK events sent to a sidecar forwarding to LearnWith.AI arrive there in the form it
        takes (the fake refuses TimebackProfile), the rest unchanged; an event the platform
        refuses is dead-lettered as it was received."""
        fake = platform.fake
        events = sdk_events("beyond-ai")
        refused = events[2]
        fake.faults.refuse_ids.add(refused["id"])
        settings = settings_for(platform, tmp_path, upstream={"endpoint": platform.learnwith_url})
        sidecar = await start(settings)
        try:
            async with (
                aiohttp.ClientSession(base_url=sidecar.url) as client,
                client.post("/caliper/v1p2", json=events) as resp,
            ):
                assert resp.status == 200
            delivered = [e for e in events if e is not refused]
            await fake.wait_for({e["id"] for e in delivered})
            await eventually(lambda: _dead_letters(sidecar))
        finally:
            await sidecar.stop()
        for event in delivered:
            arrived = fake.received[event["id"]]
            if event["profile"] == "TimebackProfile":
                assert arrived == rewrite_event(event)
                assert arrived["profile"] == "AggregationProfile"
            else:
                assert arrived == event
        (dead,) = await _dead_letters(sidecar, reopen=settings.outbox.path)
        assert json.loads(dead.body) == refused


async def _dead_letters(sidecar: Sidecar, reopen: str | None = None) -> list[Any]:
    if reopen is None:
        return await sidecar.outbox.dead_letters(10)
    async with SqliteOutbox(reopen) as outbox:
        return await outbox.dead_letters(10)
