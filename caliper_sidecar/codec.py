"""JSON in and out of the sidecar, and the one way its answers write a time.

Parsing uses msgspec: several times faster than the standard library on every request, and as
strict where it matters: integers beyond 64 bits stay exact, and NaN, Infinity, numbers beyond
a float (`1e400`) and lone UTF-16 surrogates are refused (none is JSON a platform would take,
and each would change the event on the way). Serializing uses orjson; an integer beyond 64
bits, which it will not write, is written exactly by the standard library.
"""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any, Final

import msgspec
import orjson

BOM: Final = b"\xef\xbb\xbf"


def without_bom(data: bytes) -> bytes:
    """A leading UTF-8 byte order mark dropped (RFC 8259 §8.1 allows parsers to ignore it)."""
    return data[len(BOM) :] if data.startswith(BOM) else data


def loads(data: bytes) -> Any:
    """Parse JSON, the one parser for every door (ingest, `validate`, the fake platform).

    A leading byte order mark is ignored. Raises ValueError for what is not JSON (NaN and
    Infinity included), numbers beyond a float and lone surrogates; RecursionError for absurd
    nesting.
    """
    data = without_bom(data)
    try:
        return msgspec.json.decode(data)
    except msgspec.ValidationError as e:  # its one case: "Number out of range"
        raise ValueError(
            f"a number is not a finite number, beyond what a float holds: {e}"
        ) from None
    except msgspec.DecodeError:
        pass
    # Refused: the standard library says where, or, when it would take the text, why not.
    json.loads(data, parse_constant=_refuse_constant)
    raise ValueError("it holds text that is not valid Unicode (a lone UTF-16 surrogate)")


def _refuse_constant(name: str) -> Any:
    raise ValueError(f"{name} is not valid JSON")


def dumps(value: Any) -> bytes:
    """Serialize compactly as UTF-8 JSON; raises ValueError for text that is not Unicode
    (a lone surrogate), which no platform would take."""
    try:
        return orjson.dumps(value)
    except TypeError:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def utc_from_timestamp(ts: float | None) -> str | None:
    """An ISO 8601 UTC time with milliseconds, or None."""
    if ts is None:
        return None
    try:
        moment = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
    except (OverflowError, ValueError, OSError):
        return None  # a time no calendar holds (a token "expiring" in the year 10^12)
    return str(moment).replace("+00:00", "Z")
