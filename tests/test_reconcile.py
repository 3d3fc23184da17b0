"""Proof at the destination, end to end: a real `run` delivering to the fake Beyond AI, which
answers for every event and silently loses some (`lose_rate`), checked against its listing
(`GET /caliper/events`) automatically (`reconcile.after_s`) and on demand (`caliper-sidecar
reconcile`); on both backends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, cli, eventually, free_port, make_events, write_config
from .outboxes import BACKENDS, empty, fresh_database

EVENTS = 200


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture(params=BACKENDS)
async def outbox(request: pytest.FixtureRequest, tmp_path: Path) -> dict[str, Any]:
    """The config keys of a fresh outbox of this backend."""
    if request.param == "postgres":
        url = request.getfixturevalue("database")
        await empty(url)
        return {"outbox__url": url}
    return {}


def start(
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    outbox: dict[str, Any],
    **extra: Any,
) -> tuple[SidecarProcess, Path]:
    """`run` toward the fake's Beyond AI endpoint, reconciling with these keys."""
    port = free_port()
    config = write_config(
        tmp_path / "sidecar.toml",
        platform,
        tmp_path / "outbox.db",
        port,
        upstream__endpoint=platform.beyond_url,
        upstream__platform="beyond-ai",
        log__level="info",
        **outbox,
        **extra,
    )
    p = SidecarProcess(config, port, tmp_path / "sidecar.log")
    processes.append(p)
    return p, config


async def send(url: str, events: list[dict[str, Any]]) -> None:
    async with aiohttp.ClientSession() as http:
        for i in range(0, len(events), 50):
            async with http.post(f"{url}/v1/events", json=events[i : i + 50]) as resp:
                assert resp.status == 202, await resp.text()


async def get_json(url: str) -> Any:
    async with aiohttp.ClientSession() as http, http.get(url) as resp:
        return await resp.json()


async def test_a_platform_that_loses_a_tenth_holds_everything_after_reconciliation(
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    outbox: dict[str, Any],
) -> None:
    """reconcile.after_s set: what the platform answered for and lost is found missing by a
    check and sent again, until the platform holds every event; journeys and metrics say so."""
    platform.fake.faults.lose_rate = 0.1
    p, _ = start(tmp_path, platform, processes, outbox, reconcile__after_s=0.3)
    await p.wait_ready()
    events = make_events(EVENTS)
    ids = {e["id"] for e in events}
    await send(p.url, events)
    await eventually(lambda: ids <= platform.fake.received.keys(), timeout=60)
    lost = platform.fake.lost
    assert 0 < len(lost) < EVENTS  # the fault did lose some, and not everything
    one = next(iter(lost))
    journey = await get_json(f"{p.url}/v1/events/{one}")
    assert [m["what"] for m in journey["marks"]][:2] == ["missing", "resent"]

    async def resent_counted() -> bool:
        status = await get_json(f"{p.url}/v1/status")
        reconcile = status["reconcile"]
        return bool(reconcile["resent_total"] >= len(lost) and reconcile["held_total"] > 0)

    await eventually(resent_counted, timeout=30)
    async with aiohttp.ClientSession() as http, http.get(f"{p.url}/metrics") as resp:
        text = await resp.text()
    assert 'caliper_sidecar_reconcile_events_total{result="resent"}' in text
    # a re-sent event is checked again after its second delivery, and verified then
    await eventually(lambda: _verified(p.url, one), timeout=30)
    kept = next(i for i in ids if i not in lost)
    await eventually(lambda: _verified(p.url, kept), timeout=30)
    assert "reconcile_missing" in p.events()
    assert await p.terminate() == 0


async def _verified(url: str, event_id: str) -> bool:
    journey = await get_json(f"{url}/v1/events/{event_id}")
    return "verified" in [m["what"] for m in journey.get("marks", [])]


