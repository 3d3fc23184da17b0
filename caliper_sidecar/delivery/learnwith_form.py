"""The LearnWith.AI form of TimeBack's profile: what that platform takes instead of
`TimebackProfile` events.

TimeBack's official SDK rewrites every envelope it sends to LearnWith.AI
(`timeback_caliper/resources/event_transformers/lwai.py`, timeback-caliper 0.4.0): the profile
becomes `AggregationProfile`, the `TimebackUser` a `Person`, the activity context an
`AssignableDigitalResource`, the metrics collections standard ones, the time milliseconds, and a
missing `session` becomes auto-attach. Like the SDK, the sidecar applies it to every event it
sends to LearnWith.AI (`upstream.platform = "learnwith-ai"`), question and plain Caliper events
included: their `eventTime` is normalised to milliseconds and a missing `session` set to
auto-attach. The outbox keeps every event as it arrived.

Two differences, on purpose. An event already in LearnWith.AI's form (sent by an app whose SDK
rewrote it) is left so: the SDK's rewrite applied twice would empty its metrics. And the SDK
draws a random id for each metric (and for a collection without one); here the ids are derived
from the event's id, so a resend after a crash carries the same ids and the platform can
recognise it.
"""

from __future__ import annotations

import re
import uuid
from datetime import UTC, datetime
from typing import Any, Final

from caliper_sidecar import codec
from caliper_sidecar.envelope import CALIPER_CONTEXT

AUTO_ATTACH: Final = "urn:tag:auto-attach"
_RESOURCE_EVENTS: Final = frozenset(
    {"ActivityEvent", "TimeSpentEvent", "AssignableEvent", "ViewEvent"}
)
#: event type -> (collection type, metric type, the metric name when an item has none)
_COLLECTIONS: Final = {
    "ActivityEvent": ("ActivityMetricsCollection", "ActivityMetric", ""),
    "TimeSpentEvent": ("TimeSpentMetricsCollection", "TimeSpentMetric", "Active"),
}
_IDS: Final = uuid.UUID("6f1c2a9e-3b47-4d0a-9c55-2a8e7d1b4f60")


def rewrite_body(body: bytes) -> bytes:
    """A stored event in the form LearnWith.AI takes; an event the rewrite leaves as it is
    comes back as the same bytes."""
    event = codec.loads(body)
    if not isinstance(event, dict):
        return body
    rewritten = rewrite_event(event)
    return body if rewritten == event else codec.dumps(rewritten)


def rewrite_event(event: dict[str, Any]) -> dict[str, Any]:
    """The LearnWith.AI form of one event (a new dict), as the SDK's `transform_for_lwai`."""
    out = dict(event)
    out.setdefault("@context", CALIPER_CONTEXT)
    if out.get("profile") == "TimebackProfile":
        out["profile"] = "AggregationProfile"
    kind = out.get("type")
    actor = out.get("actor")
    if isinstance(actor, dict) and actor.get("type") == "TimebackUser":
        out["actor"] = {"type": "Person", "id": actor.get("id")}
    obj = out.get("object")
    if isinstance(obj, dict):
        resource = obj.get("type") == "TimebackActivityContext" and kind in _RESOURCE_EVENTS
        out["object"] = _resource(obj) if resource else dict(obj)
    generated = out.get("generated")
    if (
        isinstance(generated, dict)
        and kind in _COLLECTIONS
        # Already in LearnWith.AI's form (an app whose SDK is set to LEARNWITH_AI rewrites
        # before sending): the SDK's rewrite is not idempotent, and a second one would turn
        # `metricType: XpEarned, metricValue: 10` into `ActivityMetric, null`.
        and generated.get("type") != _COLLECTIONS[kind][0]
    ):
        out["generated"] = _collection(generated, *_COLLECTIONS[kind], str(out.get("id")))
    if "eventTime" in out:
        out["eventTime"] = _milliseconds(out["eventTime"])
    if not out.get("session"):
        out["session"] = AUTO_ATTACH
    return out


def _resource(context: dict[str, Any]) -> dict[str, Any]:
    resource: dict[str, Any] = {"type": "AssignableDigitalResource", "id": context.get("id")}
    if context.get("name"):
        resource["name"] = context["name"]
    course = context.get("course")
    if isinstance(course, dict):
        part: dict[str, Any] = {"type": "CourseOffering", "id": course.get("id")}
        if course.get("name"):
            part["name"] = course["name"]
        resource["isPartOf"] = part
    app = context.get("app")
    if isinstance(app, dict):
        resource["extensions"] = {
            "app": {"name": app.get("name"), "type": app.get("type", "SoftwareApplication")}
        }
    return resource


def _collection(
    source: dict[str, Any], kind: str, item_kind: str, default_metric: str, event_id: str
) -> dict[str, Any]:
    out: dict[str, Any] = {
        "id": source["id"] if "id" in source else _derived_id(event_id, "generated"),
        "type": kind,
    }
    if "items" in source:
        out["items"] = [
            {
                "id": _derived_id(event_id, f"generated/items/{i}"),
                "type": item_kind,
                "metricType": _pascal(item.get("type", "")) or default_metric,
                "metricValue": item.get("value"),
            }
            for i, item in enumerate(source["items"])
        ]
    out.update((k, v) for k, v in source.items() if k not in ("id", "type", "items"))
    return out


def _pascal(name: Any) -> str:
    return name[:1].upper() + name[1:] if isinstance(name, str) else ""


def _derived_id(event_id: str, where: str) -> str:
    return f"urn:uuid:{uuid.uuid5(_IDS, f'{event_id}/{where}')}"


#: UTC times with 3 to 6 decimals: the SDK's rewrite keeps the first three, which a slice does
#: for a fraction of the cost of parsing (every event bound for LearnWith.AI passes here)
_UTC_FRACTION: Final = re.compile(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3,6}Z")


def _milliseconds(value: Any) -> Any:
    """A time as LearnWith.AI wants it, UTC with exactly three decimals; left alone if it is
    not a time (as the SDK does)."""
    if not isinstance(value, str) or not value:
        return value
    if _UTC_FRACTION.fullmatch(value):
        return value[:23] + "Z"
    text = value[:-1] + "+00:00" if value.endswith("Z") else value
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        return value
    if moment.tzinfo is not None:
        moment = moment.astimezone(UTC)
    return moment.strftime("%Y-%m-%dT%H:%M:%S.%f")[:23] + "Z"
