"""The LearnWith.AI form: every event rewritten as the official SDK's LearnWith.AI transform
does, decided by `upstream.platform`, never by the endpoint's path."""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from hypothesis import given
from hypothesis import strategies as st

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.delivery.learnwith_form import rewrite_body, rewrite_event
from caliper_sidecar.outbox import sqlite_outbox
from caliper_sidecar.presets import platform_mismatch
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SDK_DATA, eventually, sdk_envelopes, sdk_events, settings_for


def masked(event: dict[str, Any]) -> dict[str, Any]:
    """The event without the values the SDK draws at random (ids, and times it took itself)."""
    event = copy.deepcopy(event)
    event["id"] = event["eventTime"] = "*"
    generated = event.get("generated")
    if isinstance(generated, dict) and str(generated.get("type")).endswith("MetricsCollection"):
        generated["id"] = "*"
        for item in generated.get("items", []):
            item["id"] = "*"
    if isinstance(generated, dict) and generated.get("type") == "Score":
        generated["id"] = "*"  # the SDK's question-graded builder draws it
    return event


def without_metric_ids(event: dict[str, Any]) -> dict[str, Any]:
    """The event without the metric ids the SDK draws at random (all else compared)."""
    event = copy.deepcopy(event)
    generated = event.get("generated")
    if isinstance(generated, dict) and str(generated.get("type")).endswith("MetricsCollection"):
        for item in generated.get("items", []):
            item["id"] = "*"
    return event


def sent_pairs() -> list[tuple[dict[str, Any], dict[str, Any]]]:
    """(event as built, the same send as the SDK posted it to LearnWith.AI), per send."""
    built, rewritten = sdk_envelopes("beyond-ai"), sdk_envelopes("learnwith-ai")
    return [(b["data"][0], r["data"][0]) for b, r in zip(built, rewritten, strict=True)]


class TestRewrite:
    @pytest.mark.parametrize("index", range(7))
    def test_every_event_is_rewritten_as_the_sdk_does(self, index: int) -> None:
        """Each event the SDK builds (activity, time spent, question seen, answered and graded)
        comes out as the SDK's own LearnWith.AI transform wrote it (timeback-caliper 0.4.0),
        key order included, but for the ids it draws at random."""
        built, expected = sent_pairs()[index]
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
    def test_question_events_get_a_session_and_milliseconds(self, index: int) -> None:
        """Events outside TimeBack's profile (the SDK's question events) get what the SDK gives
        every event: a session (auto-attach) and a time in milliseconds; nothing else."""
        built, expected = sent_pairs()[index]
        assert built["profile"] != "TimebackProfile"
        assert "session" not in built
        ours = rewrite_event(built)
        assert ours["session"] == expected["session"] == "urn:tag:auto-attach"
        # The SDK drew each build's time itself: compare the form, and the cut of ours.
        assert len(ours["eventTime"]) == len(expected["eventTime"]) == 24
        assert ours["eventTime"] == built["eventTime"][:23] + "Z"
        assert {k: v for k, v in ours.items() if k not in ("session", "eventTime")} == {
            k: v for k, v in built.items() if k != "eventTime"
        }

    @pytest.mark.parametrize("index", range(7))
    def test_what_the_sdk_rewrote_is_not_rewritten_again(self, index: int) -> None:
        """An app whose SDK is set to LearnWith.AI sends events it already rewrote; rewriting
        them again (the SDK's rewrite is not idempotent) would turn `XpEarned: 10` into
        `ActivityMetric: null`. They leave as the app's SDK wrote them."""
        _, rewritten = sent_pairs()[index]
        assert rewrite_event(rewritten) == rewritten

    def test_the_sidecars_own_samples_as_the_sdk_rewrites_them(self) -> None:
        """The demo's sample events (the TimeBack reference's kinds) come out as the SDK's
        `transform_for_lwai` wrote them (recorded with timeback-caliper 0.4.0)."""
        recorded = json.loads((SDK_DATA / "lwai-transform-of-samples.json").read_text())
        assert recorded["pairs"]
        for pair in recorded["pairs"]:
            ours = rewrite_event(pair["event"])
            assert without_metric_ids(ours) == without_metric_ids(pair["sdk_lwai"])
            assert list(ours) == list(pair["sdk_lwai"])

    def test_an_event_already_in_form_keeps_its_bytes(self) -> None:
        """An event the transform leaves as it is (a session, a time in milliseconds) is
        forwarded as the same bytes."""
        event = {
            "@context": "http://purl.imsglobal.org/ctx/caliper/v1p2",
            "id": "urn:uuid:8d6f6ad2-6d6f-4bb0-8f7e-222222222222",
            "type": "ViewEvent",
            "eventTime": "2024-01-15T10:30:00.123Z",
            "session": "urn:uuid:8d6f6ad2-6d6f-4bb0-8f7e-333333333333",
        }
        body = json.dumps(event, indent=2).encode()
        assert rewrite_body(body) is body

    def test_the_stored_event_is_not_touched(self) -> None:
        """Rewriting builds a new event; the one it was given is left as it was."""
        built, _ = sent_pairs()[0]
        before = copy.deepcopy(built)
        rewrite_event(built)
        assert built == before