async def test_reconcile_on_demand_resends_what_the_platform_lost(
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    outbox: dict[str, Any],
) -> None:
    """`caliper-sidecar reconcile` beside `run`: --dry-run reports the missing (exit 1) and
    changes nothing; without it they are sent again, and the platform holds them all."""
    platform.fake.faults.lose_rate = 0.1
    p, config = start(tmp_path, platform, processes, outbox, reconcile__after_s=86400)
    await p.wait_ready()
    events = make_events(EVENTS)
    ids = {e["id"] for e in events}
    await send(p.url, events)

    async def answered() -> bool:
        return len(platform.fake.received) + len(platform.fake.lost) >= EVENTS

    await eventually(answered, timeout=60)
    await eventually(lambda: _drained(config), timeout=30)
    lost = set(platform.fake.lost)
    assert lost
    assert not lost & platform.fake.received.keys()

    code, out, err = await cli("reconcile", "--dry-run", "-c", str(config))
    assert code == 1, (out, err)
    assert _counts(out) == {"checked": EVENTS, "held": EVENTS - len(lost), "missing": len(lost)}
    assert "re-sent  0" in out
    assert not lost & platform.fake.received.keys()

    code, out, err = await cli("reconcile", "--since", "2000-01-01T00:00:00Z", "-c", str(config))
    assert code == 0, (out, err)
    assert _counts(out)["missing"] == len(lost)
    assert f"re-sent  {len(lost)}" in out
    await eventually(lambda: ids <= platform.fake.received.keys(), timeout=30)
    # what it found is recorded: a check now finds nothing missing
    code, out, _ = await cli("reconcile", "--dry-run", "-c", str(config))
    assert (code, _counts(out)["missing"]) == (0, 0), out
    # an eventTime range that holds none of them checks none
    code, out, _ = await cli("reconcile", "--until", "2000-01-01T00:00:00Z", "-c", str(config))
    assert (code, _counts(out)["checked"]) == (0, 0), out


async def _drained(config: Path) -> bool:
    code, out, _ = await cli("outbox", "stats", "--json", "-c", str(config))
    return code == 0 and json.loads(out)["events"] == 0


def _counts(out: str) -> dict[str, int]:
    counts = {}
    for line in out.splitlines():
        words = line.split()
        if len(words) >= 2 and words[0] in ("checked", "held", "missing") and words[1].isdigit():
            counts[words[0]] = int(words[1])
    return counts


async def test_an_event_never_held_is_given_up_and_reported(
    tmp_path: Path,
    platform: RunningFake,
    processes: list[SidecarProcess],
    outbox: dict[str, Any],
) -> None:
    """An event the platform loses however often it is sent: re-sent until give_up_s, then
    reported (status, metric, journey, an error log line), and never sent again."""
    events = make_events(3)
    doomed = events[1]["id"]
    platform.fake.faults.lose_ids = {doomed}
    p, _ = start(
        tmp_path,
        platform,
        processes,
        outbox,
        reconcile__after_s=0.2,
        reconcile__give_up_s=1.0,
    )
    await p.wait_ready()
    await send(p.url, events)

    async def given_up() -> bool:
        journey = await get_json(f"{p.url}/v1/events/{doomed}")
        return "given_up" in [m["what"] for m in journey.get("marks", [])]

    await eventually(given_up, timeout=30)
    status = await get_json(f"{p.url}/v1/status")
    assert status["reconcile"]["given_up_total"] == 1
    assert "reconcile_given_up" in p.events()
    arrivals = platform.fake.lost_arrivals[doomed]
    assert arrivals >= 2  # sent, found missing, re-sent at least once
    await asyncio.sleep(1.5)  # several rounds: a given-up event is not sent again
    assert platform.fake.lost_arrivals[doomed] == arrivals
    assert doomed not in platform.fake.received


async def test_reconcile_is_not_available_toward_learnwith(
    tmp_path: Path, platform: RunningFake
) -> None:
    """LearnWith.AI lists nothing: the command and check-config say so, exit 2."""
    config = write_config(
        tmp_path / "sidecar.toml",
        platform,
        tmp_path / "outbox.db",
        free_port(),
        upstream__endpoint=platform.learnwith_url,
        upstream__platform="learnwith-ai",
    )
    code, _, err = await cli("reconcile", "-c", str(config))
    assert code == 2
    assert "LearnWith.AI lists nothing" in err
    config.write_text(config.read_text() + "[reconcile]\nafter_s = 3600\n")
    code, _, err = await cli("check-config", "-c", str(config))
    assert code == 2
    assert "reconcile.after_s" in err
    assert "lists nothing" in err


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--since", "yesterday"], "'yesterday' is not a time"),
        (["--since", "2h", "--until", "3h"], "--until 3h is not after --since 2h"),
        (["--until", "2026-13-01T00:00:00Z"], "no such date"),
    ],
)
async def test_reconcile_refuses_times_it_cannot_read(
    tmp_path: Path, platform: RunningFake, args: list[str], message: str
) -> None:
    config = write_config(
        tmp_path / "sidecar.toml",
        platform,
        tmp_path / "outbox.db",
        free_port(),
        upstream__endpoint=platform.beyond_url,
    )
    code, out, err = await cli("reconcile", *args, "-c", str(config))
    assert (code, out) == (2, "")
    assert message in err
