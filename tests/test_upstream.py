"""The client of a Caliper endpoint, built for a `caliper` destination of [[destinations]]: its
endpoint, sensor, token and answers, against the fake platform on a real port."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import msgspec
import pytest

from caliper_sidecar.config import DestinationSettings, OAuthSettings
from caliper_sidecar.delivery.upstream import UpstreamClient, default_sensor, delivery_session
from caliper_sidecar.exceptions import AuthFailed, EndpointFailed, UnexpectedAnswer
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.tools.fake_timeback import (
    FakeTimeBack,
    RunningFake,
    ScriptedFault,
    start_fake,
)

from .conftest import make_events

LRS_TOKEN = "district-lrs-token-0123456789"


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with delivery_session() as s:
        yield s


@pytest.fixture
async def lrs() -> AsyncIterator[RunningFake]:
    """A second platform, the destination's, with credentials of its own."""
    running = await start_fake(FakeTimeBack(client_id="district", client_secret="district-secret"))
    yield running
    await running.close()


def destination(platform: RunningFake, **changes: Any) -> DestinationSettings:
    """A caliper destination posting to this fake's plain Caliper endpoint with a static
    token the fake knows."""
    platform.fake.tokens[LRS_TOKEN] = time.time() + 3600
    base = DestinationSettings(
        name="district-lrs",
        kind="caliper",
        endpoint=platform.events_url,
        bearer_token=LRS_TOKEN,
        sensor="https://lrs.district.example/sensors/sidecar",
        timeout_s=5,
    )
    return msgspec.structs.replace(base, **changes)


def bodies(events: list[dict[str, Any]]) -> list[bytes]:
    return [json.dumps(e, separators=(",", ":")).encode() for e in events]


class TestForDestination:
    async def test_sends_events_unchanged_with_its_bearer_token(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """The envelope carries the events byte for byte, under the destination's sensor,
        authorized by its static bearer token."""
        client = UpstreamClient.for_destination(session, destination(platform), Metrics())
        events = make_events(3)
        sent = await client.send(bodies(events))
        assert sent.status == 200
        assert sent.job_id is None
        assert sent.unconfirmed is None
        fake = platform.fake
        assert [fake.received[e["id"]] for e in events] == events
        for body in bodies(events):
            assert body in fake.last_raw_envelope
        assert fake.last_envelope["sensor"] == "https://lrs.district.example/sensors/sidecar"
        assert fake.token_requests == 0

    async def test_an_apps_sensor_goes_as_sent(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """Events an app sent in its own envelope keep its sensor; without a configured
        sensor the destination's envelopes carry this host's."""
        settings = destination(platform, sensor="")
        client = UpstreamClient.for_destination(session, settings, Metrics())
        assert client.sensor == default_sensor()
        await client.send(bodies(make_events(1)), "urn:app:reader")
        assert platform.fake.last_envelope["sensor"] == "urn:app:reader"

    async def test_oauth_tokens_of_its_own(
        self, session: aiohttp.ClientSession, platform: RunningFake, lrs: RunningFake
    ) -> None:
        """With a `[destinations.oauth]` table the client fetches tokens from that endpoint
        with those credentials, counted as the destination's refreshes, never the upstream's."""
        settings = destination(
            lrs,
            bearer_token="",
            oauth=OAuthSettings(
                token_url=lrs.token_url, client_id="district", client_secret="district-secret"
            ),
        )
        metrics = Metrics()
        client = UpstreamClient.for_destination(session, settings, metrics)
        events = make_events(2)
        await client.send(bodies(events))
        await client.send(bodies(make_events(1)))
        assert set(lrs.fake.received) >= {e["id"] for e in events}
        assert lrs.fake.token_requests == 1
        assert platform.fake.token_requests == 0
        assert not platform.fake.received
        assert client.tokens.expires_at is not None
        refreshes = "caliper_sidecar_token_refreshes_total"
        registry = metrics.registry
        assert registry.get_sample_value(refreshes, {"destination": "district-lrs"}) == 1
        assert registry.get_sample_value(refreshes, {"destination": "upstream"}) is None

    async def test_requests_counted_under_its_name(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """Requests and their durations are the destination's series."""
        metrics = Metrics()
        client = UpstreamClient.for_destination(session, destination(platform), metrics)
        await client.send(bodies(make_events(1)))
        registry = metrics.registry
        requests = "caliper_sidecar_upstream_requests_total"
        assert registry.get_sample_value(requests, {"destination": "district-lrs", "code": "200"})
        upstream = registry.get_sample_value(requests, {"destination": "upstream", "code": "200"})
        assert upstream is None
        seconds = "caliper_sidecar_upstream_request_seconds_count"
        assert registry.get_sample_value(seconds, {"destination": "district-lrs"}) == 1

    async def test_a_wrong_token_is_auth_failed(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """A static token the endpoint refuses cannot be renewed: auth_failed."""
        settings = destination(platform, bearer_token="not-a-token-the-fake-knows")
        client = UpstreamClient.for_destination(session, settings, Metrics())
        with pytest.raises(AuthFailed):
            await client.send(bodies(make_events(1)))

    async def test_not_for_an_archive(self, session: aiohttp.ClientSession) -> None:
        """An archive destination has no Caliper endpoint to post to."""
        archive = DestinationSettings(name="archive", kind="archive", dir="/tmp/archive")
        with pytest.raises(ValueError, match="archive"):
            UpstreamClient.for_destination(session, archive, Metrics())


class TestAnswersAsAnyCaliperEndpoint:
    """A destination is read as any Caliper endpoint: an empty body or JSON is delivery, a
    page is not."""

    async def test_an_empty_2xx_is_delivery(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        platform.fake.faults.script.append(ScriptedFault(204, text=""))
        client = UpstreamClient.for_destination(session, destination(platform), Metrics())
        assert (await client.send(bodies(make_events(1)))).status == 204

    async def test_a_page_is_an_unexpected_answer(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        platform.fake.faults.web_filter = True
        client = UpstreamClient.for_destination(session, destination(platform), Metrics())
        with pytest.raises(UnexpectedAnswer):
            await client.send(bodies(make_events(1)))

    async def test_a_missing_route_names_the_destination(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """A 404 is the endpoint's failure, and says which destination's endpoint to fix."""
        settings = destination(platform, endpoint=platform.base_url + "/no/such/route")
        client = UpstreamClient.for_destination(session, settings, Metrics())
        with pytest.raises(EndpointFailed, match="destination district-lrs"):
            await client.send(bodies(make_events(1)))
