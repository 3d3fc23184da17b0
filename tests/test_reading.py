"""The one door events come in by (caliper_sidecar/validation/reading.py), without HTTP: a
body's bytes to its events' ids, findings and bytes, or a domain error naming why not."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from caliper_sidecar import codec
from caliper_sidecar.ids import UUID_URN, canonical_id
from caliper_sidecar.validation.decoder import Decoder, decoder_for
from caliper_sidecar.validation.reading import Limits, TooManyEvents, read_events
from caliper_sidecar.validation.shape import ShapeError

from .conftest import make_event, make_events

LIMITS = Limits(max_events=10)
ENVELOPE = {
    "sensor": "urn:app:reader",
    "sendTime": "2024-01-15T10:00:00.000Z",
    "dataVersion": "http://purl.imsglobal.org/ctx/caliper/v1p2",
}


@pytest.fixture(params=["decoder", "rules"])
def decoder(request: pytest.FixtureRequest) -> Decoder | None:
    """Both ways through the door: the one-pass decoder, and the rules alone."""
    return decoder_for("timeback") if request.param == "decoder" else None


class TestReadEvents:
    def test_an_event_an_array_and_an_envelope_are_read_alike(
        self, decoder: Decoder | None
    ) -> None:
        """Each shape gives its events' ids in order and each event's own bytes; an envelope
        gives its sensor."""
        events = make_events(3)
        ids = [e["id"] for e in events]
        cases: list[tuple[object, list[str], str | None]] = [
            (events[0], ids[:1], None),
            (events, ids, None),
            ({**ENVELOPE, "data": events}, ids, "urn:app:reader"),
        ]
        for document, wanted, sensor in cases:
            received = read_events(codec.dumps(document), LIMITS, decoder)
            assert received.ids == wanted
            assert received.report.ok
            bodies, got_sensor = received.bodies()
            assert [json.loads(b)["id"] for b in bodies] == wanted
            assert got_sensor == sensor

    def test_a_byte_order_mark_is_no_obstacle(self, decoder: Decoder | None) -> None:
        """A UTF-8 byte order mark before the JSON (some Windows tools write one) is skipped."""
        event = make_event()
        received = read_events(b"\xef\xbb\xbf" + codec.dumps(event), LIMITS, decoder)
        assert received.ids == [event["id"]]

    def test_a_body_that_is_not_json_is_a_shape_error(self, decoder: Decoder | None) -> None:
        """Not JSON: ShapeError `malformed_json`, saying so."""
        with pytest.raises(ShapeError) as raised:
            read_events(b"{not json", LIMITS, decoder)
        assert raised.value.code == "malformed_json"

    def test_a_document_events_do_not_come_in_is_a_shape_error(
        self, decoder: Decoder | None
    ) -> None:
        """JSON that is no event, array or envelope: ShapeError naming the case."""
        with pytest.raises(ShapeError) as raised:
            read_events(b"[]", LIMITS, decoder)
        assert raised.value.code == "malformed_request"

    def test_too_many_events_are_refused_with_the_limit(self, decoder: Decoder | None) -> None:
        """More events than the limit: TooManyEvents with the count and the limit."""
        with pytest.raises(TooManyEvents) as raised:
            read_events(codec.dumps(make_events(11)), LIMITS, decoder)
        assert (raised.value.count, raised.value.limit) == (11, 10)

    def test_an_invalid_event_comes_back_with_its_findings(self, decoder: Decoder | None) -> None:
        """An invalid event is read, not raised: the report holds where and why."""
        events = make_events(2)
        del events[1]["actor"]
        received = read_events(codec.dumps(events), LIMITS, decoder)
        assert not received.report.ok
        assert {f.index for f in received.report.errors} == {1}

    def test_validation_off_checks_only_the_structure(self) -> None:
        """With `validation.mode = "off"` (no decoder) a rule-breaking event passes; a missing
        id still does not."""
        event = make_event()
        event["action"] = "NoSuchAction"
        off = Limits(max_events=10, mode="off")
        assert read_events(codec.dumps(event), off).report.ok
        del event["id"]
        assert not read_events(codec.dumps(event), off).report.ok


@given(st.one_of(st.text(), st.uuids().map(lambda u: f"urn:uuid:{u}"), st.just("URN:UUID:")))
def test_an_id_is_known_by_its_urn_uuid_in_lower_case_and_otherwise_as_sent(raw: str) -> None:
    """The outbox's form of an id (ids.canonical_id): the same UUID in two cases is one event;
    any other id stays exactly as the app sent it."""
    for event_id in (raw, raw.upper(), raw.swapcase()):
        expected = event_id.lower() if UUID_URN.fullmatch(event_id) else event_id
        assert canonical_id(event_id) == expected
