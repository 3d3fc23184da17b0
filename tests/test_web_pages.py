"""Web pages are kept out (docs/app-developers.md): admin POSTs take JSON only and no unlisted
origin, a request without a token must name the sidecar by a name it answers to (a DNS-rebinding
page reads nothing), and the status page cannot be framed. With a client, and in a real browser
(Debian's Chromium, driven by Playwright) on a page of another origin."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from structlog.testing import capture_logs

from caliper_sidecar.app import Sidecar

from .conftest import StartSidecar, eventually, make_events
from .test_status_page import browser, chromium  # noqa: F401 - fixtures

LISTED = "https://app.example"


async def dead_lettered(sidecar: Sidecar, client: aiohttp.ClientSession, fake: Any, n: int) -> None:
    events = make_events(n)
    fake.faults.refuse_ids = {e["id"] for e in events}
    async with client.post("/v1/events", json=events) as resp:
        assert resp.status == 202

    async def all_dead() -> bool:
        return (await sidecar.outbox.stats()).dead_letters == n

    await eventually(all_dead)


class TestAdminPosts:
    async def test_a_page_cannot_purge_with_plain_text(
        self, custom: StartSidecar, fake: Any
    ) -> None:
        """`text/plain` (what a page may post anywhere without asking) is refused with 415,
        and nothing is purged."""
        sidecar, client = await custom()
        await dead_lettered(sidecar, client, fake, 3)
        async with client.post(
            "/v1/dead-letters/purge",
            data='{"all": true}',
            headers={"Content-Type": "text/plain"},
        ) as resp:
            assert resp.status == 415
        assert (await sidecar.outbox.stats()).dead_letters == 3

    @pytest.mark.parametrize("route", ["purge", "replay"])
    async def test_an_unlisted_origin_is_refused(
        self, custom: StartSidecar, fake: Any, route: str
    ) -> None:
        """An admin POST from a web origin that is not listed is a 403 and changes nothing; a
        listed origin's is done."""
        sidecar, client = await custom(receiver={"cors_origins": (LISTED,)})
        await dead_lettered(sidecar, client, fake, 2)
        fake.faults.refuse_ids = set()
        with capture_logs() as logs:
            async with client.post(
                f"/v1/dead-letters/{route}",
                json={"all": True},
                headers={"Origin": "https://evil.example"},
            ) as resp:
                assert resp.status == 403
                assert (await resp.json())["error"] == "forbidden_origin"
        assert (await sidecar.outbox.stats()).dead_letters == 2
        assert [e["event"] for e in logs] == ["admin_request_refused"]
        async with client.post(
            f"/v1/dead-letters/{route}", json={"all": True}, headers={"Origin": LISTED}
        ) as resp:
            assert resp.status == 200

    async def test_replays_and_purges_say_who_and_how_many(
        self, custom: StartSidecar, fake: Any
    ) -> None:
        """Each replay and purge is logged with who asked and how many events it touched."""
        sidecar, client = await custom()
        await dead_lettered(sidecar, client, fake, 3)
        with capture_logs() as logs:
            async with client.post("/v1/dead-letters/purge", json={"all": True}) as resp:
                assert (await resp.json())["purged"] == 3
        (line,) = [e for e in logs if e["event"] == "dead_letters_purged"]
        assert (line["who"], line["events"], line["selected"]) == ("loopback", 3, "all")
        assert line["remote"] == "127.0.0.1"


