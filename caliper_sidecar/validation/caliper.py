"""The Caliper 1.2 rules: event properties, actions, entity types through the hierarchy, and
the value formats, applied recursively to every entity an event carries."""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from typing import Any, Final

from caliper_sidecar.validation.issues import Checker, kind_of, pointer
from caliper_sidecar.validation.moments import UTC_INSTANT_FORM, valid_instant
from caliper_sidecar.validation.vocabulary import (
    ACTIONS,
    ANONYMOUS_PREFIX,
    COMMON_SLOTS,
    CONTEXT,
    ENTITY_TYPES,
    EVENT_KEYS,
    EVENTS,
    PROFILES,
    REQUIRED_PROPERTIES,
    VOCABULARIES,
    ancestors,
    is_a,
    properties_of,
)

DURATION: Final = re.compile(
    r"P(?!$)(\d+(\.\d+)?Y)?(\d+(\.\d+)?M)?(\d+(\.\d+)?W)?(\d+(\.\d+)?D)?"
    r"(T(?=\d)(\d+(\.\d+)?H)?(\d+(\.\d+)?M)?(\d+(\.\d+)?S)?)?"
)
IRI: Final = re.compile(r"(?:[A-Za-z][A-Za-z0-9+.\-]*:|_:)[^\s<>\"{}|\\^`]+")
MAX_DEPTH: Final = 24
#: IRIs recently checked, and whether they are IRIs: an app's events repeat the same actor, app
#: and activity ids, and a lookup costs a tenth of the regular expression. Bounded in entries
#: and in the length of what is kept, so a hostile body cannot grow it.
_CHECKED_IRIS: dict[str, bool] = {}
_MEMO_ENTRIES: Final = 4096
_MEMO_LENGTH: Final = 256
ENTITY_SLOTS: Final = ("actor", "object", "generated", "target", "referrer")


def looks_like_event(item: Mapping[str, Any]) -> bool:
    """How an envelope item is classified: an event, or an entity describe."""
    kind = item.get("type")
    return (isinstance(kind, str) and kind in EVENTS) or "action" in item


def remembered(check: Callable[[str], bool], answers: dict[str, bool]) -> Callable[[str], bool]:
    """`check`, with its answers for short strings kept in `answers`, bounded in entries and in
    the length of what is kept, so that a hostile body cannot grow it."""

    def answer(value: str) -> bool:
        known = answers.get(value)
        if known is None:
            known = check(value)
            if len(value) <= _MEMO_LENGTH:
                if len(answers) >= _MEMO_ENTRIES:
                    answers.clear()
                answers[value] = known
        return known

    return answer


#: an absolute IRI (or a blank node id)
is_iri = remembered(lambda value: IRI.fullmatch(value) is not None, _CHECKED_IRIS)


def property_table(extra: Mapping[str, Mapping[str, str]]) -> dict[str, dict[str, str]]:
    """Every entity type's accepted properties, with those a profile adds to a type (TimeBack's
    `Score.scoreType`) merged in for it and its subtypes. Built once per profile."""
    table = {}
    for kind in ENTITY_TYPES:
        known = dict(properties_of(kind))
        for ancestor in ancestors(kind):
            known.update(extra.get(ancestor, {}))
        table[kind] = known
    return table


