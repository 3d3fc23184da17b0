"""Caliper 1.2 and TimeBack validation: the reference's samples and the IMS fixtures are
valid; a minimal change that breaks one rule is reported with that rule and path."""

from __future__ import annotations

import copy
import json
import re
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from caliper_sidecar.tools.samples import sample_events
from caliper_sidecar.validation import caliper as caliper_rules
from caliper_sidecar.validation import validate_events
from caliper_sidecar.validation.caliper import IRI, is_iri
from caliper_sidecar.validation.shape import events_of

from .conftest import SHARED, sdk_events

FIXTURES = SHARED / "caliper-fixtures" / "v1p2"
REFERENCE = SHARED / "timeback-caliper-events.txt"
needs_shared = pytest.mark.skipif(not SHARED.is_dir(), reason="../shared is absent")

Event = dict[str, Any]
# Indexes into sample_events(): one student's lesson, in the reference's order.
ASSIGNABLE_STARTED, ASSESSMENT_STARTED, ITEM_STARTED, ITEM_COMPLETED, QUESTION_GRADED = range(5)
ASSESSMENT_SUBMITTED, VIEWED, ASSIGNABLE_COMPLETED, MASTERY, XP = range(5, 10)


def reference_samples() -> list[Event]:
    """The JSON samples of the TimeBack reference, placeholders replaced by real UUIDs (the
    same placeholder always becomes the same UUID, so references between entities hold)."""
    text = REFERENCE.read_text()
    text = re.sub(
        r"urn:uuid:([a-z][a-z0-9-]*)",
        lambda m: f"urn:uuid:{uuid.uuid5(uuid.NAMESPACE_URL, m.group(1))}",
        text,
    )
    decoder = json.JSONDecoder()
    samples = []
    for match in re.finditer(r"^\{$", text, re.MULTILINE):
        sample, _ = decoder.raw_decode(text, match.start())
        samples.append(sample)
    return samples


def fixtures(prefix: str) -> list[Path]:
    return sorted(FIXTURES.glob(f"{prefix}*.json")) if FIXTURES.is_dir() else []


class TestValidDocuments:
    @needs_shared
    def test_every_timeback_reference_sample_is_valid(self) -> None:
        """Every sample payload of the reference passes the timeback profile, warning-free."""
        samples = reference_samples()
        assert samples  # however many the reference holds: it may gain some
        report = validate_events(samples, profile="timeback")
        assert report.errors == []
        assert report.warnings == []

    def test_built_in_samples_are_valid(self) -> None:
        report = validate_events(sample_events(), profile="timeback")
        assert (report.errors, report.warnings) == ([], [])

    @needs_shared
    @pytest.mark.parametrize("path", fixtures("caliperEvent"), ids=lambda p: p.stem)
    def test_ims_event_fixtures_are_valid(self, path: Path) -> None:
        report = validate_events([json.loads(path.read_text())], profile="caliper")
        assert report.errors == []

    @needs_shared
    @pytest.mark.parametrize("path", fixtures("caliperEnvelope"), ids=lambda p: p.stem)
    def test_ims_envelope_fixtures_are_valid(self, path: Path) -> None:
        """Event-only envelopes pass as the receiver sees them; mixed ones as `validate` does."""
        items = events_of(json.loads(path.read_text()))
        events_only = all("action" in item for item in items)
        report = validate_events(items, profile="caliper", allow_entities=not events_only)
        assert report.errors == []

    @needs_shared
    @pytest.mark.parametrize(
        "path",
        [
            p
            for p in fixtures("caliperEntity")
            if "Selector" not in p.stem and "SystemIdentifier" not in p.stem
        ],
        ids=lambda p: p.stem,
    )
    def test_ims_entity_fixtures_are_valid_describes(self, path: Path) -> None:
        report = validate_events(
            [json.loads(path.read_text())], profile="caliper", allow_entities=True
        )
        assert report.errors == []


def base(index: int) -> Event:
    return sample_events()[index]


