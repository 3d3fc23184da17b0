"""Validation while parsing: msgspec types generated from the Caliper tables.

For every event type of `vocabulary.EVENTS` and every entity type of `vocabulary.PARENTS`, a
msgspec Struct is generated from the same tables the hand-written rules read (the properties
and their kinds, the actions, the entity types each slot allows through the hierarchy, the
controlled vocabularies). Decoding a body into them parses and checks it in one pass, in C;
the few rules a type cannot say (a date that does not exist, IRIs, the slots an action
narrows or requires) run after each Struct is built, and TimeBack's rules
(`timeback.TimeBackChecker`) run on the decoded events, which read as mappings.

The contract is one-sided: a body that decodes here is one the hand-written rules find no
error and no warning in. Anything else (an invalid event, a warning, the LearnWith.AI form of
TimeBack's profile, entities nested deeper than LEVELS, an IRI in Caliper's anonymous
namespace) is left to the hand-written rules, which build the answer, so error bodies and
warnings are theirs alone. A test runs both over every fixture and a stream of mutated events.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from functools import cache
from typing import TYPE_CHECKING, Annotated, Any, ClassVar, Final, Literal, Union

import msgspec

from caliper_sidecar.envelope import DATA_VERSION
from caliper_sidecar.ids import UUID_URN
from caliper_sidecar.validation.caliper import DURATION, is_iri, property_table, remembered
from caliper_sidecar.validation.moments import UTC_INSTANT
from caliper_sidecar.validation.profile_types import profile_events
from caliper_sidecar.validation.timeback import EXTRA_PROPERTIES, TimeBackChecker
from caliper_sidecar.validation.vocabulary import (
    ANONYMOUS_PREFIX,
    COMMON_SLOTS,
    CONTEXT,
    ENTITY_TYPES,
    EVENTS,
    PROFILES,
    REQUIRED_PROPERTIES,
    VOCABULARIES,
    EventRule,
    is_a,
)

#: how deep entities are decoded here (the hand-written rules allow MAX_DEPTH); deeper
#: entities fail to decode and go to the hand-written rules
LEVELS: Final = 6
#: bodies holding these go to the hand-written rules at once: the LearnWith.AI form of
#: TimeBack's profile has no generated form, and the `caliper` profile decodes none of it
PROFILE_MARKERS: Final = (b'"TimebackProfile"', b'"AggregationProfile"')


def _anchored(pattern: str, prefix: str = "") -> str:
    # msgspec matches with re.search; \Z, unlike $, refuses a trailing newline.
    return f"{prefix}^(?:{pattern})\\Z"


#: an IRI: decoded as a string, checked after decoding (see `_iri`), where the answers for the
#: ids an app repeats are remembered; a regular expression per string, run by msgspec, was most
#: of the decoding's cost
Iri = str
UuidUrn = Annotated[str, msgspec.Meta(pattern=_anchored(UUID_URN.pattern, "(?i)"))]
#: the form of a UTC instant; that the date exists is checked after decoding
Moment = Annotated[str, msgspec.Meta(pattern=_anchored(UTC_INSTANT.pattern))]
Duration = Annotated[str, msgspec.Meta(pattern=_anchored(DURATION.pattern))]
NonNegative = Annotated[int, msgspec.Meta(ge=0)]

SCALARS: Final[dict[str, Any]] = {
    "string": str,
    "datetime": Moment,
    "duration": Duration,
    "integer": int,
    "nonneg": NonNegative,
    "decimal": float,  # takes integers too, never booleans
    "boolean": bool,
    "object": dict[str, Any],
    "strings": list[str],
}


def _terms(vocabulary: str) -> Any:
    return Literal[tuple(sorted(VOCABULARIES[vocabulary]))]


class SystemIdentifier(msgspec.Struct):
    """What the rules check of an `otherIdentifiers` item (other keys are ignored there too)."""

    type: Literal["SystemIdentifier"]
    identifier: str
    identifierType: _terms("identifier_type")  # type: ignore[valid-type]


class TextPositionSelector(msgspec.Struct):
    type: Literal["TextPositionSelector"]
    start: NonNegative
    end: NonNegative


_UNSET: Final = msgspec.UNSET


class Node(msgspec.Struct, forbid_unknown_fields=True, gc=False):
    """A decoded event or entity; reads as a mapping of its JSON keys (for TimeBack's rules).

    Not tracked by the garbage collector (`gc=False`, inherited by every generated class): a
    decoded body is a tree, which holds no cycle, and a 100-event body made thousands of
    tracked objects, each counted toward the next young collection."""

    #: JSON key -> attribute, per generated class
    keys_to_attributes: ClassVar[dict[str, str]] = {}
    if TYPE_CHECKING:
        #: every generated class has it: an entity's IRI, an event's urn:uuid
        id: str

    def get(self, key: str, default: Any = None) -> Any:
        if key == "type":
            return self.__struct_config__.tag
        attribute = self.keys_to_attributes.get(key)
        value = _UNSET if attribute is None else getattr(self, attribute)
        return default if value is _UNSET else value

    def __getitem__(self, key: str) -> Any:
        value = self.get(key, msgspec.UNSET)
        if value is msgspec.UNSET:
            raise KeyError(key)
        return value

    def __contains__(self, key: object) -> bool:
        # `get` without its default, inline: TimeBack's rules ask this of every event
        if not isinstance(key, str):
            return False
        attribute = self.keys_to_attributes.get(key)
        if attribute is None:
            return key == "type"
        return getattr(self, attribute) is not _UNSET

    def keys(self) -> set[str]:
        return {key for key in self.keys_to_attributes if key in self} | {"type"}


Mapping.register(Node)


def _never(self: Node) -> None:
    raise ValueError("not an entity type")


#: in every entity slot's union beside the real types, never decoded: msgspec asks for the tag
#: (`type`) only when a union holds several tagged types, and an entity needs its `type`
_Untyped = msgspec.defstruct(
    "_Untyped", [], bases=(Node,), tag_field="type", tag="", namespace={"__post_init__": _never}
)


#: an absolute IRI outside Caliper's anonymous namespace (whose implied types the hand-written
#: rules check); the answers are looked up inline by the checks below, called only on a miss
_IRI_ANSWERS: dict[str, bool] = {}
_iri = remembered(
    lambda value: is_iri(value) and not value.startswith(ANONYMOUS_PREFIX), _IRI_ANSWERS
)


def _attribute(key: str) -> str:
    return key if key.isidentifier() else "x_" + re.sub(r"\W", "_", key)


def _optional(kind: Any) -> Any:
    return Union[kind, msgspec.UnsetType]  # noqa: UP007 - a runtime type expression


@dataclass(frozen=True, eq=False)  # hashed by identity, for the caches of its methods
class _Family:
    """The generated types for one property table (a validation profile's)."""

    name: str
    table: Mapping[str, Mapping[str, str]]

    def property_type(self, spec: str, level: int) -> Any:
        if spec.startswith("["):
            return list[self.slot((spec[1:-1],), level)]  # type: ignore[misc]
        if spec[0].isupper():
            return self.slot((spec,), level)
        if spec == "roles":
            return Union[list[_terms("roles")], _terms("roles")]  # type: ignore[misc]  # noqa: UP007
        if spec in VOCABULARIES:
            return _terms(spec)
        if spec == "identifiers":
            return list[SystemIdentifier]
        if spec == "selector":
            return TextPositionSelector
        return SCALARS[spec]

    def slot(self, allowed: tuple[str, ...], level: int) -> Any:
        """An entity slot: an IRI, or an object of an allowed type (or a subtype)."""
        if level > LEVELS:
            return Iri
        kinds = sorted(kind for kind in ENTITY_TYPES if is_a(kind, allowed))
        return Union[(Iri, _Untyped, *(self.entity(kind, level) for kind in kinds))]

    @cache  # noqa: B019 - a family lives as long as the process, and so do its types
    def entity(self, kind: str, level: int) -> type[Node]:
        required = REQUIRED_PROPERTIES.get(kind, ())
        fields: list[tuple[str, Any, Any]] = [("id", Iri, msgspec.NODEFAULT)]
        renamed = {"x_context": "@context"}
        moments = []
        iris = ["id"]
        iri_lists = []
        for key, spec in self.table[kind].items():
            name = _attribute(key)
            if name != key:
                renamed[name] = key
            kind_of_value = self.property_type(spec, level + 1)
            if key in required:
                fields.append((name, kind_of_value, msgspec.NODEFAULT))
            else:
                fields.append((name, _optional(kind_of_value), msgspec.UNSET))
            if spec == "datetime":
                moments.append(name)
            elif spec.startswith("["):
                iri_lists.append(name)
            elif spec[0].isupper():
                iris.append(name)
        fields.append(("x_context", Any, msgspec.UNSET))
        checks = _Checks(tuple(moments), tuple(iris), tuple(iri_lists))
        return _generate(f"{kind}{level}_{self.name}", kind, fields, renamed, checks)

    @cache  # noqa: B019
    def event(self, kind: str) -> type[Node]:
        rule = EVENTS[kind]
        fields: list[tuple[str, Any, Any]] = [
            ("x_context", Literal[CONTEXT], msgspec.NODEFAULT),
            ("id", UuidUrn, msgspec.NODEFAULT),
            ("action", Literal[tuple(sorted(rule.actions))], msgspec.NODEFAULT),
            ("actor", self.slot(rule.actor, 1), msgspec.NODEFAULT),
            ("object", self.slot(rule.object, 1), msgspec.NODEFAULT),
            ("eventTime", Moment, msgspec.NODEFAULT),
            ("profile", _optional(Literal[tuple(sorted(PROFILES))]), msgspec.UNSET),
            ("extensions", _optional(dict[str, Any]), msgspec.UNSET),
        ]
        for slot in ("generated", "target", "referrer"):
            fields.append((slot, _optional(self.slot(getattr(rule, slot), 1)), msgspec.UNSET))
        for slot, allowed in COMMON_SLOTS.items():
            fields.append((slot, _optional(self.slot(allowed, 1)), msgspec.UNSET))
        slots = ("actor", "object", "generated", "target", "referrer", *COMMON_SLOTS)
        checks = _Checks(("eventTime",), slots, (), rule)
        return _generate(f"{kind}_{self.name}", kind, fields, {"x_context": "@context"}, checks)


def _generate(
    class_name: str,
    tag: str,
    fields: list[tuple[str, Any, Any]],
    renamed: dict[str, str],
    checks: _Checks,
) -> type[Node]:
    """A Struct of these (attribute, type, default) fields; `renamed`: attribute -> JSON key,
    where the key is no Python name (`@context`)."""
    # Required fields first: msgspec, like dataclasses, wants them before those with defaults.
    ordered = sorted(fields, key=lambda f: f[2] is not msgspec.NODEFAULT)
    keys = {renamed.get(name, name): name for name, _, _ in fields}
    return msgspec.defstruct(  # type: ignore[return-value]  # a subclass of its base, Node
        class_name,
        [(n, k) if d is msgspec.NODEFAULT else (n, k, d) for n, k, d in ordered],
        bases=(Node,),
        tag_field="type",
        tag=tag,
        forbid_unknown_fields=True,
        rename=renamed,
        namespace={"keys_to_attributes": keys, "__post_init__": _after_decoding(tag, checks)},
    )


@dataclass(frozen=True)
class _Checks:
    """What a generated class checks once built: attributes holding times, IRIs (or
    entities), arrays of IRIs (or entities); for an event, its rule."""

    moments: tuple[str, ...]
    iris: tuple[str, ...]
    iri_lists: tuple[str, ...]
    rule: EventRule | None = None


def _after_decoding(kind: str, checks: _Checks) -> Any:
    """The checks no type says: real dates, IRIs, and for events the slots an action narrows
    and the slots an action requires. A ValueError is msgspec's cue that the body is invalid.

    It runs for every entity of every event (a third of a forwarding run's event loop went
    to validation), so each class gets its checks written out as Python source, attribute by
    attribute, as dataclasses writes its `__init__`: the same checks in the same order as a
    loop over the names did (a 100-event body: 10.5 -> 7.6 us an event, BENCHMARKS.md)."""
    lines = ["def check(self):"]
    for name in checks.moments:  # ValueError from fromisoformat: the date does not exist
        lines += [f"    v = self.{name}", "    if v is not unset:", "        moment(v[:19])"]
    for name in checks.iris:
        lines += [
            f"    v = self.{name}",
            "    if v.__class__ is str and not (answers.get(v) or iri(v)):",
            f"        raise ValueError({f'{name} is not an IRI'!r})",
        ]
    for name in checks.iri_lists:
        lines += [
            f"    for v in self.{name} or ():",
            "        if v.__class__ is str and not (answers.get(v) or iri(v)):",
            f"            raise ValueError({f'{name} holds what is not an IRI'!r})",
        ]
    if checks.rule is not None:
        lines.append("    rule(self)")
    lines.append("    return None")
    namespace: dict[str, Any] = {
        "unset": msgspec.UNSET,
        "moment": datetime.fromisoformat,
        "answers": _IRI_ANSWERS,
        "iri": _iri,
        "rule": _rule_check(kind, checks.rule) if checks.rule is not None else None,
    }
    exec("\n".join(lines), namespace)
    return namespace["check"]


def _rule_check(kind: str, rule: EventRule) -> Any:
    """An event's rule: the slots its action narrows, and the slots its action requires."""

    def check(self: Node) -> None:
        action = self.get("action")
        for slot, allowed in rule.by_action.get(action, {}).items():
            value = self.get(slot)
            if isinstance(value, Node) and not is_a(value.get("type"), allowed):
                raise ValueError(f"{slot} is not allowed for {action}")
        if kind == "ToolLaunchEvent" and action == "Launched" and "federatedSession" not in self:
            raise ValueError("Launched requires federatedSession")
        if kind == "ResourceManagementEvent" and action == "Copied" and "generated" not in self:
            raise ValueError("Copied requires generated")

    return check


class ProfileNode(Node, forbid_unknown_fields=False):
    """An event of TimeBack's own profile (`profile_types`): what its checks say is in its
    types, but that its time exists; like the SDK's models, it takes properties it does not
    name."""

    def __post_init__(self) -> None:
        datetime.fromisoformat(getattr(self, "eventTime")[:19])  # noqa: B009 - generated


@dataclass(frozen=True)
class Decoded:
    """A body that decoded here: its events, and the shape they came in."""

    events: list[Node]
    shape: str  # "array", "event" or "envelope"


class Decoder:
    """Decodes bodies for one validation profile (`timeback`, `timeback-learnwith`, `caliper`)."""

    def __init__(self, profile: str) -> None:
        self.timeback = profile != "caliper"
        self.learnwith = profile == "timeback-learnwith"
        family = _Family(
            profile.replace("-", "_"), property_table(EXTRA_PROPERTIES if self.timeback else {})
        )
        kinds: list[Any] = [family.event(kind) for kind in sorted(EVENTS)]
        if self.timeback:
            kinds += profile_events(ProfileNode, Moment, UuidUrn)
        # With the `timeback` profiles, only the LearnWith.AI form goes to the rules at once.
        self._markers = PROFILE_MARKERS[1:] if self.timeback else PROFILE_MARKERS
        event: Any = Union[tuple(kinds)]  # noqa: UP007
        self._event = msgspec.json.Decoder(event)
        events: Any = Annotated[list[event], msgspec.Meta(min_length=1)]
        self._array = msgspec.json.Decoder(events)
        envelope: Any = msgspec.defstruct(
            "Envelope",
            [
                ("sensor", str),
                ("sendTime", str),
                ("dataVersion", Literal[DATA_VERSION]),
                ("data", events),
            ],
            forbid_unknown_fields=True,
        )
        self._envelope = msgspec.json.Decoder(envelope)

    def decode(self, body: bytes) -> Decoded | None:
        """The events of a body in which the hand-written rules would find nothing to say;
        None when they must judge it."""
        if any(marker in body for marker in self._markers):
            return None
        decoded = self._decode(body)
        if decoded is not None and self.timeback and not self._timeback_clean(decoded.events):
            return None
        return decoded

    def _decode(self, body: bytes) -> Decoded | None:
        start = body.lstrip()[:1]
        try:
            if start == b"[":
                return Decoded(self._array.decode(body), "array")
            if start != b"{":
                return None
            if b'"dataVersion"' in body:
                return Decoded(self._envelope.decode(body).data, "envelope")
            return Decoded([self._event.decode(body)], "event")
        except (msgspec.MsgspecError, RecursionError):
            return None

    def _timeback_clean(self, events: list[Node]) -> bool:
        rules = TimeBackChecker(0, self.learnwith)  # one for the body: any finding ends it
        for event in events:
            if isinstance(event, ProfileNode):  # its own rules, all in its types
                continue
            rules.event(event)  # type: ignore[arg-type]
            if rules.errors or rules.warnings:
                return False
        return True


@cache
def decoder_for(profile: str) -> Decoder:
    """One decoder per validation profile per process (generating its types takes a while)."""
    return Decoder(profile)
