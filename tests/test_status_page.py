"""The status page, in a real headless browser (Debian's Chromium, driven by Playwright): the
live numbers, the platform's state in plain words, dead letters with replay, a row per
destination."""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.app import start
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import StartSidecar, free_port, make_events
from .destinations import start_district, with_destinations
from .installs import apt_install

CHROMIUM = "/usr/bin/chromium"
#: flags this machine needs: no sandbox as root, and no background calls to hosts it cannot reach
FLAGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]


@pytest.fixture(scope="session")
def chromium() -> str:
    """Debian's Chromium, installed with apt when it is missing and this is root."""
    if not shutil.which("chromium") and os.geteuid() == 0 and shutil.which("apt-get"):
        apt_install("chromium")
    if not Path(CHROMIUM).exists():
        pytest.skip("no browser: Debian's chromium is not installed and could not be")
    return CHROMIUM


@pytest.fixture
async def browser(chromium: str) -> AsyncIterator[Any]:
    playwright = pytest.importorskip(
        "playwright.async_api", reason="playwright (the test extra) is not installed"
    )
    async with playwright.async_playwright() as p:
        launched = await p.chromium.launch(executable_path=chromium, args=FLAGS, headless=True)
        try:
            yield launched
        finally:
            await launched.close()


async def test_status_page_shows_the_live_numbers(
    browser: Any, custom: StartSidecar, fake: Any, tmp_path: Path
) -> None:
    """A person opens the ops listener: the backlog, the platform's state in plain words and
    the dead letters are there and follow the sidecar; 'Send all again' replays them. The
    screenshot is kept in the test's folder (docs/status-page.png is one of them)."""
    sidecar, client = await custom(ops={"port": free_port()}, upstream={"linger_ms": 20})
    events = make_events(12)
    fake.faults.refuse_ids = {events[0]["id"]}
    async with client.post("/v1/events", json=events) as resp:
        assert resp.status == 202
    await fake.wait_for({e["id"] for e in events[1:]})
    fake.outage(3600)
    async with client.post("/v1/events", json=make_events(5)) as resp:
        assert resp.status == 202

    # Assertions by locator: they poll without eval, which the page's CSP forbids.
    expect = pytest.importorskip("playwright.async_api").expect
    page = await browser.new_page(viewport={"width": 420, "height": 900})  # a phone's width
    await page.goto(sidecar.ops_url + "/")
    await expect(page.locator("#state")).to_contain_text("not answering", timeout=20_000)
    await expect(page.locator("#waiting")).to_have_text("5", timeout=20_000)
    await expect(page.locator("#delivered")).to_have_text("11")
    await expect(page.locator("#dead")).to_contain_text(events[0]["id"], timeout=20_000)
    await expect(page.locator("#dead")).to_contain_text("refused (HTTP 422)")
    # The last error is a sentence of its own, whatever follows it.
    await expect(page.locator("#detail")).to_contain_text(re.compile(r"Last error: [^.]+\."))
    await page.screenshot(path=str(tmp_path / "status-page.png"), full_page=True)

    fake.faults.refuse_ids = set()
    fake.faults.outage_until = 0
    await page.click("#replay")
    await expect(page.locator("#dead tr")).to_have_count(0, timeout=20_000)
    # No dead letters: nothing to send again or delete, no buttons for it.
    await expect(page.locator("#replay")).to_be_hidden()
    await expect(page.locator("#purge")).to_be_hidden()
    await expect(page.locator("#state")).to_contain_text("Delivering normally", timeout=20_000)
    # the adaptive concurrency: how many envelopes may go at once now, under `concurrency`
    await expect(page.locator("#detail")).to_contain_text(
        re.compile(r"Up to [1-4] envelopes at once now, at the platform's pace \(at most 4\)\.")
    )
    await fake.wait_for({events[0]["id"]})
    async with aiohttp.ClientSession() as http, http.get(sidecar.ops_url + "/") as resp:
        assert "default-src 'none'" in resp.headers["Content-Security-Policy"]
        assert "<script" in await resp.text()


