"""TimeBack's own profile as msgspec types, for the decoder (`decoder.py`): the events the
official SDK sends (`ActivityEvent`, `TimeSpentEvent` with `profile: "TimebackProfile"`),
generated from the tables of `timeback_profile`, whose checks they mirror.

Like those checks (and the SDK's models), they allow properties they do not name. The
LearnWith.AI form (`AggregationProfile`) has no generated form: such bodies go to the
hand-written checks.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec

from caliper_sidecar.validation.timeback_profile import (
    EVENTS,
    LOOSE_SLOTS,
    SUBJECTS,
    TIMEBACK_PROFILE,
    USER_ROLES,
    ProfileEvent,
)
from caliper_sidecar.validation.vocabulary import CONTEXT

NonEmpty = Annotated[str, msgspec.Meta(min_length=1)]
Object = dict[str, Any] | None


class TimebackUser(msgspec.Struct):
    type: Literal["TimebackUser"]
    id: NonEmpty
    email: NonEmpty
    name: str | None = None
    role: Literal[USER_ROLES] | None = None  # type: ignore[valid-type]
    extensions: Object = None


class Named(msgspec.Struct):
    """The app, course or activity of a context."""

    name: NonEmpty
    id: str | None = None
    extensions: Object = None


class TimebackActivityContext(msgspec.Struct):
    type: Literal["TimebackActivityContext"]
    id: NonEmpty
    subject: Literal[SUBJECTS]  # type: ignore[valid-type]
    app: Named
    course: Named | None = None
    activity: Named | None = None
    process: bool | None = None
    extensions: Object = None


def _collection(rule: ProfileEvent) -> Any:
    value: Any = Annotated[float, msgspec.Meta(ge=0)]  # takes integers, never booleans
    if rule.max_value is not None:
        value = Annotated[float, msgspec.Meta(ge=0, le=rule.max_value)]
    metric = msgspec.defstruct(
        f"{rule.collection}Metric",
        [
            ("type", Literal[rule.metrics]),
            ("value", value),
            ("sub_type", str | None, None),
            ("start_date", str | None, None),
            ("end_date", str | None, None),
            ("extensions", Object, None),
        ],
    )
    return msgspec.defstruct(
        rule.collection,
        [
            ("type", Literal[rule.collection]),
            ("id", NonEmpty),
            ("items", list[metric]),  # type: ignore[valid-type]
            ("attempt", Annotated[int, msgspec.Meta(ge=1)] | None, None),
            ("extensions", Object, None),
        ],
    )


def profile_events(base: type[msgspec.Struct], moment: Any, uuid_urn: Any) -> list[Any]:
    """The profile's event types, each tagged by its `type`, on `base` (with its checks after
    decoding); `moment` and `uuid_urn` are the decoder's string types for times and ids."""
    types = []
    for kind, rule in EVENTS.items():
        fields: list[Any] = [
            ("x_context", Literal[CONTEXT]),
            ("id", uuid_urn),
            ("action", Literal[rule.action]),
            ("profile", Literal[TIMEBACK_PROFILE]),
            ("actor", TimebackUser),
            ("object", TimebackActivityContext),
            ("generated", _collection(rule)),
            ("eventTime", moment),
            *((slot, str | dict[str, Any] | None, None) for slot in LOOSE_SLOTS),
            ("extensions", Object, None),
        ]
        types.append(
            msgspec.defstruct(
                f"{kind}_profile",
                fields,
                bases=(base,),
                tag_field="type",
                tag=kind,
                forbid_unknown_fields=False,
                rename={"x_context": "@context"},
            )
        )
    return types
