"""The Caliper 1.2 envelope: how waiting events are wrapped for the platform.

Events are stored already serialized, and the envelope is assembled around their bytes, so an
event is forwarded exactly as stored and never parsed or serialized again on the way out.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Final

#: Caliper 1.2's JSON-LD context: an event's `@context`, and an envelope's `dataVersion`
CALIPER_CONTEXT: Final = "http://purl.imsglobal.org/ctx/caliper/v1p2"
DATA_VERSION: Final = CALIPER_CONTEXT
ENVELOPE_KEYS: Final = frozenset({"sensor", "sendTime", "dataVersion", "data"})
#: the longest app sensor kept, serialized: envelopes are sized for it (an IRI is far shorter)
MAX_SENSOR_BYTES: Final = 1024


def sensor_bytes(sensor: str) -> int:
    """The size of a sensor as the envelope writes it."""
    return len(json.dumps(sensor))


def caliper_datetime(moment: datetime | None = None) -> str:
    """A Caliper DateTime: UTC with milliseconds, e.g. `2024-01-15T10:07:30.000Z`."""
    moment = (moment or datetime.now(UTC)).astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _head(sensor: str, send_time: str) -> bytes:
    fields = {"sensor": sensor, "sendTime": send_time, "dataVersion": DATA_VERSION}
    return json.dumps(fields, separators=(",", ":"))[:-1].encode() + b',"data":['


def envelope_overhead(sensor: str) -> int:
    """Bytes an envelope adds around its events (the send time has a fixed width), for this
    sensor or any app's sensor of up to MAX_SENSOR_BYTES."""
    longest = max(sensor_bytes(sensor), MAX_SENSOR_BYTES)
    return len(_head("", caliper_datetime())) - len('""') + longest + len(b"]}")


def build_envelope(sensor: str, bodies: Sequence[bytes], send_time: str | None = None) -> bytes:
    """Serialize an envelope whose `data` is the given serialized events, in order."""
    return _head(sensor, send_time or caliper_datetime()) + b",".join(bodies) + b"]}"