@pytest.mark.parametrize(
    ("refusal", "headline"),
    [
        ((404, {"error": "Not Found"}), "endpoint is failing"),
        ((422, {"status": "error", "message": "unknown edApp"}), "refuses every event alike"),
    ],
)
async def test_the_platforms_failures_in_plain_words(
    browser: Any,
    custom: StartSidecar,
    fake: Any,
    refusal: tuple[int, Any],
    headline: str,
) -> None:
    """An endpoint that answers 404 to everything, and a platform that refuses every event
    alike, are each said as what they are, with the platform's answer as the last error."""
    sidecar, client = await custom(ops={"port": free_port()})
    fake.faults.refuse_all = refusal
    async with client.post("/v1/events", json=make_events(20)) as resp:
        assert resp.status == 202
    expect = pytest.importorskip("playwright.async_api").expect
    page = await browser.new_page()
    await page.goto(sidecar.ops_url + "/")
    await expect(page.locator("#state")).to_contain_text(headline, timeout=20_000)
    await expect(page.locator("#detail")).to_contain_text(f"HTTP {refusal[0]}")
    await expect(page.locator("#dead tr")).to_have_count(0)


async def test_a_page_answering_for_the_platform_in_plain_words(
    browser: Any, custom: StartSidecar, fake: Any
) -> None:
    """A school's web filter answering `200` pages for the platform is said as what it is:
    events kept, none delivered, with the start of the page as the last error."""
    sidecar, client = await custom(ops={"port": free_port()})
    fake.faults.web_filter = True
    async with client.post("/v1/events", json=make_events(5)) as resp:
        assert resp.status == 202
    expect = pytest.importorskip("playwright.async_api").expect
    page = await browser.new_page()
    await page.goto(sidecar.ops_url + "/")
    await expect(page.locator("#state")).to_contain_text(
        "Something else answers in the platform's place", timeout=20_000
    )
    await expect(page.locator("#detail")).to_contain_text("blocked by your school's web filter")
    await expect(page.locator("#dead tr")).to_have_count(0)


async def test_a_row_per_destination(browser: Any, platform: RunningFake, tmp_path: Path) -> None:
    """With [[destinations]], a row for each, [upstream] first: a district's endpoint that is
    down says so with its waiting events and last error, the archive delivers; a dead letter
    of the district is listed under its name, and the count is every destination's."""
    district = await start_district()
    settings = with_destinations(
        platform, district, tmp_path, ops={"port": free_port()}, upstream={"linger_ms": 20}
    )
    sidecar = await start(settings)
    try:
        events = make_events(5)
        district.fake.faults.refuse_ids = {events[0]["id"]}
        async with aiohttp.ClientSession(base_url=sidecar.url) as client:
            async with client.post("/v1/events", json=events) as resp:
                assert resp.status == 202
            await district.fake.wait_for({e["id"] for e in events[1:]})
            district.fake.fail_next(503, times=1_000_000)
            async with client.post("/v1/events", json=make_events(3)) as resp:
                assert resp.status == 202

        expect = pytest.importorskip("playwright.async_api").expect
        page = await browser.new_page(viewport={"width": 900, "height": 1000})
        await page.goto(sidecar.ops_url + "/")
        rows = page.locator("#destinations tr")
        await expect(rows).to_have_count(3, timeout=20_000)
        await expect(rows.nth(0)).to_contain_text("upstream (caliper)")
        district_row = page.locator('#destinations tr[data-destination="district-lrs"]')
        await expect(district_row).to_contain_text("not answering", timeout=20_000)
        await expect(district_row).to_contain_text("HTTP 503")
        await expect(district_row.locator("td").nth(2)).to_have_text("3")
        await expect(page.locator('#destinations tr[data-destination="archive"]')).to_contain_text(
            "delivering"
        )
        # at once: the adaptive limit of its ceiling (an archive's is 1)
        await expect(rows.nth(0).locator("td").nth(6)).to_have_text(re.compile(r"^[1-4] of 4$"))
        archive_row = page.locator('#destinations tr[data-destination="archive"]')
        await expect(archive_row.locator("td").nth(6)).to_have_text("1 of 1")
        await expect(page.locator("#dead")).to_contain_text("district-lrs: refused (HTTP 422)")
        await expect(page.locator("#dead-count")).to_have_text("1 dead letter")
        await expect(page.locator("#state")).to_contain_text("Delivering normally")
        await page.screenshot(path=str(tmp_path / "status-page-destinations.png"), full_page=True)
    finally:
        await sidecar.stop()
        await district.close()
