"""TimeBack's official Python SDK against the sidecar, replayed: every request the SDK
(timeback-caliper 0.4.0) made in a real run against the sidecar — tokens at both token paths,
each kind of send, job status, waiting for completion, validation, listing and getting the
platform's events — sent again to a sidecar in front of each platform, and answered as the SDK
was answered (status, and the fields it reads).

The recording is `tests/data/timeback-sdk-0.4.0/sdk-calls-<platform>.json`, made by
`against_the_sidecar.py` beside it; the SDK itself is not needed here."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.delivery.learnwith_form import rewrite_event
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SDK_DATA, eventually, settings_for

TOKEN = "sdk-app-token-0001"
PLATFORMS = ("beyond-ai", "learnwith-ai")


def recording(platform: str) -> list[dict[str, Any]]:
    calls: list[dict[str, Any]] = json.loads((SDK_DATA / f"sdk-calls-{platform}.json").read_text())[
        "calls"
    ]
    return calls


@pytest.fixture(params=PLATFORMS)
async def upstream(
    request: pytest.FixtureRequest, platform: RunningFake, tmp_path: Path
) -> AsyncIterator[tuple[str, Sidecar]]:
    name: str = request.param
    if name == "beyond-ai":
        upstream = {
            "platform": name,
            "endpoint": platform.beyond_url,
            "jobs_url": platform.jobs_url,
        }
    else:
        upstream = {"platform": name, "endpoint": platform.learnwith_url}
    sidecar = await start(
        settings_for(platform, tmp_path, receiver={"tokens": (TOKEN,)}, upstream=upstream)
    )
    yield name, sidecar
    await sidecar.stop()


def keys(body: Any) -> Any:
    """The shape of an answer: its keys, and those of the objects the SDK reads inside."""
    if not isinstance(body, dict):
        return type(body).__name__
    return {k: keys(v) if k in ("job", "event", "pagination") else None for k, v in body.items()}


async def test_every_recorded_sdk_call_is_answered_as_it_was(
    upstream: tuple[str, Sidecar], platform: RunningFake
) -> None:
    """Each request the SDK made gets the status it got then, and an answer with the same
    fields; the events reach the platform (in LearnWith.AI's form behind LearnWith.AI, metrics
    intact even when the app's SDK had rewritten them already), and every job completes."""
    name, sidecar = upstream
    jobs: dict[str, str] = {}  # recorded job id -> this run's
    token = ""
    sent: list[dict[str, Any]] = []
    async with aiohttp.ClientSession(base_url=sidecar.url) as client:
        for call in recording(name):
            request, answer = call["request"], call["answer"]
            path: str = request["path"]
            for recorded, ours in jobs.items():
                path = path.replace(recorded, ours)
            if path.startswith("/caliper/events"):
                # The platform lists what it received: in the recording, the SDK's waits for
                # its jobs gave it time; here the replay waits for the same.
                await platform.fake.wait_for({e["id"] for e in sent})
            headers = {"Content-Type": request["headers"]["content-type"]}
            body = request["body"]
            if path.endswith("/token"):
                basic = base64.b64encode(f"my-app:{TOKEN}".encode()).decode()
                headers["Authorization"] = f"Basic {basic}"
                data: Any = body.encode()
            else:
                headers["Authorization"] = f"Bearer {token}"
                data = None if body is None else json.dumps(body).encode()
            async with client.request(request["method"], path, data=data, headers=headers) as r:
                assert r.status == answer["status"], (call["call"], await r.text())
                got = await r.json()
            assert keys(got) == keys(answer["body"]), call["call"]
            if path.endswith("/token"):
                token = got["access_token"]
            elif request["method"] == "POST" and path == "/caliper/event":
                jobs[answer["body"]["jobId"]] = got["jobId"]
                sent += body["data"]

        async def all_completed() -> bool:
            for job in jobs.values():
                async with client.get(
                    f"/jobs/{job}/status", headers={"Authorization": f"Bearer {token}"}
                ) as r:
                    if (await r.json())["job"]["state"] != "completed":
                        return False
            return True

        await eventually(all_completed, timeout=20)
    assert len(jobs) == 10  # five kinds of send, by an app set to each platform
    fake = platform.fake
    await fake.wait_for({e["id"] for e in sent})
    for event in sent:
        arrived = fake.received[event["id"]]
        assert arrived == (rewrite_event(event) if name == "learnwith-ai" else event)
    if name == "learnwith-ai":
        xp = [
            fake.received[e["id"]]["generated"]["items"]
            for e in sent
            if e["type"] == "ActivityEvent"
        ]
        assert all(item["metricValue"] == 10 for items in xp for item in items)
