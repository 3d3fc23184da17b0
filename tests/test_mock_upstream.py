"""`caliper-sidecar mock-upstream`: the fake TimeBack alone, for developing an app offline."""

from __future__ import annotations

import asyncio
import base64
import json
import signal
import sys

import aiohttp

from caliper_sidecar.envelope import build_envelope

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