def tool_launch() -> Event:
    return {
        "@context": "http://purl.imsglobal.org/ctx/caliper/v1p2",
        "id": f"urn:uuid:{uuid.uuid4()}",
        "type": "ToolLaunchEvent",
        "actor": "https://example.edu/users/554433",
        "action": "Launched",
        "object": {"id": "https://tool.example.com", "type": "SoftwareApplication"},
        "eventTime": "2024-01-15T10:07:30.000Z",
        "federatedSession": {"id": "urn:uuid:" + str(uuid.uuid4()), "type": "LtiSession"},
    }


Mutation = Callable[[Event], Any]


def setter(*path: str | int, value: Any) -> Mutation:
    def mutate(event: Event) -> None:
        target: Any = event
        for part in path[:-1]:
            target = target[part]
        target[path[-1]] = value

    return mutate


def deleter(*path: str | int) -> Mutation:
    def mutate(event: Event) -> None:
        target: Any = event
        for part in path[:-1]:
            target = target[part]
        del target[path[-1]]

    return mutate


PERSON = {"id": "https://example.edu/users/1", "type": "Person"}
# (id, base event, mutation, profile, path, rule)
ERRORS: list[tuple[str, Callable[[], Event], Mutation, str, str, str]] = [
    (
        "no-context",
        lambda: base(VIEWED),
        deleter("@context"),
        "caliper",
        "/@context",
        "caliper.context",
    ),
    (
        "old-context",
        lambda: base(VIEWED),
        setter("@context", value="http://purl.imsglobal.org/ctx/caliper/v1p1"),
        "caliper",
        "/@context",
        "caliper.context",
    ),
    (
        "custom-key",
        lambda: base(VIEWED),
        setter("score", value=1),
        "caliper",
        "/score",
        "caliper.unknown-property",
    ),
    (
        "unknown-type",
        lambda: base(VIEWED),
        setter("type", value="OutcomeEvent"),
        "caliper",
        "/type",
        "caliper.event-type",
    ),
    (
        "unknown-action",
        lambda: base(VIEWED),
        setter("action", value="Glanced"),
        "caliper",
        "/action",
        "caliper.action-unknown",
    ),
    (
        "wrong-action",
        lambda: base(VIEWED),
        setter("action", value="Started"),
        "caliper",
        "/action",
        "caliper.action-not-allowed",
    ),
    (
        "graded-as-submitted",
        lambda: base(QUESTION_GRADED),
        setter("action", value="Submitted"),
        "caliper",
        "/action",
        "caliper.action-not-allowed",
    ),
    (
        "unknown-profile",
        lambda: base(VIEWED),
        setter("profile", value="ReadProfile"),
        "caliper",
        "/profile",
        "caliper.profile",
    ),
    (
        "no-zone",
        lambda: base(VIEWED),
        setter("eventTime", value="2024-01-15T11:15:00.000"),
        "caliper",
        "/eventTime",
        "caliper.datetime",
    ),
    (
        "not-utc",
        lambda: base(VIEWED),
        setter("eventTime", value="2024-01-15T11:15:00.000+02:00"),
        "caliper",
        "/eventTime",
        "caliper.datetime",
    ),
    (
        "ten-decimals",
        lambda: base(VIEWED),
        setter("eventTime", value="2024-01-15T11:15:00.0000000000Z"),
        "caliper",
        "/eventTime",
        "caliper.datetime",
    ),
    (
        "not-a-date",
        lambda: base(VIEWED),
        setter("eventTime", value="2024-02-30T11:15:00.000Z"),
        "caliper",
        "/eventTime",
        "caliper.datetime",
    ),
    (
        "extensions-array",
        lambda: base(VIEWED),
        setter("extensions", value=[1]),
        "caliper",
        "/extensions",
        "caliper.extensions",
    ),
    (
        "view-a-person",
        lambda: base(VIEWED),
        setter("object", value=PERSON),
        "caliper",
        "/object/type",
        "caliper.entity-type",
    ),
    (
        "edapp-a-person",
        lambda: base(VIEWED),
        setter("edApp", value=PERSON),
        "caliper",
        "/edApp/type",
        "caliper.entity-type",
    ),
    (
        "session-a-person",
        lambda: base(VIEWED),
        setter("session", value=PERSON),
        "caliper",
        "/session/type",
        "caliper.entity-type",
    ),
    (
        "actor-not-iri",
        lambda: base(VIEWED),
        setter("actor", value="student one"),
        "caliper",
        "/actor",
        "caliper.iri",
    ),
    (
        "actor-a-number",
        lambda: base(VIEWED),
        setter("actor", value=42),
        "caliper",
        "/actor",
        "caliper.entity-value",
    ),
    (
        "actor-anonymous-app",
        lambda: base(VIEWED),
        setter("actor", value="http://purl.imsglobal.org/caliper/SoftwareApplication"),
        "caliper",
        "/actor",
        "caliper.entity-type",
    ),
    (
        "entity-no-id",
        lambda: base(VIEWED),
        deleter("object", "id"),
        "caliper",
        "/object/id",
        "caliper.entity-id",
    ),
    (
        "entity-unknown-type",
        lambda: base(VIEWED),
        setter("object", "type", value="Article"),
        "caliper",
        "/object/type",
        "caliper.entity-type-unknown",
    ),
    (
        "name-a-number",
        lambda: base(VIEWED),
        setter("object", "name", value=5),
        "caliper",
        "/object/name",
        "caliper.string",
    ),
    (
        "bad-duration",
        lambda: base(VIEWED),
        setter("generated", "duration", value="15 minutes"),
        "caliper",
        "/generated/duration",
        "caliper.duration",
    ),
    (
        "count-float",
        lambda: base(VIEWED),
        setter("generated", "count", value=1.5),
        "caliper",
        "/generated/count",
        "caliper.integer",
    ),
    (
        "nested-datetime",
        lambda: base(VIEWED),
        setter("generated", "startedAtTime", value="yesterday"),
        "caliper",
        "/generated/startedAtTime",
        "caliper.datetime",
    ),
    (
        "nested-type",
        lambda: base(VIEWED),
        setter("generated", "assignee", value={"id": "https://a.example", "type": "Organization"}),
        "caliper",
        "/generated/assignee/type",
        "caliper.entity-type",
    ),
    (
        "deep-parent-type",
        lambda: base(VIEWED),
        setter("object", "isPartOf", "type", value="Thing"),
        "caliper",
        "/object/isPartOf/type",
        "caliper.entity-type-unknown",
    ),
    (
        "completed-generates-attempt",
        lambda: base(ITEM_COMPLETED),
        setter("generated", "type", value="Attempt"),
        "caliper",
        "/generated/type",
        "caliper.entity-type",
    ),
    (
        "launched-no-federated-session",
        tool_launch,
        deleter("federatedSession"),
        "caliper",
        "/federatedSession",
        "caliper.required",
    ),
    (
        "bad-id",
        lambda: base(VIEWED),
        setter("id", value="urn:uuid:1234"),
        "caliper",
        "/id",
        "id-urn-uuid",
    ),
    ("no-actor", lambda: base(VIEWED), deleter("actor"), "caliper", "/actor", "required"),
    (
        "actor-not-platform-id",
        lambda: base(VIEWED),
        setter("actor", value="https://learningapp.com/users/1"),
        "timeback-learnwith",
        "/actor",
        "timeback.actor-urn-uuid",
    ),
    (
        "no-edapp",
        lambda: base(VIEWED),
        deleter("edApp"),
        "timeback-learnwith",
        "/edApp",
        "timeback.edapp-required",
    ),
    (
        "edapp-url",
        lambda: base(VIEWED),
        setter("edApp", value="https://learningapp.com"),
        "timeback-learnwith",
        "/edApp",
        "timeback.edapp-urn-uuid",
    ),
    (
        "lesson-started-no-start",
        lambda: base(ASSIGNABLE_STARTED),
        deleter("generated", "startedAtTime"),
        "timeback",
        "/generated/startedAtTime",
        "timeback.attempt-started",
    ),
    (
        "lesson-started-no-attempt",
        lambda: base(ASSIGNABLE_STARTED),
        deleter("generated"),
        "timeback",
        "/generated",
        "timeback.attempt-required",
    ),
    (
        "score-type",
        lambda: base(QUESTION_GRADED),
        setter("generated", "scoreType", value="XPS"),
        "timeback",
        "/generated/scoreType",
        "timeback.score-type",
    ),
    (
        "score-as-iri",
        lambda: base(XP),
        setter("generated", value="urn:uuid:" + str(uuid.uuid4())),
        "timeback",
        "/generated",
        "timeback.score-required",
    ),
]

