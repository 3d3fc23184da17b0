"""Reading the platform's stored events through the sidecar (`GET /caliper/events[/{id}]`):
connections, a metric and credentials of the reads' own, ids that stay one path segment, and
answers from the platform that cannot make a read fail."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import Sidecar
from caliper_sidecar.config import Settings
from caliper_sidecar.states import UpstreamState
from caliper_sidecar.tools.fake_timeback import RunningFake, ScriptedFault

from .conftest import make_events, settings_for
from .test_drop_in import SENDER, app_token, bearer


@pytest.fixture
def settings(platform: RunningFake, tmp_path: Path) -> Settings:
    return settings_for(
        platform,
        tmp_path,
        receiver={"tokens": (SENDER,)},
        upstream={"endpoint": platform.beyond_url},
    )


@pytest.fixture
async def token(client: aiohttp.ClientSession) -> str:
    return await app_token(client)


UPSTREAM_REQUESTS = "caliper_sidecar_upstream_requests_total"
SEND_SECONDS = "caliper_sidecar_upstream_request_seconds_count"


def sample(sidecar: Sidecar, name: str, **labels: str) -> float:
    """A metric's value in the sidecar's registry (0 when the series does not exist)."""
    value = sidecar.runtime.metrics.registry.get_sample_value(name, labels)
    return 0.0 if value is None else value


async def raw_get(sidecar: Sidecar, target: str, token: str) -> tuple[int, Any]:
    """GET this request target exactly as written (an HTTP client would normalize `..`): the
    status and the JSON body."""
    host, port = sidecar.url.removeprefix("http://").rsplit(":", 1)
    reader, writer = await asyncio.open_connection(host, int(port))
    try:
        writer.write(
            f"GET {target} HTTP/1.1\r\nHost: {host}\r\nAuthorization: Bearer {token}\r\n"
            "Connection: close\r\n\r\n".encode()
        )
        answer = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    head, _, body = answer.partition(b"\r\n\r\n")
    return int(head.split()[1]), json.loads(body)


async def deliver(client: aiohttp.ClientSession, token: str, platform: RunningFake) -> None:
    events = make_events(3)
    async with client.post("/caliper/event", json=events, headers=bearer(token)) as resp:
        assert resp.status == 200, await resp.text()
    await platform.fake.wait_for({e["id"] for e in events})


class TestOwnConnections:
    async def test_reads_have_connections_of_their_own(
        self,
        client: aiohttp.ClientSession,
        token: str,
        sidecar: Sidecar,
        platform: RunningFake,
    ) -> None:
        """Listings the platform is slow to answer, more of them than delivery has
        connections, leave delivery alone: events are delivered while every read still waits,
        the upstream stays ok, and one token serves both."""
        fake = platform.fake
        fake.faults.reads_open.clear()

        async def read() -> int:
            async with client.get("/caliper/events", headers=bearer(token)) as resp:
                await resp.read()
                return resp.status

        reads = [asyncio.create_task(read()) for _ in range(12)]
        try:
            while not fake.reads:
                await asyncio.sleep(0.01)
            await deliver(client, token, platform)
            assert not any(r.done() for r in reads)
            assert sidecar.dispatcher.state == UpstreamState.OK
            assert fake.token_requests == 1
        finally:
            fake.faults.reads_open.set()
            statuses = await asyncio.gather(*reads)
        assert statuses == [200] * 12
        assert sample(sidecar, UPSTREAM_REQUESTS, destination="upstream", code="timeout") == 0

    async def test_reads_are_counted_apart_from_delivery(
        self,
        client: aiohttp.ClientSession,
        token: str,
        sidecar: Sidecar,
        platform: RunningFake,
    ) -> None:
        """A read counts in `caliper_sidecar_platform_reads_total` and its duration, never in
        the Caliper endpoint's requests or their duration."""
        await deliver(client, token, platform)
        sends = sample(sidecar, UPSTREAM_REQUESTS, destination="upstream", code="200")
        send_time = sample(sidecar, SEND_SECONDS, destination="upstream")
        platform.fake.faults.read_script.append(ScriptedFault(503, times=1))
        for expected in (503, 200, 200):
            async with client.get("/caliper/events", headers=bearer(token)) as resp:
                assert resp.status == expected
        assert sample(sidecar, "caliper_sidecar_platform_reads_total", code="200") == 2
        assert sample(sidecar, "caliper_sidecar_platform_reads_total", code="503") == 1
        assert sample(sidecar, "caliper_sidecar_platform_read_seconds_count") == 3
        assert sample(sidecar, UPSTREAM_REQUESTS, destination="upstream", code="200") == sends
        assert sample(sidecar, UPSTREAM_REQUESTS, destination="upstream", code="503") == 0
        assert sample(sidecar, SEND_SECONDS, destination="upstream") == send_time

    async def test_reads_never_discard_the_delivery_token(
        self,
        client: aiohttp.ClientSession,
        token: str,
        sidecar: Sidecar,
        platform: RunningFake,
    ) -> None:
        """A 401 from the platform on a read is answered 503 `platform_refused_credentials`
        and never discards the token delivery uses: no token request, however many reads."""
        await deliver(client, token, platform)
        assert platform.fake.token_requests == 1
        platform.fake.faults.read_script.append(ScriptedFault(401, times=5))
        for _ in range(5):
            async with client.get("/caliper/events", headers=bearer(token)) as resp:
                assert resp.status == 503
                assert (await resp.json())["error"] == "platform_refused_credentials"
        await deliver(client, token, platform)
        assert platform.fake.token_requests == 1
        assert sidecar.dispatcher.state == UpstreamState.OK

    async def test_a_token_endpoint_refusing_the_sidecar_is_a_503(
        self, client: aiohttp.ClientSession, token: str, platform: RunningFake
    ) -> None:
        """When the token endpoint refuses the sidecar's own credentials, a read is answered
        JSON 503 `platform_refused_credentials`, not a failure of the sidecar's."""
        platform.fake.faults.token_script.append(ScriptedFault(401))
        async with client.get("/caliper/events", headers=bearer(token)) as resp:
            assert resp.status == 503
            assert (await resp.json())["error"] == "platform_refused_credentials"


