"""`run` replicas on one PostgreSQL outbox with [[destinations]], as real processes: a
destination's leases hold across replicas as [upstream]'s do (tests/test_replicas.py).
Skipped, saying why, where no PostgreSQL server answers."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from caliper_sidecar.outbox.postgres.schema import SCHEMA
from caliper_sidecar.tools.fake_timeback import RunningFake

from .conftest import SidecarProcess, eventually, free_port, make_events, write_config
from .destinations import DISTRICT_TOKEN, start_district
from .outboxes import empty, fresh_database
from .test_replicas import post

#: the replicas' timeouts ([upstream]'s and the district's), and the lease they make
TIMEOUT_S = 2
LEASE_S = 2 * TIMEOUT_S + 5


@pytest.fixture(scope="module")
def database() -> Iterator[str]:
    with fresh_database() as url:
        yield url


@pytest.fixture
async def shared(database: str) -> str:
    """The module's database, emptied for this test."""
    await empty(database)
    return database


@pytest.fixture
async def district() -> AsyncIterator[RunningFake]:
    running = await start_district()
    yield running
    await running.close()


def replica(
    tmp_path: Path,
    platform: RunningFake,
    district: RunningFake,
    processes: list[SidecarProcess],
    url: str,
    name: str,
) -> SidecarProcess:
    """A `run` replica on the shared outbox (as tests/test_replicas.py's) with the district's
    endpoint as the destination "district-lrs"."""
    port = free_port()
    settings: dict[str, Any] = {"outbox__url": url, "upstream__timeout_s": TIMEOUT_S}
    config = write_config(
        tmp_path / f"{name}.toml", platform, tmp_path / "unused.db", port, **settings
    )
    config.write_text(
        config.read_text() + '\n[[destinations]]\nname = "district-lrs"\nkind = "caliper"\n'
        f'endpoint = "{district.events_url}"\nbearer_token = "{DISTRICT_TOKEN}"\n'
        f"linger_ms = 20\ntimeout_s = {TIMEOUT_S}\nbatch_max_events = 20\n"
    )
    process = SidecarProcess(config, port, tmp_path / f"{name}.log")
    processes.append(process)
    return process


async def leased(url: str) -> set[str]:
    """The ids of the destination's events under a claim now."""
    conn = await asyncpg.connect(url)
    try:
        rows = await conn.fetch(
            f"SELECT e.id FROM {SCHEMA}.destination_batches b, unnest(b.seqs) s "
            f"JOIN {SCHEMA}.events e ON e.seq = s WHERE b.claimed_by IS NOT NULL"
        )
    finally:
        await conn.close()
    return {r["id"] for r in rows}


class TestDestinationLeases:
    async def test_a_replica_killed_holding_a_destination_lease(
        self,
        tmp_path: Path,
        platform: RunningFake,
        district: RunningFake,
        processes: list[SidecarProcess],
        shared: str,
    ) -> None:
        """A replica SIGKILLed with envelopes in flight to a destination: its leases there
        outlive it (none of those events reaches the destination before the lease can have
        run out); then the other replica sends them; every event reaches the destination,
        and [upstream] gets every event regardless."""
        # The dead replica's envelopes are answered (their events recorded) only after its
        # leases have run out: what reaches the district before is what the live one sends.
        district.fake.faults.latency_s = 2 * LEASE_S
        a = replica(tmp_path, platform, district, processes, shared, "a")
        await a.wait_ready()
        events = make_events(200)
        ids = {e["id"] for e in events}
        posted_at = time.monotonic()
        for start in range(0, 200, 50):
            await post(a.url, events[start : start + 50])
        await eventually(lambda: district.fake.requests_arrived > 0, timeout=20)
        a.kill()
        held = await leased(shared)
        assert held  # the dead replica's claims: leases, not given back
        district.fake.faults.latency_s = 0
        b = replica(tmp_path, platform, district, processes, shared, "b")
        await b.wait_ready()
        first_seen: dict[str, float] = {}

        async def all_there() -> bool:
            now = time.monotonic()
            for id_ in held & district.fake.received.keys():
                first_seen.setdefault(id_, now)
            return ids <= district.fake.received.keys()

        await eventually(all_there, timeout=60)
        await platform.fake.wait_for(ids, timeout=30)
        assert min(first_seen.values()) >= posted_at + LEASE_S - 0.5
        assert district.fake.duplicates <= 4 * 20  # what the dead one had in flight
        assert await leased(shared) == set()
        assert await b.terminate() == 0
