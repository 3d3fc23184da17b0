"""The one door events come in by: a body's bytes become its events' ids, what validation found
in them, and where each event's own bytes are, or a domain error that says why not (the HTTP side
maps it to a status: http/errors.py).

The fast path decodes and validates in one pass (`decoder`); a body it cannot take whole (an
invalid event, a warning to report) is parsed again and checked rule by rule, for the findings.
"""

from __future__ import annotations

from dataclasses import dataclass

from caliper_sidecar import codec
from caliper_sidecar.exceptions import SidecarError
from caliper_sidecar.validation import Report, validate_events
from caliper_sidecar.validation.decoder import Decoder
from caliper_sidecar.validation.shape import (
    ShapeError,
    event_bodies,
    events_of,
    lines_as_array,
    refuse_older_caliper,
    shape_of,
)


class TooManyEvents(SidecarError):
    """Raised when a body holds more events than `receiver.max_events_per_request`."""

    def __init__(self, count: int, limit: int) -> None:
        super().__init__(
            f"{count} events in one request; at most {limit} (receiver.max_events_per_request)"
        )
        self.count = count
        self.limit = limit


@dataclass(frozen=True, slots=True)
class Limits:
    """What a body may hold and how it is checked: `receiver.max_events_per_request`,
    `validation.mode` and `validation.profile`."""

    max_events: int
    mode: str = "strict"
    profile: str = "timeback"


@dataclass(frozen=True, slots=True)
class Received:
    """A body's events: their ids as the app sent them, what validation found in them, and the
    body they came in (as `shape`)."""

    ids: list[str]
    report: Report
    raw: bytes
    shape: str

    def bodies(self) -> tuple[list[bytes], str | None]:
        """Each event's bytes as the app sent them (found only for what is stored), and the
        sensor of the app's envelope."""
        return event_bodies(self.raw, self.shape)


def read_events(
    raw: bytes, limits: Limits, decoder: Decoder | None = None, lines: bool = False
) -> Received:
    """The events of a body (one event, an array, or an envelope; with `lines`, JSON Lines:
    one event a line, all or nothing as an array is), validated. Raises ShapeError (not JSON,
    not a shape events come in, Caliper 1.1; `code` says which) or TooManyEvents. `decoder` is
    the profile's one-pass decoder, None when validation is off."""
    raw = codec.without_bom(raw)
    if lines:
        raw = lines_as_array(raw)
    decoded = decoder.decode(raw) if decoder is not None else None
    if decoded is not None:  # valid, no warnings: validated while parsing
        _check_count(len(decoded.events), limits)
        return Received([event.id for event in decoded.events], Report(), raw, decoded.shape)
    try:
        document = codec.loads(raw)
    except (ValueError, RecursionError) as e:
        raise ShapeError("malformed_json", f"the body is not valid JSON: {e}") from None
    refuse_older_caliper(document)
    events = events_of(document)
    _check_count(len(events), limits)
    report = validate_events(events, limits.mode, limits.profile)
    # An invalid event may have no id; nothing of such a request is stored, its ids go unused.
    ids = [str(event.get("id")) if isinstance(event, dict) else "" for event in events]
    return Received(ids, report, raw, shape_of(document))


def _check_count(count: int, limits: Limits) -> None:
    if count > limits.max_events:
        raise TooManyEvents(count, limits.max_events)
