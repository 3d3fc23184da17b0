"""The sample events of the TimeBack Caliper reference, for the demo, tests and benchmarks.

The reference's payloads use placeholders (`urn:uuid:student-platform-id`); here each one is
built with real UUIDs, so the events are valid as sent. One call is one student's session
through a lesson: started, viewed, assessed, graded, mastered, rewarded.
"""

from __future__ import annotations

import uuid
from typing import Any, Final

from caliper_sidecar.envelope import CALIPER_CONTEXT

CONTEXT: Final = CALIPER_CONTEXT
APP: Final = "https://learningapp.com"
LESSON: Final = f"{APP}/lessons/fractions-intro"
QUIZ: Final = f"{APP}/assessments/fractions-quiz"
QUESTION: Final = f"{APP}/questions/fraction-addition-q1"

_LESSON_ENTITY: Final = {
    "id": LESSON,
    "type": "AssignableDigitalResource",
    "mediaType": "curriculum/lesson",
    "name": "Introduction to Fractions",
}


def _urn() -> str:
    return f"urn:uuid:{uuid.uuid4()}"


def sample_events(
    student: str | None = None, app_id: str | None = None, day: str = "2024-01-15"
) -> list[dict[str, Any]]:
    """The ten sample payloads of the TimeBack reference, for one student, with fresh ids."""
    student = student or _urn()
    app_id = app_id or _urn()
    lesson_attempt, quiz_attempt, question_attempt, view_attempt = (_urn() for _ in range(4))

    def event(kind: str, action: str, obj: Any, at: str, generated: Any = None) -> dict[str, Any]:
        e: dict[str, Any] = {
            "@context": CONTEXT,
            "id": _urn(),
            "type": kind,
            "actor": student,
            "action": action,
            "object": obj,
        }
        if generated is not None:
            e["generated"] = generated
        e.update(eventTime=f"{day}T{at}.000Z", edApp=app_id, session="urn:tag:auto-attach")
        return e

    def attempt(
        id_: str, assignable: str, started: str, ended: str | None = None
    ) -> dict[str, Any]:
        a = {
            "id": id_,
            "type": "Attempt",
            "assignee": student,
            "assignable": assignable,
            "startedAtTime": f"{day}T{started}.000Z",
        }
        if ended:
            a["endedAtTime"] = f"{day}T{ended}.000Z"
        return a

    lesson = {
        **_LESSON_ENTITY,
        "isPartOf": {
            "id": f"{APP}/units/number-operations",
            "type": "AssignableDigitalResource",
            "mediaType": "curriculum/unit",
            "name": "Basic Number Operations",
        },
    }
    article = f"{APP}/articles/algebra-introduction"
    return [
        event(
            "AssignableEvent",
            "Started",
            lesson,
            "09:30:00",
            attempt(lesson_attempt, LESSON, "09:30:00"),
        ),
        event(
            "AssessmentEvent",
            "Started",
            {
                "id": QUIZ,
                "type": "Assessment",
                "name": "Fractions Quiz",
                "isPartOf": _LESSON_ENTITY,
            },
            "10:00:00",
            attempt(quiz_attempt, QUIZ, "10:00:00"),
        ),
        event(
            "AssessmentItemEvent",
            "Started",
            {
                "id": QUESTION,
                "type": "AssessmentItem",
                "name": "Fraction Addition Question 1",
                "isPartOf": {"id": QUIZ, "type": "Assessment", "name": "Fractions Quiz"},
            },
            "10:05:00",
        ),
        event(
            "AssessmentItemEvent",
            "Completed",
            QUESTION,
            "10:07:00",
            {
                "id": _urn(),
                "type": "Response",
                "attempt": attempt(question_attempt, QUESTION, "10:05:00", "10:07:00"),
            },
        ),
        event(
            "GradeEvent",
            "Graded",
            question_attempt,
            "10:07:30",
            {
                "id": _urn(),
                "type": "Score",
                "scoreType": "QUESTION_RESULT",
                "attempt": question_attempt,
                "maxScore": 1,
                "scoreGiven": 1,
            },
        ),
        event(
            "AssessmentEvent",
            "Submitted",
            QUIZ,
            "10:25:00",
            attempt(quiz_attempt, QUIZ, "10:00:00", "10:25:00"),
        ),
        event(
            "ViewEvent",
            "Viewed",
            {
                "id": article,
                "type": "DigitalResource",
                "name": "Introduction to Algebra",
                "mediaType": "text/html",
                "isPartOf": _LESSON_ENTITY,
            },
            "11:15:00",
            attempt(view_attempt, article, "11:00:00", "11:15:00"),
        ),
        event(
            "AssignableEvent",
            "Completed",
            LESSON,
            "11:20:00",
            attempt(lesson_attempt, LESSON, "09:30:00", "11:20:00"),
        ),
        _graded(event, "MASTERY", 100, student, maxScore=100),
        _graded(event, "XP", 150, student),
    ]


def _graded(event: Any, score_type: str, given: int, student: str, **extra: Any) -> dict[str, Any]:
    attempt_id = _urn()
    standard = {
        "id": f"{APP}/standards/fractions-basics",
        "type": "AssignableDigitalResource",
        "mediaType": "curriculum/standard",
        "name": "Basic Fractions Understanding",
    }
    score = {
        "id": _urn(),
        "type": "Score",
        "scoreType": score_type,
        "attempt": attempt_id,
        **extra,
        "scoreGiven": given,
    }
    obj = {"id": attempt_id, "type": "Attempt", "assignee": student, "assignable": standard}
    return dict(event("GradeEvent", "Graded", obj, "14:30:00", score))
