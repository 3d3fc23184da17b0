"""Run TimeBack's official Python SDK (timeback-caliper 0.4.0) against a running sidecar, every
call it has, and record each HTTP request it made and the answer it got.

Not part of the test suite (the SDK needs Python 3.12 and pydantic; the project must not depend
on it): the suite replays what this recorded (tests/test_sdk_calls.py). Run it by hand when the
reference SDK version changes, against a sidecar in front of the fake TimeBack:

    python3.12 -m venv /tmp/sdk && /tmp/sdk/bin/pip install timeback-caliper==0.4.0
    caliper-sidecar mock-upstream --port 8788 &
    SIDECAR_RECEIVER_TOKENS=sdk-app-token-0001 SIDECAR_UPSTREAM_PLATFORM=beyond-ai \\
      SIDECAR_UPSTREAM_ENDPOINT=http://127.0.0.1:8788/caliper/event \\
      SIDECAR_UPSTREAM_JOBS_URL='http://127.0.0.1:8788/jobs/{id}/status' \\
      SIDECAR_OAUTH_TOKEN_URL=http://127.0.0.1:8788/auth/1.0/token \\
      SIDECAR_OAUTH_CLIENT_ID=sidecar SIDECAR_OAUTH_CLIENT_SECRET=sidecar-secret \\
      SIDECAR_OUTBOX_PATH=/tmp/beyond.db caliper-sidecar run &
    /tmp/sdk/bin/python against_the_sidecar.py http://127.0.0.1:8787 beyond-ai

and the same with `learnwith-ai` (SIDECAR_UPSTREAM_PLATFORM=learnwith-ai, the endpoint
`…/caliper/v1p2`, no jobs URL). It writes `sdk-calls-<platform>.json` beside itself and prints
what each call returned; it exits 1 if a call that should work raised.
"""

import asyncio
import json
import sys
from pathlib import Path
from typing import Any

import httpx
from timeback_caliper import CaliperClient, CaliperEnvelope
from timeback_caliper.types.timeback import (
    ActivityCompletedInput,
    QuestionAnsweredInput,
    QuestionGradedInput,
    QuestionObjectInput,
    QuestionSeenInput,
    ResponseGeneratedInput,
    ScoreGeneratedInput,
    TimebackActivityContext,
    TimebackActivityMetric,
    TimebackApp,
    TimebackUser,
    TimeSpentInput,
    TimeSpentMetric,
)

HERE = Path(__file__).resolve().parent
SENSOR = "https://myapp.example.com/sensors/main"
STUDENT = "https://api.alpha-1edtech.ai/ims/oneroster/rostering/v1p2/users/123"
TOKEN = "sdk-app-token-0001"
RECORDED: list[dict[str, Any]] = []
CURRENT = {"call": ""}


def _body(content: bytes) -> Any:
    if not content:
        return None
    try:
        return json.loads(content)
    except ValueError:
        return content.decode(errors="replace")


def _redacted(body: Any) -> Any:
    if isinstance(body, dict) and "access_token" in body:
        return {**body, "access_token": "<redacted>"}
    return body


_send = httpx.AsyncClient.send


async def recording_send(self: httpx.AsyncClient, request: httpx.Request, **kw: Any) -> Any:
    response = await _send(self, request, **kw)
    await response.aread()
    headers = {
        k: ("<redacted>" if k in ("authorization",) else v)
        for k, v in request.headers.items()
        if k in ("content-type", "authorization")
    }
    RECORDED.append(
        {
            "call": CURRENT["call"],
            "request": {
                "method": request.method,
                "path": request.url.raw_path.decode(),
                "headers": headers,
                "body": _body(request.content),
            },
            "answer": {"status": response.status_code, "body": _redacted(_body(response.content))},
        }
    )
    return response


httpx.AsyncClient.send = recording_send  # type: ignore[method-assign]


def _first_sent_event() -> Any:
    sends = [
        r
        for r in RECORDED
        if r["request"]["method"] == "POST" and "data" in (r["request"]["body"] or {})
    ]
    return sends[-1]["request"]["body"]["data"][0]


async def call(name: str, coroutine: Any, failures: list[str], expect_error: bool = False) -> Any:
    CURRENT["call"] = name
    try:
        result = await coroutine
    except Exception as e:
        print(f"{name}: {type(e).__name__}: {e}")
        if not expect_error:
            failures.append(name)
        return None
    print(f"{name}: {str(result)[:160]}")
    return result


