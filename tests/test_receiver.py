"""The ingest routes: every status code docs/app-developers.md lists, and bad input that stores
nothing."""

from __future__ import annotations

import gzip
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import Sidecar
from caliper_sidecar.envelope import DATA_VERSION

from .conftest import StartSidecar, make_event, make_events


async def stored(sidecar: Sidecar) -> int:
    stats = await sidecar.outbox.stats()
    return stats.events + stats.delivered_total


class TestAccepted:
    async def test_single_event(self, client: aiohttp.ClientSession) -> None:
        """One event: 202 with the counts and its id, after the commit."""
        event = make_event()
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
            assert await resp.json() == {"accepted": 1, "duplicates": 0, "ids": [event["id"]]}

    async def test_array_and_duplicates(
        self, client: aiohttp.ClientSession, sidecar: Sidecar
    ) -> None:
        """A retried request is answered again with the events counted as duplicates."""
        events = make_events(3)
        async with client.post("/v1/events", json=events) as resp:
            assert (await resp.json())["accepted"] == 3
        async with client.post("/v1/events", json=events) as resp:
            body = await resp.json()
        assert resp.status == 202
        assert (body["accepted"], body["duplicates"]) == (0, 3)
        assert body["ids"] == [e["id"] for e in events]
        assert await stored(sidecar) == 3

    async def test_envelope_and_ld_json(self, client: aiohttp.ClientSession) -> None:
        """An envelope's events are taken; application/ld+json is accepted."""
        envelope = {
            "sensor": "https://app.test/s",
            "sendTime": "2024-01-15T10:07:30.000Z",
            "dataVersion": DATA_VERSION,
            "data": make_events(2),
        }
        async with client.post(
            "/v1/events",
            data=json.dumps(envelope),
            headers={"Content-Type": "application/ld+json; charset=utf-8"},
        ) as resp:
            assert resp.status == 202
            assert (await resp.json())["accepted"] == 2

    async def test_gzip(self, client: aiohttp.ClientSession) -> None:
        events = make_events(5)
        async with client.post(
            "/v1/events",
            data=gzip.compress(json.dumps(events).encode()),
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) as resp:
            assert resp.status == 202
            assert (await resp.json())["accepted"] == 5

    @pytest.mark.parametrize("path", ["/caliper/event", "/caliper/v1p2"])
    async def test_caliper_routes_answer_as_timeback(
        self, client: aiohttp.ClientSession, sidecar: Sidecar, path: str
    ) -> None:
        """POST /caliper/event and /caliper/v1p2 answer 200 {"status", "jobId",
        "eventsAccepted"}, as TimeBack's Caliper API does, after the commit."""
        async with client.post(path, json=make_events(2)) as resp:
            assert resp.status == 200
            body = await resp.json()
        assert body["status"] == "success"
        assert body["eventsAccepted"] == 2
        assert isinstance(body["jobId"], str)
        assert body["jobId"]
        assert await stored(sidecar) == 2

    async def test_event_content_is_kept(
        self, client: aiohttp.ClientSession, fake: Any, sidecar: Sidecar
    ) -> None:
        """What arrives upstream is the event as sent, unicode and numbers included."""
        event = make_event(extensions={"note": "élève 🎓", "n": 1.5, "big": 12345678901234567890})
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
        await fake.wait_for({event["id"]})
        assert fake.received[event["id"]] == event


