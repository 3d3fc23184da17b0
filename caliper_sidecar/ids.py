"""Event ids: the `urn:uuid:` form Caliper requires, and the form the outbox knows an id by."""

from __future__ import annotations

import re
from typing import Final

# The scheme and namespace of a URN are case-insensitive (RFC 8141), and so is a UUID's hex.
UUID_URN: Final = re.compile(
    r"urn:uuid:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.IGNORECASE
)


def canonical_id(event_id: str) -> str:
    """The form an id is known by in the outbox: a `urn:uuid:` id in lower case, so that the
    same UUID written in two cases is one event (what is forwarded is the id as received)."""
    if event_id.islower():  # nothing to lower (how ids mostly come): no match needed
        return event_id
    return event_id.lower() if UUID_URN.fullmatch(event_id) else event_id