async def main(base_url: str, upstream: str) -> int:
    failures: list[str] = []
    for app_platform in ("BEYOND_AI", "LEARNWITH_AI"):
        # The token URL as each platform's app has it: LearnWith.AI's path, Beyond AI's
        # Cognito path; only the host changed to the sidecar's.
        token_path = "/auth/1.0/token" if app_platform == "LEARNWITH_AI" else "/oauth2/token"
        client = CaliperClient(
            platform=app_platform,  # type: ignore[arg-type]
            base_url=base_url,
            auth_url=base_url + token_path,
            client_id="my-app",
            client_secret=TOKEN,
        )
        tag = app_platform.lower()
        user = TimebackUser(id=STUDENT, email="student@example.edu")
        context = TimebackActivityContext(
            id="https://myapp.example.com/activities/123",
            subject="Math",
            app=TimebackApp(name="My Learning App"),
        )
        sent = [
            await call(
                f"{tag} events.send_activity",
                client.events.send_activity(
                    SENSOR,
                    ActivityCompletedInput(
                        actor=user,
                        object=context,
                        metrics=[TimebackActivityMetric(type="xpEarned", value=10)],
                    ),
                ),
                failures,
            ),
            await call(
                f"{tag} events.send_time_spent",
                client.events.send_time_spent(
                    SENSOR,
                    TimeSpentInput(
                        actor=user,
                        object=context,
                        metrics=[TimeSpentMetric(type="active", value=60)],
                    ),
                ),
                failures,
            ),
            await call(
                f"{tag} events.send_question_seen",
                client.events.send_question_seen(
                    SENSOR,
                    QuestionSeenInput(
                        actor="urn:uuid:student-123",
                        object=QuestionObjectInput(id="urn:uuid:q-456", name="2+2?"),
                        ed_app="https://myapp.example.com",
                    ),
                ),
                failures,
            ),
            await call(
                f"{tag} events.send_question_answered",
                client.events.send_question_answered(
                    SENSOR,
                    QuestionAnsweredInput(
                        actor="urn:uuid:student-123",
                        object=QuestionObjectInput(id="urn:uuid:q-456", name="2+2?"),
                        ed_app="https://myapp.example.com",
                        generated=ResponseGeneratedInput(
                            id="urn:uuid:response-789", attempt="urn:uuid:attempt-101"
                        ),
                    ),
                ),
                failures,
            ),
            await call(
                f"{tag} events.send_question_graded",
                client.events.send_question_graded(
                    SENSOR,
                    QuestionGradedInput(
                        actor="urn:uuid:student-123",
                        object="urn:uuid:attempt-101",
                        generated=ScoreGeneratedInput(
                            score_given=1, max_score=1, attempt="urn:uuid:attempt-101"
                        ),
                        ed_app="https://myapp.example.com",
                    ),
                ),
                failures,
            ),
        ]
        jobs = [s.job_id for s in sent if s is not None]
        if jobs:
            await call(f"{tag} jobs.get_status", client.jobs.get_status(jobs[0]), failures)
            for job in jobs:
                await call(
                    f"{tag} jobs.wait_for_completion",
                    client.jobs.wait_for_completion(job, timeout=30),
                    failures,
                )
        await call(
            f"{tag} events.validate",
            client.events.validate(
                CaliperEnvelope(
                    sensor=SENSOR,
                    sendTime="2024-01-15T10:00:00.000Z",
                    dataVersion="http://purl.imsglobal.org/ctx/caliper/v1p2",
                    data=[_first_sent_event()],
                )
            ),
            failures,
        )
        # The platform's own listing: Beyond AI has one, LearnWith.AI has none.
        listing = await call(
            f"{tag} events.list",
            client.events.list(limit=5),
            failures,
            expect_error=upstream != "beyond-ai",
        )
        if listing is not None and listing.events:
            await call(
                f"{tag} events.get",
                client.events.get(listing.events[0].external_id),
                failures,
            )
        else:
            await call(
                f"{tag} events.get",
                client.events.get("urn:uuid:00000000-0000-4000-8000-000000000000"),
                failures,
                expect_error=True,
            )
        await client.close()
    out = HERE / f"sdk-calls-{upstream}.json"
    note = {
        "sdk": "timeback-caliper 0.4.0, timeback-common 0.4.0 (Python 3.12)",
        "sidecar upstream.platform": upstream,
        "recorded by": "tests/data/timeback-sdk-0.4.0/against_the_sidecar.py",
    }
    out.write_text(json.dumps({"note": note, "calls": RECORDED}, indent=2) + "\n")
    print(f"{len(RECORDED)} requests recorded in {out}; failures: {failures or 'none'}")
    return 1 if failures else 0


sys.exit(asyncio.run(main(sys.argv[1], sys.argv[2])))
