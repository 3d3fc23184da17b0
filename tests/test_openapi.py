"""The OpenAPI document: committed as served, and checked by schemathesis against a live
sidecar (no 5xx; every answer's status, content type and body as documented)."""

from __future__ import annotations

import asyncio
import re
import shutil
import sys
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from jsonschema import Draft202012Validator

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.http import openapi
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import (
    SidecarProcess,
    eventually,
    free_port,
    make_event,
    settings_for,
    write_config,
)

ROOT = Path(__file__).resolve().parents[1]


def test_every_route_is_documented() -> None:
    from caliper_sidecar.http import admin, cors, ingest, ops, timeback_api

    documented = {
        (method.upper(), path)
        for path, item in openapi.document()["paths"].items()
        for method in item
    }
    routes = ingest.routes() + timeback_api.routes() + ops.routes() + admin.routes()
    routes += cors.preflight_routes()
    # `{id:.+}` is the path `{id}` with what aiohttp lets it match
    served = {(r.method, re.sub(r"\{(\w+):[^}]+\}", r"{\1}", r.path)) for r in routes}
    assert served == documented


async def test_schemathesis_finds_nothing(
    platform: RunningFake, tmp_path: Path, processes: list[SidecarProcess]
) -> None:
    """A bounded schemathesis run (deterministic, a few examples per operation) against the
    real process: no server error, and every answer conforms to the document."""
    st = shutil.which("schemathesis", path=str(Path(sys.executable).parent))
    if st is None:
        pytest.skip("schemathesis (the test extra) is not installed")
    port = free_port()
    config = write_config(tmp_path / "c.toml", platform, tmp_path / "outbox.db", port)
    process = SidecarProcess(config, port, tmp_path / "run.log")
    processes.append(process)
    await process.wait_ready()
    async with aiohttp.ClientSession() as http, http.get(f"{process.url}/openapi.json") as r:
        assert r.status == 200
    proc = await asyncio.create_subprocess_exec(
        st,
        "run",
        f"{process.url}/openapi.json",
        "--checks",
        "not_a_server_error,status_code_conformance,content_type_conformance,"
        "response_schema_conformance",
        "--max-examples",
        "8",
        # a stream that never ends of itself (tests/test_tail.py follows it)
        "--exclude-path",
        "/v1/tail",
        "--generation-deterministic",
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
        cwd=tmp_path,
    )
    out, _ = await asyncio.wait_for(proc.communicate(), 120)
    report = out.decode(errors="replace")
    assert proc.returncode == 0, report[-4000:]
    assert '"status":500' not in process.logs()


def conforms(answer: Any, schema_name: str) -> None:
    """The answer matches the document's schema of that name (which forbids fields it does not
    describe): the document says every field every answer has."""
    document = openapi.document()
    schema = {"$ref": f"#/components/schemas/{schema_name}", "components": document["components"]}
    errors = [e.message for e in Draft202012Validator(schema).iter_errors(answer)]
    assert errors == [], f"{schema_name}: {errors} in {answer}"


class TestRealAnswersMatchTheDocument:
    async def test_journeys_in_every_state(self, platform: RunningFake, tmp_path: Path) -> None:
        """A journey in each state it can be in, as served, matches the Journey schema."""
        fake = platform.fake
        base = settings_for(platform, tmp_path)
        beyond = msgspec.structs.replace(
            base.upstream, endpoint=platform.beyond_url, jobs_url=platform.jobs_url
        )
        sidecar = await start(msgspec.structs.replace(base, upstream=beyond))
        seen: dict[str, dict[str, Any]] = {}
        try:
            async with aiohttp.ClientSession(base_url=sidecar.url) as client:

                async def journey(event_id: str) -> dict[str, Any]:
                    async with client.get(f"/v1/events/{event_id}") as resp:
                        assert resp.status == 200
                        body: dict[str, Any] = await resp.json()
                    seen[body["state"]] = body
                    return body

                fake.faults.stuck_jobs = True
                waiting, active = make_event(), make_event()
                fake.outage(0.5)
                async with client.post("/v1/events", json=[waiting]) as resp:
                    assert resp.status == 202
                await journey(waiting["id"])
                await fake.wait_for({waiting["id"]})
                await eventually(lambda: _in_state(journey, waiting["id"], "awaiting_confirmation"))
                fake.faults.stuck_jobs = False
                fake.faults.fail_job_ids = {active["id"]}
                envelope = {
                    "sensor": "urn:app:x",
                    "sendTime": "2024-01-15T10:00:00.000Z",
                    "dataVersion": "http://purl.imsglobal.org/ctx/caliper/v1p2",
                    "data": [active],
                }
                async with client.post("/caliper/event", json=envelope) as resp:
                    assert resp.status == 200
                await eventually(lambda: _in_state(journey, active["id"], "dead_lettered"))
                fake.faults.omit_job_id = True
                unconfirmed = make_event()
                async with client.post("/v1/events", json=unconfirmed) as resp:
                    assert resp.status == 202
                await eventually(lambda: _in_state(journey, unconfirmed["id"], "unconfirmed"))
                fake.faults.omit_job_id = False
                confirmed = make_event()
                async with client.post("/v1/events", json=confirmed) as resp:
                    assert resp.status == 202
                await eventually(lambda: _in_state(journey, confirmed["id"], "confirmed"))
                async with client.get("/v1/status") as resp:
                    conforms(await resp.json(), "Status")
        finally:
            await sidecar.stop()
        assert {"waiting", "awaiting_confirmation", "dead_lettered", "unconfirmed"} <= set(seen)
        for body in seen.values():
            conforms(body, "Journey")

    async def test_tokens_jobs_and_refusals(self, sidecar: Sidecar, fake: Any) -> None:
        """A token, a refused token request, a job status and a plain sidecar's status match
        their schemas."""
        async with aiohttp.ClientSession(base_url=sidecar.url) as client:
            form = {"grant_type": "client_credentials"}
            async with client.post("/oauth2/token", data=form) as resp:
                conforms(await resp.json(), "Token")
            async with client.post("/oauth2/token", data={"grant_type": "x"}) as resp:
                conforms(await resp.json(), "OAuthError")
            event = make_event()
            async with client.post("/caliper/event", json=event) as resp:
                job = (await resp.json())["jobId"]
            await fake.wait_for({event["id"]})
            async with client.get(f"/jobs/{job}/status") as resp:
                conforms(await resp.json(), "JobStatus")
            async with client.get("/v1/status") as resp:
                conforms(await resp.json(), "Status")
            async with client.get("/nowhere") as resp:
                conforms(await resp.json(), "Error")


async def _in_state(journey: Any, event_id: str, state: str) -> bool:
    return bool((await journey(event_id))["state"] == state)
