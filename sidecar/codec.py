"""JSON in and out of the sidecar.

Parsing uses the standard library: it keeps integers beyond 64 bits exact (orjson reads them as
floats, which would change an event's content), and measured faster here than orjson plus a
scan for long digit runs. NaN and Infinity are refused: they are not JSON, and the platform
would refuse the envelope. Serializing uses orjson, several times faster on every stored event;
an integer beyond 64 bits, which it will not write, is written exactly by the standard library.
"""

from __future__ import annotations

import json
import math
from typing import Any, Final

import orjson

BOM: Final = b"\xef\xbb\xbf"


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def _finite(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        # orjson would write it as null: the event's content would change on the way.
        raise ValueError(f"{text[:40]} is not a finite number (beyond what a float holds)")
    return value


def loads(data: bytes) -> Any:
    """Parse JSON, the one parser for every door (ingest, `validate`, the fake platform).

    A leading UTF-8 byte order mark is ignored (RFC 8259 §8.1 allows it). Raises ValueError for
    what is not JSON, NaN and Infinity, and numbers beyond a float; RecursionError for absurd
    nesting.
    """
    if data.startswith(BOM):
        data = data[len(BOM) :]
    return json.loads(data, parse_constant=_refuse_constant, parse_float=_finite)


def dumps(value: Any) -> bytes:
    """Serialize compactly as UTF-8 JSON; raises ValueError for text that is not Unicode
    (a lone surrogate), which no platform would take."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