class CaliperChecker(Checker):
    """Collects the findings for one event (or entity describe) at `index`; `properties` is
    the profile's `property_table`."""

    prefix = "caliper"

    def __init__(self, index: int, properties: Mapping[str, Mapping[str, str]]) -> None:
        super().__init__(index)
        self.properties = properties

    # -- events ----------------------------------------------------------------------------

    def event(self, event: Mapping[str, Any]) -> None:
        self.context(event)
        for key in event:
            if key not in EVENT_KEYS:
                self.error(
                    pointer(key),
                    f"`{key}` is not a Caliper event property; custom data goes in `extensions`",
                    "unknown-property",
                )
        kind, action = event.get("type"), event.get("action")
        rule = EVENTS.get(kind) if isinstance(kind, str) else None
        if isinstance(kind, str) and rule is None:
            self.error("/type", f"`{kind}` is not a Caliper 1.2 event type", "event-type")
        if isinstance(action, str):
            if action not in ACTIONS:
                self.error("/action", f"`{action}` is not a Caliper action", "action-unknown")
            elif rule is not None and action not in rule.actions:
                self.error(
                    "/action",
                    f"{kind} does not allow `{action}`; it allows "
                    f"{', '.join(sorted(rule.actions))}",
                    "action-not-allowed",
                )
        profile = event.get("profile")
        if "profile" in event and (not isinstance(profile, str) or profile not in PROFILES):
            self.error("/profile", f"`{profile}` is not a Caliper 1.2 profile", "profile")
        if isinstance(event.get("eventTime"), str) and not valid_instant(event["eventTime"]):
            self.error("/eventTime", f"`eventTime` must be {UTC_INSTANT_FORM}", "datetime")
        if "extensions" in event and not isinstance(event["extensions"], dict):
            self.error("/extensions", "`extensions` must be a JSON object", "extensions")
        if rule is not None:
            narrowed = rule.by_action.get(action, {}) if isinstance(action, str) else {}
            for slot in ENTITY_SLOTS:
                allowed = narrowed.get(slot, getattr(rule, slot))
                if kind == "ViewEvent" and slot == "object" and profile == "GradingProfile":
                    allowed = (*allowed, "Result")
                if slot in event:
                    self.value("/" + slot, event[slot], allowed, 0)
        for slot, allowed in COMMON_SLOTS.items():
            if slot in event:
                self.value("/" + slot, event[slot], allowed, 0)
        if kind == "ToolLaunchEvent" and action == "Launched" and "federatedSession" not in event:
            self.error("/federatedSession", "Launched requires `federatedSession`", "required")
        if kind == "ResourceManagementEvent" and action == "Copied" and "generated" not in event:
            self.error("/generated", "Copied requires `generated` (the copy)", "required")

    def context(self, document: Mapping[str, Any]) -> None:
        if "@context" not in document:
            self.error("/@context", f"`@context` is required: {CONTEXT}", "context")
            return
        value = document["@context"]
        if isinstance(value, list):
            value = value[-1] if value else None
        if isinstance(value, dict):
            self.warn("/@context", "an inline `@context` object; use the 1.2 IRI", "context")
        elif value != CONTEXT:
            self.error(
                "/@context",
                f"`@context` must be {CONTEXT} (or an array ending with it)",
                "context",
            )

    # -- entities --------------------------------------------------------------------------

    def describe(self, entity: Mapping[str, Any]) -> None:
        """An entity sent on its own in an envelope."""
        self.context(entity)
        self.entity("", entity, ("Entity",), 0)

    def value(self, path: str, value: Any, allowed: tuple[str, ...], depth: int) -> None:
        """An entity slot: an object of an allowed type, or an IRI string."""
        if isinstance(value, str):
            if not is_iri(value):
                self.error(path, f"`{value[:80]}` is not an absolute IRI", "iri")
            elif value.startswith(ANONYMOUS_PREFIX):
                implied = value[len(ANONYMOUS_PREFIX) :]
                if implied in ENTITY_TYPES and not is_a(implied, allowed):
                    self.error(path, self._wrong_type(implied, allowed), "entity-type")
        elif isinstance(value, dict):
            self.entity(path, value, allowed, depth + 1)
        else:
            self.error(
                path,
                f"must be an entity object or an IRI string, not {kind_of(value)}",
                "entity-value",
            )

    def entity(
        self, path: str, entity: Mapping[str, Any], allowed: tuple[str, ...], depth: int
    ) -> None:
        if depth > MAX_DEPTH:
            self.error(path, f"entities nested deeper than {MAX_DEPTH}", "depth")
            return
        entity_id = entity.get("id")
        if entity_id is None:
            self.error(pointer_join(path, "id"), "an entity needs an `id`", "entity-id")
        elif not isinstance(entity_id, str) or not is_iri(entity_id):
            self.error(pointer_join(path, "id"), "an entity `id` must be an absolute IRI", "iri")
        kind = entity.get("type")
        if not isinstance(kind, str):
            self.error(pointer_join(path, "type"), "an entity needs a `type`", "entity-type")
            return
        if kind not in ENTITY_TYPES:
            self.error(
                pointer_join(path, "type"),
                f"`{kind}` is not a Caliper 1.2 entity type",
                "entity-type-unknown",
            )
            return
        if not is_a(kind, allowed):
            self.error(pointer_join(path, "type"), self._wrong_type(kind, allowed), "entity-type")
        known = self.properties[kind]
        for key, value in entity.items():
            if key in ("id", "type", "@context"):
                continue
            where = pointer_join(path, key)
            spec = known.get(key)
            if spec is None:
                self.warn(where, f"`{key}` is not a property of {kind}", "unknown-property")
            else:
                self.property(where, value, spec, depth)
        for key in REQUIRED_PROPERTIES.get(kind, ()):
            if key not in entity:
                self.error(pointer_join(path, key), f"{kind} requires `{key}`", "required")

    def property(self, path: str, value: Any, spec: str, depth: int) -> None:
        if spec.startswith("["):
            if not isinstance(value, list):
                self.error(path, f"must be an array, not {kind_of(value)}", "type")
                return
            for i, item in enumerate(value):
                self.value(pointer_join(path, i), item, (spec[1:-1],), depth)
        elif spec[0].isupper():
            self.value(path, value, (spec,), depth)
        elif spec in VOCABULARIES or spec == "roles":
            terms = VOCABULARIES[spec]
            values = value if spec == "roles" and isinstance(value, list) else [value]
            for term in values:
                # A term is a string: an object or an array here is refused, not hashed.
                if not isinstance(term, str):
                    self.error(path, f"must be a {spec} term, not {kind_of(term)}", "term")
                elif term not in terms:
                    self.error(path, f"`{term[:80]}` is not a Caliper {spec} term", "term")
        elif spec == "identifiers":
            self._identifiers(path, value)
        elif spec == "selector":
            self._selector(path, value)
        elif not _SCALARS[spec][0](value):
            self.error(path, f"must be {_SCALARS[spec][1]}, not {kind_of(value)}", spec)

    def _identifiers(self, path: str, value: Any) -> None:
        if not isinstance(value, list):
            self.error(path, "must be an array of SystemIdentifier objects", "type")
            return
        for i, item in enumerate(value):
            where = pointer_join(path, i)
            if not isinstance(item, dict) or item.get("type") != "SystemIdentifier":
                self.error(where, "must be a SystemIdentifier object", "type")
                continue
            if not isinstance(item.get("identifier"), str):
                self.error(pointer_join(where, "identifier"), "must be a string", "type")
            if item.get("identifierType") not in VOCABULARIES["identifier_type"]:
                self.error(
                    pointer_join(where, "identifierType"), "not a system identifier type", "term"
                )

    def _selector(self, path: str, value: Any) -> None:
        if not isinstance(value, dict) or value.get("type") != "TextPositionSelector":
            self.error(path, "must be a TextPositionSelector object", "type")
            return
        for key in ("start", "end"):
            if not _nonneg(value.get(key)):
                self.error(pointer_join(path, key), "must be an integer >= 0", "type")

    @staticmethod
    def _wrong_type(kind: str, allowed: tuple[str, ...]) -> str:
        return f"{kind} is not allowed here; expected {' or '.join(allowed)} (or a subtype)"


def pointer_join(path: str, part: str | int) -> str:
    """Extend a JSON pointer by one step (on the hot path: no work for plain keys)."""
    text = str(part)
    if "~" in text or "/" in text:
        return path + pointer(text)
    return f"{path}/{text}"


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _nonneg(v: Any) -> bool:
    return _integer(v) and v >= 0


_SCALARS: Final[dict[str, tuple[Any, str]]] = {
    "string": (lambda v: isinstance(v, str), "a string"),
    "datetime": (valid_instant, UTC_INSTANT_FORM),
    "duration": (
        lambda v: isinstance(v, str) and bool(DURATION.fullmatch(v)),
        "an ISO 8601 duration, like PT30M54S",
    ),
    "integer": (_integer, "an integer"),
    "nonneg": (_nonneg, "an integer >= 0"),
    "decimal": (lambda v: isinstance(v, int | float) and not isinstance(v, bool), "a number"),
    "boolean": (lambda v: isinstance(v, bool), "true or false"),
    "object": (lambda v: isinstance(v, dict), "a JSON object"),
    "strings": (
        lambda v: isinstance(v, list) and all(isinstance(s, str) for s in v),
        "an array of strings",
    ),
}