WARNINGS: list[tuple[str, Callable[[], Event], Mutation, str, str]] = [
    (
        "lesson-completed-no-end",
        lambda: base(ASSIGNABLE_COMPLETED),
        deleter("generated", "endedAtTime"),
        "/generated/endedAtTime",
        "timeback.attempt-ended",
    ),
    (
        "quiz-submitted-no-end",
        lambda: base(ASSESSMENT_SUBMITTED),
        deleter("generated", "endedAtTime"),
        "/generated/endedAtTime",
        "timeback.attempt-ended",
    ),
    (
        "quiz-started-no-start",
        lambda: base(ASSESSMENT_STARTED),
        deleter("generated", "startedAtTime"),
        "/generated/startedAtTime",
        "timeback.attempt-started",
    ),
    (
        "attempt-other-assignable",
        lambda: base(ASSIGNABLE_STARTED),
        setter("generated", "assignable", value="https://learningapp.com/lessons/other"),
        "/generated/assignable",
        "timeback.attempt-assignable",
    ),
    (
        "view-no-attempt",
        lambda: base(VIEWED),
        deleter("generated"),
        "/generated",
        "timeback.view-attempt",
    ),
    (
        "item-started-generated",
        lambda: base(ITEM_STARTED),
        setter("generated", value={"id": "urn:uuid:" + str(uuid.uuid4()), "type": "Attempt"}),
        "/generated",
        "timeback.item-started-generated",
    ),
    (
        "item-completed-attempt-iri",
        lambda: base(ITEM_COMPLETED),
        setter("generated", "attempt", value="urn:uuid:" + str(uuid.uuid4())),
        "/generated/attempt",
        "timeback.item-response",
    ),
    (
        "question-max-score",
        lambda: base(QUESTION_GRADED),
        setter("generated", "maxScore", value=2),
        "/generated/maxScore",
        "timeback.question-max-score",
    ),
    (
        "question-partial",
        lambda: base(QUESTION_GRADED),
        setter("generated", "scoreGiven", value=0.5),
        "/generated/scoreGiven",
        "timeback.question-score-given",
    ),
    (
        "unknown-entity-property",
        lambda: base(VIEWED),
        setter("object", "colour", value="red"),
        "/object/colour",
        "caliper.unknown-property",
    ),
]


