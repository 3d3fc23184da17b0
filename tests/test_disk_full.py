"""A full disk: 503 with Retry-After, one clear log line, nothing acknowledged lost, nothing
corrupted, and recovery on its own when space returns."""

from __future__ import annotations

import asyncio
import sqlite3
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from caliper_sidecar.app import Sidecar, start
from caliper_sidecar.config import OutboxSettings
from caliper_sidecar.exceptions import OutboxUnavailable
from caliper_sidecar.outbox import NewEvent, sqlite_outbox
from caliper_sidecar.outbox.sqlite.storage import SqliteStorage
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import (
    SidecarProcess,
    eventually,
    free_port,
    make_event,
    new_id,
    settings_for,
    write_config,
)
from .disks import fill_disk, tmpfs


def padded_events(n: int) -> list[dict[str, object]]:
    return [make_event(extensions={"pad": "x" * 2000}) for _ in range(n)]


async def post(url: str, events: list[dict[str, object]]) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/events", json=events) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def fill_until_refused(url: str, acknowledged: set[str]) -> tuple[int, dict[str, str], str]:
    """Post until the sidecar refuses; returns the refusal (1 KB pages hold these 2 KB events
    in less room than 4 KB pages did: the bound is far above what fills 64 MiB)."""
    for _ in range(2000):
        events = padded_events(20)
        status, headers, body = await post(url, events)
        if status == 202:
            acknowledged.update(str(e["id"]) for e in events)
        else:
            return status, headers, body
    raise AssertionError("the disk never filled")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 64 MiB tmpfs: a filesystem that really fills (root only; skipped elsewhere)."""
    with tmpfs(tmp_path, "64m", "test_capped_database covers SQLITE_FULL") as mount:
        yield mount


async def test_disk_filled_by_something_else(
    small_disk: Path, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """The real process, its disk filled to the last byte by another program: 503 disk_full
    with Retry-After, readiness down, one error line; when space returns it accepts again,
    and every acknowledged event arrives, without a storm of re-sends."""
    platform.fake.outage(3600)
    port = free_port()
    outbox = small_disk / "outbox.db"
    p = SidecarProcess(
        write_config(tmp_path / "c.toml", platform, outbox, port), port, tmp_path / "run.log"
    )
    processes.append(p)
    await p.wait_ready()
    acknowledged: set[str] = set()
    for _ in range(20):
        events = padded_events(20)
        assert (await post(p.url, events))[0] == 202
        acknowledged.update(str(e["id"]) for e in events)
    # The background checkpoint has copied them from the WAL into the database file.
    await eventually(lambda: outbox.stat().st_size > len(acknowledged) * 2000, timeout=30)

    filler = small_disk / "filler"
    fill_disk(filler)
    status, headers, body = await post(p.url, padded_events(20))
    assert status == 503, body
    assert '"disk_full"' in body
    assert int(headers["Retry-After"]) > 0
    async with aiohttp.ClientSession() as http, http.get(f"{p.url}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["reason"] == "disk_full"
    for _ in range(3):
        assert (await post(p.url, padded_events(20)))[0] == 503

    sent_before = platform.fake.requests_arrived
    platform.fake.faults.outage_until = 0  # deliveries start while the disk is still full
    await eventually(lambda: platform.fake.requests_arrived > sent_before + 1)
    filler.unlink()  # space returns

    async def accepted_again() -> bool:
        events = padded_events(1)
        status, _, _ = await post(p.url, events)
        if status == 202:
            acknowledged.update(str(e["id"]) for e in events)
        return status == 202

    await eventually(accepted_again, timeout=30)
    await platform.fake.wait_for(acknowledged, timeout=60)
    assert await p.terminate() == 0
    logged = p.events()
    assert logged.count("outbox_write_failing") >= 1
    # An outcome that cannot be written is retried after a backoff, never in a tight loop.
    assert logged.count("outcome_not_recorded") < 50
    assert platform.fake.duplicates <= len(acknowledged)
    conn = sqlite3.connect(outbox)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


async def test_reserve_keeps_room_for_deliveries(tmp_path: Path) -> None:
    """New events are refused while less than the reserve is free; what is queued stays."""
    async with sqlite_outbox(
        OutboxSettings(path=str(tmp_path / "o.db")), reserve_bytes=2**62
    ) as box:
        with pytest.raises(OutboxUnavailable) as refused:
            await box.append([NewEvent(new_id(), b"{}")])
        assert refused.value.reason == "disk_full"
        assert "MiB free" in str(refused.value)
        assert box.unwritable_reason() == "disk_full"


async def test_capped_database(sidecar: Sidecar, platform: RunningFake) -> None:
    """SQLITE_FULL from a capped database behaves the same, in every environment."""
    platform.fake.outage(3600)
    assert isinstance(sidecar.outbox.storage, SqliteStorage)
    # The cap is set on the outbox's own writer connection, on purpose: it is per connection,
    # and the small-disk tests that need no private access need root for a tmpfs.
    writer = sidecar.outbox.storage._writer
    pages = await writer.run(lambda c: c.execute("PRAGMA page_count").fetchone()[0])
    await writer.run(lambda c: c.execute(f"PRAGMA max_page_count = {pages + 20}"))
    acknowledged: set[str] = set()
    with capture_logs() as logs:
        status, headers, body = await fill_until_refused(sidecar.url, acknowledged)
        assert (status, '"disk_full"' in body) == (503, True)
        assert headers["Retry-After"]
        await post(sidecar.url, padded_events(20))
        await writer.run(lambda c: c.execute("PRAGMA max_page_count = 1000000"))
        status, _, answer = await post(sidecar.url, padded_events(1))
        assert status == 202, answer
    events = [entry["event"] for entry in logs if entry["event"].startswith("outbox_")]
    assert events == ["outbox_write_failing", "outbox_writable_again"]
    stats = await sidecar.outbox.stats()
    assert stats.events == len(acknowledged) + 1
    platform.fake.faults.outage_until = 0
    await platform.fake.wait_for(acknowledged, timeout=30)
    await asyncio.sleep(0)


async def test_disk_filled_by_the_outbox_itself_accepts_again_once_drained(
    small_disk: Path, tmp_path: Path, platform: RunningFake
) -> None:
    """Hardening #1. An outage fills the outbox's own disk to the reserve (503 disk_full); the
    platform comes back and the backlog drains: the sidecar accepts events again on its own.
    (The free-space check refused before any write, so the sidecar's own WAL, which only a
    failed write would truncate, held the space for good.)"""
    platform.fake.outage(3600)
    settings = settings_for(platform, small_disk, outbox={"synchronous": "full"})
    sidecar = await start(settings)
    try:
        acknowledged: set[str] = set()
        status, _, body = await fill_until_refused(sidecar.url, acknowledged)
        assert (status, '"disk_full"' in body) == (503, True)
        platform.fake.faults.outage_until = 0
        await platform.fake.wait_for(acknowledged, timeout=60)
        await sidecar.dispatcher.drained(timeout=30)

        async def accepted_again() -> bool:
            return (await post(sidecar.url, padded_events(1)))[0] == 202

        await eventually(accepted_again, timeout=30)
        async with aiohttp.ClientSession() as http, http.get(f"{sidecar.url}/readyz") as resp:
            assert resp.status == 200
    finally:
        await sidecar.stop()
