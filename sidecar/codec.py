"""JSON in and out of the sidecar.

Parsing uses the standard library: it keeps integers beyond 64 bits exact (orjson reads them as
floats, which would change an event's content), and measured faster here than orjson plus a
scan for long digit runs. NaN and Infinity are refused: they are not JSON, and the platform
would refuse the envelope. Serializing uses orjson, several times faster on every stored event;
an integer beyond 64 bits, which it will not write, is written exactly by the standard library.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def loads(data: bytes) -> Any:
    """Parse JSON; raises ValueError (or RecursionError for absurd nesting)."""
    return json.loads(data, parse_constant=_refuse_constant)


def dumps(value: Any) -> bytes:
    """Serialize compactly as UTF-8 JSON; raises ValueError for text that is not Unicode
    (a lone surrogate), which no platform would take."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