class TestRules:
    @pytest.mark.parametrize(
        ("make", "mutate", "profile", "path", "rule"),
        [row[1:] for row in ERRORS],
        ids=[row[0] for row in ERRORS],
    )
    def test_breaking_one_rule_is_one_error(
        self, make: Callable[[], Event], mutate: Mutation, profile: str, path: str, rule: str
    ) -> None:
        """The base event is valid; the mutated one fails with exactly that path and rule."""
        event = make()
        assert validate_events([event], profile=profile).errors == []
        broken = copy.deepcopy(event)
        mutate(broken)
        errors = validate_events([broken], profile=profile).errors
        assert [(e.path, e.rule) for e in errors] == [(path, rule)]
        assert errors[0].index == 0
        assert errors[0].message

    @pytest.mark.parametrize(
        ("make", "mutate", "path", "rule"),
        [row[1:] for row in WARNINGS],
        ids=[row[0] for row in WARNINGS],
    )
    def test_should_rules_only_warn(
        self, make: Callable[[], Event], mutate: Mutation, path: str, rule: str
    ) -> None:
        """What the reference says *should* be: a warning, never an error."""
        event = make()
        mutate(event)
        report = validate_events([event], profile="timeback")
        assert report.errors == []
        assert [(w.path, w.rule) for w in report.warnings] == [(path, rule)]

    def test_session_is_a_learnwith_rule(self) -> None:
        """A missing `session` is a warning where LearnWith.AI is the upstream, and nothing for
        the other platforms."""
        event = base(VIEWED)
        del event["session"]
        learnwith = validate_events([event], profile="timeback-learnwith")
        assert learnwith.errors == []
        assert [(w.path, w.rule) for w in learnwith.warnings] == [
            ("/session", "timeback.session-auto-attach")
        ]
        assert validate_events([event], profile="timeback").warnings == []

    @pytest.mark.parametrize(
        "moment",
        [
            "2024-01-15T11:15:00Z",
            "2024-01-15T11:15:00.1Z",
            "2024-01-15T11:15:00.123456Z",
            "2024-01-15T11:15:00.123456789Z",
            "2024-01-15T11:15:00.000+00:00",
        ],
    )
    def test_any_utc_instant_is_a_time(self, moment: str) -> None:
        """Times are accepted as the platforms take them: any UTC instant, microseconds (as the
        SDK sends them) included."""
        event = base(VIEWED)
        event["eventTime"] = moment
        event["generated"]["endedAtTime"] = moment
        assert validate_events([event], profile="timeback").errors == []

    def test_datetime_message_gives_the_form(self) -> None:
        event = base(VIEWED)
        event["eventTime"] = "2024-01-15"
        (error,) = validate_events([event]).errors
        assert "2024-01-15T10:07:30.000Z" in error.message

    def test_caliper_profile_skips_timeback_rules(self) -> None:
        event = base(VIEWED)
        del event["edApp"]
        assert validate_events([event], profile="caliper").errors == []
        assert validate_events([event], profile="timeback").errors == []
        assert validate_events([event], profile="timeback-learnwith").errors

    def test_deep_nesting_is_an_error_not_a_crash(self) -> None:
        event = base(VIEWED)
        node = event["object"]
        for _ in range(100):
            node["isPartOf"] = {"id": "https://x.example/p", "type": "DigitalResource"}
            node = node["isPartOf"]
        assert any(e.rule == "caliper.depth" for e in validate_events([event]).errors)

    def test_entity_describe_is_not_an_event_at_the_door(self) -> None:
        entity = {"@context": "http://purl.imsglobal.org/ctx/caliper/v1p2", **PERSON}
        (error,) = validate_events([entity]).errors
        assert "entity describe" in error.message
        assert validate_events([entity], allow_entities=True).errors == []


