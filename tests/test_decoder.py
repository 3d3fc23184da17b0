"""The decoder that validates while parsing never disagrees with the hand-written rules: what it
accepts, they find no error and no warning in (issue 13). Run over every seed (the reference's
samples, the SDK's events, the IMS fixtures) and a stream of mutated events and bodies."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from caliper_sidecar.envelope import DATA_VERSION
from caliper_sidecar.tools.samples import sample_events
from caliper_sidecar.validation import PROFILES, validate_events
from caliper_sidecar.validation.decoder import LEVELS, decoder_for
from caliper_sidecar.validation.shape import events_of, shape_of
from caliper_sidecar.validation.vocabulary import ANONYMOUS_PREFIX

from .conftest import new_id, sdk_events
from .test_properties import SEEDS, mutated_events


def clean(events: list[Any], profile: str) -> bool:
    report = validate_events(events, "strict", profile)
    return report.error_count == 0 and report.warning_count == 0


def assert_agrees(body: bytes, profile: str) -> bool:
    """If the decoder takes the body, the hand-written rules find nothing in it, and the
    decoder's events are the body's, in order. Returns whether it took it."""
    decoded = decoder_for(profile).decode(body)
    if decoded is None:
        return False
    document = json.loads(body)
    events = events_of(document)
    assert clean(events, profile), validate_events(events, "strict", profile)
    assert decoded.shape == shape_of(document)
    assert [e.id for e in decoded.events] == [e["id"] for e in events]
    return True


def left_to_the_rules(event: dict[str, Any]) -> bool:
    """What the decoder leaves to the hand-written rules by design: the LearnWith.AI form of
    TimeBack's profile, and IRIs in Caliper's anonymous namespace (whose implied types only
    the rules check)."""
    text = json.dumps(event)
    return '"AggregationProfile"' in text or ANONYMOUS_PREFIX in text


@pytest.mark.parametrize("profile", PROFILES)
def test_every_seed_agrees_and_every_clean_seed_is_decoded(profile: str) -> None:
    taken = 0
    for event in SEEDS:
        body = json.dumps(event).encode()
        if assert_agrees(body, profile):
            taken += 1
        elif clean([event], profile):
            assert left_to_the_rules(event), event
    # The decoder is in use: it took at least the project's own samples and the SDK's events
    # that are clean (what ../shared adds, when it is there, only adds to that).
    own = [e for e in sample_events() + sdk_events() if clean([e], profile)]
    assert own
    assert taken >= sum(1 for e in own if not left_to_the_rules(e))


@pytest.mark.parametrize("profile", ["timeback", "timeback-learnwith"])
def test_the_sdks_own_profile_is_decoded(profile: str) -> None:
    """What real TimeBack apps send most: the SDK's ActivityEvent and TimeSpentEvent."""
    own = [e for e in SEEDS if e.get("profile") == "TimebackProfile"]
    assert {e["type"] for e in own} == {"ActivityEvent", "TimeSpentEvent"}
    for event in own:
        assert assert_agrees(json.dumps(event).encode(), profile)


@pytest.mark.parametrize("profile", PROFILES)
def test_bodies_of_every_shape(profile: str) -> None:
    events = [e for e in SEEDS if clean([e], profile) and not left_to_the_rules(e)][:5]
    envelope = {"sensor": "s", "sendTime": "2024-01-15T10:00:00.000Z", "dataVersion": DATA_VERSION}
    for document in (events, events[0], {**envelope, "data": events}):
        assert assert_agrees(json.dumps(document, indent=1).encode(), profile)
    refusals: list[Any] = [[], {**envelope, "data": []}, {**envelope, "data": events, "x": 1}]
    for refused in refusals:
        assert decoder_for(profile).decode(json.dumps(refused).encode()) is None


def nested(depth: int) -> dict[str, Any]:
    """A ViewEvent whose object is a chain of `depth` entities, each `isPartOf` the next."""
    event = copy.deepcopy(next(e for e in SEEDS if e.get("type") == "ViewEvent"))
    event["id"] = new_id()
    chain: dict[str, Any] = {"id": "https://example.edu/0", "type": "Document"}
    for level in range(1, depth):
        chain = {"id": f"https://example.edu/{level}", "type": "Document", "isPartOf": chain}
    event["object"] = chain
    return event


@pytest.mark.parametrize("depth", [LEVELS, LEVELS + 1, 25])
def test_deep_entities_are_left_to_the_rules(depth: int) -> None:
    """Entities deeper than LEVELS are not decoded here; the rules allow 24 levels."""
    event = nested(depth)
    assert clean([event], "caliper") == (depth <= 24)
    taken = assert_agrees(json.dumps(event).encode(), "caliper")
    assert taken == (depth <= LEVELS)


@pytest.mark.parametrize(
    ("where", "value"),
    [
        ("id", "urn:uuid:" + "0" * 8 + "-0000-0000-0000-" + "0" * 12 + "\n"),
        ("eventTime", "2024-01-15T10:00:00.000Z\n"),
        ("eventTime", "2024-02-30T10:00:00.000Z"),
        ("actor", "https://example.edu/users/1\n"),
        ("actor", "not an iri"),
        ("object", {"id": "https://example.edu/1"}),
        ("object", {"id": "https://example.edu/1", "type": ""}),
    ],
)
def test_what_types_alone_could_let_through(where: str, value: Any) -> None:
    """A trailing newline ($ would let it match), a date that does not exist, a bad IRI, an
    entity without a type where a slot allows one type only (msgspec needs no tag then)."""
    event = copy.deepcopy(SEEDS[0])
    event[where] = value
    assert not clean([event], "timeback")
    assert decoder_for("timeback").decode(json.dumps(event).encode()) is None


@pytest.mark.parametrize("profile", PROFILES)
@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_mutated_events_agree(profile: str, data: st.DataObject) -> None:
    events = data.draw(st.lists(mutated_events(), min_size=1, max_size=3))
    body = events if len(events) > 1 else events[0]
    assert_agrees(json.dumps(body).encode(), profile)
