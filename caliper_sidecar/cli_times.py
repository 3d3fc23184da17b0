"""The times the command line takes (`replay --since`, `reconcile --until`): an RFC 3339
time with its offset, or a duration meaning that long before now. (Times inside events are
validation/moments.py's.)"""

from __future__ import annotations

import re
from datetime import datetime
from typing import Final

#: RFC 3339's date-time: the offset is required (a time without one names no instant)
_RFC3339: Final = re.compile(
    r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})"
)
_DURATION: Final = re.compile(r"(\d+)([smhd])")
_UNIT_S: Final = {"s": 1, "m": 60, "h": 3600, "d": 86_400}

MOMENT_HELP: Final = (
    "an RFC 3339 time with its offset (2026-12-05T08:00:00Z, 2026-12-05T09:00:00+01:00), or "
    "a duration meaning that long ago (90s, 90m, 2h, 7d)"
)


def parse_moment(text: str, now: float) -> float:
    """The instant `text` names, in seconds since the epoch: an RFC 3339 time, or a duration
    (`90m`, `2h`, `7d`, `30s`) before `now`. ValueError, naming the text, when it is
    neither."""
    written = text.strip()
    duration = _DURATION.fullmatch(written)
    if duration is not None:
        return now - int(duration.group(1)) * _UNIT_S[duration.group(2)]
    if _RFC3339.fullmatch(written):
        # fromisoformat takes neither a lower-case separator nor a lower-case zone letter
        normal = written[:10] + "T" + written[11:]
        if normal[-1] in "Zz":
            normal = normal[:-1] + "+00:00"
        try:
            return datetime.fromisoformat(normal).timestamp()
        except ValueError:
            raise ValueError(f"{text!r} is not a time: no such date or time of day") from None
    raise ValueError(f"{text!r} is not a time: expected {MOMENT_HELP}")