@pytest.mark.parametrize(
    ("platform", "endpoint", "warned"),
    [
        ("learnwith-ai", "https://platform.timeback.com/caliper/v1p2", False),
        ("learnwith-ai", "https://gateway.example/timeback/", False),
        ("learnwith-ai", "https://caliper.alpha-1edtech.ai/caliper/event", True),
        ("beyond-ai", "https://platform.timeback.com/caliper/v1p2/", True),
        ("caliper", "https://platform.timeback.com/caliper/v1p2?x=1", True),
        ("caliper", "https://lrs.example/xapi/caliper", False),
    ],
)
def test_a_platform_that_does_not_match_its_path_is_warned_about(
    platform: str, endpoint: str, warned: bool
) -> None:
    """The path never decides; a path that is another platform's Caliper path is a warning."""
    warning = platform_mismatch(platform, endpoint)
    assert (warning is not None) is warned
    if warning is not None:
        assert "upstream.platform" in warning


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
        settings = settings_for(
            platform,
            tmp_path,
            upstream={"endpoint": platform.learnwith_url, "platform": "learnwith-ai"},
        )
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
            assert arrived == rewrite_event(event)
            assert arrived["profile"] != "TimebackProfile"
        (dead,) = await _dead_letters(sidecar, reopen=settings.outbox.path)
        assert json.loads(dead.body) == refused

    async def test_the_platform_decides_not_the_path(
        self, platform: RunningFake, tmp_path: Path
    ) -> None:
        """`upstream.platform = "learnwith-ai"` with the endpoint behind a gateway's path: the
        events still leave in LearnWith.AI's form."""
        fake = platform.fake
        events = sdk_events("beyond-ai")[:2]
        settings = settings_for(
            platform,
            tmp_path,
            upstream={"endpoint": platform.events_url, "platform": "learnwith-ai"},
        )
        sidecar = await start(settings)
        try:
            async with (
                aiohttp.ClientSession(base_url=sidecar.url) as client,
                client.post("/caliper/event", json=events) as resp,
            ):
                assert resp.status == 200
            await fake.wait_for({e["id"] for e in events})
        finally:
            await sidecar.stop()
        for event in events:
            assert fake.received[event["id"]] == rewrite_event(event)
            assert fake.received[event["id"]]["profile"] == "AggregationProfile"


async def _dead_letters(sidecar: Sidecar, reopen: str | None = None) -> list[Any]:
    if reopen is None:
        return await sidecar.outbox.dead_letters(10)
    async with sqlite_outbox(OutboxSettings(path=str(reopen))) as outbox:
        return await outbox.dead_letters(10)


@given(
    st.datetimes(
        min_value=datetime(1970, 1, 2), max_value=datetime(2999, 12, 31), timezones=st.just(UTC)
    ),
    st.integers(min_value=3, max_value=6),
)
def test_times_are_cut_as_the_sdk_cuts_them(moment: datetime, digits: int) -> None:
    """The shortcut for UTC times with 3 to 6 decimals gives what the SDK's parse-and-format
    gives (`_normalize_datetime` in its lwai.py, written out here)."""
    text = moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[: 20 + digits] + "Z"
    parsed = datetime.fromisoformat(text[:-1] + "+00:00").astimezone(UTC)
    sdk = parsed.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
    assert rewrite_event({"eventTime": text})["eventTime"] == sdk
