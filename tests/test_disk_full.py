"""A full disk: 503 with Retry-After, one clear log line, nothing acknowledged lost, nothing
corrupted, and recovery on its own when space returns."""

from __future__ import annotations

import asyncio
import sqlite3
import subprocess
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
from structlog.testing import capture_logs

from sidecar.app import Sidecar
from sidecar.mock_upstream import RunningFake

from .conftest import SidecarProcess, eventually, free_port, make_event, write_config


def padded_events(n: int) -> list[dict[str, object]]:
    return [make_event(extensions={"pad": "x" * 2000}) for _ in range(n)]


async def post(url: str, events: list[dict[str, object]]) -> tuple[int, dict[str, str], str]:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/events", json=events) as resp:
        return resp.status, dict(resp.headers), await resp.text()


async def fill_until_refused(url: str, acknowledged: set[str]) -> tuple[int, dict[str, str], str]:
    """Post until the sidecar refuses; returns the refusal."""
    for _ in range(400):
        events = padded_events(20)
        status, headers, body = await post(url, events)
        if status == 202:
            acknowledged.update(str(e["id"]) for e in events)
        else:
            return status, headers, body
    raise AssertionError("the disk never filled")


@pytest.fixture
def small_disk(tmp_path: Path) -> Iterator[Path]:
    """A 2 MiB tmpfs: a really full filesystem (root only; skipped elsewhere)."""
    mount = tmp_path / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a small tmpfs here; test_capped_database covers SQLITE_FULL")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


async def test_really_full_filesystem(
    small_disk: Path, tmp_path: Path, platform: RunningFake, processes: list[SidecarProcess]
) -> None:
    """The real process on a full tmpfs: 503 disk_full with Retry-After, readiness down, one
    error line; after space returns it accepts again and every acknowledged event arrives."""
    filler = small_disk / "filler"
    filler.write_bytes(b"\0" * 700_000)
    platform.fake.outage(3600)
    port = free_port()
    outbox = small_disk / "outbox.db"
    config = write_config(tmp_path / "c.toml", platform, outbox, port)
    p = SidecarProcess(config, port, tmp_path / "run.log")
    processes.append(p)
    await p.wait_ready()
    acknowledged: set[str] = set()

    status, headers, body = await fill_until_refused(p.url, acknowledged)
    assert status == 503, body
    assert '"disk_full"' in body
    assert int(headers["Retry-After"]) > 0
    assert acknowledged
    async with aiohttp.ClientSession() as http, http.get(f"{p.url}/readyz") as resp:
        assert resp.status == 503
        assert (await resp.json())["reason"] == "disk_full"
    for _ in range(3):  # more refusals: still one log line
        assert (await post(p.url, padded_events(20)))[0] == 503

    filler.unlink()  # space returns

    async def accepted_again() -> bool:
        events = padded_events(1)
        status, _, _ = await post(p.url, events)
        if status == 202:
            acknowledged.update(str(e["id"]) for e in events)
        return status == 202

    await eventually(accepted_again)
    platform.fake.faults.outage_until = 0
    await platform.fake.wait_for(acknowledged, timeout=60)
    assert await p.terminate() == 0
    assert p.events().count("outbox_write_failing") == 1
    assert p.events().count("outbox_writable_again") == 1
    conn = sqlite3.connect(outbox)
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


async def test_capped_database(sidecar: Sidecar, platform: RunningFake) -> None:
    """SQLITE_FULL from a capped database behaves the same, in every environment."""
    platform.fake.outage(3600)
    ingest = sidecar.outbox._ingest
    assert ingest is not None
    cur = await ingest.execute("PRAGMA page_count")
    row = await cur.fetchone()
    assert row is not None
    await ingest.execute(f"PRAGMA max_page_count = {row[0] + 20}")
    acknowledged: set[str] = set()
    with capture_logs() as logs:
        status, headers, body = await fill_until_refused(sidecar.url, acknowledged)
        assert (status, '"disk_full"' in body) == (503, True)
        assert headers["Retry-After"]
        await post(sidecar.url, padded_events(20))
        await ingest.execute("PRAGMA max_page_count = 1000000")
        status, _, _ = await post(sidecar.url, padded_events(1))
        assert status == 202
    events = [entry["event"] for entry in logs if entry["event"].startswith("outbox_")]
    assert events == ["outbox_write_failing", "outbox_writable_again"]
    stats = await sidecar.outbox.stats()
    assert stats.events == len(acknowledged) + 1
    platform.fake.faults.outage_until = 0
    await platform.fake.wait_for(acknowledged, timeout=30)
    await asyncio.sleep(0)