class TestModes:
    def test_strict_rejects(self) -> None:
        event = base(VIEWED)
        event["action"] = "Started"
        assert validate_events([event], mode="strict").errors

    def test_warn_turns_rule_errors_into_warnings(self) -> None:
        event = base(VIEWED)
        event["action"] = "Started"
        report = validate_events([event], mode="warn")
        assert report.errors == []
        assert [w.rule for w in report.warnings] == ["caliper.action-not-allowed"]

    def test_structural_checks_apply_in_every_mode(self) -> None:
        event = base(VIEWED)
        event["id"] = "not-an-id"
        for mode in ("strict", "warn", "off"):
            assert [e.rule for e in validate_events([event], mode=mode).errors] == ["id-urn-uuid"]

    def test_off_keeps_only_structure(self) -> None:
        event = base(VIEWED)
        event["action"] = "Started"
        del event["edApp"]
        report = validate_events([event], mode="off")
        assert (report.errors, report.warnings) == ([], [])


def run_validate(*args: str, stdin: str = "") -> tuple[int, str]:
    import subprocess
    import sys

    out = subprocess.run(
        [sys.executable, "-m", "caliper_sidecar", "validate", *args],
        input=stdin,
        capture_output=True,
        text=True,
        check=False,
    )
    return out.returncode, out.stdout + out.stderr