class TestRejected:
    @pytest.mark.parametrize(
        ("body", "error"),
        [
            (b"{not json", "malformed_json"),
            (b"", "malformed_json"),
            (b"\xff\xfe", "malformed_json"),
            (b"[" * 100_000 + b"]" * 100_000, "malformed_json"),
            (b'"an event"', "malformed_request"),
            (b"42", "malformed_request"),
            (b"[]", "malformed_request"),
            (
                json.dumps({"sensor": "s", "sendTime": "t", "dataVersion": DATA_VERSION}).encode(),
                "invalid_events",  # no `data`: taken as a (broken) event
            ),
            (
                json.dumps(
                    {"sensor": "s", "sendTime": "t", "dataVersion": "v1p1", "data": [{}]}
                ).encode(),
                "malformed_envelope",
            ),
            (
                json.dumps(
                    {"sensor": "s", "sendTime": "t", "dataVersion": DATA_VERSION, "data": []}
                ).encode(),
                "malformed_envelope",
            ),
            (
                json.dumps(
                    {
                        "sensor": "s",
                        "sendTime": "t",
                        "dataVersion": DATA_VERSION,
                        "data": [{}],
                        "extra": 1,
                    }
                ).encode(),
                "malformed_envelope",
            ),
        ],
    )
    async def test_malformed(
        self, client: aiohttp.ClientSession, sidecar: Sidecar, body: bytes, error: str
    ) -> None:
        """Malformed JSON or shapes: a clear 400 (or 422), nothing stored, no 500."""
        async with client.post(
            "/v1/events", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == (422 if error == "invalid_events" else 400)
            assert (await resp.json())["error"] == error
        assert await stored(sidecar) == 0

    async def test_broken_gzip(self, client: aiohttp.ClientSession) -> None:
        async with client.post(
            "/v1/events",
            data=b"\x1f\x8b\x08\x00garbage",
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) as resp:
            assert resp.status == 400

    @pytest.mark.parametrize("content_type", ["text/plain", "application/x-www-form-urlencoded"])
    async def test_wrong_content_type(
        self, client: aiohttp.ClientSession, content_type: str
    ) -> None:
        async with client.post(
            "/v1/events", data=json.dumps(make_event()), headers={"Content-Type": content_type}
        ) as resp:
            assert resp.status == 415
            assert "application/json" in (await resp.json())["message"]

    async def test_invalid_event_rejects_the_whole_request(
        self, client: aiohttp.ClientSession, sidecar: Sidecar
    ) -> None:
        """One invalid event: 422 naming its index and path; its valid neighbours not stored."""
        events = make_events(3)
        events[1]["id"] = "not-a-urn"
        del events[2]["eventTime"]
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 422
            errors = (await resp.json())["errors"]
        assert {(e["index"], e["path"]) for e in errors} == {(1, "/id"), (2, "/eventTime")}
        assert all(e["message"] and e["rule"] for e in errors)
        assert await stored(sidecar) == 0

    @pytest.mark.parametrize(
        ("field", "value"),
        [("id", 5), ("type", ["ViewEvent"]), ("eventTime", None), ("actor", None)],
    )
    async def test_wrong_types(self, client: aiohttp.ClientSession, field: str, value: Any) -> None:
        async with client.post("/v1/events", json=make_event(**{field: value})) as resp:
            assert resp.status == 422
            assert (await resp.json())["errors"][0]["path"] == f"/{field}"

    async def test_non_object_event(self, client: aiohttp.ClientSession) -> None:
        async with client.post("/v1/events", json=[make_event(), 7]) as resp:
            assert resp.status == 422
            assert (await resp.json())["errors"][0]["index"] == 1


class TestLimits:
    async def test_body_too_large(self, custom: StartSidecar) -> None:
        """A body over max_body_bytes is refused with 413, whether announced or streamed."""
        sidecar, client = await custom(receiver={"max_body_bytes": 2000})
        big = json.dumps(make_events(10)).encode()
        async with client.post(
            "/v1/events", data=big, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 413

        async def chunks() -> AsyncIterator[bytes]:
            for i in range(0, len(big), 500):
                yield big[i : i + 500]

        async with client.post(
            "/v1/events", data=chunks(), headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 413
        assert await stored(sidecar) == 0

    async def test_gzip_bomb(self, custom: StartSidecar) -> None:
        """The limit applies to the decompressed body: a small gzip of a huge body is 413."""
        _, client = await custom(receiver={"max_body_bytes": 100_000})
        bomb = gzip.compress(b"[" + b" " * 50_000_000 + b"]")
        assert len(bomb) < 100_000
        async with client.post(
            "/v1/events",
            data=bomb,
            headers={"Content-Type": "application/json", "Content-Encoding": "gzip"},
        ) as resp:
            assert resp.status == 413

    async def test_too_many_events(self, custom: StartSidecar) -> None:
        _, client = await custom(receiver={"max_events_per_request": 3})
        async with client.post("/v1/events", json=make_events(4)) as resp:
            assert resp.status == 413
            assert "max_events_per_request" in (await resp.json())["message"]

    async def test_event_larger_than_an_envelope(self, custom: StartSidecar) -> None:
        """An event that could never fit an envelope is refused at the door, not later."""
        _, client = await custom(upstream={"batch_max_bytes": 3000})
        event = make_event(extensions={"blob": "x" * 4000})
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 413
            assert (await resp.json())["error"] == "event_too_large"

    async def test_outbox_full(self, custom: StartSidecar) -> None:
        """A full outbox answers 503 with Retry-After, and keeps what it had."""
        sidecar, client = await custom(
            outbox={"max_events": 2}, upstream={"endpoint": "http://127.0.0.1:9/unreachable"}
        )
        async with client.post("/v1/events", json=make_events(2)) as resp:
            assert resp.status == 202
        async with client.post("/v1/events", json=make_events(1)) as resp:
            assert resp.status == 503
            assert int(resp.headers["Retry-After"]) > 0
            assert (await resp.json())["error"] == "outbox_full"
        async with client.get("/readyz") as resp:
            assert resp.status == 503
            assert (await resp.json())["reason"] == "outbox_full"
        assert (await sidecar.outbox.stats()).events == 2


class TestAuthentication:
    @pytest.mark.parametrize(
        "header", [None, "Bearer wrong", "Basic YTpi", "Bearer", "bearer app-token-2x"]
    )
    async def test_missing_or_wrong_token(self, custom: StartSidecar, header: str | None) -> None:
        sidecar, client = await custom(receiver={"tokens": ("app-token-1", "app-token-2")})
        headers = {"Authorization": header} if header else {}
        async with client.post("/v1/events", json=make_event(), headers=headers) as resp:
            assert resp.status == 401
            assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert await stored(sidecar) == 0

    async def test_any_configured_token(self, custom: StartSidecar) -> None:
        _, client = await custom(receiver={"tokens": ("app-token-1", "app-token-2")})
        for token in ("app-token-1", "app-token-2"):
            async with client.post(
                "/v1/events", json=make_event(), headers={"Authorization": f"Bearer {token}"}
            ) as resp:
                assert resp.status == 202


class TestShutdown:
    async def test_not_accepting_answers_503(
        self, client: aiohttp.ClientSession, sidecar: Sidecar
    ) -> None:
        sidecar.runtime.accepting = False
        async with client.post("/v1/events", json=make_event()) as resp:
            assert resp.status == 503
            assert resp.headers["Retry-After"]
            assert (await resp.json())["error"] == "shutting_down"
        async with client.get("/readyz") as resp:
            assert resp.status == 503

    async def test_alive_after_bad_input(self, client: aiohttp.ClientSession) -> None:
        """Bad input never harms the process: it still serves."""
        for body in (b"\x00" * 1000, b"{" * 5000, b"null"):
            async with client.post(
                "/v1/events", data=body, headers={"Content-Type": "application/json"}
            ) as resp:
                assert resp.status < 500
        async with client.get("/healthz") as resp:
            assert resp.status == 200
        async with client.post("/v1/events", json=make_event()) as resp:
            assert resp.status == 202


class TestValidationModes:
    async def test_strict_rejects_with_rule_and_path(self, client: aiohttp.ClientSession) -> None:
        """Strict (the default): a rule broken anywhere rejects the request with 422."""
        events = make_events(2)
        events[1]["action"] = "Started"
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 422
            (error,) = (await resp.json())["errors"]
        assert error == {
            "index": 1,
            "path": "/action",
            "message": error["message"],
            "rule": "caliper.action-not-allowed",
        }

    async def test_warnings_come_back_in_the_202(self, client: aiohttp.ClientSession) -> None:
        event = make_event()
        del event["generated"]
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
            body = await resp.json()
        assert [w["rule"] for w in body["warnings"]] == ["timeback.view-attempt"]

    async def test_warn_mode_accepts_and_reports(self, custom: StartSidecar) -> None:
        _, client = await custom(validation={"mode": "warn"})
        event = make_event(action="Started")
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202
            body = await resp.json()
        assert body["accepted"] == 1
        assert [w["rule"] for w in body["warnings"]] == ["caliper.action-not-allowed"]

    async def test_off_mode_keeps_structure(self, custom: StartSidecar) -> None:
        _, client = await custom(validation={"mode": "off"})
        async with client.post("/v1/events", json=make_event(action="Started")) as resp:
            assert resp.status == 202
            assert "warnings" not in await resp.json()
        async with client.post("/v1/events", json=make_event(id="x")) as resp:
            assert resp.status == 422

    async def test_caliper_profile(self, custom: StartSidecar) -> None:
        """With profile caliper, TimeBack's own rules do not apply."""
        _, client = await custom(validation={"profile": "caliper"})
        event = make_event(actor="https://school.example/users/7")
        del event["edApp"]
        async with client.post("/v1/events", json=event) as resp:
            assert resp.status == 202


class TestJsonEdges:
    async def test_lone_surrogate_is_400_not_500(self, client: aiohttp.ClientSession) -> None:
        event = make_event(extensions={"note": "SURROGATE"})
        body = json.dumps(event).replace("SURROGATE", "\\ud800").encode()
        async with client.post(
            "/v1/events", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400
            assert "not valid Unicode" in (await resp.json())["message"]

    async def test_huge_integers_arrive_exactly(
        self, client: aiohttp.ClientSession, fake: Any
    ) -> None:
        """Integers beyond 64 bits are forwarded digit for digit, not rounded to floats."""
        event = make_event(extensions={"huge": 123456789012345678901234567890, "neg": -(2**70)})
        async with client.post(
            "/v1/events", data=json.dumps(event), headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 202
        await fake.wait_for({event["id"]})
        assert fake.received[event["id"]]["extensions"] == event["extensions"]

    async def test_events_are_forwarded_byte_for_byte(
        self, client: aiohttp.ClientSession, fake: Any
    ) -> None:
        """An event is stored and forwarded as the app wrote it: its spacing, escapes and
        number forms included (docs/guarantees.md: content unchanged), in an envelope of several."""
        events = [make_event(extensions={"n": i}) for i in range(2)]
        written = [
            json.dumps(e, indent=2).replace('"n": 0', '"n": 1.0E0').replace("urn", "\\u0075rn")
            for e in events
        ]
        body = "[ " + " ,\n".join(written) + " ]"
        async with client.post(
            "/v1/events", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 202, await resp.text()
        await fake.wait_for({e["id"] for e in events})
        for text in written:
            assert text.encode() in fake.last_raw_envelope

    async def test_nan_is_refused(self, client: aiohttp.ClientSession) -> None:
        body = json.dumps(make_event(extensions={"x": 1})).replace('"x": 1', '"x": NaN')
        async with client.post(
            "/v1/events", data=body, headers={"Content-Type": "application/json"}
        ) as resp:
            assert resp.status == 400


class TestJsonLines:
    """JSON Lines, one event a line, as log shippers send (Fluent Bit's json_lines, Vector's
    ndjson): all or nothing, as an array is, each event stored exactly as its line."""

    @pytest.mark.parametrize("content_type", ["application/x-ndjson", "application/jsonl"])
    async def test_one_event_a_line(
        self, client: aiohttp.ClientSession, fake: Any, content_type: str
    ) -> None:
        events = make_events(3)
        lines = [json.dumps(e, ensure_ascii=False).encode() for e in events]
        body = lines[0] + b"\r\n\n" + lines[1] + b"\n   \n" + lines[2]  # CRLF, blank lines
        async with client.post(
            "/v1/events", data=body, headers={"Content-Type": content_type}
        ) as resp:
            assert resp.status == 202, await resp.text()
            assert (await resp.json())["ids"] == [e["id"] for e in events]
        await fake.wait_for({e["id"] for e in events})
        assert [fake.received[e["id"]] for e in events] == events

    async def test_gzipped_to_the_drop_in_route(self, client: aiohttp.ClientSession) -> None:
        events = make_events(2)
        body = gzip.compress(b"\n".join(json.dumps(e).encode() for e in events) + b"\n")
        async with client.post(
            "/caliper/v1p2",
            data=body,
            headers={"Content-Type": "application/x-ndjson", "Content-Encoding": "gzip"},
        ) as resp:
            assert resp.status == 200
            assert (await resp.json())["eventsAccepted"] == 2

    async def test_an_invalid_line_stores_nothing(
        self, client: aiohttp.ClientSession, sidecar: Sidecar
    ) -> None:
        events = make_events(3)
        events[1]["eventTime"] = "not a time"
        body = b"\n".join(json.dumps(e).encode() for e in events)
        async with client.post(
            "/v1/events", data=body, headers={"Content-Type": "application/x-ndjson"}
        ) as resp:
            assert resp.status == 422
            assert [e["index"] for e in (await resp.json())["errors"]] == [1]
        assert await stored(sidecar) == 0

    @pytest.mark.parametrize(
        ("body", "message"),
        [
            (b'{"a": 1}\n{not json\n', "line 2 of the JSON Lines body is not JSON"),
            (b"\n \n", "the JSON Lines body holds no event"),
        ],
    )
    async def test_lines_that_are_not_json(
        self, client: aiohttp.ClientSession, sidecar: Sidecar, body: bytes, message: str
    ) -> None:
        async with client.post(
            "/v1/events", data=body, headers={"Content-Type": "application/x-ndjson"}
        ) as resp:
            assert resp.status == 400
            assert message in (await resp.json())["message"]
        assert await stored(sidecar) == 0


class TestOlderCaliper:
    """A sensor of Caliper 1.1 is told that only 1.2 is taken (a 400 saying so), not handed a
    list of rule failures."""

    V1P1 = "http://purl.imsglobal.org/ctx/caliper/v1p1"

    @pytest.mark.parametrize("shape", ["envelope", "event", "array"])
    async def test_caliper_1_1_is_refused_saying_why(
        self, client: aiohttp.ClientSession, sidecar: Sidecar, shape: str
    ) -> None:
        event = make_event(**{"@context": self.V1P1})
        document: Any = {
            "envelope": {
                "sensor": "https://app.example/sensor",
                "sendTime": "2026-12-05T08:00:00.000Z",
                "dataVersion": self.V1P1,
                "data": [event],
            },
            "event": event,
            "array": [make_event(), event],
        }[shape]
        async with client.post("/v1/events", json=document) as resp:
            assert resp.status == 400
            body = await resp.json()
        assert body["error"] == "unsupported_caliper_version"
        assert "this is Caliper 1.1" in body["message"]
        assert "only Caliper 1.2" in body["message"]
        assert await stored(sidecar) == 0
