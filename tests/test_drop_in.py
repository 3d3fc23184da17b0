"""TimeBack's API for apps using its SDK: tokens issued to apps, the Caliper answer, job status in
the SDK's shape, validation only, and each event's journey."""

from __future__ import annotations

import base64
from pathlib import Path
from typing import Any

import aiohttp
import msgspec
import pytest
from structlog.testing import capture_logs

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.config import Settings, load_settings
from caliper_sidecar.exceptions import ConfigError
from caliper_sidecar.http.auth import TOKEN_FAILURES_ALLOWED
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import eventually, make_event, sdk_envelopes, sdk_events, settings_for

SENDER = "app-token-1-abcdef"
JOB_STATES = {"waiting", "active", "completed", "failed"}


@pytest.fixture
def settings(platform: RunningFake, tmp_path: Path) -> Settings:
    return settings_for(platform, tmp_path, receiver={"tokens": (SENDER, "app-token-2-abcdef")})


def basic(client_id: str, secret: str) -> dict[str, str]:
    raw = base64.b64encode(f"{client_id}:{secret}".encode()).decode()
    return {"Authorization": f"Basic {raw}"}


async def app_token(client: aiohttp.ClientSession, secret: str = SENDER) -> str:
    """A token as TimeBack's SDK asks for one: client credentials with HTTP Basic."""
    async with client.post(
        "/auth/1.0/token",
        data={"grant_type": "client_credentials"},
        headers=basic("my-app", secret),
    ) as resp:
        assert resp.status == 200, await resp.text()
        body = await resp.json()
    assert body["token_type"] == "Bearer"
    assert body["expires_in"] > 60
    token: str = body["access_token"]
    return token


def bearer(token: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}"}


def parse_job_status(answer: dict[str, Any]) -> dict[str, Any]:
    """Read a job-status answer the way the SDK's `JobStatus` model does (its field names,
    its required ones, its literals); fails the test where the SDK would fail."""
    job = answer.get("job", answer)
    assert isinstance(job["id"], str)
    assert job["state"] in JOB_STATES
    value = job.get("returnValue")
    if value is not None:
        assert value["status"] in ("success", "error")
        for result in value.get("results", []):
            assert isinstance(result["allocatedId"], str)
            assert isinstance(result["externalId"], str)
    assert job.get("processedOn") is None or isinstance(job["processedOn"], str)
    return dict(job)