class TestValidateCommand:
    def test_valid_file_exits_zero(self, tmp_path: Path) -> None:
        path = tmp_path / "events.json"
        path.write_text(json.dumps(sample_events()))
        code, out = run_validate(str(path))
        assert code == 0
        assert f"{path}: valid (10 item(s), 0 error(s), 0 warning(s))" in out
        assert "\033[" not in out  # no colour when not a terminal

    def test_invalid_stdin_exits_one_with_paths(self) -> None:
        event = base(VIEWED)
        event["eventTime"] = "2024-01-15T11:15:00"
        code, out = run_validate(stdin=json.dumps(event))
        assert code == 1
        assert "-: invalid" in out
        assert "error item 0 /eventTime:" in out
        assert "[caliper.datetime]" in out

    def test_json_lines_and_json_report(self, tmp_path: Path) -> None:
        events = sample_events()
        events[2]["type"] = "ReadingEvent"
        path = tmp_path / "events.jsonl"
        path.write_text("\n".join(json.dumps(e) for e in events))
        code, out = run_validate("--json", str(path))
        assert code == 1
        report = json.loads(out)
        assert report["valid"] is False
        (error,) = report["files"][0]["errors"]
        assert (error["index"], error["path"], error["rule"]) == (2, "/type", "caliper.event-type")

    def test_envelope_and_profile_option(self, tmp_path: Path) -> None:
        event = base(VIEWED)
        del event["edApp"]
        envelope = {
            "sensor": "https://a.example",
            "sendTime": "2024-01-15T10:07:30.000Z",
            "dataVersion": "http://purl.imsglobal.org/ctx/caliper/v1p2",
            "data": [event],
        }
        path = tmp_path / "envelope.json"
        path.write_text(json.dumps(envelope))
        assert run_validate("--profile", "timeback-learnwith", str(path))[0] == 1
        assert run_validate(str(path))[0] == 0
        assert run_validate("--profile", "caliper", str(path))[0] == 0

    def test_unreadable_and_malformed(self, tmp_path: Path) -> None:
        code, out = run_validate(str(tmp_path / "missing.json"))
        assert code == 1
        assert "cannot read the file" in out
        code, out = run_validate(stdin="{nope")
        assert code == 1
        assert "[shape]" in out

    @needs_shared
    def test_ims_fixtures_from_the_command_line(self) -> None:
        code, out = run_validate("--profile", "caliper", *map(str, fixtures("caliperEvent")))
        assert code == 0, out

    def test_colour_on_a_terminal(self, tmp_path: Path) -> None:
        """On a terminal the verdicts are coloured."""
        import os
        import pty
        import subprocess
        import sys

        path = tmp_path / "events.json"
        path.write_text(json.dumps(sample_events()[:1]))
        master, slave = pty.openpty()
        subprocess.run(
            [sys.executable, "-m", "caliper_sidecar", "validate", str(path)],
            stdout=slave,
            stderr=slave,
            check=False,
        )
        os.close(slave)
        output = os.read(master, 65536)
        os.close(master)
        assert b"\x1b[32mvalid\x1b[0m" in output


def sdk_event(kind: str) -> Event:
    """The first event of this type the SDK built (see tests/data/timeback-sdk-0.4.0)."""
    return copy.deepcopy(next(e for e in sdk_events() if e["type"] == kind))


# (id, event type, mutation, path, rule): each breaks one rule of the SDK's own types
SDK_ERRORS: list[tuple[str, str, Mutation, str, str]] = [
    (
        "metric-type",
        "ActivityEvent",
        setter("generated", "items", 0, "type", value="xp"),
        "/generated/items/0/type",
        "timeback.metric",
    ),
    (
        "negative-value",
        "ActivityEvent",
        setter("generated", "items", 0, "value", value=-1),
        "/generated/items/0/value",
        "timeback.metric-value",
    ),
    (
        "value-as-text",
        "ActivityEvent",
        setter("generated", "items", 0, "value", value="10"),
        "/generated/items/0/value",
        "timeback.metric-value",
    ),
    (
        "more-than-a-day",
        "TimeSpentEvent",
        setter("generated", "items", 0, "value", value=86401),
        "/generated/items/0/value",
        "timeback.metric-value",
    ),
    (
        "time-metric-type",
        "TimeSpentEvent",
        setter("generated", "items", 0, "type", value="idle"),
        "/generated/items/0/type",
        "timeback.metric",
    ),
    (
        "attempt-zero",
        "ActivityEvent",
        setter("generated", "attempt", value=0),
        "/generated/attempt",
        "timeback.attempt",
    ),
    (
        "subject",
        "ActivityEvent",
        setter("object", "subject", value="Art"),
        "/object/subject",
        "timeback.subject",
    ),
    ("no-email", "ActivityEvent", deleter("actor", "email"), "/actor/email", "timeback.required"),
    (
        "role",
        "ActivityEvent",
        setter("actor", "role", value="parent"),
        "/actor/role",
        "timeback.term",
    ),
    (
        "no-app-name",
        "TimeSpentEvent",
        deleter("object", "app", "name"),
        "/object/app/name",
        "timeback.required",
    ),
    (
        "empty-course-name",
        "ActivityEvent",
        setter("object", "course", value={"name": ""}),
        "/object/course/name",
        "timeback.required",
    ),
    (
        "empty-actor-id",
        "ActivityEvent",
        setter("actor", "id", value=""),
        "/actor/id",
        "timeback.required",
    ),
    (
        "wrong-action",
        "ActivityEvent",
        setter("action", value="Started"),
        "/action",
        "timeback.action",
    ),
    (
        "wrong-collection",
        "ActivityEvent",
        setter("generated", "type", value="TimebackTimeSpentMetricsCollection"),
        "/generated/type",
        "timeback.type",
    ),
    (
        "no-zone",
        "TimeSpentEvent",
        setter("eventTime", value="2024-01-15T10:30:00.123456"),
        "/eventTime",
        "timeback.datetime",
    ),
    (
        "actor-as-iri",
        "ActivityEvent",
        setter("actor", value="urn:uuid:x"),
        "/actor",
        "timeback.type",
    ),
]


