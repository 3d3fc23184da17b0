"""OAuth2 client credentials: caching, single-flight refresh, refresh ahead of expiry, errors."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import msgspec
import pytest

from caliper_sidecar.config import OAuthSettings
from caliper_sidecar.delivery.tokens import OAuthTokens, StaticToken
from caliper_sidecar.exceptions import AuthFailed, RetryLater
from caliper_sidecar.metrics import Metrics
from caliper_sidecar.tools.fake_timeback import FakeTimeBack, RunningFake

from .conftest import settings_for


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as s:
        yield s


def oauth(platform: RunningFake, **changes: object) -> OAuthSettings:
    base = OAuthSettings(
        token_url=platform.token_url,
        client_id=platform.fake.client_id,
        client_secret=platform.fake.client_secret,
    )
    return msgspec.structs.replace(base, **changes)


class Clock:
    """A wall clock that moves only when a test moves it."""

    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def tokens_for(
    session: aiohttp.ClientSession,
    platform: RunningFake,
    clock: Clock | None = None,
    **changes: object,
) -> OAuthTokens:
    return OAuthTokens(
        session,
        oauth(platform, **changes),
        5.0,
        Metrics().for_destination("upstream"),
        clock=clock or time.time,
    )


class TestOAuthTokens:
    async def test_fetched_once_and_cached(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """A token is fetched on first use and reused while valid."""
        tokens = tokens_for(session, platform)
        first = await tokens.bearer()
        assert first in platform.fake.tokens
        assert await tokens.bearer() == first
        assert platform.fake.token_requests == 1
        assert tokens.expires_at is not None

    @pytest.mark.parametrize("method", ["client_secret_basic", "client_secret_post"])
    async def test_client_auth_methods(
        self, session: aiohttp.ClientSession, platform: RunningFake, method: str
    ) -> None:
        """Both client secret methods authenticate to the token endpoint."""
        assert await tokens_for(session, platform, auth_method=method).bearer()

    async def test_single_flight(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """However many senders wait, one request reaches the token endpoint."""
        platform.fake.faults.token_latency_s = 0.2
        tokens = tokens_for(session, platform)
        got = await asyncio.gather(*(tokens.bearer() for _ in range(50)))
        assert len(set(got)) == 1
        assert platform.fake.token_requests == 1

    async def test_refreshed_half_way_through_a_short_token(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """A short-lived token is renewed half-way through its life, even with a larger
        leeway (and not before)."""
        platform.fake.token_ttl_s = 4
        clock = Clock()
        tokens = tokens_for(session, platform, clock, refresh_leeway_s=60)
        first = await tokens.bearer()
        clock.now += 1.9
        assert await tokens.bearer() == first  # before half-way: kept
        clock.now += 0.2
        second = await tokens.bearer()
        assert second != first
        assert platform.fake.token_requests == 2

    async def test_refreshed_refresh_leeway_s_before_expiry(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """With a long-lived token, the refresh happens refresh_leeway_s before expiry."""
        platform.fake.token_ttl_s = 3600
        clock = Clock()
        tokens = tokens_for(session, platform, clock, refresh_leeway_s=60)
        first = await tokens.bearer()
        assert tokens.expires_at == clock.now + 3600
        clock.now += 3600 - 61
        assert await tokens.bearer() == first
        clock.now += 2
        assert await tokens.bearer() != first
        assert platform.fake.token_requests == 2

    async def test_invalidate_forces_a_new_token(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        tokens = tokens_for(session, platform)
        first = await tokens.bearer()
        tokens.invalidate("some other token")
        assert await tokens.bearer() == first
        tokens.invalidate(first)
        assert await tokens.bearer() != first

    async def test_wrong_secret_is_auth_failed(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        with pytest.raises(AuthFailed, match="invalid_client"):
            await tokens_for(session, platform, client_secret="wrong").bearer()

    async def test_token_endpoint_down_is_retry_later(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        """A failing or unreachable token endpoint means backoff, with Retry-After."""
        from caliper_sidecar.tools.fake_timeback import ScriptedFault

        platform.fake.faults.token_script.append(ScriptedFault(503, 1, "7"))
        with pytest.raises(RetryLater) as caught:
            await tokens_for(session, platform).bearer()
        assert caught.value.retry_after_s == 7
        with pytest.raises(RetryLater, match="unreachable"):
            await tokens_for(session, platform, token_url="http://127.0.0.1:9/token").bearer()

    async def test_refreshes_counted(
        self, session: aiohttp.ClientSession, platform: RunningFake
    ) -> None:
        metrics = Metrics()
        tokens = OAuthTokens(session, oauth(platform), 5.0, metrics.for_destination("upstream"))
        await tokens.bearer()
        assert (
            b'caliper_sidecar_token_refreshes_total{destination="upstream"} 1.0'
            in (metrics.render()[0])
        )


class TestStaticToken:
    async def test_static_or_none(self) -> None:
        assert await StaticToken("abc").bearer() == "abc"
        assert await StaticToken("").bearer() is None


class TestThroughTheSidecar:
    async def test_revoked_token_refreshed_once_and_retried(
        self, platform: RunningFake, tmp_path: Path
    ) -> None:
        """A 401 from the Caliper endpoint: one new token, one retry, delivered."""
        from caliper_sidecar.app import start

        from .conftest import make_event

        fake: FakeTimeBack = platform.fake
        sidecar = await start(settings_for(platform, tmp_path))
        try:
            async with aiohttp.ClientSession(base_url=sidecar.url) as client:
                first = make_event()
                await client.post("/v1/events", json=first)
                await fake.wait_for({first["id"]})
                fake.revoke_tokens()
                second = make_event()
                await client.post("/v1/events", json=second)
                await fake.wait_for({second["id"]})
            assert fake.token_requests == 2
            assert fake.statuses[401] == 1
            assert sidecar.dispatcher.state == "ok"
        finally:
            await sidecar.stop()
