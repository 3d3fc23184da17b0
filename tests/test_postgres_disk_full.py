"""A PostgreSQL outbox whose disk filled (docs/operators.md): ingest refuses (503 disk_full), and
once the platform is back the backlog drains, nothing lost, and ingest accepts again on its own.

The outbox's tables live on a small tmpfs tablespace, as a database on a small volume: what
fills is the tables' own disk, the WAL stays on the server's. Skipped, saying why, where no tmpfs
can be mounted or no local PostgreSQL server can use it."""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import subprocess
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg
import pytest

from caliper_sidecar.app import start
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import eventually, make_event, settings_for
from .outboxes import SERVER, admin, fresh_database

#: small enough to fill in seconds, large enough for the schema and a few thousand events
TABLESPACE_MB = 12


def random_events(n: int) -> list[dict[str, Any]]:
    """Events that do not compress (PostgreSQL would squeeze repeated padding to nothing)."""
    return [
        make_event(extensions={"pad": base64.b64encode(os.urandom(1500)).decode()})
        for _ in range(n)
    ]


@pytest.fixture
def small_database() -> Iterator[str]:
    """A fresh database whose tables are created on a TABLESPACE_MB tmpfs (outside pytest's
    private temporary folder: the server's own user must reach it)."""
    home = Path(tempfile.mkdtemp(prefix="caliper-sidecar-tablespace-"))
    home.chmod(0o755)
    mount = home / "disk"
    mount.mkdir()
    made = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={TABLESPACE_MB}m,mode=0700", "tmpfs", str(mount)],
        capture_output=True,
        check=False,
    )
    if made.returncode != 0:
        pytest.skip("cannot mount a tmpfs here (root only)")
    tablespace = f"sidecar_small_{uuid.uuid4().hex[:8]}"
    try:
        shutil.chown(mount, user="postgres")
        admin(f"CREATE TABLESPACE {tablespace} LOCATION '{mount}'")
    except (LookupError, OSError, asyncpg.PostgresError) as e:
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(home, ignore_errors=True)
        pytest.skip(f"the PostgreSQL server at {SERVER} cannot use a local tablespace: {e}")
    try:
        with fresh_database() as url:
            name = url.rsplit("/", 1)[1]
            admin(f'ALTER DATABASE "{name}" SET default_tablespace = {tablespace}')
            yield url
    finally:
        admin(f"DROP TABLESPACE IF EXISTS {tablespace}")
        subprocess.run(["umount", "-l", str(mount)], check=False)
        shutil.rmtree(home, ignore_errors=True)


async def post(url: str, events: list[dict[str, Any]]) -> tuple[int, str]:
    async with aiohttp.ClientSession() as http, http.post(f"{url}/v1/events", json=events) as resp:
        return resp.status, await resp.text()


async def test_a_database_whose_disk_filled_keeps_draining_once_the_platform_is_back(
    small_database: str, tmp_path: Path, platform: RunningFake
) -> None:
    platform.fake.outage(3600)
    settings = settings_for(
        platform, tmp_path, outbox={"url": small_database, "synchronous": "full"}
    )
    sidecar = await start(settings)
    try:
        acknowledged: set[str] = set()
        for _ in range(TABLESPACE_MB * 100):
            events = random_events(20)
            status, body = await post(sidecar.url, events)
            if status != 202:
                break
            acknowledged.update(str(e["id"]) for e in events)
        else:
            raise AssertionError("the tablespace never filled")
        assert (status, '"disk_full"' in body) == (503, True), body
        assert len(acknowledged) > 1000  # the disk, not something else, refused

        platform.fake.faults.outage_until = 0
        await platform.fake.wait_for(acknowledged, timeout=90)
        await sidecar.dispatcher.drained(timeout=30)

        async def accepted_again() -> bool:
            return (await post(sidecar.url, random_events(1)))[0] == 202

        await eventually(accepted_again, timeout=60)
        assert (await sidecar.outbox.stats()).dead_letters == 0
    finally:
        await sidecar.stop()
        await asyncio.sleep(0)
