"""Times in events: what the platforms accept as a Caliper DateTime.

Caliper 1.2 writes times as UTC with milliseconds, but TimeBack's platforms take any UTC
instant, and TimeBack's SDK sends microseconds (`2024-01-15T10:30:00.123456Z`, or no fraction
at all when it happens to be zero). What is not a UTC instant (no zone, another offset, a day
that does not exist) is refused: the platform could not place it in time.
"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Any, Final

UTC_INSTANT: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d(\.\d{1,9})?(Z|\+00:00)")
UTC_INSTANT_FORM: Final = (
    "a UTC time like 2024-01-15T10:07:30.000Z (fractions of a second optional, "
    "Z or +00:00 as the zone)"
)


def valid_instant(value: Any) -> bool:
    """A UTC instant in ISO 8601 form, naming a real calendar date and time."""
    if not isinstance(value, str) or not UTC_INSTANT.fullmatch(value):
        return False
    try:
        datetime.fromisoformat(value[:19])
    except ValueError:
        return False
    return True
