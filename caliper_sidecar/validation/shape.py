"""What a body holds: one event, an array of events, or a Caliper envelope of events."""

from __future__ import annotations

from typing import Any

import msgspec

from caliper_sidecar.envelope import DATA_VERSION, ENVELOPE_KEYS
from caliper_sidecar.exceptions import SidecarError


class ShapeError(SidecarError):
    """Raised when a document is none of the shapes events arrive in; `code` names the case."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def events_of(document: Any) -> list[Any]:
    """The events of a document, in order; raises ShapeError."""
    if isinstance(document, list):
        if not document:
            raise ShapeError("malformed_request", "the array of events is empty")
        return document
    if not isinstance(document, dict):
        raise ShapeError(
            "malformed_request",
            "the body must be a Caliper event, an array of events, or a Caliper envelope",
        )
    if shape_of(document) == "event":
        return [document]
    return _envelope_data(document)


def _envelope_data(envelope: dict[str, Any]) -> list[Any]:
    extra = set(envelope) - ENVELOPE_KEYS
    if extra:
        raise ShapeError(
            "malformed_envelope",
            f"an envelope has exactly sensor, sendTime, dataVersion and data; "
            f"unexpected: {', '.join(sorted(extra))}",
        )
    for key in ("sensor", "sendTime", "dataVersion"):
        if not isinstance(envelope.get(key), str):
            raise ShapeError("malformed_envelope", f"the envelope needs `{key}` (a string)")
    if envelope["dataVersion"] != DATA_VERSION:
        raise ShapeError(
            "malformed_envelope", f"the envelope's `dataVersion` must be {DATA_VERSION}"
        )
    data = envelope["data"]
    if not isinstance(data, list) or not data:
        raise ShapeError("malformed_envelope", "the envelope's `data` must be a non-empty array")
    return data


def shape_of(document: Any) -> str:
    """Which shape a list or an object is: "array", "event" (an object with no `data`, or
    with an `action`) or "envelope"."""
    if isinstance(document, list):
        return "array"
    return "event" if "data" not in document or "action" in document else "envelope"


def event_bodies(data: bytes, shape: str) -> tuple[list[bytes], str | None]:
    """The bytes of each event of a body `data` of that shape, as the body holds them (what is
    stored and forwarded, so that an event reaches the platform exactly as the app wrote it),
    and the envelope's `sensor` (None for bare events: they go out under the configured one)."""
    if shape == "array":
        return _slices(data), None
    if shape == "event":
        return [data.strip(b" \t\r\n")], None
    envelope = msgspec.json.decode(data, type=dict[str, msgspec.Raw])
    sensor = msgspec.json.decode(envelope["sensor"]) if "sensor" in envelope else None
    return _slices(bytes(envelope["data"])), sensor if isinstance(sensor, str) and sensor else None


def _slices(array: bytes) -> list[bytes]:
    return [bytes(item) for item in msgspec.json.decode(array, type=list[msgspec.Raw])]
