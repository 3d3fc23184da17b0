"""What a body holds: one event, an array of events, or a Caliper envelope of events."""

from __future__ import annotations

from typing import Any, Final

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


#: the JSON-LD contexts (an envelope's `dataVersion`, an event's `@context`) of the Caliper
#: versions before 1.2, which the sidecar does not take
_OLDER_CALIPER: Final = ("/ctx/caliper/v1p1", "/ctx/caliper/v1p0")


def refuse_older_caliper(document: Any) -> None:
    """Raise ShapeError (`unsupported_caliper_version`) when the body is Caliper 1.1 (or 1.0):
    an IMS sensor of an older release, which no rule-by-rule report would explain (nor a
    complaint about an envelope's `dataVersion`)."""
    if isinstance(document, list):
        items = document
    elif isinstance(document, dict) and isinstance(document.get("data"), list):
        items = [document, *document["data"]]
    else:
        items = [document]
    contexts = [
        item.get(key)
        for item in items
        if isinstance(item, dict)
        for key in ("dataVersion", "@context")
    ]
    for context in contexts:
        if isinstance(context, str) and context.rstrip("/").endswith(_OLDER_CALIPER):
            raise ShapeError(
                "unsupported_caliper_version",
                f"this is Caliper {context.rstrip('/')[-3]}.{context.rstrip('/')[-1]} "
                f"({context}); only Caliper 1.2 ({DATA_VERSION}) is taken: send with a "
                "sensor of Caliper 1.2 (IMS caliper-python 1.2, TimeBack's SDKs)",
            )


def lines_as_array(raw: bytes) -> bytes:
    """JSON Lines (one event a line, as log shippers send) as the JSON array of the same
    events, each line's bytes kept as they are (so each event is stored exactly as sent);
    blank lines skipped. Raises ShapeError naming the first line that is not JSON."""
    lines = [line.rstrip(b"\r") for line in raw.split(b"\n")]
    kept = [line for line in lines if line.strip(b" \t")]
    if not kept:
        raise ShapeError("malformed_request", "the JSON Lines body holds no event")
    array = b"[" + b",".join(kept) + b"]"
    try:
        msgspec.json.decode(array)
    except msgspec.DecodeError:
        for number, line in enumerate(lines, 1):
            if not line.strip(b" \t"):
                continue
            try:
                msgspec.json.decode(line)
            except msgspec.DecodeError as e:
                raise ShapeError(
                    "malformed_json", f"line {number} of the JSON Lines body is not JSON: {e}"
                ) from None
        raise ShapeError("malformed_json", "the JSON Lines body is not JSON") from None
    return array


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