class TestHostNames:
    @pytest.mark.parametrize(
        ("method", "path"),
        [
            ("GET", "/v1/dead-letters"),
            ("GET", "/v1/status"),
            ("GET", "/"),
            ("GET", "/metrics"),
            ("GET", "/v1/events/urn:uuid:x"),
            ("GET", "/jobs/x/status"),
            ("POST", "/v1/dead-letters/purge"),
        ],
    )
    async def test_a_rebound_name_reads_nothing(
        self, custom: StartSidecar, method: str, path: str
    ) -> None:
        """A request without a token naming the sidecar `attacker.example` (a DNS name rebound
        to 127.0.0.1) is a 421, in the one JSON error shape."""
        _, client = await custom()
        async with client.request(
            method, path, json={"all": True}, headers={"Host": "attacker.example:8787"}
        ) as resp:
            assert resp.status == 421
            assert (await resp.json())["error"] == "misdirected_request"

    @pytest.mark.parametrize(
        "host", ["127.0.0.1:8787", "localhost:8787", "[::1]:8787", "LOCALHOST", "relay.local"]
    )
    async def test_known_names_are_answered(self, custom: StartSidecar, host: str) -> None:
        """IP literals, localhost and `receiver.server_names` are answered."""
        _, client = await custom(receiver={"server_names": ("relay.local",)})
        async with client.get("/v1/status", headers={"Host": host}) as resp:
            assert resp.status == 200

    async def test_probes_and_token_holders_may_use_any_name(self, custom: StartSidecar) -> None:
        """Health probes are answered whatever the name; so is a request that authenticates
        with a sender or admin token (an app reaching a gateway by its service name)."""
        token, admin = "sender-token-0123456789", "admin-token-0123456789"
        _, client = await custom(receiver={"tokens": (token,)}, admin={"token": admin})
        other = {"Host": "caliper-sidecar.apps.svc.cluster.local"}
        async with client.get("/healthz", headers=other) as resp:
            assert resp.status == 200
        async with client.post(
            "/v1/events",
            json=make_events(1),
            headers={**other, "Authorization": f"Bearer {token}"},
        ) as resp:
            assert resp.status == 202
        async with client.get(
            "/v1/status", headers={**other, "Authorization": f"Bearer {admin}"}
        ) as resp:
            assert resp.status == 200
        async with client.get(
            "/v1/status", headers={**other, "Authorization": "Bearer forged-0123456789abcd"}
        ) as resp:
            assert resp.status == 421


async def test_the_status_page_cannot_be_framed(custom: StartSidecar) -> None:
    """The status page forbids every frame (CSP `frame-ancestors 'none'`, X-Frame-Options)."""
    _, client = await custom()
    async with client.get("/") as resp:
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
        assert resp.headers["X-Frame-Options"] == "DENY"


@pytest.fixture
async def other_origin() -> AsyncIterator[str]:
    """A web server on another origin (another port), serving an empty page."""
    app = web.Application()

    async def page(request: web.Request) -> web.Response:
        return web.Response(
            text="<!doctype html><title>elsewhere</title>", content_type="text/html"
        )

    app.router.add_get("/{name}", page)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    yield f"http://{host}:{port}"
    await runner.cleanup()


class TestInARealBrowser:
    async def test_a_page_on_another_origin_cannot_purge_or_frame(
        self,
        custom: StartSidecar,
        fake: Any,
        browser: Any,  # noqa: F811 - the fixture
        other_origin: str,
    ) -> None:
        """A page served from another origin, in Chromium, tries the attack that worked:
        `fetch(purge, {mode: "no-cors", text/plain, '{"all":true}'})`, then the same with
        JSON, then frames the status page. The dead letters are all still there, and the frame
        shows nothing of the page."""
        sidecar, client = await custom()
        await dead_lettered(sidecar, client, fake, 3)
        page = await browser.new_page()
        await page.goto(f"{other_origin}/attack")
        results = await page.evaluate(
            """async (base) => {
                const out = [];
                for (const init of [
                    {method: "POST", mode: "no-cors", headers: {"Content-Type": "text/plain"},
                     body: '{"all":true}'},
                    {method: "POST", headers: {"Content-Type": "application/json"},
                     body: '{"all":true}'},
                ]) {
                    try { const r = await fetch(base + "/v1/dead-letters/purge", init);
                          out.push(r.type + ":" + r.status); }
                    catch (e) { out.push("blocked:" + e.name); }
                }
                return out;
            }""",
            sidecar.url,
        )
        assert results[0] == "opaque:0"  # sent, but refused by the sidecar (415)
        assert results[1].startswith("blocked")  # the preflight is not answered
        # (each fetch settled once its answer came: nothing of it is still under way)
        assert (await sidecar.outbox.stats()).dead_letters == 3
        await page.set_content(f'<iframe id="f" src="{sidecar.url}/"></iframe>')
        await page.wait_for_load_state("load")  # the frames' loads included
        frame = page.frames[-1]
        assert await frame.locator("#state").count() == 0
        await page.close()