class TestIds:
    @pytest.mark.parametrize(
        "target",
        [
            "/caliper/events/..",
            "/caliper/events/.",
            "/caliper/events/%2E%2E",
            "/caliper/events/%2e",
            "/caliper/events/.%2E?limit=1",
            "/caliper/events/a%2Fb",
            "/caliper/events/a%2fb",
            "/caliper/events/a/b",
            "/caliper/events/a/../b",
            "/caliper/events/a%5Cb",
            "/caliper/events/a\\b",
        ],
    )
    async def test_an_id_is_one_path_segment(
        self, sidecar: Sidecar, token: str, platform: RunningFake, target: str
    ) -> None:
        """An id that is `.` or `..`, or holds `/` or `\\` (raw or percent-encoded) is a 400
        in the sidecar's error shape, and nothing is asked of the platform."""
        status, body = await raw_get(sidecar, target, token)
        assert status == 400
        assert set(body) == {"error", "message"}
        assert body["error"] == "invalid_event_id"
        assert platform.fake.reads == []

    @pytest.mark.parametrize(
        ("target", "sent"),
        [
            (
                "/caliper/events/urn:uuid:1%3Fx?limit=2",
                "/caliper/events/urn%3Auuid%3A1%3Fx?limit=2",
            ),
            ("/caliper/events/%252E%252E", "/caliper/events/%252E%252E"),
            ("/caliper/events/%252F", "/caliper/events/%252F"),
            ("/caliper/events/a..b", "/caliper/events/a..b"),
            ("/caliper/events/a;b=c", "/caliper/events/a%3Bb%3Dc"),
        ],
    )
    async def test_every_id_is_sent_as_one_segment(
        self, sidecar: Sidecar, token: str, platform: RunningFake, target: str, sent: str
    ) -> None:
        """An id is decoded once and sent to the platform quoted as one path segment; the
        query is passed on as it came."""
        status, body = await raw_get(sidecar, target, token)
        assert status == 404, body
        assert platform.fake.reads == [sent]


class TestPeerHeaders:
    async def test_a_retry_after_that_is_no_number_is_no_failure(
        self, client: aiohttp.ClientSession, token: str, platform: RunningFake
    ) -> None:
        """The platform's 503 with `Retry-After: ²` (a digit to Python, no number to HTTP) is
        answered as the platform answered: a JSON 503, not a failure of the sidecar's."""
        platform.fake.faults.read_script.append(ScriptedFault(503, retry_after="²"))
        async with client.get("/caliper/events", headers=bearer(token)) as resp:
            assert resp.status == 503
            assert resp.content_type == "application/json"
            assert (await resp.json())["error"] == "injected fault"
