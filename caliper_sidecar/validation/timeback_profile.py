"""TimeBack's own Caliper profile, as TimeBack's official SDK builds it, and the form the SDK
rewrites it into for LearnWith.AI.

`TimebackProfile` events (`ActivityEvent`/`Completed`, `TimeSpentEvent`/`SpentTime`) are not
Caliper 1.2 types, so the Caliper rules cannot judge them: these checks mirror the SDK's own
types instead (`timeback_caliper/types/timeback.py`, timeback-caliper 0.4.0), refusing what they
refuse and nothing more (their models allow extra properties, so these checks do too).
`AggregationProfile` events are the same events after the SDK's LearnWith.AI rewrite
(`event_transformers/lwai.py`); an app that uses the SDK against LearnWith.AI sends that form.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final, NamedTuple

from caliper_sidecar.envelope import CALIPER_CONTEXT
from caliper_sidecar.validation.issues import Checker, kind_of
from caliper_sidecar.validation.moments import UTC_INSTANT_FORM, valid_instant

TIMEBACK_PROFILE: Final = "TimebackProfile"
AGGREGATION_PROFILE: Final = "AggregationProfile"

USER_ROLES: Final = ("student", "teacher", "admin", "guide")
SUBJECTS: Final = (
    "Reading",
    "Language",
    "Vocabulary",
    "Social Studies",
    "Writing",
    "Science",
    "FastMath",
    "Math",
    "None",
    "Other",
)
ACTIVITY_METRICS: Final = ("xpEarned", "totalQuestions", "correctQuestions", "masteredUnits")
TIME_SPENT_METRICS: Final = ("active", "inactive", "waste", "unknown", "anti-pattern")
#: seconds: one metric of time spent covers at most a day
MAX_TIME_SPENT_S: Final = 86_400
#: the event's slots the SDK types as `str | dict | None` (an IRI or an entity)
LOOSE_SLOTS: Final = (
    "edApp",
    "target",
    "referrer",
    "group",
    "membership",
    "session",
    "federatedSession",
)


class ProfileEvent(NamedTuple):
    """What one event type of the profile must carry."""

    action: str
    collection: str  # the type of `generated` in TimebackProfile
    metrics: tuple[str, ...]
    max_value: float | None
    aggregation_collection: str  # … and after the LearnWith.AI rewrite
    aggregation_metric: str


EVENTS: Final[Mapping[str, ProfileEvent]] = {
    "ActivityEvent": ProfileEvent(
        "Completed",
        "TimebackActivityMetricsCollection",
        ACTIVITY_METRICS,
        None,
        "ActivityMetricsCollection",
        "ActivityMetric",
    ),
    "TimeSpentEvent": ProfileEvent(
        "SpentTime",
        "TimebackTimeSpentMetricsCollection",
        TIME_SPENT_METRICS,
        MAX_TIME_SPENT_S,
        "TimeSpentMetricsCollection",
        "TimeSpentMetric",
    ),
}


def is_profile_event(event: Mapping[str, Any]) -> bool:
    """True for events these checks judge instead of the Caliper 1.2 rules."""
    return event.get("profile") in (TIMEBACK_PROFILE, AGGREGATION_PROFILE) or (
        event.get("type") in EVENTS
    )


class TimebackProfileChecker(Checker):
    """Collects the findings for one TimebackProfile (or AggregationProfile) event."""

    prefix = "timeback"

    def event(self, event: Mapping[str, Any]) -> None:
        kind, profile = event.get("type"), event.get("profile")
        rule = EVENTS.get(kind) if isinstance(kind, str) else None
        if rule is None:
            self.error(
                "/type",
                f"`{profile}` events are {' or '.join(EVENTS)}, not `{kind}`",
                "profile-event-type",
            )
            return
        if profile not in (TIMEBACK_PROFILE, AGGREGATION_PROFILE):
            self.error(
                "/profile",
                f"{kind} is an event of TimeBack's profile: `profile` must be "
                f"{TIMEBACK_PROFILE!r} (as the SDK sends it) or {AGGREGATION_PROFILE!r}",
                "profile",
            )
            return
        if event.get("action") != rule.action:
            self.error("/action", f"{kind}'s `action` must be {rule.action!r}", "action")
        if event.get("@context") != CALIPER_CONTEXT:
            self.error(
                "/@context",
                f"`@context` must be {CALIPER_CONTEXT}",
                "context",
            )
        if not valid_instant(event.get("eventTime")):
            self.error("/eventTime", f"`eventTime` must be {UTC_INSTANT_FORM}", "datetime")
        for slot in LOOSE_SLOTS:
            value = event.get(slot)
            if value is not None and not isinstance(value, str | dict):
                self.error(
                    f"/{slot}", f"must be an IRI or an object, not {kind_of(value)}", "entity"
                )
        self._optional_object("/extensions", event.get("extensions"))
        if profile == TIMEBACK_PROFILE:
            self._user(event.get("actor"))
            self._context(event.get("object"))
            self._metrics(event.get("generated"), rule)
        else:
            self._aggregation(event, rule)

    # -- TimebackProfile, as the SDK's types have it -----------------------------------------

    def _user(self, actor: Any) -> None:
        if not self._typed("/actor", actor, "TimebackUser"):
            return
        self._nonempty("/actor/email", actor.get("email"), "a TimebackUser needs an `email`")
        self._optional_string("/actor/name", actor.get("name"))
        role = actor.get("role")
        if role is not None and role not in USER_ROLES:
            self.error("/actor/role", f"`role` must be one of {', '.join(USER_ROLES)}", "term")
        self._optional_object("/actor/extensions", actor.get("extensions"))

    def _context(self, obj: Any) -> None:
        if not self._typed("/object", obj, "TimebackActivityContext"):
            return
        if obj.get("subject") not in SUBJECTS:
            self.error(
                "/object/subject",
                f"`subject` must be one of {', '.join(SUBJECTS)}",
                "subject",
            )
        self._named("/object/app", obj.get("app"), required=True)
        self._named("/object/course", obj.get("course"), required=False)
        self._named("/object/activity", obj.get("activity"), required=False)
        process = obj.get("process")
        if process is not None and not isinstance(process, bool):
            self.error("/object/process", "`process` must be true or false", "type")
        self._optional_object("/object/extensions", obj.get("extensions"))

    def _named(self, path: str, value: Any, required: bool) -> None:
        """The app, course or activity of a context: a `name`, an optional `id`."""
        if value is None and not required:
            return
        if not isinstance(value, dict):
            self.error(path, f"must be an object with a `name`, not {kind_of(value)}", "type")
            return
        self._nonempty(f"{path}/name", value.get("name"), "a `name` is required")
        self._optional_string(f"{path}/id", value.get("id"))
        self._optional_object(f"{path}/extensions", value.get("extensions"))

    def _metrics(self, generated: Any, rule: ProfileEvent) -> None:
        if not self._typed("/generated", generated, rule.collection):
            return
        attempt = generated.get("attempt")
        if attempt is not None and not (_integer(attempt) and attempt >= 1):
            self.error("/generated/attempt", "`attempt` must be an integer >= 1", "attempt")
        self._optional_object("/generated/extensions", generated.get("extensions"))
        items = generated.get("items")
        if not isinstance(items, list):
            self.error("/generated/items", "`items` must be an array of metrics", "type")
            return
        for i, item in enumerate(items):
            path = f"/generated/items/{i}"
            if not isinstance(item, dict):
                self.error(path, f"a metric must be an object, not {kind_of(item)}", "type")
                continue
            if item.get("type") not in rule.metrics:
                self.error(
                    f"{path}/type", f"`type` must be one of {', '.join(rule.metrics)}", "metric"
                )
            self._value(f"{path}/value", item.get("value"), rule.max_value)
            for key in ("sub_type", "start_date", "end_date"):
                self._optional_string(f"{path}/{key}", item.get(key))
            self._optional_object(f"{path}/extensions", item.get("extensions"))

    # -- AggregationProfile, as the SDK's LearnWith.AI rewrite writes it -------------------

    def _aggregation(self, event: Mapping[str, Any], rule: ProfileEvent) -> None:
        self._typed("/actor", event.get("actor"), "Person")
        obj: Any = event.get("object")
        if self._typed("/object", obj, "AssignableDigitalResource"):
            part = obj.get("isPartOf")
            if part is not None and not (isinstance(part, dict) and part.get("type")):
                self.error("/object/isPartOf", "`isPartOf` must be a typed object", "type")
        generated: Any = event.get("generated")
        if not self._typed("/generated", generated, rule.aggregation_collection):
            return
        items = generated.get("items")
        if not isinstance(items, list):
            self.error("/generated/items", "`items` must be an array of metrics", "type")
            return
        for i, item in enumerate(items):
            path = f"/generated/items/{i}"
            if not self._typed(path, item, rule.aggregation_metric):
                continue
            metric = item.get("metricType")
            if not isinstance(metric, str) or metric[:1].lower() + metric[1:] not in rule.metrics:
                names = ", ".join(m[0].upper() + m[1:] for m in rule.metrics)
                self.error(f"{path}/metricType", f"`metricType` must be one of {names}", "metric")
            self._value(f"{path}/metricValue", item.get("metricValue"), rule.max_value)

    # -- pieces ----------------------------------------------------------------------------

    def _typed(self, path: str, value: Any, kind: str) -> bool:
        """An object of this `type` with a non-empty `id`; False when it is no object."""
        if not isinstance(value, dict):
            self.error(path, f"must be a {kind} object, not {kind_of(value)}", "type")
            return False
        if value.get("type") != kind:
            self.error(f"{path}/type", f"`type` must be {kind!r}", "type")
        self._nonempty(f"{path}/id", value.get("id"), "an `id` is required")
        return True

    def _nonempty(self, path: str, value: Any, message: str) -> None:
        if not isinstance(value, str) or not value:
            self.error(path, f"{message} (a non-empty string)", "required")

    def _optional_string(self, path: str, value: Any) -> None:
        if value is not None and not isinstance(value, str):
            self.error(path, f"must be a string, not {kind_of(value)}", "type")

    def _optional_object(self, path: str, value: Any) -> None:
        if value is not None and not isinstance(value, dict):
            self.error(path, f"must be a JSON object, not {kind_of(value)}", "type")

    def _value(self, path: str, value: Any, maximum: float | None) -> None:
        if not (isinstance(value, int | float) and not isinstance(value, bool)) or value < 0:
            self.error(path, "must be a number >= 0", "metric-value")
        elif maximum is not None and value > maximum:
            self.error(path, f"must be at most {maximum:g} (seconds in a day)", "metric-value")


def _integer(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)
