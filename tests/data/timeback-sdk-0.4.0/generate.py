"""Regenerate the SDK events in this folder with TimeBack's official Python SDK.

Not part of the test suite (the SDK needs Python 3.12 and pydantic; the project must not depend
on it). Run it by hand when the reference SDK version changes:

    python3.12 -m venv /tmp/sdk && /tmp/sdk/bin/pip install timeback-caliper==0.4.0
    /tmp/sdk/bin/python tests/data/timeback-sdk-0.4.0/generate.py

It calls the SDK's own `send_*` methods with a transport that records what would be posted:
`beyond-ai.json` holds the envelopes as the SDK posts them to Beyond AI (`/caliper/event`, events
as built), `learnwith-ai.json` the same sends to LearnWith.AI (`/caliper/v1p2`, after the SDK's
LWAI transformer). The metric item ids the transformer draws at random are kept as drawn.
"""

import asyncio
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

from timeback_caliper.resources.event_transformers import LwaiEventTransformer
from timeback_caliper.resources.events import EventsResource
from timeback_caliper.types.timeback import (
    ActivityCompletedInput,
    QuestionAnsweredInput,
    QuestionGradedInput,
    QuestionObjectInput,
    QuestionSeenInput,
    ResponseGeneratedInput,
    ScoreGeneratedInput,
    TimebackActivity,
    TimebackActivityContext,
    TimebackActivityMetric,
    TimebackApp,
    TimebackCourse,
    TimebackUser,
    TimeSpentInput,
    TimeSpentMetric,
)

HERE = Path(__file__).resolve().parent
SENSOR = "https://myapp.example.com/sensors/main"
STUDENT = "https://api.alpha-1edtech.ai/ims/oneroster/rostering/v1p2/users/123"


class Recorder:
    def __init__(self, send_path: str) -> None:
        self.paths = SimpleNamespace(send=send_path)
        self.posted: list[dict[str, Any]] = []

    async def post(self, path: str, payload: dict[str, Any]) -> dict[str, Any]:
        self.posted.append(payload)
        return {"jobId": f"job-{len(self.posted)}", "eventsAccepted": len(payload["data"])}


def user(**extra: Any) -> TimebackUser:
    return TimebackUser(id=STUDENT, email="student@example.edu", **extra)


def context(**extra: Any) -> TimebackActivityContext:
    return TimebackActivityContext(
        id="https://myapp.example.com/activities/123",
        subject="Math",
        app=TimebackApp(name="My Learning App"),
        **extra,
    )


async def sends(events: EventsResource) -> None:
    # The README's minimal activity: ids and times drawn by the SDK (microseconds).
    await events.send_activity(
        SENSOR,
        ActivityCompletedInput(
            actor=user(),
            object=context(),
            metrics=[
                TimebackActivityMetric(type="totalQuestions", value=10),
                TimebackActivityMetric(type="correctQuestions", value=8),
            ],
        ),
    )
    # Every option the builder takes.
    await events.send_activity(
        SENSOR,
        ActivityCompletedInput(
            id="urn:uuid:0d9a5a3c-6f1e-4f55-9b1a-3c1f0b6f6a01",
            actor=user(name="Jane Doe", role="student"),
            object=context(
                course=TimebackCourse(id="https://myapp.example.com/courses/alg", name="Algebra"),
                activity=TimebackActivity(name="Lesson 3"),
                process=True,
            ),
            metrics=[
                TimebackActivityMetric(type="xpEarned", value=1.5),
                TimebackActivityMetric(type="masteredUnits", value=1),
            ],
            attempt=2,
            eventTime="2024-01-15T10:30:00.123456Z",
            metricsId="urn:uuid:0d9a5a3c-6f1e-4f55-9b1a-3c1f0b6f6a02",
            edApp="https://myapp.example.com",
            session="urn:tag:auto-attach",
            extensions={"lessonType": "practice"},
            generatedExtensions={"pctComplete": 100},
        ),
    )
    await events.send_time_spent(
        SENSOR,
        TimeSpentInput(
            actor=user(),
            object=TimebackActivityContext(
                id="https://myapp.example.com/activities/123",
                subject="Reading",
                app=TimebackApp(name="My Learning App"),
            ),
            metrics=[
                TimeSpentMetric(type="active", value=1800),
                TimeSpentMetric(type="inactive", value=300),
            ],
        ),
    )
    await events.send_time_spent(
        SENSOR,
        TimeSpentInput(
            actor=user(),
            object=context(),
            metrics=[
                TimeSpentMetric(
                    type="active",
                    value=1800,
                    sub_type="reading",
                    start_date="2024-01-15T10:00:00Z",
                    end_date="2024-01-15T10:30:00Z",
                ),
                TimeSpentMetric(type="waste", value=12.5),
            ],
            eventTime="2024-01-15T10:30:00Z",
        ),
    )
    await events.send_question_seen(
        SENSOR,
        QuestionSeenInput(
            actor="urn:uuid:student-123",
            object=QuestionObjectInput(id="urn:uuid:q-456", name="What is 2+2?"),
            ed_app="https://myapp.example.com",
        ),
    )
    await events.send_question_answered(
        SENSOR,
        QuestionAnsweredInput(
            actor="urn:uuid:student-123",
            object=QuestionObjectInput(id="urn:uuid:q-456", name="What is 2+2?"),
            ed_app="https://myapp.example.com",
            generated=ResponseGeneratedInput(
                id="urn:uuid:response-789", attempt="urn:uuid:attempt-101"
            ),
        ),
    )
    await events.send_question_graded(
        SENSOR,
        QuestionGradedInput(
            actor="urn:uuid:student-123",
            object="urn:uuid:attempt-101",
            generated=ScoreGeneratedInput(
                score_given=1, max_score=1, attempt="urn:uuid:attempt-101"
            ),
            ed_app="https://myapp.example.com",
        ),
    )


async def main() -> None:
    beyond = Recorder("/caliper/event")
    await sends(EventsResource(beyond))  # type: ignore[arg-type]
    lwai = Recorder("/caliper/v1p2")
    await sends(EventsResource(lwai, LwaiEventTransformer()))  # type: ignore[arg-type]
    for name, recorder in (("beyond-ai.json", beyond), ("learnwith-ai.json", lwai)):
        (HERE / name).write_text(json.dumps(recorder.posted, indent=2) + "\n")


asyncio.run(main())