class TestTokens:
    async def test_sdk_token_flow(self, client: aiohttp.ClientSession) -> None:
        """An app gets a token with its sender token as client secret, and sends with it."""
        token = await app_token(client)
        async with client.post("/caliper/event", json=sdk_envelopes("beyond-ai")[0]) as resp:
            assert resp.status == 401
        async with client.post(
            "/caliper/event", json=sdk_envelopes("beyond-ai")[0], headers=bearer(token)
        ) as resp:
            assert resp.status == 200

    async def test_client_secret_in_the_form(self, client: aiohttp.ClientSession) -> None:
        """client_secret_post works too."""
        async with client.post(
            "/auth/1.0/token",
            data={
                "grant_type": "client_credentials",
                "client_id": "my-app",
                "client_secret": "app-token-2-abcdef",
                "scope": "https://purl.imsglobal.org/spec/caliper/v1p2/scope/events.write",
            },
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["scope"].endswith("events.write")

    @pytest.mark.parametrize("secret", ["wrong", "", "app-token-1-abcdefx"])
    async def test_wrong_secret_is_invalid_client(
        self, client: aiohttp.ClientSession, secret: str
    ) -> None:
        """A client secret that is not a sender token gets no token."""
        async with client.post(
            "/auth/1.0/token",
            data={"grant_type": "client_credentials"},
            headers=basic("my-app", secret),
        ) as resp:
            assert resp.status == 401
            assert (await resp.json())["error"] == "invalid_client"

    async def test_other_grants_are_refused(self, client: aiohttp.ClientSession) -> None:
        async with client.post(
            "/auth/1.0/token", data={"grant_type": "password"}, headers=basic("a", SENDER)
        ) as resp:
            assert resp.status == 400
            assert (await resp.json())["error"] == "unsupported_grant_type"

    async def test_forged_token_is_refused(self, client: aiohttp.ClientSession) -> None:
        """A token that looks issued but is not signed by a sender token is refused."""
        token = await app_token(client)
        forged = token.rsplit(".", 1)[0] + ".AAAA"
        async with client.post("/v1/events", json=make_event(), headers=bearer(forged)) as resp:
            assert resp.status == 401

    @pytest.mark.parametrize(
        "forged",
        [
            "cs1." + "9" * 5000 + ".a.b",  # more digits than int() takes: a ValueError once
            "cs1." + "9" * 30 + ".a.b",
            "cs1.1.a." + "A" * 100_000,
            "x" * 7000,
            "cs1..a.b",
            "cs1.-1.a.b",
        ],
    )
    async def test_a_forged_token_of_any_size_is_a_401(
        self, client: aiohttp.ClientSession, forged: str
    ) -> None:
        """A forged or malformed bearer of any size and shape is a 401 on every route that
        takes sender tokens, never a 500, and writes no traceback."""
        headers = bearer(forged)
        with capture_logs() as logs:
            for method, path, body in (
                ("POST", "/v1/events", make_event()),
                ("POST", "/caliper/event", make_event()),
                ("POST", "/caliper/event/validate", make_event()),
                ("GET", "/jobs/x/status", None),
                ("GET", "/v1/events/urn:uuid:x", None),
            ):
                async with client.request(method, path, json=body, headers=headers) as resp:
                    assert resp.status in (400, 401), (path, resp.status)
                    if resp.status == 400:  # aiohttp refuses a header over its line limit
                        assert len(forged) > 8000
        assert not [e for e in logs if e.get("exc_info") or e["log_level"] == "error"]

    async def test_issued_token_survives_a_restart(self, settings: Settings) -> None:
        """A token issued before a restart is still accepted after it, on every route; and no
        longer once its sender token is removed from the configuration."""
        first = await start(settings)
        try:
            async with aiohttp.ClientSession(base_url=first.url) as session:
                token = await app_token(session)
        finally:
            await first.stop()
        again = await start(settings)
        try:
            async with aiohttp.ClientSession(base_url=again.url) as session:
                async with session.post(
                    "/v1/events", json=make_event(), headers=bearer(token)
                ) as resp:
                    assert resp.status == 202
                async with session.get("/jobs/nope/status", headers=bearer(token)) as resp:
                    assert resp.status == 404  # authenticated: the job is what is missing
        finally:
            await again.stop()
        revoked = msgspec.structs.replace(
            settings,
            receiver=msgspec.structs.replace(settings.receiver, tokens=("app-token-2-abcdef",)),
        )
        third = await start(revoked)
        try:
            async with (
                aiohttp.ClientSession(base_url=third.url) as session,
                session.post("/v1/events", json=make_event(), headers=bearer(token)) as resp,
            ):
                assert resp.status == 401
        finally:
            await third.stop()


class TestCaliperAnswer:
    async def test_sdk_envelopes_are_answered_as_timeback_does(
        self, client: aiohttp.ClientSession, fake: Any
    ) -> None:
        """Every envelope the SDK sends is answered with a jobId and the count, the events
        reach the platform, and the job reads `completed`, in the SDK's JobStatus shape."""
        token = await app_token(client)
        jobs: dict[str, list[str]] = {}
        for envelope in sdk_envelopes("beyond-ai"):
            async with client.post("/caliper/event", json=envelope, headers=bearer(token)) as r:
                assert r.status == 200
                body = await r.json()
            assert body["status"] == "success"
            assert body["eventsAccepted"] == len(envelope["data"])
            jobs[body["jobId"]] = [e["id"] for e in envelope["data"]]
        await fake.wait_for({i for ids in jobs.values() for i in ids})
        for job, ids in jobs.items():

            async def completed(job: str = job) -> bool:
                async with client.get(f"/jobs/{job}/status", headers=bearer(token)) as r:
                    assert r.status == 200
                    return bool(parse_job_status(await r.json())["state"] == "completed")

            await eventually(completed)
            async with client.get(f"/jobs/{job}/status", headers=bearer(token)) as r:
                status = parse_job_status(await r.json())
            assert [x["externalId"] for x in status["returnValue"]["results"]] == ids
            assert status["returnValue"]["status"] == "success"
            assert status["processedOn"].endswith("Z")

    async def test_job_waits_while_the_platform_is_down(
        self, client: aiohttp.ClientSession, fake: Any
    ) -> None:
        """While the platform is unreachable the job reads `waiting`, then `active` once the
        sidecar has tried to send it."""
        fake.outage(60)
        token = await app_token(client)
        async with client.post("/caliper/v1p2", json=[make_event()], headers=bearer(token)) as resp:
            job = (await resp.json())["jobId"]

        async def state() -> str:
            async with client.get(f"/jobs/{job}/status", headers=bearer(token)) as r:
                return str(parse_job_status(await r.json())["state"])

        assert await state() in ("waiting", "active")
        await eventually(lambda: _is(state, "active"))

    async def test_job_fails_when_an_event_is_dead_lettered(
        self, client: aiohttp.ClientSession, fake: Any
    ) -> None:
        """An event the platform refuses fails its job, with the reason; its batch-mates are
        delivered."""
        good, bad = make_event(), make_event()
        fake.faults.refuse_ids.add(bad["id"])
        token = await app_token(client)
        async with client.post("/caliper/event", json=[good, bad], headers=bearer(token)) as resp:
            job = (await resp.json())["jobId"]

        async def failed() -> dict[str, Any] | None:
            async with client.get(f"/jobs/{job}/status", headers=bearer(token)) as r:
                status = parse_job_status(await r.json())
            return status if status["state"] == "failed" else None

        await eventually(failed)
        status = await failed()
        assert status is not None
        assert bad["id"] in status["failedReason"]
        assert "refused" in status["failedReason"]
        assert status["returnValue"]["status"] == "error"
        assert [r["externalId"] for r in status["returnValue"]["results"]] == [good["id"]]


async def _is(read: Any, expected: str) -> bool:
    return bool(await read() == expected)


class TestValidateOnly:
    async def test_valid_and_invalid(self, client: aiohttp.ClientSession, sidecar: Sidecar) -> None:
        """POST /caliper/event/validate answers success or error with the problems, and
        stores nothing."""
        token = await app_token(client)
        async with client.post(
            "/caliper/event/validate", json=sdk_envelopes("beyond-ai")[0], headers=bearer(token)
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "success"
        broken = sdk_events()[0]
        broken["generated"]["items"][0]["value"] = -3
        async with client.post(
            "/caliper/event/validate", json=broken, headers=bearer(token)
        ) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["status"] == "error"
        assert body["errors"][0]["path"] == "/generated/items/0/value"
        assert (await sidecar.outbox.stats()).events == 0

    async def test_needs_a_sender_token(self, client: aiohttp.ClientSession) -> None:
        async with client.post("/caliper/event/validate", json=make_event()) as resp:
            assert resp.status == 401


class TestJourney:
    async def test_an_events_journey(self, client: aiohttp.ClientSession, fake: Any) -> None:
        """GET /v1/events/{id} says where an event is: received, then delivered."""
        event = make_event()
        headers = {"Authorization": f"Bearer {SENDER}"}
        async with client.post("/v1/events", json=event, headers=headers) as resp:
            assert resp.status == 202
        await fake.wait_for({event["id"]})

        async def delivered() -> dict[str, Any] | None:
            async with client.get(f"/v1/events/{event['id']}", headers=headers) as resp:
                assert resp.status == 200
                body: dict[str, Any] = await resp.json()
            return body if body["state"] == "delivered" else None

        await eventually(delivered)
        body = await delivered()
        assert body is not None
        assert body["received_at"].endswith("Z")
        assert body["delivered_at"] >= body["received_at"]
        assert body["attempts"] == 1  # the send that succeeded counts

    async def test_a_dead_letters_journey(self, client: aiohttp.ClientSession, fake: Any) -> None:
        """A dead-lettered event's journey says why, with the platform's status."""
        event = make_event()
        fake.faults.refuse_ids.add(event["id"])
        headers = {"Authorization": f"Bearer {SENDER}"}
        async with client.post("/v1/events", json=event, headers=headers) as resp:
            assert resp.status == 202

        async def dead() -> dict[str, Any] | None:
            async with client.get(f"/v1/events/{event['id']}", headers=headers) as resp:
                body: dict[str, Any] = await resp.json()
            return body if body["state"] == "dead_lettered" else None

        await eventually(dead)
        body = await dead()
        assert body is not None
        assert body["dead_letter"]["reason"] == "refused"
        assert body["dead_letter"]["status"] == 422

    async def test_unknown_event(self, client: aiohttp.ClientSession) -> None:
        headers = {"Authorization": f"Bearer {SENDER}"}
        async with client.get("/v1/events/urn:uuid:nope", headers=headers) as resp:
            assert resp.status == 404
        async with client.get("/v1/events/urn:uuid:nope") as resp:
            assert resp.status == 401


class TestTokenEndpointAsClientsSendIt:
    @pytest.mark.parametrize("path", ["/auth/1.0/token", "/oauth2/token"])
    async def test_both_token_paths_answer(self, client: aiohttp.ClientSession, path: str) -> None:
        """The token endpoint answers at LearnWith.AI's path and at Beyond AI's (Cognito's
        `/oauth2/token`), so an app that changed only its token URL's host gets a token."""
        async with client.post(
            path, data={"grant_type": "client_credentials"}, headers=basic("app", SENDER)
        ) as resp:
            assert resp.status == 200, await resp.text()
            assert (await resp.json())["token_type"] == "Bearer"

    async def test_json_parameters_are_taken(self, client: aiohttp.ClientSession) -> None:
        """Parameters sent as a JSON object are read as the form's would be."""
        body = {"grant_type": "client_credentials", "client_id": "a", "client_secret": SENDER}
        async with client.post("/auth/1.0/token", json=body) as resp:
            assert resp.status == 200, await resp.text()
            token = (await resp.json())["access_token"]
        async with client.post("/v1/events", json=make_event(), headers=bearer(token)) as resp:
            assert resp.status == 202

    @pytest.mark.parametrize(
        ("body", "status", "error", "says"),
        [
            ({"client_id": "a", "client_secret": SENDER}, 400, "invalid_request", "missing"),
            (
                {"grant_type": "password", "client_secret": SENDER},
                400,
                "unsupported_grant_type",
                "'password'",
            ),
            ({"grant_type": "client_credentials"}, 401, "invalid_client", "no client secret"),
            (
                {"grant_type": "client_credentials", "client_secret": "nope"},
                401,
                "invalid_client",
                "one of the sidecar's sender tokens",
            ),
            ({"grant_type": ["client_credentials"]}, 400, "invalid_request", "JSON object"),
        ],
    )
    async def test_a_refusal_says_what_was_wrong(
        self,
        client: aiohttp.ClientSession,
        body: dict[str, Any],
        status: int,
        error: str,
        says: str,
    ) -> None:
        """A refused token request names the parameter at fault, in RFC 6749's shape and the
        sidecar's own (`message`)."""
        async with client.post("/oauth2/token", json=body) as resp:
            assert resp.status == status
            answer = await resp.json()
        assert answer["error"] == error
        assert says in answer["error_description"]
        assert answer["message"] == answer["error_description"]


class TestEveryAnswerIsJson:
    @pytest.mark.parametrize(
        ("method", "path", "status"),
        [
            ("GET", "/nowhere", 404),
            ("POST", "/caliper/v2", 404),
            ("GET", "/caliper/event", 405),
            ("DELETE", "/v1/events", 405),
            ("PUT", "/auth/1.0/token", 405),
        ],
    )
    async def test_unknown_routes_and_methods(
        self, client: aiohttp.ClientSession, method: str, path: str, status: int
    ) -> None:
        """An unknown route's 404 and a wrong method's 405 are JSON in the one error shape, so
        an SDK reports them instead of "Invalid JSON response"."""
        async with client.request(method, path) as resp:
            assert resp.status == status
            assert resp.content_type == "application/json"
            body = await resp.json()
        assert set(body) == {"error", "message"}
        assert body["error"] == {404: "not_found", 405: "method_not_allowed"}[status]
        if status == 405:
            assert resp.headers["Allow"]


class TestStoredEventsReadThrough:
    @pytest.fixture
    def settings(self, platform: RunningFake, tmp_path: Path) -> Settings:
        return settings_for(
            platform,
            tmp_path,
            receiver={"tokens": (SENDER,)},
            upstream={"endpoint": platform.beyond_url, "jobs_url": platform.jobs_url},
        )

    async def test_list_and_get_read_through_to_the_platform(
        self, client: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """`GET /caliper/events` and `/caliper/events/{id}` (the SDK's `events.list` and
        `events.get`) answer as the platform does, with the sidecar's own token."""
        token = await app_token(client)
        events = sdk_events("beyond-ai")
        async with client.post("/caliper/event", json=events, headers=bearer(token)) as resp:
            assert resp.status == 200
        await platform.fake.wait_for({e["id"] for e in events})
        async with client.get(
            "/caliper/events", params={"limit": "2", "offset": "1"}, headers=bearer(token)
        ) as resp:
            assert resp.status == 200, await resp.text()
            listing = await resp.json()
        assert [e["externalId"] for e in listing["events"]] == [e["id"] for e in events[1:3]]
        assert listing["pagination"]["total"] == len(events)
        async with client.get(f"/caliper/events/{events[0]['id']}", headers=bearer(token)) as resp:
            assert resp.status == 200
            assert (await resp.json())["event"]["externalId"] == events[0]["id"]
        async with client.get("/caliper/events/urn:uuid:unknown", headers=bearer(token)) as resp:
            assert resp.status == 404
            assert "not found" in (await resp.json())["error"]

    async def test_a_sender_token_is_needed(self, client: aiohttp.ClientSession) -> None:
        """The platform's events are read only for apps that may send."""
        async with client.get("/caliper/events") as resp:
            assert resp.status == 401

    async def test_an_unreachable_platform_is_a_json_503(
        self, client: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """When the platform cannot be reached, a JSON 503 says why."""
        token = await app_token(client)
        platform.fake.outage(30)
        async with client.get("/caliper/events", headers=bearer(token)) as resp:
            assert resp.status == 503
            body = await resp.json()
        assert body["error"] == "platform_unreachable"
        assert resp.headers["Retry-After"]


async def test_a_platform_without_a_listing_says_so(
    client: aiohttp.ClientSession,
) -> None:
    """Behind an endpoint that has no `/caliper/events` beside it, the listing is a JSON 404
    that says why."""
    token = await app_token(client)
    async with client.get("/caliper/events", headers=bearer(token)) as resp:
        assert resp.status == 404
        body = await resp.json()
    assert body["error"] == "not_available"


class TestTokenRequestsRefused:
    async def test_failures_are_counted_logged_and_slowed(
        self, client: aiohttp.ClientSession
    ) -> None:
        """Wrong client secrets are counted (a metric), logged without flooding (one line per
        episode, with the count), and an address that keeps failing is slowed down: answered
        429 with Retry-After, without its secret being checked, until its failures age out."""
        wrong = {"grant_type": "client_credentials"}
        statuses = []
        with capture_logs() as logs:
            for i in range(40):
                async with client.post(
                    "/auth/1.0/token", data=wrong, headers=basic("x", f"guess-{i}")
                ) as resp:
                    statuses.append(resp.status)
                    if resp.status == 429:
                        assert int(resp.headers["Retry-After"]) >= 1
                        assert (await resp.json())["error"] == "slow_down"
            async with client.post(
                "/auth/1.0/token", data=wrong, headers=basic("x", SENDER)
            ) as resp:
                assert resp.status == 429  # even the right secret waits: nothing is checked
        assert statuses[:TOKEN_FAILURES_ALLOWED] == [401] * TOKEN_FAILURES_ALLOWED
        assert set(statuses[TOKEN_FAILURES_ALLOWED:]) == {429}
        lines = [e for e in logs if e["event"] == "token_requests_refused"]
        assert 1 <= len(lines) <= 2
        async with client.get("/metrics") as resp:
            text = await resp.text()
        assert 'caliper_sidecar_token_requests_refused_total{reason="invalid_client"} ' in text
        assert 'caliper_sidecar_token_requests_refused_total{reason="slowed_down"} ' in text

    def test_short_sender_tokens_are_refused_at_start(self) -> None:
        """A sender token shorter than 16 characters is a configuration error naming it."""
        with pytest.raises(ConfigError, match="receiver.tokens: token 2 .* shorter than 16"):
            load_settings(None, environ={"SIDECAR_RECEIVER_TOKENS": "a-long-sender-token,short"})
