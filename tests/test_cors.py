"""Browsers (docs/app-developers.md): web apps on a listed origin send events through the sidecar;
no other origin stores anything, and no other route answers a cross-origin request. With a client,
and in a real browser (Debian's Chromium, driven by Playwright) from a page of another origin."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import web

from .conftest import StartSidecar, make_event, make_events
from .test_status_page import browser, chromium  # noqa: F401 - fixtures

TOKEN = "classroom-token-0123456789"


@pytest.fixture
async def page_origin() -> AsyncIterator[str]:
    """A web app's own server on another origin (another port)."""
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(text="<!doctype html><title>app</title>", content_type="text/html")

    app.router.add_get("/{name}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", 0).start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


class TestWithAClient:
    async def test_a_listed_origins_preflight_and_post(
        self, custom: StartSidecar, fake: Any
    ) -> None:
        """The preflight of a listed origin gets 204 with the CORS headers (Private Network
        Access included); its POST is stored and answered with Allow-Origin."""
        origin = "https://app.example"
        _, client = await custom(receiver={"cors_origins": (origin,)})
        async with client.options(
            "/v1/events",
            headers={
                "Origin": origin,
                "Access-Control-Request-Method": "POST",
                "Access-Control-Request-Headers": "authorization,content-type",
                "Access-Control-Request-Private-Network": "true",
            },
        ) as resp:
            assert resp.status == 204
            h = resp.headers
            assert h["Access-Control-Allow-Origin"] == origin
            assert "POST" in h["Access-Control-Allow-Methods"]
            assert "Authorization" in h["Access-Control-Allow-Headers"]
            assert "Content-Type" in h["Access-Control-Allow-Headers"]
            assert int(h["Access-Control-Max-Age"]) > 0
            assert h["Access-Control-Allow-Private-Network"] == "true"
        event = make_event()
        async with client.post("/v1/events", json=event, headers={"Origin": origin}) as resp:
            assert resp.status == 202
            assert resp.headers["Access-Control-Allow-Origin"] == origin
            assert "Origin" in resp.headers["Vary"]
        await fake.wait_for({event["id"]})

    @pytest.mark.parametrize("path", ["/v1/events", "/caliper/event", "/auth/1.0/token"])
    async def test_an_unlisted_origin_stores_nothing(self, custom: StartSidecar, path: str) -> None:
        """Another origin's preflight and request get 403 without CORS headers; nothing is
        stored."""
        sidecar, client = await custom(receiver={"cors_origins": ("https://app.example",)})
        evil = {"Origin": "https://evil.example"}
        async with client.options(path, headers=evil) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        async with client.post(path, json=make_events(2), headers=evil) as resp:
            assert resp.status == 403
            assert "Access-Control-Allow-Origin" not in resp.headers
        stats = await sidecar.outbox.stats()
        assert stats.events + stats.delivered_total == 0

    @pytest.mark.parametrize(("method", "path"), [("OPTIONS", "/v1/status"), ("GET", "/metrics")])
    async def test_other_routes_answer_no_cross_origin_request(
        self, custom: StartSidecar, method: str, path: str
    ) -> None:
        """The operators' routes have no preflight and never send CORS headers, even to a
        listed origin."""
        origin = "https://app.example"
        _, client = await custom(receiver={"cors_origins": (origin,)})
        async with client.request(method, path, headers={"Origin": origin}) as resp:
            assert "Access-Control-Allow-Origin" not in resp.headers
            if method == "OPTIONS":
                assert resp.status == 405


class TestInARealBrowser:
    async def test_a_web_app_sends_events(
        self,
        custom: StartSidecar,
        fake: Any,
        browser: Any,  # noqa: F811 - the fixture
        page_origin: str,
    ) -> None:
        """A page on a listed origin posts with `fetch` (JSON, a bearer token) and with
        `keepalive: true` (as a page does on unload): the events reach the platform. A page on
        an unlisted origin cannot store anything."""
        sidecar, _ = await custom(receiver={"tokens": (TOKEN,), "cors_origins": (page_origin,)})
        sent = make_events(2)
        page = await browser.new_page()
        await page.goto(f"{page_origin}/app")
        statuses = await page.evaluate(
            """async ([base, token, events]) => {
                const out = [];
                for (const [i, event] of events.entries()) {
                    const r = await fetch(base + "/v1/events", {
                        method: "POST", keepalive: i === 1,
                        headers: {"Content-Type": "application/json",
                                  "Authorization": "Bearer " + token},
                        body: JSON.stringify(event)});
                    out.push(r.status);
                }
                return out;
            }""",
            [sidecar.url, TOKEN, sent],
        )
        assert statuses == [202, 202]
        await fake.wait_for({e["id"] for e in sent})
        await page.close()

        # The same page served from an origin nobody listed.
        other = page_origin.replace("127.0.0.1", "localhost")
        page = await browser.new_page()
        await page.goto(f"{other}/app")
        blocked = await page.evaluate(
            """async ([base, token, event]) => {
                try {
                    await fetch(base + "/v1/events", {method: "POST",
                        headers: {"Content-Type": "application/json",
                                  "Authorization": "Bearer " + token},
                        body: JSON.stringify(event)});
                    return "sent";
                } catch (e) { return "blocked"; }
            }""",
            [sidecar.url, TOKEN, make_event()],
        )
        # fetch settles only once the answer arrived, and the sidecar answers after the commit
        assert blocked == "blocked"
        stats = await sidecar.outbox.stats()
        assert stats.events + stats.delivered_total == 2
        await page.close()
