"""What operators watch: liveness, readiness, Prometheus metrics, status, backpressure."""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import aiohttp
import pytest
from aiohttp import web
from aiohttp.test_utils import make_mocked_request

from caliper_sidecar.app import start
from caliper_sidecar.config import AdminSettings, Settings
from caliper_sidecar.http.errors import ApiError
from caliper_sidecar.http.ops import operators_only
from caliper_sidecar.http.runtime import Runtime
from caliper_sidecar.tools.fake_timeback import FakeTimeBack, RunningFake

from .conftest import StartSidecar, eventually, free_port, make_events, settings_for

DOCUMENTED_METRICS = (
    "caliper_sidecar_events_received_total",
    "caliper_sidecar_events_delivered_total",
    "caliper_sidecar_events_dead_lettered_total",
    "caliper_sidecar_outbox_events",
    "caliper_sidecar_outbox_oldest_age_seconds",
    "caliper_sidecar_upstream_requests_total",
    "caliper_sidecar_upstream_request_seconds",
    "caliper_sidecar_token_refreshes_total",
)


class TestProbes:
    async def test_healthz_and_readyz(self, client: aiohttp.ClientSession) -> None:
        async with client.get("/healthz") as resp:
            assert resp.status == 200
        async with client.get("/readyz") as resp:
            assert resp.status == 200
            assert (await resp.json())["status"] == "ready"


class TestMetrics:
    async def test_spec_names_and_process_metrics(
        self, client: aiohttp.ClientSession, fake: FakeTimeBack
    ) -> None:
        """Every metric docs/app-developers.md names is exported, with values that follow the
        traffic."""
        events = make_events(7)
        async with client.post("/v1/events", json=events) as resp:
            assert resp.status == 202
        await fake.wait_for(7)

        async def delivered_counted() -> bool:
            async with client.get("/metrics") as resp:
                return 'caliper_sidecar_events_delivered_total{destination="upstream"} 7.0' in (
                    await resp.text()
                )

        await eventually(delivered_counted)
        async with client.get("/metrics") as resp:
            assert resp.content_type == "text/plain"
            text = await resp.text()
        for name in DOCUMENTED_METRICS:
            assert f"\n{name}" in text, name
        assert 'caliper_sidecar_events_received_total{sender=""} 7.0' in text
        assert 'caliper_sidecar_upstream_requests_total{code="200",destination="upstream"}' in text
        assert 'caliper_sidecar_token_refreshes_total{destination="upstream"} 1.0' in text
        assert "caliper_sidecar_outbox_commits_total 1.0" in text
        assert "caliper_sidecar_outbox_events 0.0" in text
        assert "process_resident_memory_bytes" in text

    async def test_metrics_that_make_alerts_possible(
        self, client: aiohttp.ClientSession, fake: FakeTimeBack
    ) -> None:
        """Capacity, upstream state, build info and token expiry are exported; no `_created`
        series doubles the output."""
        async with client.post("/v1/events", json=make_events(1)) as resp:
            assert resp.status == 202
        await fake.wait_for(1)
        async with client.get("/metrics") as resp:
            text = await resp.text()
        assert "caliper_sidecar_outbox_capacity_events 1e+06" in text
        assert "caliper_sidecar_outbox_capacity_bytes" in text
        assert 'caliper_sidecar_upstream_state{destination="upstream",state="ok"} 1.0' in text
        assert (
            'caliper_sidecar_upstream_state{destination="upstream",state="auth_failed"} 0.0' in text
        )
        assert 'caliper_sidecar_build_info{version="' in text
        assert 'caliper_sidecar_token_expiry_timestamp_seconds{destination="upstream"} 1.' in text
        assert "_created" not in text

    async def test_openmetrics_when_asked(self, client: aiohttp.ClientSession) -> None:
        """A scraper that asks for OpenMetrics gets it (with its closing # EOF)."""
        async with client.get(
            "/metrics", headers={"Accept": "application/openmetrics-text; version=1.0.0"}
        ) as resp:
            assert resp.content_type == "application/openmetrics-text"
            text = await resp.text()
        assert text.rstrip().endswith("# EOF")
        assert "caliper_sidecar_events_received_total" in text