class TestTimebackSdk:
    """The events TimeBack's official SDK builds (timeback-caliper 0.4.0)."""

    @pytest.mark.parametrize("platform", ["beyond-ai", "learnwith-ai"])
    def test_every_sdk_event_is_accepted(self, platform: str) -> None:
        """Every event the SDK sends, as built and in its LearnWith.AI form, passes the default
        profile."""
        assert validate_events(sdk_events(platform), profile="timeback").errors == []

    def test_sdk_events_are_not_caliper_1_2(self) -> None:
        """The caliper profile stays Caliper 1.2: TimeBack's own event types are not in it."""
        errors = validate_events([sdk_event("ActivityEvent")], profile="caliper").errors
        assert ("/type", "caliper.event-type") in [(e.path, e.rule) for e in errors]

    @pytest.mark.parametrize(
        ("kind", "mutate", "path", "rule"),
        [pytest.param(*case[1:], id=case[0]) for case in SDK_ERRORS],
    )
    def test_breaking_one_sdk_rule_is_one_error(
        self, kind: str, mutate: Mutation, path: str, rule: str
    ) -> None:
        """What the SDK's types refuse is refused, at the right place, and nothing else."""
        event = sdk_event(kind)
        assert validate_events([event]).errors == []
        mutate(event)
        errors = validate_events([event]).errors
        assert [(e.path, e.rule) for e in errors] == [(path, rule)]

    def test_sdk_extras_are_allowed(self) -> None:
        """The SDK's models allow extra properties, so the platform sees them: so do we."""
        event = sdk_event("ActivityEvent")
        event["actor"]["grade"] = 5
        event["object"]["unit"] = {"name": "fractions"}
        event["custom"] = True
        assert validate_events([event]).errors == []

    def test_learnwith_form_is_checked(self) -> None:
        """The LearnWith.AI form is checked too: a metric in it must be one the SDK knows."""
        event = copy.deepcopy(next(e for e in sdk_events("learnwith-ai") if "generated" in e))
        event["generated"]["items"][0]["metricType"] = "Bogus"
        errors = validate_events([event]).errors
        assert [(e.path, e.rule) for e in errors] == [
            ("/generated/items/0/metricType", "timeback.metric")
        ]


class TestIriMemo:
    """Checked IRIs are remembered (events repeat their actor, app and activity ids), and the
    memory stays bounded whatever a body holds."""

    def test_remembered_answers_are_the_same_answers(self) -> None:
        for value in ("https://example.edu/users/1", "not an iri", "urn:uuid:x", "a b:c"):
            first = is_iri(value)
            assert is_iri(value) == first == bool(IRI.fullmatch(value))

    def test_bounded_in_entries_and_length(self) -> None:
        for i in range(3 * caliper_rules._MEMO_ENTRIES):
            is_iri(f"https://example.edu/things/{i}")
        is_iri("https://example.edu/" + "x" * 10_000)
        assert len(caliper_rules._CHECKED_IRIS) <= caliper_rules._MEMO_ENTRIES
        assert all(len(k) <= caliper_rules._MEMO_LENGTH for k in caliper_rules._CHECKED_IRIS)
