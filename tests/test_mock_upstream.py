"""`caliper-sidecar mock-upstream`: the fake TimeBack alone, for developing an app offline."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys
import time

import aiohttp

from caliper_sidecar.envelope import build_envelope
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import eventually, free_port, make_event, sdk_events


async def test_serves_prints_its_urls_and_stops_on_sigterm() -> None:
    """It prints the URLs it serves; the token endpoint issues tokens for the configured
    client, the Caliper endpoint takes an envelope with one, and SIGTERM stops it (exit 0)."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "caliper_sidecar",
        "mock-upstream",
        "--port",
        str(port),
        "--client-id",
        "app",
        "--client-secret",
        "s3cret",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.DEVNULL,
    )
    try:
        assert proc.stdout is not None
        banner = (await asyncio.wait_for(proc.stdout.readline(), 20)).decode()
        assert f"http://127.0.0.1:{port}" in banner
        lines = [(await asyncio.wait_for(proc.stdout.readline(), 5)).decode() for _ in range(4)]
        assert f"http://127.0.0.1:{port}/auth/1.0/token" in lines[0]
        assert "client_secret='s3cret'" in lines[0]
        assert f"http://127.0.0.1:{port}/caliper/v1p2" in lines[1]
        assert f"http://127.0.0.1:{port}/caliper/event " in lines[2]
        assert f"http://127.0.0.1:{port}/jobs/{{id}}/status" in lines[2]
        assert f"http://127.0.0.1:{port}/events/1.0/" in lines[3]
        base = f"http://127.0.0.1:{port}"
        async with aiohttp.ClientSession() as http:
            async with http.post(
                f"{base}/auth/1.0/token",
                data={"grant_type": "client_credentials"},
                headers={"Authorization": "Basic " + base64.b64encode(b"app:s3cret").decode()},
            ) as resp:
                assert resp.status == 200
                token = (await resp.json())["access_token"]
            event = make_event()
            async with http.post(
                f"{base}/events/1.0/",
                data=build_envelope("https://app.test/sensor", [json.dumps(event).encode()]),
                headers={"Content-Type": "application/json", "Authorization": f"Bearer {token}"},
            ) as resp:
                assert resp.status == 200
            async with http.get(f"{base}/_mock/events") as resp:
                assert (await resp.json())["ids"] == [event["id"]]
            auth = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
            sdk_event = sdk_events()[0]
            envelope = build_envelope("https://app.test/s", [json.dumps(sdk_event).encode()])
            async with http.post(f"{base}/caliper/v1p2", data=envelope, headers=auth) as resp:
                assert resp.status == 422  # LearnWith.AI takes TimeBack's profile in its form
            async with http.post(f"{base}/caliper/event", data=envelope, headers=auth) as resp:
                assert resp.status == 200
                answer = await resp.json()
            assert answer["eventsAccepted"] == 1

            async def completed() -> bool:
                async with http.get(f"{base}/jobs/{answer['jobId']}/status", headers=auth) as r:
                    return bool((await r.json())["job"]["state"] == "completed")

            await eventually(completed)
    finally:
        proc.send_signal(signal.SIGTERM)
        assert await asyncio.wait_for(proc.wait(), 20) == 0


async def test_a_platform_of_limited_capacity_queues_then_answers_429(
    platform: RunningFake,
) -> None:
    """`capacity` 2 and `capacity_queue` 2 (set over HTTP, as the drain benchmark does), six
    envelopes at once: two are served, two wait their turn (served a latency later), the last
    two are answered 429 with Retry-After at once."""
    fake = platform.fake
    fake.tokens["capacity-token"] = time.time() + 3600
    fake.request_log = []
    latency = 0.2
    async with aiohttp.ClientSession() as http:
        async with http.post(
            f"{platform.base_url}/_mock/faults",
            json={"capacity": 2, "capacity_queue": 2, "latency_ms": latency * 1000},
        ) as resp:
            assert resp.status == 200

        async def post() -> tuple[int, str | None]:
            async with http.post(
                platform.events_url,
                data=build_envelope("https://app.test/sensor", [json.dumps(make_event()).encode()]),
                headers={
                    "Content-Type": "application/json",
                    "Authorization": "Bearer capacity-token",
                },
            ) as resp:
                return resp.status, resp.headers.get("Retry-After")

        answers = await asyncio.gather(*(post() for _ in range(6)))
    assert sorted(answers, key=lambda a: a[0]) == [(200, None)] * 4 + [(429, "1")] * 2
    assert fake.most_at_once == 4
    assert fake.at_once == 0
    took = sorted(end - start for start, end, status in fake.request_log if status == 200)
    # The two served first took a latency; the two that waited for them, close to two (they
    # arrived a moment after them; a sleep is never short, so this holds on any machine).
    assert took[2] >= 1.5 * latency
    assert took[3] >= 1.5 * latency