class TestStatus:
    async def test_status_during_an_outage(self, platform: RunningFake, tmp_path: Path) -> None:
        """/v1/status shows the backlog, its age, the upstream state and the last error."""
        platform.fake.outage(3600)
        sidecar = await start(settings_for(platform, tmp_path))
        try:
            async with aiohttp.ClientSession(base_url=sidecar.url) as client:
                async with client.post("/v1/events", json=make_events(3)) as resp:
                    assert resp.status == 202
                await eventually(lambda: sidecar.dispatcher.state == "backing_off")
                async with client.get("/v1/status") as resp:
                    status = await resp.json()
        finally:
            await sidecar.stop()
        assert status["outbox"]["events"] == 3
        assert status["outbox"]["oldest_age_s"] >= 0
        assert status["outbox"]["bytes"] > 0
        upstream = status["upstream"]
        assert upstream["state"] == "backing_off"
        assert "unreachable" in upstream["last_error"]
        assert upstream["last_error_at"].endswith("Z")
        assert upstream["token_expires_at"].endswith("Z")
        assert upstream["endpoint"] == platform.events_url
        assert status["accepting"] is True


class TestBackpressure:
    async def test_full_then_accepting_again(self, platform: RunningFake, tmp_path: Path) -> None:
        """Past max_events: 503 + Retry-After and not ready; as soon as deliveries make
        room, ready and accepting again. Nothing is dropped."""
        platform.fake.outage(3600)
        sidecar = await start(settings_for(platform, tmp_path, outbox={"max_events": 10}))
        try:
            async with aiohttp.ClientSession(base_url=sidecar.url) as client:
                first = make_events(10)
                async with client.post("/v1/events", json=first) as resp:
                    assert resp.status == 202
                async with client.post("/v1/events", json=make_events(1)) as resp:
                    assert resp.status == 503
                    assert resp.headers["Retry-After"]
                async with client.get("/readyz") as resp:
                    assert (resp.status, (await resp.json())["reason"]) == (503, "outbox_full")
                platform.fake.faults.outage_until = 0
                await platform.fake.wait_for({e["id"] for e in first})

                async def ready() -> bool:
                    async with client.get("/readyz") as resp:
                        return resp.status == 200

                await eventually(ready)
                async with client.post("/v1/events", json=make_events(5)) as resp:
                    assert resp.status == 202
        finally:
            await sidecar.stop()


class TestOpsListener:
    async def test_ops_routes_on_their_own_listener(self, custom: StartSidecar) -> None:
        """With ops.port set, health, readiness, metrics, status and the dead-letter routes
        answer there (plain HTTP, loopback); the receiver keeps ingest and /healthz only."""
        sidecar, client = await custom(ops={"port": free_port()})
        assert sidecar.ops_url != sidecar.url
        async with aiohttp.ClientSession(base_url=sidecar.ops_url) as ops_client:
            for path in ("/healthz", "/readyz", "/metrics", "/v1/status", "/v1/dead-letters"):
                async with ops_client.get(path) as resp:
                    assert resp.status == 200, path
            async with ops_client.post("/v1/events", json=make_events(1)) as resp:
                assert resp.status == 404
        async with client.get("/healthz") as resp:
            assert resp.status == 200
        for path in ("/metrics", "/v1/status", "/v1/dead-letters"):
            async with client.get(path) as resp:
                assert resp.status == 404, path
        async with client.post("/v1/events", json=make_events(1)) as resp:
            assert resp.status == 202

    def request_from(self, remote: str, path: str, token: str = "") -> web.Request:
        transport = mock.Mock()
        transport.get_extra_info.side_effect = lambda key, default=None: (
            (remote, 40000) if key == "peername" else default
        )
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        return make_mocked_request("GET", path, headers=headers, transport=transport)

    @pytest.mark.parametrize("admin_token", ["", "op-token"])
    def test_state_is_for_this_machine_or_the_admin_token(self, admin_token: str) -> None:
        """On a listener another machine can reach (a relay's receiver), metrics and status
        need the admin token; from this machine they do not."""
        rt = Runtime(
            settings=Settings(admin=AdminSettings(token=admin_token)),
            outbox=mock.Mock(),
            metrics=mock.Mock(),
        )
        operators_only(rt, self.request_from("127.0.0.1", "/metrics"))
        for token in ("", "wrong"):
            with pytest.raises(ApiError) as refused:
                operators_only(rt, self.request_from("192.0.2.7", "/metrics", token))
            assert refused.value.status == 401
        if admin_token:
            operators_only(rt, self.request_from("192.0.2.7", "/metrics", admin_token))
