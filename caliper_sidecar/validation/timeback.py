"""TimeBack's rules for standard Caliper events: its events reference on top of Caliper 1.2.

Where the reference (or the platform's authentication guide) says an event *must* be some way,
breaking it is an error: the platform would refuse or misattribute the event. Where it says
*should*, it is a warning, returned to the app and logged, never a rejection.

The reference is LearnWith.AI's: its identity rules (the actor and `edApp` as `urn:uuid:` ids,
`session` auto-attach) apply only when LearnWith.AI is the upstream (`learnwith`); Beyond AI and
the SDK's own events do without them.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Final

from caliper_sidecar.ids import UUID_URN
from caliper_sidecar.validation.issues import Checker

#: properties TimeBack adds to Caliper entities
EXTRA_PROPERTIES: Final[dict[str, dict[str, str]]] = {"Score": {"scoreType": "string"}}
SCORE_TYPES: Final = ("QUESTION_RESULT", "MASTERY", "XP")
AUTO_ATTACH: Final = "urn:tag:auto-attach"


def _id(value: Any) -> Any:
    """The IRI of an entity given as an object or as an IRI string."""
    return value.get("id") if isinstance(value, Mapping) else value


def _attempt(value: Any) -> Mapping[str, Any] | None:
    # Mappings: the rules run on parsed JSON and on decoder.Node alike.
    return value if isinstance(value, Mapping) and value.get("type") == "Attempt" else None


class TimeBackChecker(Checker):
    """Collects the TimeBack findings for one event at `index`."""

    prefix = "timeback"

    def __init__(self, index: int, learnwith: bool) -> None:
        super().__init__(index)
        self.learnwith = learnwith

    def event(self, event: Mapping[str, Any]) -> None:
        if self.learnwith:
            self._identities(event)
        kind, action = event.get("type"), event.get("action")
        generated = event.get("generated")
        if kind == "AssignableEvent" and action in ("Started", "Completed"):
            self._attempt_times(
                event, required_start=action == "Started", wants_end=action == "Completed"
            )
        elif kind == "AssessmentEvent" and action in ("Started", "Submitted"):
            self._attempt_times(event, required_start=False, wants_end=action == "Submitted")
        elif kind == "ViewEvent" and _attempt(generated) is None:
            self.warn(
                "/generated",
                "a ViewEvent should generate an Attempt with its timing",
                "view-attempt",
            )
        elif kind == "AssessmentItemEvent" and action == "Started" and "generated" in event:
            self.warn(
                "/generated",
                "an AssessmentItemEvent Started should not have `generated`",
                "item-started-generated",
            )
        elif kind == "AssessmentItemEvent" and action == "Completed":
            self._response(generated)
        elif kind == "GradeEvent":
            self._score(generated)
        if self.learnwith and "session" not in event:
            self.warn(
                "/session",
                f"`session` should be {AUTO_ATTACH!r}, so that TimeBack "
                "attaches the student's session",
                "session-auto-attach",
            )

    def _identities(self, event: Mapping[str, Any]) -> None:
        actor = _id(event.get("actor"))
        if isinstance(actor, str) and not UUID_URN.fullmatch(actor):
            self.error(
                "/actor",
                "`actor` must be the student's platform id, "
                "`urn:uuid:{platformId}` (the LTI `sub`)",
                "actor-urn-uuid",
            )
        if "edApp" not in event:
            self.error(
                "/edApp",
                "`edApp` is required: `urn:uuid:{appId}`, the id TimeBack assigned to the app",
                "edapp-required",
            )
        elif not (isinstance(_id(event["edApp"]), str) and UUID_URN.fullmatch(_id(event["edApp"]))):
            self.error(
                "/edApp",
                "`edApp` must be `urn:uuid:{appId}`, the id TimeBack assigned "
                "to the app; events with an unknown edApp are rejected",
                "edapp-urn-uuid",
            )

    def _attempt_times(
        self, event: Mapping[str, Any], required_start: bool, wants_end: bool
    ) -> None:
        attempt = _attempt(event.get("generated"))
        if attempt is None:
            message = "`generated` should be the student's Attempt, as an object"
            if required_start:
                self.error("/generated", message.replace("should", "must"), "attempt-required")
            else:
                self.warn("/generated", message, "attempt")
            return
        if "startedAtTime" not in attempt:
            if required_start:
                self.error(
                    "/generated/startedAtTime",
                    "the Attempt must include `startedAtTime`",
                    "attempt-started",
                )
            elif not wants_end:
                self.warn(
                    "/generated/startedAtTime",
                    "the Attempt should include `startedAtTime`",
                    "attempt-started",
                )
        if wants_end and "endedAtTime" not in attempt:
            self.warn(
                "/generated/endedAtTime",
                "the Attempt should include `endedAtTime`",
                "attempt-ended",
            )
        if "assignable" in attempt and _id(attempt["assignable"]) != _id(event.get("object")):
            self.warn(
                "/generated/assignable",
                "the Attempt's `assignable` should be the event's `object`",
                "attempt-assignable",
            )

    def _response(self, generated: Any) -> None:
        if not (isinstance(generated, Mapping) and generated.get("type") == "Response"):
            self.warn(
                "/generated",
                "an AssessmentItemEvent Completed should generate a Response embedding its Attempt",
                "item-response",
            )
            return
        attempt = _attempt(generated.get("attempt"))
        if attempt is None:
            self.warn(
                "/generated/attempt",
                "the Response should embed its Attempt as an object",
                "item-response",
            )
        elif "startedAtTime" not in attempt or "endedAtTime" not in attempt:
            self.warn(
                "/generated/attempt",
                "the Response's Attempt should have `startedAtTime` and `endedAtTime`",
                "item-response",
            )

    def _score(self, generated: Any) -> None:
        if not (isinstance(generated, Mapping) and generated.get("type") == "Score"):
            self.error("/generated", "a GradeEvent must generate a Score object", "score-required")
            return
        score_type = generated.get("scoreType")
        if score_type not in SCORE_TYPES:
            self.error(
                "/generated/scoreType",
                f"`scoreType` must be one of {', '.join(SCORE_TYPES)}",
                "score-type",
            )
        if score_type == "QUESTION_RESULT":
            if generated.get("maxScore") != 1:
                self.warn(
                    "/generated/maxScore",
                    "a QUESTION_RESULT's `maxScore` should be 1",
                    "question-max-score",
                )
            if generated.get("scoreGiven") not in (0, 1):
                self.warn(
                    "/generated/scoreGiven",
                    "a QUESTION_RESULT's `scoreGiven` should be 0 (incorrect) or 1 (correct)",
                    "question-score-given",
                )
