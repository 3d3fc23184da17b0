"""The checks every event passes in every mode: what the outbox and the envelope rely on."""

from __future__ import annotations

from typing import Any, Final

from caliper_sidecar.ids import UUID_URN
from caliper_sidecar.validation.issues import Finding, kind_of, pointer

REQUIRED: Final = ("id", "type", "action", "actor", "object", "eventTime")
_STRINGS: Final = ("id", "type", "action", "eventTime")


def check_structure(index: int, event: Any) -> list[Finding]:
    """An event is an object with a `urn:uuid:` id and the core properties present."""
    if not isinstance(event, dict):
        return [
            Finding(
                index, "", f"an event must be a JSON object, not {kind_of(event)}", "event-object"
            )
        ]
    found: list[Finding] = []
    for key in REQUIRED:
        if key not in event or event[key] is None:
            found.append(Finding(index, pointer(key), f"`{key}` is required", "required"))
        elif key in _STRINGS and not isinstance(event[key], str):
            found.append(
                Finding(
                    index,
                    pointer(key),
                    f"`{key}` must be a string, not {kind_of(event[key])}",
                    "string",
                )
            )
    event_id = event.get("id")
    if isinstance(event_id, str) and not UUID_URN.fullmatch(event_id):
        found.append(
            Finding(
                index,
                "/id",
                f"`id` must be `urn:uuid:` followed by a UUID (got {event_id[:80]!r})",
                "id-urn-uuid",
            )
        )
    return found
