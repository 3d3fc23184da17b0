"""`caliper-sidecar demo`: the whole path on one machine, with no config and no network.

A fake TimeBack and a sidecar pointed at it start on free ports with a temporary outbox; the
sample events of the TimeBack reference are sent for a few students; the platform goes down
for a while and comes back; the demo shows the backlog drain and checks that every event
arrived.
"""

from __future__ import annotations

import asyncio
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import TextIO

import aiohttp

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.config import (
    LogSettings,
    OAuthSettings,
    OutboxSettings,
    ReceiverSettings,
    RetrySettings,
    Settings,
    UpstreamSettings,
)
from caliper_sidecar.logs import configure_logging
from caliper_sidecar.tools.fake_timeback import FakeTimeBack, start_fake
from caliper_sidecar.tools.samples import sample_events

STUDENTS = 6
OUTAGE_S = 3.0


async def run_demo(
    out: TextIO = sys.stdout, students: int = STUDENTS, outage_s: float = OUTAGE_S
) -> int:
    """Run the demo; returns the exit code (0 when every event was delivered)."""
    configure_logging("error", "console")
    # Short-lived tokens, so that the demo also shows them being renewed.
    fake = FakeTimeBack(token_ttl_s=4)
    platform = await start_fake(fake)
    with tempfile.TemporaryDirectory(prefix="caliper-sidecar-demo-") as tmp:
        settings = Settings(
            receiver=ReceiverSettings(port=0),
            outbox=OutboxSettings(path=str(Path(tmp) / "outbox.db")),
            upstream=UpstreamSettings(
                endpoint=platform.events_url, linger_ms=100, sensor="https://learningapp.com/sensor"
            ),
            oauth=OAuthSettings(
                token_url=platform.token_url,
                client_id=fake.client_id,
                client_secret=fake.client_secret,
            ),
            retry=RetrySettings(initial_backoff_s=0.25, max_backoff_s=1.0),
            log=LogSettings(level="error", format="console"),
        )
        sidecar = await start(settings)
        try:
            return await _story(out, fake, sidecar, students, outage_s)
        finally:
            await sidecar.stop()
            await platform.close()


async def _story(
    out: TextIO, fake: FakeTimeBack, sidecar: Sidecar, students: int, outage_s: float
) -> int:
    def say(text: str = "") -> None:
        print(text, file=out, flush=True)

    say("caliper-sidecar demo")
    say(f"  fake TimeBack   {fake.token_ttl_s:.0f}-second OAuth tokens, strict envelope checks")
    say(f"  sidecar         {sidecar.url}  (outbox in a temporary directory)")
    say()
    sent: set[str] = set()
    started = time.monotonic()
    async with aiohttp.ClientSession(base_url=sidecar.url) as http:
        half = students // 2
        say(f"1. The learning app sends the TimeBack sample events for {half} students")
        for n in range(half):
            sent |= await _send_student(http, n + 1, say)
        await _watch(say, fake, sidecar, sent, "delivering")
        say()
        say(f"2. TimeBack goes down for {outage_s:.0f} s; the app keeps sending")
        fake.outage(outage_s)
        for n in range(half, students):
            sent |= await _send_student(http, n + 1, say)
        await _watch(say, fake, sidecar, sent, "waiting out the outage", until=outage_s)
        say()
        say("3. TimeBack is back; the backlog drains")
        await _watch(say, fake, sidecar, sent, "draining")
        async with http.get("/v1/status") as resp:
            status = await resp.json()
    missing = sent - fake.received.keys()
    outbox = status["outbox"]
    say()
    say("Summary")
    say(f"  events sent by the app      {len(sent)}")
    say(f"  delivered to TimeBack       {len(sent) - len(missing)}")
    say(f"  dead-lettered               {outbox['dead_lettered_total']}")
    say(f"  still waiting               {outbox['events']}")
    say(f"  duplicates upstream         {fake.duplicates}")
    say(f"  OAuth tokens fetched        {fake.token_requests}")
    say(f"  envelopes accepted          {fake.envelopes}")
    say(f"  time                        {time.monotonic() - started:.1f} s")
    if missing or outbox["dead_lettered_total"]:
        say(f"FAILED: {len(missing)} event(s) did not reach TimeBack")
        return 1
    say("OK: every event reached TimeBack")
    return 0


async def _send_student(http: aiohttp.ClientSession, n: int, say: Callable[..., None]) -> set[str]:
    events = sample_events()
    async with http.post("/v1/events", json=events) as resp:
        body = await resp.json()
    if resp.status != 202:
        raise RuntimeError(f"the sidecar answered {resp.status}: {body}")
    say(
        f"   student {n}: POST /v1/events {len(events)} events -> {resp.status} "
        f"accepted={body['accepted']}"
    )
    return {e["id"] for e in events}


async def _watch(
    say: Callable[..., None],
    fake: FakeTimeBack,
    sidecar: Sidecar,
    sent: set[str],
    doing: str,
    until: float | None = None,
    timeout: float = 60.0,
) -> None:
    """Print progress until every sent event arrived (or, with `until`, for that long)."""
    started = time.monotonic()
    while time.monotonic() - started < timeout:
        stats = await sidecar.outbox.stats()
        delivered = len(sent & fake.received.keys())
        say(
            f"   {doing}: outbox {stats.events:3d} waiting | TimeBack has {delivered:3d}/"
            f"{len(sent)} | upstream {sidecar.dispatcher.state.value}"
        )
        if until is None and delivered == len(sent) and stats.events == 0:
            return
        if until is not None and time.monotonic() - started >= until:
            return
        await asyncio.sleep(0.5)
    raise TimeoutError("the demo's events were not delivered in time")
